"""Processed-events replay: re-publish rows of a Postgres `processed_events` table to
a RabbitMQ exchange, with a snapshot to undo, an audit row per replay, and an emergency stop.

The table is the seed's (see `create_processed_events_table`): an event per row with its status
`pending` -> `processing` -> `processed` | `error`. A worker consumes the exchange and marks each
event `processed` (or `error`). A replay

1. selects rows (`EventSelection`): one event by `event_id`; the failed (`error`) ones in a window of
   `processed_at`; a type in a date range of `processed_at`; those stuck in `processing` for
   longer than N minutes; or those whose payload has given top-level values (`payload->>field`,
   which also narrows the failed and range selections);
2. walks them in `batch_size` batches of `SELECT ... FOR UPDATE SKIP LOCKED` (a row another replay
   or worker holds is left to it), publishes each replayable row to the exchange (routing key = the
   event type, `message_id` = the event id, publisher confirms, paced by `rate_limit`), and in the
   same transaction snapshots the published rows into `event_replay_snapshot` and moves them to
   `pending` (retry_count 0, error_message and processed_at cleared, as the seed's SQL does);
3. records it in `event_replay_audit` (one row per run: who, why, selection, counts, forced flag,
   snapshot location, status).

A row whose message fails on its own (refused for its shape: a routing key, message id or header
key over AMQP's 255 bytes, a body over `max_message_bytes`; or not confirmed: unroutable, nacked)
is left unchanged, counted (`failed`; `refused` by reason), recorded in `event_replay_dead_letter`
(run id, row, event id, reason, error) in the batch's transaction, and the replay goes on with the
next rows. Only a lost connection stops the run; a publish whose confirm it lost leaves its row
unchanged too, so the next replay publishes it again (a consumer drops the copy by `message_id`).

Idempotency: `error` rows are always replayed; `processed` and `pending` ones (already done, or
already waiting for the worker) only with `force`, and a forced replay is flagged in the audit;
`processing` rows never (that is `reset_stuck`'s job).

Emergency stop: a publish and its bookkeeping are one unit that SIGINT/SIGTERM (how Dagster
cancels a run) cannot split; the stop lands between two publishes. The batch in progress then
commits exactly the rows the broker confirmed, the rest stay as they were, and the audit row
says `stopped` with the count published.

Queue depth: the consumers' queues named to watch are counted (passive `queue_declare`) before the
first publish and when the run ends, into the report and the audit row.

Purge: `purge(...)` takes a replay's messages (header `replay_run_id`) off a queue before the
consumers drain them and puts every other message back (nack with requeue: same place, marked
redelivered); audited as action `purge`.

Undo: `undo(run_id)` puts the snapshot's status, retry_count, error_message and processed_at back
(messages already consumed cannot be recalled; the undo itself is snapshotted and audited).

Every value goes to Postgres as a parameter; table names only as `psycopg.sql.Identifier`.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any, NamedTuple

from replay_defs.core import connect
from replay_defs.core.pacing import Pacer
from replay_defs.core.redact import redact

STATUSES = ("pending", "processing", "processed", "error")
AUDIT_TABLE = "event_replay_audit"
SNAPSHOT_TABLE = "event_replay_snapshot"
DEAD_LETTER_TABLE = "event_replay_dead_letter"
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
_EXCHANGE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{0,255}$")


def table_identifier(name: str):
    """`processed_events` or `schema.processed_events` as a quoted identifier (never formatted)."""
    from psycopg import sql

    if not _TABLE_NAME.fullmatch(name or ""):
        raise ValueError(f"{name!r} is not a table name (letters, digits, _; optionally schema.table)")
    return sql.Identifier(*name.split("."))


def check_exchange(name: str) -> str:
    if not _EXCHANGE_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid exchange name")
    return name


# ---- schema -----------------------------------------------------------------------------------


def create_processed_events_table(conn, table: str = "processed_events") -> None:
    """The seed's table (for demos and tests; production already has it)."""
    from psycopg import sql

    conn.execute(
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS {t} (
              id bigserial PRIMARY KEY,
              event_type text NOT NULL,
              event_id text NOT NULL UNIQUE,
              idempotency_key text NOT NULL UNIQUE,
              payload jsonb NOT NULL DEFAULT '{{}}'::jsonb,
              status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'processing', 'processed', 'error')),
              retry_count integer NOT NULL DEFAULT 0,
              error_message text,
              processed_at timestamptz,
              created_at timestamptz NOT NULL DEFAULT now()
            )"""
        ).format(t=table_identifier(table))
    )


def require_table(conn, table: str, url: str) -> None:
    """Fail with what is missing, and where, when the events table does not exist."""
    if conn.execute("SELECT to_regclass(%s)", [table_identifier(table).as_string(conn)]).fetchone()[0] is not None:
        return
    raise LookupError(
        redact(
            f"table {table!r} does not exist in database {conn.info.dbname!r} ({url}, EVENT_REPLAY_POSTGRES_URL): "
            "point EVENT_REPLAY_POSTGRES_URL at the database that holds the events table, or name it (--table, "
            "launchpad config `table`, schema.table allowed); to try the replay, "
            f"`event-replay processed-events create-table --table {table}` creates an empty one with the seed's columns"
        )
    )


# The bookkeeping tables next to the events, created on first use.
AUDIT_DDL = f"""
CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
  run_id text PRIMARY KEY,
  action text NOT NULL,
  table_name text NOT NULL,
  selection jsonb NOT NULL,
  requested_by text NOT NULL,
  reason text NOT NULL,
  exchange text,
  force boolean NOT NULL DEFAULT false,
  forced boolean NOT NULL DEFAULT false,
  forced_count integer NOT NULL DEFAULT 0,
  selected integer NOT NULL DEFAULT 0,
  published integer NOT NULL DEFAULT 0,
  changed integer NOT NULL DEFAULT 0,
  skipped_processed integer NOT NULL DEFAULT 0,
  skipped_pending integer NOT NULL DEFAULT 0,
  skipped_processing integer NOT NULL DEFAULT 0,
  failed integer NOT NULL DEFAULT 0,
  not_reached integer NOT NULL DEFAULT 0,
  snapshot text,
  status text NOT NULL,
  error text,
  undone_by text,
  started_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz
)"""

SNAPSHOT_DDL = f"""
CREATE TABLE IF NOT EXISTS {SNAPSHOT_TABLE} (
  run_id text NOT NULL,
  table_name text NOT NULL,
  event_pk bigint NOT NULL,
  event_id text NOT NULL,
  status text NOT NULL,
  retry_count integer NOT NULL,
  error_message text,
  processed_at timestamptz,
  snapshotted_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (run_id, table_name, event_pk)
)"""

# Rows whose message failed on its own (refused for its shape, or not confirmed), per run.
DEAD_LETTER_DDL = f"""
CREATE TABLE IF NOT EXISTS {DEAD_LETTER_TABLE} (
  run_id text NOT NULL,
  table_name text NOT NULL,
  event_pk bigint NOT NULL,
  event_id text NOT NULL,
  event_type text NOT NULL,
  reason text NOT NULL,
  error text NOT NULL,
  failed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (run_id, table_name, event_pk)
)"""

# Added after the first release: audit tables created before get the columns here.
AUDIT_COLUMNS_ADDED = (
    f"ALTER TABLE {AUDIT_TABLE} ADD COLUMN IF NOT EXISTS refused integer NOT NULL DEFAULT 0",
    f"ALTER TABLE {AUDIT_TABLE} ADD COLUMN IF NOT EXISTS refused_by_reason jsonb NOT NULL DEFAULT '{{}}'::jsonb",
    f"ALTER TABLE {AUDIT_TABLE} ADD COLUMN IF NOT EXISTS queue_depth_before jsonb",
    f"ALTER TABLE {AUDIT_TABLE} ADD COLUMN IF NOT EXISTS queue_depth_after jsonb",
    f"ALTER TABLE {AUDIT_TABLE} ADD COLUMN IF NOT EXISTS purged integer NOT NULL DEFAULT 0",
    f"ALTER TABLE {AUDIT_TABLE} ADD COLUMN IF NOT EXISTS kept integer NOT NULL DEFAULT 0",
)


def ensure_replay_tables(conn) -> None:
    """The audit and snapshot tables, next to the events (created on first use; an advisory lock
    keeps two first replays from racing on CREATE TABLE IF NOT EXISTS)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('event_replay_tables'))")
        for statement in (AUDIT_DDL, SNAPSHOT_DDL, DEAD_LETTER_DDL, *AUDIT_COLUMNS_ADDED):
            conn.execute(statement)


# ---- selections -------------------------------------------------------------------------------


def _parse_time(value: str, end: bool = False) -> datetime:
    """ISO date or timestamp; a date alone as an end means the whole of that day (exclusive next
    midnight, unlike the seed's BETWEEN, which dropped the last day). Naive times are UTC."""
    value = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        d = datetime.combine(date.fromisoformat(value), datetime.min.time(), tzinfo=timezone.utc)
        return d + timedelta(days=1) if end else d
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


_PAYLOAD_FIELD = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def payload_fields(fields: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    """`{"contribution_id": "abc"}` as sorted (field, value) pairs, each field a top-level key of
    the payload (compared as text, `payload->>field`; the name only ever goes to SQL as a parameter)."""
    pairs = []
    for name, value in sorted((fields or {}).items()):
        if not _PAYLOAD_FIELD.fullmatch(str(name)):
            raise ValueError(
                f"{name!r} is not a payload field name (a top-level key of letters, digits, _ or -, at most 128)"
            )
        if value is None:
            raise ValueError(f"payload field {name!r} needs a value")
        pairs.append((name, str(value)))
    return tuple(pairs)


@dataclass(frozen=True)
class EventSelection:
    """Which rows a replay covers. Build with the class methods; `with_payload` narrows any of
    them to rows whose payload has the given top-level values (the seed's `payload->>'contribution_id'`)."""

    kind: str  # one | failed | range | stuck | payload
    event_id: str | None = None
    event_type: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    older_than_minutes: float | None = None
    payload: tuple[tuple[str, str], ...] = ()  # (field, value) pairs, AND-ed

    def with_payload(self, fields: dict[str, str] | None) -> "EventSelection":
        return replace(self, payload=payload_fields(fields))

    @classmethod
    def by_payload(cls, fields: dict[str, str]) -> "EventSelection":
        """Every row whose payload has these values (e.g. all events of one contribution), any time."""
        pairs = payload_fields(fields)
        if not pairs:
            raise ValueError("select by payload needs at least one field=value")
        return cls("payload", payload=pairs)

    @classmethod
    def one(cls, event_id: str) -> "EventSelection":
        if not event_id:
            raise ValueError("event_id is required")
        return cls("one", event_id=event_id)

    @classmethod
    def failed(
        cls, since: str | None = None, until: str | None = None, hours: float = 24.0, now: datetime | None = None
    ) -> "EventSelection":
        """Rows in `error` whose processed_at is in [since, until) (default: the last `hours`)."""
        now = now or datetime.now(timezone.utc)
        start = _parse_time(since) if since else now - timedelta(hours=hours)
        end = _parse_time(until, end=True) if until else now
        if end <= start:
            raise ValueError(f"empty window: {start.isoformat()} .. {end.isoformat()}")
        return cls("failed", start=start, end=end)

    @classmethod
    def range(cls, event_type: str, start: str, end: str) -> "EventSelection":
        """Rows of `event_type` whose processed_at is in [start, end] (a date end: the whole day)."""
        if not event_type:
            raise ValueError("event_type is required")
        s, e = _parse_time(start), _parse_time(end, end=True)
        if e <= s:
            raise ValueError(f"end {end} is not after start {start}")
        return cls("range", event_type=event_type, start=s, end=e)

    @classmethod
    def stuck(cls, older_than_minutes: float = 5) -> "EventSelection":
        """Rows in `processing` since more than N minutes (processed_at, else created_at)."""
        if older_than_minutes < 0:
            raise ValueError("older_than_minutes must be >= 0")
        return cls("stuck", older_than_minutes=older_than_minutes)

    def where(self):
        """(SQL condition, parameters)."""
        from psycopg import sql

        cond, params = self._kind_where()
        for name, value in self.payload:
            cond = sql.SQL("({}) AND payload->>%s = %s").format(cond)
            params = [*params, name, value]
        return cond, params

    def _kind_where(self):
        from psycopg import sql

        if self.kind == "payload":
            return sql.SQL("true"), []
        if self.kind == "one":
            return sql.SQL("event_id = %s"), [self.event_id]
        if self.kind == "failed":
            return sql.SQL("status = 'error' AND processed_at >= %s AND processed_at < %s"), [self.start, self.end]
        if self.kind == "range":
            return sql.SQL("event_type = %s AND processed_at >= %s AND processed_at < %s"), [
                self.event_type,
                self.start,
                self.end,
            ]
        if self.kind == "stuck":
            return (
                sql.SQL(
                    "status = 'processing' AND coalesce(processed_at, created_at) < now() - make_interval(secs => %s)"
                ),
                [self.older_than_minutes * 60],
            )
        raise ValueError(f"unknown selection {self.kind!r}")

    def describe(self) -> dict:
        described = {
            k: (v.isoformat() if isinstance(v, datetime) else v)
            for k, v in asdict(self).items()
            if v is not None and k != "payload"
        }
        if self.payload:
            described["payload"] = dict(self.payload)
        return described


# ---- interrupts -------------------------------------------------------------------------------


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (Dagster cancels a run with them) until the block is done, then act on
    them as if they arrived right after it: a publish and its bookkeeping are never split."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    originals = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, lambda signo, _frame: received.append(signo))
    try:
        yield
    finally:
        for s, handler in originals.items():
            signal.signal(s, handler)
        if received:
            handler = originals[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL and received[0] == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(received[0])


# ---- replay -----------------------------------------------------------------------------------


# A replay's counts, in the order the audit, the run metadata and the CLI show them.
COUNTS = (
    "selected",
    "published",
    "changed",
    "forced_count",
    "skipped_processed",
    "skipped_pending",
    "skipped_processing",
    "failed",
    "refused",
    "not_reached",
)


@dataclass
class Report:
    run_id: str
    action: str
    table: str
    selection: dict
    dry_run: bool = False
    force: bool = False
    selected: int = 0  # rows matching the selection when the replay started
    published: int = 0  # confirmed by the broker (and moved to the new status)
    changed: int = 0  # rows whose status this run changed (= published when publishing)
    would_change: int = 0  # a dry run's plan: rows a replay would change (a dry run changes none)
    forced_count: int = 0  # processed/pending rows replayed because of force
    skipped_processed: int = 0
    skipped_pending: int = 0
    skipped_processing: int = 0
    failed: int = 0  # refused for its shape, not confirmed (unroutable, nacked), connection lost: row left unchanged
    refused: int = 0  # of failed: refused for the message's shape (dead-lettered, the replay went on)
    refused_by_reason: dict = field(default_factory=dict)  # e.g. {"routing_key_too_long": 1}
    dead_letters: int = 0  # rows recorded in event_replay_dead_letter
    not_reached: int = 0  # locked by another replay/worker, or left when stopped
    status: str = "running"  # running | succeeded | failed | stopped | dry_run
    by_status: dict = field(default_factory=dict)  # selection per current status (the plan)
    by_type: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    snapshot: str | None = None
    seconds: float = 0.0
    queue_depth_before: dict | None = None  # ready messages per watched queue, before publishing
    queue_depth_after: dict | None = None  # ... and when the run ended (however it ended)
    purged: int = 0  # purge: messages of the replay taken off the queue (acked)
    kept: int = 0  # purge: other messages put back (nack, requeue)

    @property
    def forced(self) -> bool:
        return self.forced_count > 0

    def counts(self) -> dict:
        """The counts in COUNTS' order; a dry run's plan says `would_change` where a replay says `changed`."""
        names = ("would_change" if self.dry_run and k == "changed" else k for k in COUNTS)
        return {k: getattr(self, k) for k in names}


def _failure_reason(err: str) -> str:
    """`refused: routing_key_too_long: 300 bytes > 255` -> routing_key_too_long; `not confirmed: X` -> not_confirmed."""
    if err.startswith("refused"):
        return err.split(":", 2)[1].strip() or "refused"
    return err.split(":", 1)[0].strip().replace(" ", "_") or "failed"


def dead_letter_location(run_id: str) -> str:
    return f"{DEAD_LETTER_TABLE} WHERE run_id = '{run_id}'"


def snapshot_location(run_id: str) -> str:
    return f"{SNAPSHOT_TABLE} WHERE run_id = '{run_id}'"


def _plan(conn, table: str, selection: EventSelection) -> tuple[int, dict, dict]:
    from psycopg import sql

    cond, params = selection.where()
    rows = conn.execute(
        sql.SQL("SELECT status, event_type, count(*) FROM {t} WHERE {c} GROUP BY 1, 2").format(
            t=table_identifier(table), c=cond
        ),
        params,
    ).fetchall()
    by_status: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for status, event_type, n in rows:
        by_status[status] = by_status.get(status, 0) + n
        by_type[event_type] = by_type.get(event_type, 0) + n
    return sum(by_status.values()), by_status, by_type


def _audit_start(conn, report: Report, requested_by: str, reason: str, exchange: str | None) -> None:
    conn.execute(
        f"INSERT INTO {AUDIT_TABLE} (run_id, action, table_name, selection, requested_by, reason, exchange, force, selected, snapshot,"
        " queue_depth_before, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'running')",
        (
            report.run_id,
            report.action,
            report.table,
            json.dumps(report.selection),
            requested_by,
            reason,
            exchange,
            report.force,
            report.selected,
            report.snapshot,
            _json_or_none(report.queue_depth_before),
        ),
    )


def _json_or_none(value) -> str | None:
    return None if value is None else json.dumps(value)


def _audit_finish(conn, report: Report, error: str | None = None) -> None:
    c = report.counts()
    conn.execute(
        f"UPDATE {AUDIT_TABLE} SET published = %s, changed = %s, forced = %s, forced_count = %s, skipped_processed = %s,"
        " skipped_pending = %s, skipped_processing = %s, failed = %s, refused = %s, refused_by_reason = %s, not_reached = %s, status = %s,"
        " error = %s, queue_depth_after = %s, purged = %s, kept = %s, finished_at = now() WHERE run_id = %s",
        (
            c["published"],
            c["changed"],
            report.forced,
            c["forced_count"],
            c["skipped_processed"],
            c["skipped_pending"],
            c["skipped_processing"],
            c["failed"],
            c["refused"],
            json.dumps(report.refused_by_reason),
            c["not_reached"],
            report.status,
            redact(error) if error else None,
            _json_or_none(report.queue_depth_after),
            report.purged,
            report.kept,
            report.run_id,
        ),
    )


def _finish_status(report: Report, exc: BaseException | None) -> str | None:
    """Sets report.status from how the run ended; returns the error text for the audit."""
    if exc is None:
        report.status = "failed" if report.failed else "succeeded"
        return "; ".join(report.errors[:5]) or None
    if isinstance(exc, Exception):
        report.status = "failed"
        return redact(f"{type(exc).__name__}: {exc}")[:2000]
    report.status = "stopped"  # KeyboardInterrupt, DagsterExecutionInterruptedError: run cancelled
    return f"stopped ({type(exc).__name__}) after {report.published} published"


def _check_replay_arguments(
    batch_size: int, rate_limit: float, new_status: str, publish: bool, exchange, dry_run: bool
) -> None:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if rate_limit < 0:
        raise ValueError("rate_limit must be >= 0 (0: unlimited)")
    if new_status not in STATUSES:
        raise ValueError(f"unknown status {new_status!r}")
    if publish and exchange is None and not dry_run:
        raise ValueError("publishing needs an exchange")


def _replayable_statuses(selection: EventSelection, force: bool) -> set[str]:
    """`error` rows (the stuck reset: `processing` ones); with force, also processed and pending."""
    replayable = {"processing"} if selection.kind == "stuck" else {"error"}
    if force:
        replayable |= {"processed", "pending"}
    return replayable


class _ReplaySQL(NamedTuple):
    select: Any  # the next batch of selected rows, locked (SKIP LOCKED: a held row is left to its holder)
    snapshot: Any  # the rows' current values, kept for undo
    update: Any  # the rows' new status
    dead_letter: str  # a row whose message failed on its own


def _replay_sql(table: str, selection: EventSelection, new_status: str) -> _ReplaySQL:
    from psycopg import sql

    t = table_identifier(table)
    cond, _ = selection.where()
    select = sql.SQL(
        "SELECT id, event_type, event_id, idempotency_key, payload, status FROM {t} WHERE ({c}) AND id > %s"
        " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
    ).format(t=t, c=cond)
    snapshot = sql.SQL(
        "INSERT INTO {s} (run_id, table_name, event_pk, event_id, status, retry_count, error_message, processed_at)"
        " SELECT %s, %s, id, event_id, status, retry_count, error_message, processed_at FROM {t} WHERE id = ANY(%s)"
        " ON CONFLICT DO NOTHING"
    ).format(s=sql.Identifier(SNAPSHOT_TABLE), t=t)
    if new_status == "pending":  # back to the worker, as the seed's replay SQL does
        update = sql.SQL(
            "UPDATE {t} SET status = %s, retry_count = 0, error_message = %s, processed_at = NULL WHERE id = ANY(%s)"
        )
    else:  # marked failed now, so a later replay-failed window finds it
        update = sql.SQL("UPDATE {t} SET status = %s, error_message = %s, processed_at = now() WHERE id = ANY(%s)")
    dead_letter = (
        f"INSERT INTO {DEAD_LETTER_TABLE} (run_id, table_name, event_pk, event_id, event_type, reason, error)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
    )
    return _ReplaySQL(select, snapshot, update.format(t=t), dead_letter)


class _ThrottledProgress:
    """Calls `callback(report)` at most every `every_s` seconds."""

    def __init__(self, callback: Callable[[Report], None] | None, every_s: float):
        self.callback, self.every_s = callback, every_s
        self.last = time.monotonic()

    def maybe(self, report: Report) -> None:
        if self.callback and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.callback(report)


@dataclass
class _BatchOutcome:
    """What a batch commits: the confirmed rows, their dead letters, how many were forced."""

    done: list[int] = field(default_factory=list)
    dead: list[tuple] = field(default_factory=list)
    forced: int = 0


class _RowReplay:
    """Walks the selected rows in batches, publishes each replayable one (paced), and commits per
    batch exactly the rows the broker confirmed, with their snapshot and new status."""

    def __init__(
        self,
        conn,
        report: Report,
        selection: EventSelection,
        replayable: set[str],
        *,
        exchange,
        publish: bool,
        pacer: Pacer,
        progress: _ThrottledProgress,
        batch_size: int,
        new_status: str,
        new_error: str | None,
    ):
        self.conn, self.report, self.selection, self.replayable = conn, report, selection, replayable
        self.exchange, self.publish, self.pacer, self.progress = exchange, publish, pacer, progress
        self.batch_size, self.new_status, self.new_error = batch_size, new_status, new_error
        self.sql = _replay_sql(report.table, selection, new_status)
        self.handled = 0  # rows skipped, changed or failed (the rest: not reached)
        self.broken: str | None = None  # the connection error that stopped the run

    def run(self) -> None:
        _, params = self.selection.where()
        last_id = 0
        while True:
            with deferred_interrupts():  # a cancel never lands inside a query
                rows = self.conn.execute(self.sql.select, [*params, last_id, self.batch_size]).fetchall()
            if not rows:
                self.conn.commit()
                return
            last_id = rows[-1][0]
            self._replay_batch(rows)
            if self.broken:  # the broker is gone: what was confirmed is committed, the rest stays as it was
                raise ConnectionError(
                    f"RabbitMQ connection lost after {self.report.published} published: {self.broken}"
                )
            self.progress.maybe(self.report)

    def _replay_batch(self, rows: list[tuple]) -> None:
        batch = _BatchOutcome()
        try:
            for row in rows:
                if not self._replay_row(row, batch):
                    break
        finally:
            # Whatever happened (stop included), commit exactly the rows the broker confirmed.
            self._commit(batch)

    def _replay_row(self, row: tuple, batch: _BatchOutcome) -> bool:
        """Skip, change or publish one row; False when the connection is lost."""
        pk, _, _, _, _, status = row
        if status not in self.replayable:
            self.handled += 1
            self._count_skipped(status)
            return True
        if not self.publish:
            self.handled += 1
            batch.done.append(pk)
            return True
        self.pacer.wait()  # a cancel lands here, between two publishes
        err = self._publish(row, batch)
        if err is not None and not self._record_failure(row, err, batch):
            return False
        self.progress.maybe(self.report)
        return True

    def _count_skipped(self, status: str) -> None:
        if status == "processed":
            self.report.skipped_processed += 1
        elif status == "pending":
            self.report.skipped_pending += 1
        else:
            self.report.skipped_processing += 1

    def _publish(self, row: tuple, batch: _BatchOutcome) -> str | None:
        pk, event_type, event_id, idem, payload, status = row
        forced = status in ("processed", "pending") and self.selection.kind != "stuck"
        headers = {
            "event_id": event_id,
            "idempotency_key": idem,
            "event_type": event_type,
            "replay_run_id": self.report.run_id,
            "replay_forced": forced,
        }
        body = json.dumps(payload, separators=(",", ":")).encode()
        with deferred_interrupts():  # a publish and its bookkeeping are one unit
            err = self.exchange.publish(event_type, body, message_id=event_id, headers=headers)
            self.handled += 1
            if err is None:
                batch.done.append(pk)
                batch.forced += forced
        return err

    def _record_failure(self, row: tuple, err: str, batch: _BatchOutcome) -> bool:
        """Count a failed publish; False when the connection is lost (the run stops)."""
        pk, event_type, event_id = row[0], row[1], row[2]
        report = self.report
        report.failed += 1
        if len(report.errors) < 20:
            report.errors.append(f"{event_id}: {err}")
        if self.exchange.connection_lost(err):  # not sent, or in doubt: the row stays as it was, retried next time
            self.broken = err
            return False
        # This message alone failed (its shape refused, or not confirmed): the row stays
        # as it was, is dead-lettered, and the replay goes on with the next row.
        reason = _failure_reason(err)
        if err.startswith("refused"):
            report.refused += 1
            report.refused_by_reason[reason] = report.refused_by_reason.get(reason, 0) + 1
        batch.dead.append((report.run_id, report.table, pk, event_id, event_type, reason, err[:2000]))
        return True

    def _commit(self, batch: _BatchOutcome) -> None:
        report, conn = self.report, self.conn
        with deferred_interrupts():
            if batch.done:
                conn.execute(self.sql.snapshot, [report.run_id, report.table, batch.done])
                conn.execute(self.sql.update, [self.new_status, self.new_error, batch.done])
            if batch.dead:
                conn.cursor().executemany(self.sql.dead_letter, batch.dead)
            conn.commit()
            report.dead_letters += len(batch.dead)
            report.changed += len(batch.done)
            report.published += len(batch.done) if self.publish else 0
            report.forced_count += batch.forced


@contextmanager
def _audited(
    conn, report: Report, t0: float, handled: Callable[[], int], queue_depths: QueueDepths | None = None
) -> Iterator[None]:
    """Whatever ends the block (success, an error, a cancel), its outcome goes into the audit row,
    with the watched queues' depth at that moment."""
    exc_seen: BaseException | None = None
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - a cancelled run lands here too; re-raised
        exc_seen = exc
        raise
    finally:
        if queue_depths is not None:
            try:
                report.queue_depth_after = queue_depths()
            except Exception as exc:  # noqa: BLE001 - the broker went away: the audit says so, the run's outcome stands
                report.errors.append(redact(f"queue depth after: {type(exc).__name__}: {exc}")[:300])
        report.not_reached = max(0, report.selected - handled())
        report.seconds = time.monotonic() - t0
        error = _finish_status(report, exc_seen)
        with deferred_interrupts():
            try:
                conn.rollback()
                conn.autocommit = True
                _audit_finish(conn, report, error)
            except Exception:  # the database went away: the run's error says why
                if exc_seen is None:
                    raise


def _require_targets(conn, table: str, url: str, exchange) -> None:
    """The table, and the exchange when one will be published to, exist (else a clear error)."""
    require_table(conn, table, url)
    if exchange is not None:
        exchange.require_exchange()


def _dry_run_report(report: Report, replayable, t0: float) -> Report:
    report.status = "dry_run"
    report.would_change = sum(n for s, n in report.by_status.items() if s in replayable)
    report.seconds = time.monotonic() - t0
    return report


# Ready messages per watched queue (`queue_depths` bound to the broker and the queues).
QueueDepths = Callable[[], dict[str, int]]


def replay(
    url: str,
    selection: EventSelection,
    run_id: str,
    *,
    table: str = "processed_events",
    exchange=None,
    exchange_name: str = "",
    action: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    rate_limit: float = 0.0,
    batch_size: int = 100,
    requested_by: str = "unknown",
    reason: str = "",
    publish: bool = True,
    new_status: str = "pending",
    new_error: str | None = None,
    progress: Callable[[Report], None] | None = None,
    progress_every_s: float = 5.0,
    queue_depths: QueueDepths | None = None,
) -> Report:
    """Replay the selected rows (see the module docstring). `exchange`: an object with
    `publish(routing_key, body, message_id, headers) -> None | error` and `require_exchange()`
    (`sinks.rabbitmq.RabbitMQSink`); a missing table or exchange fails before any row is selected;
    `publish=False` only changes statuses (the stuck reset to `error`). `queue_depths` is measured
    before publishing (a missing queue fails then) and at the end."""
    _check_replay_arguments(batch_size, rate_limit, new_status, publish, exchange, dry_run)
    table_identifier(table)
    report = Report(run_id, action or selection.kind, table, selection.describe(), dry_run=dry_run, force=force)
    t0 = time.monotonic()
    with connect.postgres(url, autocommit=True, connect_timeout=10) as conn:
        _require_targets(conn, table, url, exchange if publish and not dry_run else None)
        report.selected, report.by_status, report.by_type = _plan(conn, table, selection)
        if selection.kind == "one" and not report.selected:
            raise LookupError(f"no event with event_id {selection.event_id!r} in {table}")
        report.queue_depth_before = queue_depths() if queue_depths else None  # a missing queue fails here
        replayable = _replayable_statuses(selection, force)
        if dry_run:
            return _dry_run_report(report, replayable, t0)
        ensure_replay_tables(conn)
        report.snapshot = snapshot_location(run_id)
        _audit_start(conn, report, requested_by, reason, exchange_name if publish else None)
        conn.autocommit = False
        rows = _RowReplay(
            conn,
            report,
            selection,
            replayable,
            exchange=exchange,
            publish=publish,
            pacer=Pacer(rate_limit),
            progress=_ThrottledProgress(progress, progress_every_s),
            batch_size=batch_size,
            new_status=new_status,
            new_error=new_error,
        )
        with _audited(conn, report, t0, lambda: rows.handled, queue_depths):
            rows.run()
    return report


# Undo: lock the rows the replay changed, snapshot their current values under the undo's run id,
# then put the replay's snapshot back.
_UNDO_LOCK = (
    "SELECT p.id FROM {t} p JOIN {s} s ON s.event_pk = p.id WHERE s.run_id = %s AND s.table_name = %s FOR UPDATE OF p"
)
_UNDO_SNAPSHOT = (
    "INSERT INTO {s} (run_id, table_name, event_pk, event_id, status, retry_count, error_message, processed_at)"
    " SELECT %s, %s, p.id, p.event_id, p.status, p.retry_count, p.error_message, p.processed_at"
    " FROM {t} p JOIN {s} old ON old.event_pk = p.id WHERE old.run_id = %s AND old.table_name = %s"
)
_UNDO_RESTORE = (
    "UPDATE {t} p SET status = s.status, retry_count = s.retry_count, error_message = s.error_message,"
    " processed_at = s.processed_at FROM {s} s WHERE s.event_pk = p.id AND s.run_id = %s AND s.table_name = %s"
)


def _check_undoable(conn, undo_run_id: str) -> None:
    found = conn.execute(f"SELECT status, undone_by FROM {AUDIT_TABLE} WHERE run_id = %s", (undo_run_id,)).fetchone()
    if found is None:
        raise LookupError(f"no replay {undo_run_id!r} in {AUDIT_TABLE}")
    if found[1]:
        raise ValueError(f"replay {undo_run_id} was already undone by run {found[1]} (undo that run to redo it)")


def _restore_snapshot(conn, table: str, undo_run_id: str, run_id: str) -> int:
    """Put back the rows replay `undo_run_id` snapshotted (their current values snapshotted under
    `run_id` first) and mark the replay undone, in one transaction. Returns the rows restored."""
    from psycopg import sql

    names = {"t": table_identifier(table), "s": sql.Identifier(SNAPSHOT_TABLE)}
    with deferred_interrupts(), conn.transaction():
        conn.execute(sql.SQL(_UNDO_LOCK).format(**names), (undo_run_id, table))
        conn.execute(sql.SQL(_UNDO_SNAPSHOT).format(**names), (run_id, table, undo_run_id, table))
        restored = conn.execute(sql.SQL(_UNDO_RESTORE).format(**names), (undo_run_id, table)).rowcount
        conn.execute(f"UPDATE {AUDIT_TABLE} SET undone_by = %s WHERE run_id = %s", (run_id, undo_run_id))
    return restored


def undo(
    url: str,
    undo_run_id: str,
    run_id: str,
    *,
    table: str = "processed_events",
    dry_run: bool = False,
    requested_by: str = "unknown",
    reason: str = "",
) -> Report:
    """Restore status, retry_count, error_message and processed_at of the rows replay `undo_run_id`
    changed, as snapshotted. The current values are snapshotted under `run_id` first, so an undo
    can itself be undone."""
    table_identifier(table)
    report = Report(run_id, "undo", table, {"undo_of": undo_run_id}, dry_run=dry_run)
    t0 = time.monotonic()
    with connect.postgres(url, autocommit=True, connect_timeout=10) as conn:
        ensure_replay_tables(conn)
        _check_undoable(conn, undo_run_id)
        report.selected = conn.execute(
            f"SELECT count(*) FROM {SNAPSHOT_TABLE} WHERE run_id = %s AND table_name = %s", (undo_run_id, table)
        ).fetchone()[0]
        if dry_run:
            report.status = "dry_run"
            report.changed = report.selected
            return report
        report.snapshot = snapshot_location(run_id)
        _audit_start(conn, report, requested_by, reason, None)
        with _audited(conn, report, t0, lambda: report.changed):
            report.changed = _restore_snapshot(conn, table, undo_run_id, run_id)
    return report


# ---- queues -----------------------------------------------------------------------------------


def queue_depth(channel, queue: str) -> int:
    """Ready messages in `queue` (a passive `queue_declare`: no management plugin needed). A
    missing queue is a LookupError (the broker closes the channel: use a fresh one for the next)."""
    import pika

    try:
        return channel.queue_declare(queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            raise LookupError(
                f"RabbitMQ has no queue {queue!r} (in the vhost of EVENT_REPLAY_RABBITMQ_URL): "
                "declare it, or name the consumers' queue"
            ) from None
        raise


def queue_depths(rabbitmq_url: str, queues) -> dict[str, int]:
    """Ready messages per queue, e.g. the consumers' queues a replay feeds (see `queue_depth`)."""
    if not queues:
        return {}
    conn = connect.rabbitmq(rabbitmq_url, connection_attempts=1, socket_timeout=5)
    try:
        return {q: queue_depth(conn.channel(), q) for q in queues}
    finally:
        if conn.is_open:
            conn.close()


# ---- purge ------------------------------------------------------------------------------------


def _header(props, name: str):
    value = (props.headers or {}).get(name)
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _take_run_messages(channel, queue: str, replay_run_id: str, report: Report) -> None:
    """Take the queue's ready messages one by one (`basic_get`, unacknowledged), as many as it held
    at the start (`report.selected`): ack those whose `replay_run_id` header is `replay_run_id`
    (gone for good), hold the others, then put them all back with one nack(requeue). RabbitMQ
    puts a requeued message back at its original place in the queue, marked `redelivered`; a
    message the purge holds is never lost (a crash or cancel closes the channel, which requeues it
    the same way)."""
    try:
        for _ in range(report.selected):
            with deferred_interrupts():  # a message taken is acked or held before a cancel lands
                method, props, _body = channel.basic_get(queue, auto_ack=False)
                if method is None:  # consumers took the rest
                    return
                if _header(props, "replay_run_id") == replay_run_id:
                    channel.basic_ack(method.delivery_tag)
                    report.purged += 1
                else:
                    report.kept += 1
    finally:
        if report.kept and channel.is_open:
            channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)  # every held message


def _depth_after_requeue(channel, queue: str, kept: int, timeout_s: float = 2.0) -> int:
    """The queue's depth once the broker has applied our requeue (it does so asynchronously: a
    depth read right after the nack can miss the requeued messages). Waits at most `timeout_s`
    for at least `kept` messages; live consumers may take them first, then the depth read is what
    it is."""
    deadline = time.monotonic() + timeout_s
    while (depth := queue_depth(channel, queue)) < kept and time.monotonic() < deadline:
        time.sleep(0.05)
    return depth


def purge(
    url: str,
    rabbitmq_url: str,
    queue: str,
    purge_run_id: str,
    run_id: str,
    *,
    confirm: str = "",
    requested_by: str = "unknown",
    reason: str = "",
) -> Report:
    """Take the messages replay `purge_run_id` published off `queue` before consumers drain them
    (header `replay_run_id`); every other message goes back. `confirm` must be `purge_run_id`.
    Audited as action `purge` (purged, kept; selected = ready messages at the start, not_reached =
    those consumers took meanwhile). The table is untouched: `undo` the replay for that."""
    if confirm != purge_run_id:
        raise ValueError(
            f"purging takes the messages of replay {purge_run_id} off queue {queue!r} for good: "
            f"confirm with the replay's run id (config `confirm: {purge_run_id}`, CLI --yes)"
        )
    with connect.postgres(url, autocommit=True, connect_timeout=10) as conn:
        ensure_replay_tables(conn)
        found = conn.execute(f"SELECT table_name FROM {AUDIT_TABLE} WHERE run_id = %s", (purge_run_id,)).fetchone()
        if found is None:
            raise LookupError(f"no replay {purge_run_id!r} in {AUDIT_TABLE} (the run id the replay printed)")
        report = Report(run_id, "purge", found[0], {"purge_of": purge_run_id, "queue": queue})
        t0 = time.monotonic()
        amqp = connect.rabbitmq(rabbitmq_url, connection_attempts=1, socket_timeout=10)
        try:
            channel = amqp.channel()
            report.selected = queue_depth(channel, queue)  # a missing queue: LookupError, nothing audited
            report.queue_depth_before = {queue: report.selected}
            _audit_start(conn, report, requested_by, reason, None)
            with _audited(
                conn,
                report,
                t0,
                lambda: report.purged + report.kept,
                lambda: {queue: _depth_after_requeue(channel, queue, report.kept)},
            ):
                _take_run_messages(channel, queue, purge_run_id, report)
        finally:
            if amqp.is_open:
                amqp.close()
    return report


def audit_row(url: str, run_id: str) -> dict[str, Any] | None:
    """The audit record of a replay, as a dict (None if there is none)."""
    from psycopg.rows import dict_row

    with connect.postgres(url, connect_timeout=10, row_factory=dict_row) as conn:
        ensure_replay_tables(conn)
        return conn.execute(f"SELECT * FROM {AUDIT_TABLE} WHERE run_id = %s", (run_id,)).fetchone()
