"""`event-replay billing`: billing reprocessing (`reprocess`, the service's POST
/events/raw/reprocess as a run of the billing_reprocessing pipeline, in this process or queued for
the daemon), a run's outcome (`status`) and demo rows (`generate`)."""

from __future__ import annotations

import json
import sys
import time
from datetime import date, datetime, timedelta, timezone

from replay_defs.cli_common import (
    RANGE_END,
    RANGE_START,
    days_between,
    ensure_dagster_home,
    find_spec,
    resolve,
    run_in_process,
    submit_run,
)

BILLING = "billing_reprocessing"  # the pipeline spec the commands run
TOTALS = ("found", "published", "skipped_already_delivered", "dropped", "transformation_errors", "publish_failures")


def register(sub) -> None:
    """Add this system's commands to `event-replay`'s subparsers."""
    b = sub.add_parser("billing", help="billing reprocessing").add_subparsers(dest="billing_cmd", required=True)
    rp = b.add_parser(
        "reprocess",
        help="reprocess raw_events from ClickHouse to Kafka (POST /events/raw/reprocess); prints the run id, totals and "
        "failed checks as JSON (exit 1: the run or a check failed, seed 002's rate alerts included)",
    )
    rp.add_argument("--start", required=True, help="RFC 3339 (2024-01-01T00:00:00Z) or a date")
    rp.add_argument("--end", help="RFC 3339, exclusive, or a date (inclusive); default now")
    rp.add_argument("--tenant", required=True)
    rp.add_argument("--environment", required=True)
    rp.add_argument("--customer", help="external customer id")
    rp.add_argument("--event-name")
    rp.add_argument(
        "--batch-size", type=int, default=10_000, help="rows per keyset page and per delivery (default 10,000)"
    )
    rp.add_argument("--dry-run", action="store_true", help="read, transform and count; publish nothing")
    rp.add_argument("--force", action="store_true", help="publish again what the ledger says Kafka already has")
    rp.add_argument(
        "--topic",
        help="publish to this Kafka topic instead of the configured one (the spec's prod_events_v4, or "
        "EVENT_REPLAY_SINK__BILLING_REPROCESSING=kafka:<topic>); the ledger is kept per topic, so nothing "
        "is skipped because it went to another topic",
    )
    rp.add_argument(
        "--submit",
        action="store_true",
        help="queue the run for the daemon (the instance's run queue) and print its id at once instead of running "
        "it here; follow it with `event-replay billing status RUN_ID --wait`",
    )
    rp.add_argument(
        "--workspace",
        metavar="PATH",
        help="with --submit: the workspace file naming the code location the daemon serves "
        "(default: the project's workspace.yaml; in a deployment, deploy/workspace.yaml)",
    )
    rp.set_defaults(fn=cmd_billing_reprocess)
    st = b.add_parser(
        "status",
        help="a reprocess run's status, and once it has finished its totals and failed checks, as JSON "
        "(exit 1: the run failed or a check failed)",
    )
    st.add_argument("run_id", help="the run id `billing reprocess` printed")
    st.add_argument("--wait", action="store_true", help="wait until the run has finished")
    st.add_argument("--timeout", type=float, default=3600, help="with --wait: give up after this many seconds")
    st.set_defaults(fn=cmd_billing_status)
    bg = b.add_parser("generate", help="create raw_events and fill it with demo rows (tenant acme, environment prod)")
    bg.add_argument("--start", default="2024-03-04", help="first day, YYYY-MM-DD")
    bg.add_argument("--days", type=int, default=1)
    bg.add_argument("--rows-per-day", type=int, default=100_000)
    bg.set_defaults(fn=cmd_billing_generate)


def _moment(value: str, end: bool = False) -> datetime:
    """RFC 3339 (a zone is required), or a bare date: its start, or for an end the next midnight."""
    if len(value) == 10:
        d = date.fromisoformat(value) + timedelta(days=1 if end else 0)
        return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        raise SystemExit(f"{value!r}: give a time zone, e.g. {value}Z")
    return dt.astimezone(timezone.utc)


def reprocess_plan(
    spec,
    start: str,
    end: str | None,
    filters: dict,
    batch_size: int,
    dry_run: bool,
    force: bool,
    topic: str | None = None,
) -> tuple[list[str], dict]:
    """A reprocess request as a partition range and the job's run config: the filters and the
    window go to raw_events (its manifest is the selection), the batch size to the keyset read
    and the redrive, dry_run / force / the topic (the redrive's `destination`) to the redrive."""
    lo = _moment(start)
    hi = _moment(end, end=True) if end else datetime.now(timezone.utc)
    if hi <= lo:
        raise SystemExit(f"end {hi.isoformat()} is not after start {lo.isoformat()}")
    days = days_between(lo.date().isoformat(), (hi - timedelta(microseconds=1)).date().isoformat())
    op = spec.name + "__"
    selection = {**{k: v for k, v in filters.items() if v}, "start": lo.isoformat(), "end": hi.isoformat()}
    config = {
        "ops": {
            op + "raw_events": {"config": selection},
            op + "parsed_events": {"config": {"batch_size": batch_size}},
            op + "redrive": {
                "config": {
                    "dry_run": dry_run,
                    "force": force,
                    "batch_size": batch_size,
                    **({"destination": topic} if topic else {}),
                }
            },
        }
    }
    return days, config


def cmd_billing_reprocess(args) -> None:
    """POST /events/raw/reprocess of the billing service, as a run of the billing_reprocessing job:
    here (prints the outcome), or with --submit queued for the daemon (prints the run id at once)."""
    from replay_defs.sinks.base import with_destination

    ensure_dagster_home()
    spec = find_spec(BILLING)
    sink = spec.redrive.sink
    if args.topic:
        try:
            sink = with_destination(sink, args.topic)
        except ValueError as exc:
            raise SystemExit(f"--topic {args.topic!r}: {exc}") from None
    filters = {
        "tenant": args.tenant,
        "environment": args.environment,
        "customer": args.customer,
        "event_name": args.event_name,
    }
    days, config = reprocess_plan(
        spec, args.start, args.end, filters, args.batch_size, args.dry_run, args.force, args.topic
    )
    job = f"{spec.name}_replay"
    head = {"job": job, "partitions": [days[0], days[-1]], "sink": sink.name, "dry_run": args.dry_run}
    if args.submit:
        run_id, status = submit_run(job, config, days=days, workspace=args.workspace)
        print(json.dumps({"run_id": run_id, "status": status, **head}))
        return
    result = run_in_process(job, config, days=days)
    _print_outcome(spec, result.run_id, "SUCCESS" if result.success else "FAILURE", head)


def cmd_billing_status(args) -> None:
    """A reprocess run's status; once finished, its totals and failed checks (from the event log)."""
    import dagster as dg

    ensure_dagster_home()
    spec = find_spec(BILLING)
    instance = dg.DagsterInstance.get()
    deadline = time.monotonic() + args.timeout
    while True:
        run = instance.get_run_by_id(args.run_id)
        if run is None:
            raise SystemExit(f"no run {args.run_id!r} in the instance at $DAGSTER_HOME")
        if run.is_finished or not args.wait:
            break
        if time.monotonic() > deadline:
            print(json.dumps({"run_id": run.run_id, "status": run.status.value, "timed_out": True}))
            sys.exit(1)
        time.sleep(1)
    head = {"job": run.job_name, "partitions": [run.tags.get(RANGE_START), run.tags.get(RANGE_END)]}
    if not run.is_finished:
        print(json.dumps({"run_id": run.run_id, "status": run.status.value, **head}))
        return
    _print_outcome(spec, run.run_id, run.status.value, head)


def _print_outcome(spec, run_id: str, status: str, head: dict) -> None:
    """One JSON line: the run's status, its totals over the days and the checks that failed;
    exit 1 when the run failed or a check did (the rate thresholds do not block the run)."""
    import dagster as dg

    instance = dg.DagsterInstance.get()
    totals, failed = dict.fromkeys(TOTALS, 0), []
    redrive = dg.AssetKey([spec.name, "redrive"])
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        mat = entry.asset_materialization
        if mat.asset_key == redrive:
            if "sink" in mat.metadata:  # the topic the run sent to (status does not know it otherwise)
                head.setdefault("sink", mat.metadata["sink"].value)
            for k in totals:
                totals[k] += mat.metadata[k].value if k in mat.metadata else 0
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        ev = entry.asset_check_evaluation
        if not ev.passed and ev.partition is not None:  # a day's verdict (a range's summary has no day)
            md = {k: ev.metadata[k].value for k in ("rate_percent", "threshold_percent") if k in ev.metadata}
            failed.append({"check": ev.check_name, "day": ev.partition, "description": ev.description, **md})
    print(json.dumps({"run_id": run_id, "status": status, **head, **totals, "failed_checks": failed}))
    if status != "SUCCESS" or failed:
        sys.exit(1)


def cmd_billing_generate(args) -> None:
    """Demo rows in the configured ClickHouse (chDB at EVENT_REPLAY_CHDB by default)."""
    from replay_defs.clickhouse_table.demo import generate_billing
    from replay_defs.core.clickhouse import ClickHouse
    from replay_defs.definitions import defs

    res = defs.resources["clickhouse"]
    last = (date.fromisoformat(args.start) + timedelta(days=args.days - 1)).isoformat()
    with ClickHouse(resolve(res.url), resolve(res.data_path), resolve(res.database)) as ch:
        for day in days_between(args.start, last):
            stored = generate_billing(ch, day, args.rows_per_day)
            print(f"{day}: {stored:,} rows into raw_events ({ch.where}, database {ch.database})")
