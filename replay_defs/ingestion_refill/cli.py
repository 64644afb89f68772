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
        "go to the day's quarantine with their reason and a sample; logs and errors never show the file's content.",
    )
    f.add_argument("--refill", default="ingestion_refill", help="the RefillSpec's name (default ingestion_refill)")
    f.add_argument(
        "--source",
        choices=["csv", "access_logs", "listing"],
        default="csv",
        help='csv: export with header "operation","key" (optional "requestdatetime"); access_logs: S3 server '
        "access log files; listing: objects last modified on the day (default csv)",
    )
    f.add_argument(
        "--location",
        required=True,
        help="CSV path or s3:// URI; log directory or s3://bucket/prefix; s3://bucket/prefix to "
        "list. A local path must resolve under EVENT_REPLAY_REFILL_ROOTS (default: the lake root and the current directory)",
    )
    f.add_argument("--start", required=True, help="first day (YYYY-MM-DD) of the access-log records")
    f.add_argument("--end", help="last day (default: start); several days need a requestdatetime column")
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
    days = days_between(args.start, args.end or args.start)
    t0 = time.time()
    result = run_in_process(f"{spec.name}_replay", refill_config(spec, args), days=days)
    print(f"run {result.run_id}: {run_status(result)} in {time.time() - t0:.1f}s")
    if not result.success:
        failure = next(iter(failed_steps(result)), None)
        if failure is not None:
            print(redact(f"  {failure.step_key}: {failure.event_specific_data.error.message.strip()}"), file=sys.stderr)
    print_refill_table(spec, result, days, args.dry_run)
    exit_if_failed(result)


def refill_config(spec, args) -> dict:
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
            f"{spec.name}__{EVENT_KEYS}": {"config": {"source": args.source, "location": location}},
            f"{spec.name}__redrive": {"config": delivery},
        }
    }


def print_refill_table(spec, result, days: list[str], dry_run: bool) -> None:
    """Per day: the PUT rows read, keys, repeats, quarantined, sent (or would send), skipped, checks."""
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
