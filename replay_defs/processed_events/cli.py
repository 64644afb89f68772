"""`event-replay processed-events`: the processed-events replay's commands, each a run of its
Dagster job (processed_events_*) on the instance in $DAGSTER_HOME."""

from __future__ import annotations

import argparse
import json
import os
import sys

from replay_defs.cli_common import (
    ensure_dagster_home,
    exit_if_failed,
    failed_steps,
    resolve,
    run_in_process,
    run_status,
)
from replay_defs.core.redact import redact
from replay_defs.processed_events import engine as pe

# subcommand -> (job, its op)
PROCESSED_EVENTS_JOBS = {
    "replay-one": ("processed_events_replay_one", "replay_one_event"),
    "replay-failed": ("processed_events_replay_failed", "replay_failed_events"),
    "replay-range": ("processed_events_replay_range", "replay_event_range"),
    "replay-payload": ("processed_events_replay_payload", "replay_payload_events"),
    "reset-stuck": ("processed_events_reset_stuck", "reset_stuck_events"),
    "undo": ("processed_events_undo", "undo_replay"),
    "purge": ("processed_events_purge", "purge_replay_messages"),
}


def register(sub) -> None:
    """Add this system's commands to `event-replay`'s subparsers."""
    pe = sub.add_parser(
        "processed-events",
        help="replay, reset and undo rows of a Postgres processed_events table through RabbitMQ (processed-events replay)",
        description="Replays of a Postgres `processed_events` table (EVENT_REPLAY_POSTGRES_URL) to a RabbitMQ exchange "
        "(EVENT_REPLAY_RABBITMQ_URL), routed by event type, with publisher confirms. Each command launches the matching "
        "Dagster job (processed_events_*) on the instance in $DAGSTER_HOME, so it shows in the UI like a launchpad run. "
        "Every run snapshots the rows it changes (undo with `undo RUN_ID`) and writes an audit row "
        "(event_replay_audit). Events already processed are skipped unless --force. A message refused for its shape "
        "(event type, event id or header key over AMQP's 255 bytes, payload over --max-message-bytes) or not confirmed fails "
        "that row alone: counted, dead-lettered in event_replay_dead_letter, row left unchanged, and the run goes on; only a lost "
        "connection stops it. Ctrl-C stops publishing at once; the rows published so far are committed and counted. "
        "A bad replay: terminate it, `purge RUN_ID --queue Q --yes` its messages still queued, then `undo RUN_ID`.",
    )
    pe_sub = pe.add_subparsers(dest="pe_cmd", required=True)
    _add_replay_commands(pe_sub)
    _add_repair_commands(pe_sub)


def _add_replay_commands(pe_sub) -> None:
    p = pe_sub.add_parser(
        "replay-one", help="replay one event by its event_id", description="Replay one event, by event_id."
    )
    p.add_argument("event_id")
    _add_common_options(p)
    p = pe_sub.add_parser(
        "replay-failed",
        help="replay failed (status error) events of a time window",
        description="Replay the events in status 'error' whose processed_at is in a window (default: the last 24 hours).",
    )
    p.add_argument(
        "--hours", type=float, default=24.0, help="window: the last N hours (default 24), unless --since is given"
    )
    p.add_argument("--since", help="window start, ISO date or timestamp (UTC unless an offset is given)")
    p.add_argument("--until", help="window end, exclusive (a date: the end of that day; default now)")
    _add_payload_option(p)
    _add_common_options(p)
    p = pe_sub.add_parser(
        "replay-range",
        help="replay the events of one type in a date range",
        description="Replay the events of a type whose processed_at is in START..END (END day inclusive). "
        "Processed ones only with --force.",
    )
    p.add_argument("event_type", help="e.g. contribution.submitted")
    p.add_argument("start", help="first day (YYYY-MM-DD) or timestamp")
    p.add_argument("end", help="last day, inclusive (or an exclusive timestamp)")
    _add_payload_option(p)
    _add_common_options(p)
    p = pe_sub.add_parser(
        "replay-payload",
        help="replay the events whose payload has given values (e.g. all events of one contribution)",
        description="Replay every event whose payload has the given top-level values, e.g. "
        "--payload contribution_id=123e4567-... (the runbook's payload->>'contribution_id' query), any time. "
        "Failed ones are replayed; processed or pending ones only with --force.",
    )
    _add_payload_option(p, required=True)
    _add_common_options(p)


def _payload_pair(text: str) -> tuple[str, str]:
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE, e.g. contribution_id=123e4567-...")
    try:
        pe.payload_fields({field: value})  # a bad field name is refused here, with the reason
    except ValueError as e:  # argparse shows only an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from e
    return field, value


def _add_payload_option(p, required: bool = False) -> None:
    p.add_argument(
        "--payload",
        action="append",
        type=_payload_pair,
        required=required,
        metavar="FIELD=VALUE",
        help="only events whose payload has this top-level value, compared as text (payload->>'FIELD' = 'VALUE'); "
        "repeat to AND several",
    )


def _add_repair_commands(pe_sub) -> None:
    p = pe_sub.add_parser(
        "reset-stuck",
        help="reset events stuck in 'processing' for more than N minutes",
        description="Events in status 'processing' for longer than --older-than-minutes (a crashed worker): "
        "back to pending and re-published (default), or to error for a later replay-failed.",
    )
    p.add_argument("--older-than-minutes", type=float, default=5.0, help="default 5")
    p.add_argument(
        "--to-status", choices=("pending", "error"), default="pending", help="pending (re-published, default) or error"
    )
    _add_common_options(p)
    p = pe_sub.add_parser(
        "undo",
        help="undo a replay: restore the statuses its snapshot holds",
        description="Restore status, retry_count, error_message and processed_at of the rows a replay run changed, "
        "from its snapshot (messages already consumed cannot be recalled). The undo is itself snapshotted.",
    )
    p.add_argument(
        "replay_run_id", help="the run id of the replay (printed by the replay, in its audit row and in the UI)"
    )
    _add_common_options(p, publishing=False)
    p = pe_sub.add_parser(
        "purge",
        help="take a replay's messages off a queue before the consumers drain them (needs --yes)",
        description="Take from QUEUE every ready message whose replay_run_id header is REPLAY_RUN_ID (acked: gone for "
        "good) and put every other message back: they are held unacknowledged while the queue is walked once, then "
        "requeued with one nack, so RabbitMQ puts them back at their original place (order kept) but marks them "
        "redelivered. Messages a consumer already holds or took are not purged. Refused without --yes. Audited "
        "(purged, kept). Runbook for a bad replay: terminate the run (UI Terminate / Ctrl-C), purge, then undo "
        "REPLAY_RUN_ID to put the table back.",
    )
    p.add_argument("replay_run_id", help="the run id of the replay whose messages to purge")
    p.add_argument("--queue", required=True, help="the consumers' queue to purge them from")
    p.add_argument("--yes", action="store_true", help="confirm: the purged messages are gone for good")
    _add_audit_options(p, dry_run=False)

    p = pe_sub.add_parser(
        "create-table",
        help="create an empty events table with the seed's columns, to try the replays (production has its own)",
        description="CREATE TABLE IF NOT EXISTS the seed's processed_events table in EVENT_REPLAY_POSTGRES_URL's database.",
    )
    p.add_argument(
        "--table", default="processed_events", help="table, optionally schema.table (default processed_events)"
    )
    p.set_defaults(fn=cmd_create_table)


def _add_audit_options(p, dry_run: bool = True) -> None:
    required = "required unless --dry-run" if dry_run else "required"
    p.add_argument("--reason", default="", help=f"why (kept in the audit; {required})")
    p.add_argument("--requested-by", default=os.environ.get("USER", ""), help="who (kept in the audit; default $USER)")
    p.set_defaults(fn=cmd_processed_events)


def _add_common_options(p, publishing: bool = True) -> None:
    """The table and the audit's options; with `publishing`, also how messages are published."""
    p.add_argument(
        "--table",
        default="processed_events",
        help="events table, optionally schema.table (default processed_events)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only report what would be replayed (counts per status and type); change nothing",
    )
    _add_audit_options(p)
    if publishing:
        _add_publishing_options(p)


def _add_publishing_options(p) -> None:
    p.add_argument(
        "--exchange",
        default="habitat-events",
        help="RabbitMQ exchange; the routing key is the event type (default habitat-events)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="also replay events already processed or pending (flagged in the audit: side effects may repeat)",
    )
    p.add_argument("--rate-limit", type=float, default=50.0, help="messages per second, 0 for unlimited (default 50)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="rows locked, published and committed together (default 100)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="a payload over this is refused before it is sent (default 16 MiB, RabbitMQ 4's max_message_size; "
        "0: no limit). A refused row (also: event type, event id or header key over AMQP's 255 bytes) fails "
        "alone: counted as refused, dead-lettered in event_replay_dead_letter, left unchanged; the run goes on",
    )
    p.add_argument(
        "--watch-queue",
        action="append",
        default=[],
        metavar="QUEUE",
        help="a consumer queue to watch (repeatable): its ready-message count before and after the replay is printed "
        "and kept in the run's metadata and the audit; a missing queue fails before anything is published",
    )


def processed_events_config(args) -> dict:
    """The op config of a `processed-events` subcommand, from its arguments."""
    if args.pe_cmd == "purge":
        return {
            "replay_run_id": args.replay_run_id,
            "queue": args.queue,
            "confirm": args.replay_run_id if args.yes else "",
            "reason": args.reason,
            "requested_by": args.requested_by,
        }
    config = {"table": args.table, "dry_run": args.dry_run, "reason": args.reason, "requested_by": args.requested_by}
    if args.pe_cmd != "undo":
        config.update(
            exchange=args.exchange,
            force=args.force,
            rate_limit=args.rate_limit,
            batch_size=args.batch_size,
            max_message_bytes=args.max_message_bytes,
            watch_queues=args.watch_queue,
        )
    if getattr(args, "payload", None):
        config["payload"] = dict(args.payload)
    if args.pe_cmd == "replay-one":
        config["event_id"] = args.event_id
    elif args.pe_cmd == "replay-failed":
        config.update(hours=args.hours, since=args.since, until=args.until)
    elif args.pe_cmd == "replay-range":
        config.update(event_type=args.event_type, start=args.start, end=args.end)
    elif args.pe_cmd == "replay-payload":
        pass  # the payload alone
    elif args.pe_cmd == "reset-stuck":
        config.update(older_than_minutes=args.older_than_minutes, to_status=args.to_status)
    else:
        config["replay_run_id"] = args.replay_run_id
    return config


def cmd_processed_events(args) -> None:
    """Launch the job on the instance in $DAGSTER_HOME (it shows in the UI's runs) and print its
    counts. Ctrl-C is the emergency stop, as terminating the run in the UI is."""
    if args.pe_cmd == "purge" and not args.yes:
        print(
            f"refused: purge takes the messages of replay {args.replay_run_id} off queue {args.queue!r} for good; "
            "add --yes to confirm",
            file=sys.stderr,
        )
        sys.exit(1)
    ensure_dagster_home()
    job_name, op_name = PROCESSED_EVENTS_JOBS[args.pe_cmd]
    result = run_in_process(
        job_name, {"ops": {op_name: {"config": processed_events_config(args)}}}, tags={"event_replay/source": "cli"}
    )
    outputs = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    print(f"run_id {result.run_id}: {run_status(result)}")
    if outputs:
        _print_counts(
            {k: v.value for k, v in outputs[0].step_output_data.metadata.items()},
            result.run_id,
            getattr(args, "table", ""),
        )
    else:
        _print_failure(result)
    exit_if_failed(result)


def cmd_create_table(args) -> None:
    from replay_defs.core import connect
    from replay_defs.definitions import defs
    from replay_defs.processed_events import engine as pe

    url = resolve(defs.resources["postgres"].url)
    with connect.postgres(url, autocommit=True, connect_timeout=10) as conn:
        pe.create_processed_events_table(conn, args.table)
        print(redact(f"table {args.table} is in database {conn.info.dbname!r} ({url})"))


def _print_counts(md: dict, run_id: str, table: str) -> None:
    """The op's counts and, when it changed rows, their snapshot and how to undo it."""
    print("  " + " ".join(f"{k}={md[k]}" for k in (*pe.COUNTS, "would_change") if k in md))
    print(
        f"  status={md.get('status')} forced={md.get('forced')} selected_by_status={json.dumps(md.get('selected_by_status'))}"
    )
    print(f"  selection={json.dumps(md.get('selection'))}")
    if "purged" in md:
        print(f"  purged={md['purged']} kept={md['kept']} (kept messages are back in the queue, marked redelivered)")
    if "queue_depth_before" in md:
        print(
            f"  queue depth before={json.dumps(md['queue_depth_before'])} after={json.dumps(md.get('queue_depth_after'))}"
        )
    if md.get("snapshot") and "purged" not in md:
        print(
            f"  snapshot: {md['snapshot']}\n  undo: event-replay processed-events undo {run_id} --table {table} --reason ..."
        )


def _print_failure(result) -> None:
    """A run without output: its audit row (if the database answers), its dead letters, its error."""
    from replay_defs.definitions import defs

    try:
        row = pe.audit_row(resolve(defs.resources["postgres"].url), result.run_id)
    except Exception:  # noqa: BLE001 - the database is what failed
        row = None
    if row:
        print(
            redact(
                f"  audit: status={row['status']} published={row['published']} failed={row['failed']} refused={row.get('refused', 0)}"
                f" {json.dumps(row.get('refused_by_reason') or {})} not_reached={row['not_reached']} error={row['error']}"
            )
        )
        if row.get("refused") or row.get("failed"):
            print(f"  dead letters: {pe.dead_letter_location(result.run_id)}")
    for event in failed_steps(result):  # the error, without Dagster's stack trace (that is in the run's log)
        error = event.step_failure_data.error
        while error is not None and error.cause is not None:  # the op's own exception, not Dagster's wrapper
            error = error.cause
        message = error.message.strip() if error else event.message
        if error and error.cls_name == "Failure":  # the op's own words, without the class name
            message = message.split(": ", 1)[-1]
        print(redact(f"  {message}"), file=sys.stderr)
