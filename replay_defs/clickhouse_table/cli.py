"""`event-replay billing`: billing reprocessing (`reprocess`, the service's POST
/events/raw/reprocess as a run of the billing_reprocessing pipeline) and its demo rows (`generate`)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from replay_defs.cli_common import days_between, ensure_dagster_home, find_spec, print_run_json, resolve, run_in_process

BILLING = "billing_reprocessing"  # the pipeline spec the commands run
TOTALS = ("found", "published", "skipped_already_delivered", "dropped", "transformation_errors", "publish_failures")


def register(sub) -> None:
    """Add this system's commands to `event-replay`'s subparsers."""
    b = sub.add_parser("billing", help="billing reprocessing").add_subparsers(dest="billing_cmd", required=True)
    rp = b.add_parser(
        "reprocess",
        help="reprocess raw_events from ClickHouse to Kafka (POST /events/raw/reprocess); prints the run id and totals as JSON",
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
    rp.set_defaults(fn=cmd_billing_reprocess)
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
    spec, start: str, end: str | None, filters: dict, batch_size: int, dry_run: bool, force: bool
) -> tuple[list[str], dict]:
    """A reprocess request as a partition range and the job's run config: the filters and the
    window go to raw_events (its manifest is the selection), the batch size to the keyset read
    and the redrive, dry_run / force to the redrive."""
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
            op + "redrive": {"config": {"dry_run": dry_run, "force": force, "batch_size": batch_size}},
        }
    }
    return days, config


def cmd_billing_reprocess(args) -> None:
    """POST /events/raw/reprocess of the billing service, as a run of the billing_reprocessing job."""
    ensure_dagster_home()
    spec = find_spec(BILLING)
    filters = {
        "tenant": args.tenant,
        "environment": args.environment,
        "customer": args.customer,
        "event_name": args.event_name,
    }
    days, config = reprocess_plan(spec, args.start, args.end, filters, args.batch_size, args.dry_run, args.force)
    result = run_in_process(f"{spec.name}_replay", config, days=days)
    totals = dict.fromkeys(TOTALS, 0)
    for mat in result.asset_materializations_for_node(f"{spec.name}__redrive"):
        for k in totals:
            totals[k] += mat.metadata[k].value if k in mat.metadata else 0
    print_run_json(result, job=f"{spec.name}_replay", partitions=[days[0], days[-1]], dry_run=args.dry_run, **totals)


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
