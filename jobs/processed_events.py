"""Processed-events replay jobs: one op each, configured in the launchpad (or by
`event-replay processed-events ...`). The work is `replay_defs.processed_events.engine`; this module maps
config and run tags onto it and reports counts as metadata and progress in the run log.

Cancelling ("Terminate") a run is the emergency stop: publishing stops between two messages,
the batch in progress commits exactly what the broker confirmed, and the audit row and the run log
say how many were published."""

import json
from typing import Literal, Optional

import dagster as dg
from pydantic import Field

from replay_defs.core.redact import redact
from replay_defs.processed_events import engine as pe
from replay_defs.sinks.rabbitmq import DEFAULT_MAX_MESSAGE_BYTES, RabbitMQResource
from resources import PostgresResource

REQUESTED_BY_TAG = "event_replay/requested_by"
REASON_TAG = "event_replay/reason"


class _Audited(dg.Config):
    reason: str = Field(
        default="",
        description=f"Why (kept in the audit; required unless dry_run). Falls back to the run tag {REASON_TAG}.",
    )
    requested_by: str = Field(
        default="", description=f"Who (kept in the audit). Falls back to the run tags {REQUESTED_BY_TAG}, dagster/user."
    )


class _Common(_Audited):
    table: str = Field(default="processed_events", description="The events table (optionally schema.table).")
    dry_run: bool = Field(
        default=False,
        description="Report what would be replayed (counts per status and type); change and publish nothing.",
    )


class _Publishing(_Common):
    exchange: str = Field(default="habitat-events", description="RabbitMQ exchange; the routing key is the event type.")
    force: bool = Field(
        default=False,
        description="Also replay events already processed (or pending). Flagged in the audit: side effects may repeat.",
    )
    rate_limit: float = Field(default=50.0, description="At most this many messages per second (0: unlimited).")
    batch_size: int = Field(
        default=100, description="Rows locked (FOR UPDATE SKIP LOCKED), published and committed together."
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        description="A payload larger than this is refused before it is sent (RabbitMQ 4's default max_message_size, 16 MiB; "
        "0: no limit). Like a routing key, message id or header key over AMQP's 255 bytes, that row alone fails: counted "
        f"as refused, recorded in {pe.DEAD_LETTER_TABLE}, left unchanged; the replay goes on.",
    )
    watch_queues: list[str] = Field(
        default=[],
        description="The consumers' queue(s) to watch: their ready-message count before and after the replay (and in "
        "the progress lines) goes to the run's metadata, log and audit row. A missing queue fails the run before "
        "anything is published.",
    )


_PAYLOAD_HELP = (
    "Only events whose payload has these top-level values, compared as text (payload->>field = value), AND-ed; "
    "e.g. {contribution_id: 123e4567-...}."
)


class ReplayOneConfig(_Publishing):
    event_id: str = Field(description="The event_id of the event to replay.")


class ReplayFailedConfig(_Publishing):
    hours: float = Field(
        default=24.0,
        description="Failed (status 'error') events processed in the last N hours, unless since/until are set.",
    )
    since: Optional[str] = Field(
        default=None, description="Window start on processed_at: ISO date or timestamp (UTC if no offset)."
    )
    until: Optional[str] = Field(
        default=None, description="Window end (exclusive; a date means the end of that day). Default: now."
    )
    payload: dict[str, str] = Field(default={}, description=_PAYLOAD_HELP)


class ReplayRangeConfig(_Publishing):
    event_type: str = Field(description="e.g. contribution.submitted")
    start: str = Field(description="First day (or timestamp) of processed_at.")
    end: str = Field(description="Last day, inclusive (or an exclusive timestamp).")
    payload: dict[str, str] = Field(default={}, description=_PAYLOAD_HELP)


class ReplayPayloadConfig(_Publishing):
    payload: dict[str, str] = Field(
        description="Every event whose payload has these top-level values (any time, any status; processed or pending "
        "ones only with force), compared as text (payload->>field = value), AND-ed; e.g. {contribution_id: 123e4567-...}."
    )


class ResetStuckConfig(_Publishing):
    older_than_minutes: float = Field(
        default=5.0, description="Events in 'processing' for longer than this (processed_at, else created_at)."
    )
    to_status: Literal["pending", "error"] = Field(
        default="pending",
        description="pending: back to the worker (re-published, as its message died with the crashed worker); "
        "error: marked failed, for a later replay-failed.",
    )


class UndoConfig(_Common):
    replay_run_id: str = Field(description="The run id of the replay to undo (its audit row and snapshot).")


class PurgeConfig(_Audited):
    replay_run_id: str = Field(description="The run id of the replay whose messages to take off the queue.")
    queue: str = Field(description="The consumers' queue to take them from.")
    confirm: str = Field(
        default="",
        description="The replay's run id again: purged messages are gone for good (the other messages are put back, "
        "marked redelivered).",
    )


def _who_why(context: dg.OpExecutionContext, config: _Audited) -> tuple[str, str]:
    tags = context.run.tags
    who = config.requested_by or tags.get(REQUESTED_BY_TAG) or tags.get("dagster/user") or "unknown"
    why = config.reason or tags.get(REASON_TAG) or ""
    if not why and not getattr(config, "dry_run", False):
        raise dg.Failure(f"a replay needs a reason: set config `reason` or the run tag {REASON_TAG}")
    return who, why


def _metadata(report: pe.Report) -> dict:
    md = {k: dg.MetadataValue.int(v) for k, v in report.counts().items()}
    md.update(
        {
            "status": report.status,
            "forced": dg.MetadataValue.bool(report.forced),
            "selection": dg.MetadataValue.json(report.selection),
            "selected_by_status": dg.MetadataValue.json(report.by_status),
            "selected_by_type": dg.MetadataValue.json(report.by_type),
            "refused_by_reason": dg.MetadataValue.json(report.refused_by_reason),
            "table": report.table,
            "duration_s": dg.MetadataValue.float(round(report.seconds, 3)),
        }
    )
    if report.queue_depth_before is not None:
        md["queue_depth_before"] = dg.MetadataValue.json(report.queue_depth_before)
    if report.queue_depth_after is not None:
        md["queue_depth_after"] = dg.MetadataValue.json(report.queue_depth_after)
    if report.action == "purge":
        md.update(purged=dg.MetadataValue.int(report.purged), kept=dg.MetadataValue.int(report.kept))
    if report.snapshot:
        md["snapshot"] = report.snapshot
        md["audit"] = f"{pe.AUDIT_TABLE} WHERE run_id = '{report.run_id}'"
    if report.dead_letters:
        md["dead_letters"] = pe.dead_letter_location(report.run_id)
    if report.errors:
        md["errors"] = dg.MetadataValue.json(report.errors[:20])
    return md


def _run(context: dg.OpExecutionContext, postgres: PostgresResource, work) -> dg.Output:
    """Run `work()` (returns a Report); log and report its outcome, including an emergency stop."""
    try:
        report = work()
    except LookupError as exc:  # a missing table, exchange or event: the message says what to create or set
        raise dg.Failure(str(exc)) from None
    except BaseException as exc:
        if not isinstance(exc, Exception):  # the run was cancelled: say what the audit recorded
            row = pe.audit_row(postgres.url, context.run_id)
            if row and row["action"] == "purge":
                context.log.warning(
                    f"STOPPED: {row['purged']} messages purged before the stop; the others are back in the queue. "
                    f"Audit: {pe.AUDIT_TABLE} run_id={context.run_id}"
                )
            elif row:
                context.log.warning(
                    f"STOPPED: {row['published']} published (and moved to pending) before the stop; "
                    f"{row['not_reached']} not reached and left as they were. Audit: {pe.AUDIT_TABLE} run_id={context.run_id}"
                )
        raise
    summary = ", ".join(f"{k}={v}" for k, v in report.counts().items())
    context.log.info(f"{report.action} {report.status}: {summary}")
    if report.action == "purge":
        context.log.info(f"purged {report.purged} messages, put {report.kept} others back (redelivered)")
    if report.queue_depth_before is not None:
        context.log.info(f"queue depth before: {report.queue_depth_before}, after: {report.queue_depth_after}")
    skipped = report.skipped_processed + report.skipped_pending
    if skipped and not report.changed and report.action != "undo":
        context.log.warning(
            f"nothing replayed: {report.skipped_processed} already processed, {report.skipped_pending} pending "
            "(force=true replays them; side effects may repeat)"
        )
    if report.refused:
        context.log.warning(
            f"{report.refused} refused for their shape {report.refused_by_reason} and dead-lettered "
            f"({pe.dead_letter_location(report.run_id)}); the rows are left unchanged"
        )
    if report.status == "failed":
        refused = (
            f", {report.refused} of them refused for their shape {report.refused_by_reason}" if report.refused else ""
        )
        raise dg.Failure(
            f"{report.failed} not published{refused} (rows left unchanged, dead letters in {pe.DEAD_LETTER_TABLE}): "
            f"{report.errors[:3]}",
            metadata=_metadata(report),
        )
    return dg.Output(json.dumps(report.counts()), metadata=_metadata(report))


def _watching(context: dg.OpExecutionContext, config: _Publishing, rabbitmq: RabbitMQResource):
    """(queue depths or None, progress callback): progress lines in the run log, each with the
    watched queues' depth when some are watched."""

    def depths() -> dict[str, int]:
        measured = pe.queue_depths(rabbitmq.url, config.watch_queues)
        context.log.info(f"queue depth: {measured}")
        return measured

    def progress(r: pe.Report) -> None:
        context.log.info(
            f"progress: {r.published}/{r.selected} published, {r.failed} failed ({r.refused} refused), "
            f"{r.skipped_processed + r.skipped_pending + r.skipped_processing} skipped"
        )
        if config.watch_queues:
            try:
                depths()
            except Exception as exc:  # noqa: BLE001 - watching must not stop the replay
                context.log.warning(redact(f"queue depth unavailable: {type(exc).__name__}: {exc}"))

    return (depths if config.watch_queues else None), progress


def _replay(
    context: dg.OpExecutionContext,
    config: _Publishing,
    postgres: PostgresResource,
    rabbitmq: RabbitMQResource,
    selection: pe.EventSelection,
    action: str,
    **kw,
) -> dg.Output:
    who, why = _who_why(context, config)
    pe.check_exchange(config.exchange)
    context.log.info(
        f"{action}: {selection.describe()} in {config.table} -> exchange {config.exchange!r} (requested by {who}: {why!r})"
    )
    depths, progress = _watching(context, config, rabbitmq)
    publish = kw.pop("publish", True)

    def work() -> pe.Report:
        exchange = (
            rabbitmq.sink(config.exchange, "{type}", max_message_bytes=config.max_message_bytes)
            if publish and not config.dry_run
            else None
        )
        try:
            return pe.replay(
                postgres.url,
                selection,
                context.run_id,
                table=config.table,
                exchange=exchange,
                exchange_name=config.exchange,
                action=action,
                force=config.force,
                dry_run=config.dry_run,
                rate_limit=config.rate_limit,
                batch_size=config.batch_size,
                requested_by=who,
                reason=why,
                publish=publish,
                progress=progress,
                queue_depths=depths,
                **kw,
            )
        finally:
            if exchange is not None:
                exchange.close()

    return _run(context, postgres, work)


@dg.op(description="Replay one event (by event_id) to the exchange.")
def replay_one_event(
    context: dg.OpExecutionContext, config: ReplayOneConfig, postgres: PostgresResource, rabbitmq: RabbitMQResource
):
    return _replay(context, config, postgres, rabbitmq, pe.EventSelection.one(config.event_id), "replay_one")


@dg.op(description="Replay the failed (status 'error') events of a processed_at window.")
def replay_failed_events(
    context: dg.OpExecutionContext, config: ReplayFailedConfig, postgres: PostgresResource, rabbitmq: RabbitMQResource
):
    selection = pe.EventSelection.failed(config.since, config.until, config.hours).with_payload(config.payload)
    return _replay(context, config, postgres, rabbitmq, selection, "replay_failed")


@dg.op(description="Replay the events of one type in a processed_at date range.")
def replay_event_range(
    context: dg.OpExecutionContext, config: ReplayRangeConfig, postgres: PostgresResource, rabbitmq: RabbitMQResource
):
    selection = pe.EventSelection.range(config.event_type, config.start, config.end).with_payload(config.payload)
    return _replay(context, config, postgres, rabbitmq, selection, "replay_range")


@dg.op(description="Replay the events whose payload has the given values (e.g. all events of one contribution).")
def replay_payload_events(
    context: dg.OpExecutionContext, config: ReplayPayloadConfig, postgres: PostgresResource, rabbitmq: RabbitMQResource
):
    return _replay(context, config, postgres, rabbitmq, pe.EventSelection.by_payload(config.payload), "replay_payload")


@dg.op(description="Reset events stuck in 'processing' (a crashed worker) to pending (re-published) or error.")
def reset_stuck_events(
    context: dg.OpExecutionContext, config: ResetStuckConfig, postgres: PostgresResource, rabbitmq: RabbitMQResource
):
    selection = pe.EventSelection.stuck(config.older_than_minutes)
    if config.to_status == "pending":
        return _replay(context, config, postgres, rabbitmq, selection, "reset_stuck")
    note = f"reset from processing (stuck > {config.older_than_minutes:g} min) by run {context.run_id}"
    return _replay(
        context, config, postgres, rabbitmq, selection, "reset_stuck", publish=False, new_status="error", new_error=note
    )


@dg.op(description="Undo a replay: restore the statuses its snapshot holds.")
def undo_replay(context: dg.OpExecutionContext, config: UndoConfig, postgres: PostgresResource):
    who, why = _who_why(context, config)
    context.log.info(f"undo of {config.replay_run_id} in {config.table} (requested by {who}: {why!r})")
    return _run(
        context,
        postgres,
        lambda: pe.undo(
            postgres.url,
            config.replay_run_id,
            context.run_id,
            table=config.table,
            dry_run=config.dry_run,
            requested_by=who,
            reason=why,
        ),
    )


@dg.op(description="Take a replay's messages off a queue before consumers drain them; every other message goes back.")
def purge_replay_messages(
    context: dg.OpExecutionContext, config: PurgeConfig, postgres: PostgresResource, rabbitmq: RabbitMQResource
):
    who, why = _who_why(context, config)
    context.log.info(
        f"purge of replay {config.replay_run_id}'s messages from queue {config.queue!r} (requested by {who}: {why!r})"
    )
    return _run(
        context,
        postgres,
        lambda: pe.purge(
            postgres.url,
            rabbitmq.url,
            config.queue,
            config.replay_run_id,
            context.run_id,
            confirm=config.confirm,
            requested_by=who,
            reason=why,
        ),
    )


def _job(name: str, op, description: str) -> dg.JobDefinition:
    # One op: the in-process executor saves the step subprocess (seconds at launch) and takes
    # the run's termination signal directly in the op.
    @dg.job(
        name=name,
        description=description,
        tags={"event_replay/kind": "processed_events"},
        executor_def=dg.in_process_executor,
    )
    def _the_job():
        op()

    return _the_job


JOBS = [
    _job("processed_events_replay_one", replay_one_event, "Replay one processed_events row (by event_id) to RabbitMQ."),
    _job(
        "processed_events_replay_failed",
        replay_failed_events,
        "Replay failed processed_events in a time window to RabbitMQ.",
    ),
    _job(
        "processed_events_replay_range",
        replay_event_range,
        "Replay processed_events of a type in a date range to RabbitMQ.",
    ),
    _job(
        "processed_events_replay_payload",
        replay_payload_events,
        "Replay processed_events whose payload has given values (e.g. one contribution's) to RabbitMQ.",
    ),
    _job(
        "processed_events_reset_stuck",
        reset_stuck_events,
        "Reset processed_events stuck in 'processing' for more than N minutes.",
    ),
    _job("processed_events_undo", undo_replay, "Undo a processed-events replay from its snapshot."),
    _job(
        "processed_events_purge",
        purge_replay_messages,
        "Take a processed-events replay's messages off a RabbitMQ queue (needs confirm: <replay run id>).",
    ),
]
