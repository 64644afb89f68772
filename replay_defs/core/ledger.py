"""The redrive idempotency ledger: which messages each pipeline's sink already has.

A row per (pipeline, sink, message id) with the partition (day), status, attempts, last error,
the replay run id, when it was last sent and whether it may be a duplicate. Statuses:

- `sending`: written before a chunk is handed to the sink (the intent), so a crash at any point
  leaves the chunk in doubt rather than unrecorded;
- `delivered`: the sink confirmed it; `failed`: the sink refused it (the target does not hold it);
- `unknown`: sent, but neither confirmed nor refused (a timeout, a connection lost after sending).

A redrive skips ids recorded as delivered unless forced, and reconciles `sending` and `unknown`
ones with the sink before sending them again. Two backends with the same rows (`redrive_ledger`)
and behaviour:

- `DuckDBLedger`: the embedded default, in the store's DuckDB file, kept per send (`redrive_ledger`
  is a view there);
- `PostgresLedger`: for real backends (`EVENT_REPLAY_LEDGER_URL=postgresql://...`), so several
  run workers on several machines share it.

Ids travel as one Arrow column or array parameter per batch, never one statement per message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Protocol

import duckdb
import pyarrow as pa

from replay_defs.core import connect
from replay_defs.core.duckdb_file import DuckDBFile
from replay_defs.core.redact import redact

COLUMNS = (
    "pipeline, sink, message_id, day, status, attempts, last_error, run_id, updated_at, sent_at, possible_duplicate"
)
DELIVERED, FAILED, SENDING, UNKNOWN = "delivered", "failed", "sending", "unknown"
IN_DOUBT = (SENDING, UNKNOWN)
# Columns added after the first release: a ledger created before them gets them on open.
ADDED_COLUMNS = ("sent_at TIMESTAMPTZ", "possible_duplicate BOOLEAN DEFAULT false")


class Ledger(Protocol):
    def delivered(self, pipeline: str, sink: str, ids: list[str]) -> set[str]:
        """The subset of `ids` the sink already has."""

    def in_doubt(self, pipeline: str, sink: str, ids: list[str]) -> dict[str, tuple[float, str]]:
        """The ids of `ids` whose last send is in doubt (`sending` or `unknown`), each with when it
        was first sent (epoch seconds) and the day (partition) it was sent for."""

    def lookup(self, pipeline: str, sink: str, ids: list[str]) -> tuple[set[str], dict[str, tuple[float, str]]]:
        """`delivered` and `in_doubt` of `ids` in one query."""

    def record(
        self,
        pipeline: str,
        sink: str,
        day: str,
        ids: list[str],
        status: str,
        run_id: str,
        error: str | None = None,
        possible_duplicate: bool = False,
    ) -> None:
        """Record each id's status: `sending` (an attempt begins: counted, and its time kept),
        `delivered`, `failed` or `unknown` (with the error). `possible_duplicate` sticks to the row.
        An outcome updates the rows its attempt's intent wrote (inserted, should one be missing)."""

    def claim(self, pipeline: str, sink: str, day: str, ids: list[str], run_id: str) -> bool:
        """Records `ids` as `sending` (their intent) if none of them is in the ledger yet, and says
        whether it did; else writes nothing. For a day's first delivery this one insert answers the
        lookup (nothing delivered, nothing in doubt) and records the intent at once."""

    def summary(self, pipeline: str, day: str) -> dict[str, dict[str, int]]:
        """The day's rows per sink: how many in each status, and `possible_duplicates`."""

    def count(self, pipeline: str, sink: str, day: str, run_id: str | None = None) -> int:
        """Ids of the day recorded as delivered (by one run, when given)."""

    def rows(self, pipeline: str, sink: str, day: str) -> list[dict]:
        """Every ledger row of the day, for inspection and tests."""


# An attempt (`sending`) counts and stamps the row with this process's clock (the one a Kafka
# message's timestamp comes from, whatever the ledger server's clock says); an outcome keeps the
# attempt's count and time.
# A row still in doubt keeps its first attempt's time: the target may hold that first copy (and an
# SQS FIFO queue's deduplication window runs from it). Postgres's upsert; DuckDB's `MOVED` does the same.
UPSERT = """status = excluded.status,
    attempts = redrive_ledger.attempts + CASE WHEN excluded.status = 'sending' THEN 1 ELSE 0 END,
    last_error = excluded.last_error, run_id = excluded.run_id, day = excluded.day, updated_at = now(),
    sent_at = CASE WHEN redrive_ledger.status IN ('sending', 'unknown')
      THEN coalesce(redrive_ledger.sent_at, excluded.sent_at) ELSE coalesce(excluded.sent_at, redrive_ledger.sent_at) END,
    possible_duplicate = redrive_ledger.possible_duplicate OR excluded.possible_duplicate"""
STATUSES = (DELIVERED, FAILED, UNKNOWN, SENDING)
SUMMARY = ", ".join(f"count(*) FILTER (WHERE status = '{s}')" for s in STATUSES) + (
    ", count(*) FILTER (WHERE possible_duplicate)"
)


def _record_params(pipeline, sink, day, status, run_id, error, possible_duplicate) -> dict:
    """The query parameters of a `record` (both backends name them alike)."""
    return dict(
        pipeline=pipeline, sink=sink, day=day, status=status, error=error, run_id=run_id, dup=possible_duplicate
    )


def _summary(rows) -> dict[str, dict[str, int]]:
    return {r[0]: dict(zip((*STATUSES, "possible_duplicates"), map(int, r[1:]))) for r in rows}


class _Lookups:
    """`delivered`, `in_doubt` and both at once, from a backend's `_known`: (id, status, first
    sent, day) of each of `ids` that is delivered or in doubt."""

    def delivered(self, pipeline: str, sink: str, ids: list[str]) -> set[str]:
        return self.lookup(pipeline, sink, ids)[0]

    def in_doubt(self, pipeline: str, sink: str, ids: list[str]) -> dict[str, tuple[float, str]]:
        return self.lookup(pipeline, sink, ids)[1]

    def lookup(self, pipeline: str, sink: str, ids: list[str]) -> tuple[set[str], dict[str, tuple[float, str]]]:
        delivered, in_doubt = set(), {}
        for message_id, status, sent, day in self._known(pipeline, sink, ids) if ids else ():
            if status == DELIVERED:
                delivered.add(message_id)
            else:
                in_doubt[message_id] = (sent, day)
        return delivered, in_doubt


def _run(con, sql: str, params: dict | None = None) -> list[tuple]:
    """A DuckDB statement run to its end (a connection with an unfinished result refuses other work)."""
    return con.execute(sql, params or {}).fetchall()


class DuckDBLedger(_Lookups):
    """The ledger in the store's DuckDB file, kept per send rather than per id.

    The ids of one chunk share all but their id: day, status, attempts, error, run and times. So a
    chunk's intent is one `redrive_sends` row holding all that, and one narrow `redrive_ids` row per
    id (scope, message_id, send_id) under the primary key that refuses an id sent before; the
    outcome that settles the whole chunk updates the send's one row. An outcome for part of a chunk
    (some refused, some in doubt), a second attempt, or ids of no intent of this ledger's move their
    ids to send rows of their own, keeping each id's attempts and first send time. A scope number
    (`redrive_scopes`) stands for each (pipeline, sink). `redrive_ledger` is a view with one row per
    id and the Postgres table's columns.

    Measured (`bench/redrive_bench.py`'s day, batches of 10k): an intent costs ~0.9 µs of CPU an id
    and its outcome next to nothing, against 1.7 and 0.85 µs with one wide row per id (each column
    of a row costs DuckDB ~0.13 µs an id to write, the primary key's index ~0.6)."""

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS redrive_scopes (scope INTEGER PRIMARY KEY, pipeline VARCHAR NOT NULL, "
        "sink VARCHAR NOT NULL, UNIQUE (pipeline, sink))",
        "CREATE TABLE IF NOT EXISTS redrive_sends (send_id BIGINT PRIMARY KEY, scope INTEGER NOT NULL, day VARCHAR, "
        "status VARCHAR, attempts INTEGER, last_error VARCHAR, run_id VARCHAR, "
        "updated_at TIMESTAMPTZ DEFAULT current_timestamp, sent_at TIMESTAMPTZ, possible_duplicate BOOLEAN DEFAULT false)",
        "CREATE TABLE IF NOT EXISTS redrive_ids (scope INTEGER, message_id VARCHAR, send_id BIGINT NOT NULL, "
        "PRIMARY KEY (scope, message_id))",
    )
    VIEW = """CREATE VIEW IF NOT EXISTS redrive_ledger AS SELECT sc.pipeline, sc.sink, i.message_id, s.day, s.status,
        s.attempts, s.last_error, s.run_id, s.updated_at, s.sent_at, s.possible_duplicate
        FROM redrive_ids i JOIN redrive_sends s ON s.send_id = i.send_id JOIN redrive_scopes sc ON sc.scope = i.scope"""
    # The outcome of a whole intent, on its send row: it keeps the attempt's count and time (see UPSERT).
    OUTCOME = """status = $status, last_error = $error, run_id = $run_id, day = $day, updated_at = now(),
        possible_duplicate = possible_duplicate OR $dup"""
    SEND = """INSERT INTO redrive_sends (send_id, scope, day, status, attempts, last_error, run_id, sent_at,
                 possible_duplicate)
               VALUES (nextval('redrive_send_ids'), $scope, $day, $status, 1, $error, $run_id,
                 CASE WHEN $status = 'sending' THEN to_timestamp($now) END, $dup) RETURNING send_id"""
    # Each id's attempts, first send time and duplicate flag after this record (as UPSERT has them).
    MOVED = """CREATE OR REPLACE TEMP TABLE ledger_moved AS SELECT l.message_id,
          CASE WHEN s.send_id IS NULL THEN 1
            ELSE s.attempts + CASE WHEN $status = 'sending' THEN 1 ELSE 0 END END AS attempts,
          CASE WHEN s.status IN ('sending', 'unknown') THEN coalesce(s.sent_at, to_timestamp($sent))
            ELSE coalesce(to_timestamp($sent), s.sent_at) END AS sent_at,
          coalesce(s.possible_duplicate, false) OR $dup AS possible_duplicate
        FROM (SELECT DISTINCT message_id FROM ledger_ids) l
        LEFT JOIN redrive_ids i ON i.scope = $scope AND i.message_id = l.message_id
        LEFT JOIN redrive_sends s ON s.send_id = i.send_id"""

    def __init__(self, con):
        self.con = con
        old = _run(
            con,
            "SELECT 1 FROM information_schema.tables WHERE table_name = 'redrive_ledger' "
            "AND table_schema = current_schema() AND table_type = 'BASE TABLE'",
        )
        _run(con, "BEGIN TRANSACTION")
        for ddl in self.SCHEMA:
            _run(con, ddl)
        if old:
            self._migrate()
        _run(con, self.VIEW)
        _run(con, "CREATE SEQUENCE IF NOT EXISTS redrive_send_ids")
        _run(con, "COMMIT")
        # `record` may run on a writer thread while `delivered` runs on the caller's: a DuckDB
        # connection is not shared between threads, so writes get a cursor (a connection) of their own.
        self._write = con.cursor()
        self._scopes: dict[tuple[str, str], int] = {}
        # Intents written by this ledger and not yet settled: send_id -> (scope, ids).
        self._open: dict[int, tuple[int, list[str]]] = {}
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        """A ledger written before with one row per id (the table `redrive_ledger`): its rows into
        sends (one per set of equal attributes) and ids; the view takes the table's name."""
        con = self.con
        for column in ADDED_COLUMNS:
            _run(con, f"ALTER TABLE redrive_ledger ADD COLUMN IF NOT EXISTS {column}")
        _run(
            con,
            "INSERT INTO redrive_scopes SELECT row_number() OVER (ORDER BY pipeline, sink), pipeline, sink "
            "FROM (SELECT DISTINCT pipeline, sink FROM redrive_ledger)",
        )
        _run(
            con,
            "CREATE TEMP TABLE ledger_old AS SELECT l.*, sc.scope, dense_rank() OVER (ORDER BY sc.scope, day, status, "
            "attempts, last_error, run_id, updated_at, sent_at, possible_duplicate) AS send_id "
            "FROM redrive_ledger l JOIN redrive_scopes sc USING (pipeline, sink)",
        )
        _run(
            con,
            "INSERT INTO redrive_sends SELECT DISTINCT send_id, scope, day, status, attempts, last_error, run_id, "
            "updated_at, sent_at, possible_duplicate FROM ledger_old",
        )
        _run(con, "INSERT INTO redrive_ids SELECT scope, message_id, send_id FROM ledger_old")
        (last,) = con.execute("SELECT coalesce(max(send_id), 0) FROM ledger_old").fetchall()[0]
        _run(con, "DROP TABLE ledger_old")
        _run(con, "DROP TABLE redrive_ledger")
        _run(con, f"CREATE SEQUENCE redrive_send_ids START WITH {int(last) + 1}")

    def _scope(self, pipeline: str, sink: str, create: bool = True) -> int | None:
        key = (pipeline, sink)
        with self._lock:  # the two connections of this ledger may both ask first
            if key not in self._scopes:
                con, params = self._write, {"pipeline": pipeline, "sink": sink}
                find = "SELECT scope FROM redrive_scopes WHERE pipeline = $pipeline AND sink = $sink"
                found = _run(con, find, params)
                if not found and not create:
                    return None
                if not found:
                    insert = "INSERT INTO redrive_scopes SELECT coalesce(max(scope), 0) + 1, $pipeline, $sink FROM redrive_scopes"
                    _run(con, insert, params)
                    found = _run(con, find, params)
                self._scopes[key] = found[0][0]
            return self._scopes[key]

    def _known(self, pipeline: str, sink: str, ids: list[str]) -> list[tuple]:
        scope = self._scope(pipeline, sink, create=False)
        if scope is None:
            return []
        self.con.register("ledger_ids", pa.table({"message_id": pa.array(ids, pa.string())}))
        rows = self.con.execute(
            "SELECT i.message_id, s.status, epoch(coalesce(s.sent_at, s.updated_at)), s.day FROM ledger_ids l "
            "JOIN redrive_ids i ON i.scope = $scope AND i.message_id = l.message_id "
            "JOIN redrive_sends s ON s.send_id = i.send_id WHERE s.status IN ('delivered', 'sending', 'unknown')",
            {"scope": scope},
        ).fetchall()
        self.con.unregister("ledger_ids")
        return rows

    def _send(self, con, scope: int, ids: list[str], params: dict) -> bool:
        """A new send row for `ids`, none of which is in the ledger, in one transaction; False
        (nothing written) when one is."""
        con.register("ledger_ids", pa.table({"message_id": pa.array(ids, pa.string())}))
        _run(con, "BEGIN TRANSACTION")
        try:
            (send_id,) = con.execute(self.SEND, {**params, "scope": scope, "now": time.time()}).fetchall()[0]
            _run(
                con,
                "INSERT INTO redrive_ids SELECT $scope, message_id, $send FROM ledger_ids",
                {"scope": scope, "send": send_id},
            )
            _run(con, "COMMIT")
        except duckdb.ConstraintException:  # some were sent before: nothing was inserted
            _run(con, "ROLLBACK")
            return False
        finally:
            con.unregister("ledger_ids")
        if params["status"] == SENDING:
            with self._lock:
                self._open[send_id] = (scope, ids)
        return True

    def _whole_intent(self, scope: int, ids: list[str]) -> int | None:
        """The open intent whose ids are exactly `ids`, taken (its outcome is being written), else None."""
        with self._lock:
            for send_id, (s, sent) in self._open.items():
                if s == scope and len(sent) == len(ids) and sent == ids:
                    del self._open[send_id]
                    return send_id
        return None

    def record(
        self,
        pipeline: str,
        sink: str,
        day: str,
        ids: list[str],
        status: str,
        run_id: str,
        error: str | None = None,
        possible_duplicate: bool = False,
    ) -> None:
        if not ids:
            return
        scope = self._scope(pipeline, sink)
        params = _record_params(pipeline, sink, day, status, run_id, error, possible_duplicate)
        del params["pipeline"], params["sink"]
        if status == SENDING:  # ids never sent (the usual intent): a send of their own
            if self._send(self._write, scope, ids, params):
                return
        elif (send_id := self._whole_intent(scope, ids)) is not None:  # the outcome of a whole intent
            (updated,) = self._write.execute(
                f"UPDATE redrive_sends SET {self.OUTCOME} WHERE send_id = $send", {**params, "send": send_id}
            ).fetchall()[0]
            if updated == 1:
                return
        self._move(scope, ids, params)

    def _move(self, scope: int, ids: list[str], params: dict) -> None:
        """Records `ids` (any of them in the ledger or not) under new sends, one per distinct
        (attempts, first send time, duplicate flag) after this record. An open intent sharing an
        id with them is forgotten: its send row no longer holds all its ids."""
        with self._lock:
            if self._open:
                these = set(ids)
                for send_id in [k for k, (_, sent) in self._open.items() if not these.isdisjoint(sent)]:
                    del self._open[send_id]
        con = self._write
        con.register("ledger_ids", pa.table({"message_id": pa.array(ids, pa.string())}))
        sent = time.time() if params["status"] == SENDING else None
        _run(con, "BEGIN TRANSACTION")
        try:
            _run(con, self.MOVED, {"scope": scope, "status": params["status"], "sent": sent, "dup": params["dup"]})
            _run(
                con,
                "CREATE OR REPLACE TEMP TABLE ledger_groups AS SELECT nextval('redrive_send_ids') AS send_id, * "
                "FROM (SELECT DISTINCT attempts, sent_at, possible_duplicate FROM ledger_moved)",
            )
            _run(
                con,
                "INSERT INTO redrive_sends (send_id, scope, day, status, attempts, last_error, run_id, sent_at, "
                "possible_duplicate) SELECT send_id, $scope, $day, $status, attempts, $error, $run_id, sent_at, "
                "possible_duplicate FROM ledger_groups",
                {k: params[k] for k in ("day", "status", "error", "run_id")} | {"scope": scope},
            )
            _run(
                con,
                "INSERT INTO redrive_ids SELECT $scope, m.message_id, g.send_id FROM ledger_moved m JOIN ledger_groups g "
                "ON m.attempts = g.attempts AND m.sent_at IS NOT DISTINCT FROM g.sent_at "
                "AND m.possible_duplicate = g.possible_duplicate "
                "ON CONFLICT (scope, message_id) DO UPDATE SET send_id = excluded.send_id",
                {"scope": scope},
            )
            _run(con, "COMMIT")
        except BaseException:
            _run(con, "ROLLBACK")
            raise
        finally:
            con.unregister("ledger_ids")

    def claim(self, pipeline: str, sink: str, day: str, ids: list[str], run_id: str) -> bool:
        # On the lookups' connection (the caller's thread); the primary key refuses the whole
        # insert when any id is there.
        params = _record_params(pipeline, sink, day, SENDING, run_id, None, False)
        del params["pipeline"], params["sink"]
        return self._send(self.con, self._scope(pipeline, sink), ids, params)

    def summary(self, pipeline: str, day: str) -> dict[str, dict[str, int]]:
        rows = self.con.execute(
            f"SELECT sink, {SUMMARY} FROM redrive_ledger WHERE pipeline = $pipeline AND day = $day GROUP BY sink",
            {"pipeline": pipeline, "day": day},
        ).fetchall()
        return _summary(rows)

    def count(self, pipeline: str, sink: str, day: str, run_id: str | None = None) -> int:
        return self.con.execute(
            "SELECT count(*) FROM redrive_ledger WHERE pipeline = $pipeline AND sink = $sink AND day = $day "
            "AND status = 'delivered' AND ($run_id IS NULL OR run_id = $run_id)",
            {"pipeline": pipeline, "sink": sink, "day": day, "run_id": run_id},
        ).fetchall()[0][0]  # fetchall: DuckDB refuses the next statement while a result is unfinished

    def rows(self, pipeline: str, sink: str, day: str) -> list[dict]:
        cur = self.con.execute(
            f"SELECT {COLUMNS} FROM redrive_ledger WHERE pipeline = $pipeline AND sink = $sink AND day = $day ORDER BY message_id",
            {"pipeline": pipeline, "sink": sink, "day": day},
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


class PostgresLedger(_Lookups):
    """Lookups and claims on `con` (the caller's thread), `record` on `write`: a redrive records
    outcomes on a thread of its own (`LedgerWriter`) while it looks the next batch up, and psycopg
    serializes the use of one connection across threads, so with one connection each waited for
    the other. Both are in autocommit, so what one writes the other reads at once."""

    # Every row is written twice, its intent then its outcome. Pages filled to 45% leave room for the
    # outcome's row version beside the intent's, so Postgres updates it in place (a HOT update: no
    # new index entry), which halved an outcome's cost (1.1 s against 2.1 s per 200k ids). At 50%
    # one outcome in twenty, a little longer than its intent, no longer fitted.
    FILLFACTOR = "fillfactor=45"
    DDL = f"""CREATE TABLE IF NOT EXISTS redrive_ledger (
        pipeline TEXT NOT NULL, sink TEXT NOT NULL, message_id TEXT NOT NULL, day TEXT NOT NULL,
        status TEXT NOT NULL, attempts INTEGER NOT NULL, last_error TEXT, run_id TEXT,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (pipeline, sink, message_id)) WITH ({FILLFACTOR})"""
    INSERT = """INSERT INTO redrive_ledger (pipeline, sink, message_id, day, status, attempts, last_error, run_id,
                 sent_at, possible_duplicate)
               SELECT %(pipeline)s, %(sink)s, unnest(%(ids)s::text[]), %(day)s, %(status)s, 1, %(error)s, %(run_id)s,
                 CASE WHEN %(status)s = 'sending' THEN to_timestamp(%(now)s) END, %(dup)s"""

    def __init__(self, con, write):
        self.con, self._write = con, write
        with con.transaction():
            # Two runs creating the table at once would race on the catalog; the lock serializes them.
            con.execute("SELECT pg_advisory_xact_lock(hashtext('event_replay.redrive_ledger'))")
            con.execute(self.DDL)
            have = {
                r[0]
                for r in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'redrive_ledger' "
                    "AND table_schema = current_schema()"
                ).fetchall()
            }
            for column in ADDED_COLUMNS:  # ALTER takes an exclusive lock: only when a column is missing
                if column.split()[0] not in have:
                    con.execute(f"ALTER TABLE redrive_ledger ADD COLUMN IF NOT EXISTS {column}")
            (options,) = con.execute(
                "SELECT reloptions FROM pg_class WHERE oid = 'redrive_ledger'::regclass"
            ).fetchone()
            if self.FILLFACTOR not in (options or []):  # a ledger created before: its new pages get the room
                con.execute(f"ALTER TABLE redrive_ledger SET ({self.FILLFACTOR})")

    def _known(self, pipeline: str, sink: str, ids: list[str]) -> list[tuple]:
        # One primary-key probe per id, whatever the table's statistics say: a LATERAL ... LIMIT 1
        # cannot be turned into a hash join over every row of the sink (what a fresh, unanalyzed
        # ledger otherwise gets, making each batch slower than the last).
        return self.con.execute(
            "SELECT l.message_id, l.status, l.sent, l.day FROM unnest(%s::text[]) AS i(message_id), LATERAL ("
            "  SELECT message_id, status, extract(epoch FROM coalesce(sent_at, updated_at))::float8 AS sent, day"
            "  FROM redrive_ledger WHERE pipeline = %s AND sink = %s AND message_id = i.message_id"
            "  AND status IN ('delivered', 'sending', 'unknown') LIMIT 1) AS l",
            (ids, pipeline, sink),
        ).fetchall()

    def record(
        self,
        pipeline: str,
        sink: str,
        day: str,
        ids: list[str],
        status: str,
        run_id: str,
        error: str | None = None,
        possible_duplicate: bool = False,
    ) -> None:
        if not ids:
            return
        params = {**_record_params(pipeline, sink, day, status, run_id, error, possible_duplicate), "ids": ids}
        self._write.execute(
            f"{self.INSERT} ON CONFLICT (pipeline, sink, message_id) DO UPDATE SET {UPSERT}",
            {**params, "now": time.time()},
        )

    def claim(self, pipeline: str, sink: str, day: str, ids: list[str], run_id: str) -> bool:
        import psycopg

        params = {**_record_params(pipeline, sink, day, SENDING, run_id, None, False), "ids": ids}
        try:  # one statement (autocommit): the primary key refuses the whole insert when any id is there
            self.con.execute(self.INSERT, {**params, "now": time.time()})
            return True
        except psycopg.errors.UniqueViolation:
            return False

    def summary(self, pipeline: str, day: str) -> dict[str, dict[str, int]]:
        rows = self.con.execute(
            f"SELECT sink, {SUMMARY} FROM redrive_ledger WHERE pipeline = %s AND day = %s GROUP BY sink",
            (pipeline, day),
        ).fetchall()
        return _summary(rows)

    def count(self, pipeline: str, sink: str, day: str, run_id: str | None = None) -> int:
        return self.con.execute(
            "SELECT count(*) FROM redrive_ledger WHERE pipeline = %s AND sink = %s AND day = %s "
            "AND status = 'delivered' AND (%s::text IS NULL OR run_id = %s)",
            (pipeline, sink, day, run_id, run_id),
        ).fetchone()[0]

    def rows(self, pipeline: str, sink: str, day: str) -> list[dict]:
        cur = self.con.execute(
            f"SELECT {COLUMNS} FROM redrive_ledger WHERE pipeline = %s AND sink = %s AND day = %s ORDER BY message_id",
            (pipeline, sink, day),
        )
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


@contextmanager
def open_ledger(postgres_url: str | None, store: DuckDBFile | None) -> Iterator[Ledger]:
    """The Postgres ledger when a URL is given (two connections: see `PostgresLedger`), else the
    DuckDB one in the store, for the whole unit of work (the DuckDB store's file lock is held meanwhile)."""
    if postgres_url:
        import psycopg

        with ExitStack() as opened:
            try:
                con = opened.enter_context(connect.postgres(postgres_url, autocommit=True, connect_timeout=10))
                write = opened.enter_context(connect.postgres(postgres_url, autocommit=True, connect_timeout=10))
            except psycopg.Error as exc:  # the message may quote the URL: keep the password out
                raise RuntimeError(redact(f"cannot connect to the Postgres ledger: {exc}")) from None
            yield PostgresLedger(con, write)
    else:
        with store.connect() as con:
            yield DuckDBLedger(con)
