"""`event-replay refill`: the ingestion refill, a run of its refill job over some days."""

from __future__ import annotations

import os
import sys
import time

from replay_defs.cli_common import (
    days_between,
    ensure_dagster_home,
    exit_if_failed,
    failed_steps,
    run_in_process,
    run_status,
)
from replay_defs.core.redact import redact


def register(sub) -> None:
    """Add this system's command to `event-replay`'s subparsers."""
    f = sub.add_parser(
        "refill",
        help="re-enqueue ingestion jobs for the event objects PUT on some days (ingestion refill)",
        description="Collect the keys of the objects PUT on the days (from an access-log CSV, S3 access log files or a "
        "listing), validate and de-duplicate them, and enqueue one BullMQ job per key into the refill's queue "
        "(EVENT_REPLAY_REDIS_URL). Keys already enqueued by an earlier refill are skipped unless --force. "
        "Local sources are read only under EVENT_REPLAY_REFILL_ROOTS (colon-separated directories; default: the "
        "lake root EVENT_REPLAY_LAKE and the current directory), checked after resolving symlinks; anything else "
        "fails before it is read. Bad rows (including a line with an unterminated quote or over 1 MiB, each alone) "
        "go to the day's quarantine with their reason and a sample; logs and errors never show the file's content. "
        "Only successful PUTs (2xx) are writes: a failed one is quarantined as not_written:<status>. Keys of the logs "
        "and of an Athena export are URL-decoded the same way (twice, as S3 logs them), so both give the same job; "
        "one still holding % or + after that could be two objects and is quarantined as ambiguous_key_encoding. "
        "A day without an access log file is reported (stderr, metadata); a location with none fails. With times in --start/--end "
        "(e.g. --start 2025-07-09T00:30:00 --end 2025-07-09T07:45:00, UTC), only the records in [start, end) count; "
        "the days are still whole partitions, the window clips the first and last.",
    )
    f.add_argument("--refill", default="ingestion_refill", help="the RefillSpec's name (default ingestion_refill)")
    f.add_argument(
        "--source",
        choices=["csv", "access_logs", "listing"],
        default="csv",
        help='csv: export with header "operation","key" (optional "requestdatetime", "httpstatus"); access_logs: '
        "S3 server access log files, simple (<prefix>YYYY-mm-DD-HH-MM-SS-<id>) or date-partitioned "
        "(<prefix><account>/<region>/<bucket>/YYYY/MM/DD/...) layout; listing: objects last modified on the day "
        "(default csv)",
    )
    f.add_argument(
        "--location",
        required=True,
        help="CSV path or s3:// URI; log directory or s3://bucket/prefix; s3://bucket/prefix to "
        "list. A local path must resolve under EVENT_REPLAY_REFILL_ROOTS (default: the lake root and the current directory)",
    )
    f.add_argument(
        "--start",
        required=True,
        help="first day (YYYY-MM-DD) of the access-log records, or a time (YYYY-MM-DDTHH:MM:SS, UTC unless an offset "
        "is given) from which records count",
    )
    f.add_argument(
        "--end",
        help="last day, included (default: start's day); or a time, excluded, before which records count. Several "
        "days, or a time in either, need request times (a CSV's requestdatetime column)",
    )
    f.add_argument("--dry-run", action="store_true", help="collect and count, enqueue nothing")
    f.add_argument("--limit", type=int, help="enqueue at most N jobs")
    f.add_argument("--force", action="store_true", help="enqueue again keys an earlier refill enqueued (new job ids)")
    f.add_argument("--rate-limit", type=float, help="at most N jobs per second")
    f.add_argument("--batch-size", type=int, help="jobs per ledger lookup and Redis round trip (default 10000)")
    f.set_defaults(fn=cmd_refill)


def cmd_refill(args) -> None:
    """Collect the keys of the days from the access logs and enqueue one ingestion job per key."""
    ensure_dagster_home()
    from replay_defs.pipelines import served

    refills = served()[1]
    spec = next((r for r in refills if r.name == args.refill), None)
    if spec is None:
        raise SystemExit(f"no refill {args.refill!r}; known: {', '.join(r.name for r in refills)}")
    days, window = run_days(args.start, args.end)
    t0 = time.time()
    result = run_in_process(f"{spec.name}_replay", refill_config(spec, args, window), days=days)
    print(f"run {result.run_id}: {run_status(result)} in {time.time() - t0:.1f}s")
    if not result.success:
        failure = next(iter(failed_steps(result)), None)
        if failure is not None:
            print(redact(f"  {failure.step_key}: {failure.event_specific_data.error.message.strip()}"), file=sys.stderr)
    print_refill_table(spec, result, days, args.dry_run)
    exit_if_failed(result)


def run_days(start: str, end: str | None) -> tuple[list[str], tuple[str, str] | None]:
    """The days of the run and, when --start or --end has a time of day, the window [start, end)."""
    from datetime import datetime, timedelta

    from replay_defs.ingestion_refill.access_logs import parse_time

    def is_day(text: str | None) -> bool:
        return text is None or len(text.strip()) == 10

    if is_day(start) and is_day(end):
        return days_between(start, end or start), None
    try:
        ws = parse_time(start)
        if end is None:
            we = datetime.combine(ws.date() + timedelta(days=1), datetime.min.time(), ws.tzinfo)
        elif is_day(end):
            we = parse_time(end) + timedelta(days=1)  # a day is included whole
        else:
            we = parse_time(end)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if we <= ws:
        raise SystemExit(f"end {we.isoformat()} is not after start {ws.isoformat()}")
    last = (we - timedelta(microseconds=1)).date()
    return days_between(ws.date().isoformat(), last.isoformat()), (ws.isoformat(), we.isoformat())


def refill_config(spec, args, window: tuple[str, str] | None = None) -> dict:
    """The run config: where the keys come from, and how the redrive delivers them."""
    from replay_defs.core.naming import EVENT_KEYS

    delivery = {
        k: v
        for k, v in {
            "dry_run": args.dry_run,
            "limit": args.limit,
            "force": args.force,
            "rate_limit": args.rate_limit,
            "batch_size": args.batch_size,
        }.items()
        if v not in (None, False)
    }
    # Absolute, not resolved: the asset resolves symlinks itself and checks the result against EVENT_REPLAY_REFILL_ROOTS.
    location = args.location if args.location.startswith("s3://") else os.path.abspath(args.location)
    return {
        "ops": {
            f"{spec.name}__{EVENT_KEYS}": {
                "config": {
                    "source": args.source,
                    "location": location,
                    **({"window_start": window[0], "window_end": window[1]} if window else {}),
                }
            },
            f"{spec.name}__redrive": {"config": delivery},
        }
    }


def print_refill_table(spec, result, days: list[str], dry_run: bool) -> None:
    """Per day: the PUT rows read, keys, repeats, quarantined, sent (or would send), skipped, checks;
    then the window and the rows outside it, and any day without an access log file."""
    from replay_defs.core.naming import EVENT_KEYS

    mats = {
        (m.asset_key.path[-1], m.partition): {k: v.value for k, v in m.metadata.items()}
        for node in (f"{spec.name}__{EVENT_KEYS}", f"{spec.name}__redrive")
        for m in result.asset_materializations_for_node(node)
    }
    checks = {(e.check_name, e.partition): e.passed for e in result.get_asset_check_evaluations()}
    verb = "would send" if dry_run else "sent"
    print(f"{'day':10} {'PUT rows':>9} {'keys':>8} {'repeats':>7} {'quar.':>6} {verb:>10} {'skip':>8}  checks")
    for day in days:
        k, r = mats.get((EVENT_KEYS, day), {}), mats.get(("redrive", day), {})
        sent = r.get("would_publish") if dry_run else r.get("published")
        verdicts = [v for (name, d), v in checks.items() if d == day]
        fmt = lambda v, w: f"{v:>{w},}" if isinstance(v, int) else f"{'-':>{w}}"  # noqa: E731
        print(
            f"{day:10} {fmt(k.get('put_rows'), 9)} {fmt(k.get('keys'), 8)} {fmt(k.get('duplicates'), 7)} "
            f"{fmt(k.get('quarantined'), 6)} {fmt(sent, 10)} {fmt(r.get('skipped_already_delivered'), 8)}  "
            f"{sum(verdicts)}/{len(verdicts)} passed"
        )
    for day in days:
        k = mats.get((EVENT_KEYS, day), {})
        if k.get("window", "whole day") != "whole day":
            print(f"{day}: window {k['window']}, {k.get('outside_window', 0):,} PUT rows of the day outside it")
        if k.get("missing_logs"):
            print(f"{day}: NO access log file for this day (looked for {k['missing_logs']})", file=sys.stderr)
