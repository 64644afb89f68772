"""The redrive idempotency ledger: which messages each pipeline's sink already has.

One row per (pipeline, sink, message id) with the partition (day), status, attempts, last error,
the replay run id, when it was last sent and whether it may be a duplicate. Statuses:

- `sending`: written before a chunk is handed to the sink (the intent), so a crash at any point
  leaves the chunk in doubt rather than unrecorded;
- `delivered`: the sink confirmed it; `failed`: the sink refused it (the target does not hold it);
- `unknown`: sent, but neither confirmed nor refused (a timeout, a connection lost after sending).

A redrive skips ids recorded as delivered unless forced, and reconciles `sending` and `unknown`
ones with the sink before sending them again. Two backends with the same table and behaviour:

- `DuckDBLedger`: the embedded default, in the store's DuckDB file;
- `PostgresLedger`: for real backends (`EVENT_REPLAY_LEDGER_URL=postgresql://...`), so several
  run workers on several machines share it.

Ids travel as one Arrow column or array parameter per batch, never one statement per message.
"""

from __future__ import annotations

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
# SQS FIFO queue's deduplication window runs from it).
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


# An outcome keeps the attempt's count and time (see UPSERT); in DuckDB it needs no insert when its
# intent's row is there, which a plain UPDATE settles at a fraction of an upsert's cost. (Postgres
# keeps the upsert: its UPDATE of `message_id = ANY(ids)` may scan the table once per id.)
OUTCOME = """status = $status, last_error = $error, run_id = $run_id, day = $day, updated_at = now(),
    possible_duplicate = possible_duplicate OR $dup"""


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


class DuckDBLedger(_Lookups):
    DDL = """CREATE TABLE IF NOT EXISTS redrive_ledger (
        pipeline VARCHAR, sink VARCHAR, message_id VARCHAR, day VARCHAR,
        status VARCHAR, attempts INTEGER, last_error VARCHAR, run_id VARCHAR,
        updated_at TIMESTAMPTZ DEFAULT current_timestamp,
        PRIMARY KEY (pipeline, sink, message_id))"""

    INSERT = """INSERT INTO redrive_ledger (pipeline, sink, message_id, day, status, attempts, last_error, run_id,
                 sent_at, possible_duplicate)
               SELECT $pipeline, $sink, message_id, $day, $status, 1, $error, $run_id,
                 CASE WHEN $status = 'sending' THEN to_timestamp($now) END, $dup FROM ledger_ids"""

    def __init__(self, con):
        self.con = con
        con.execute(self.DDL)
        for column in ADDED_COLUMNS:
            con.execute(f"ALTER TABLE redrive_ledger ADD COLUMN IF NOT EXISTS {column}")
        # `record` may run on a writer thread while `delivered` runs on the caller's: a DuckDB
        # connection is not shared between threads, so writes get a cursor (a connection) of their own.
        self._write = con.cursor()

    def _known(self, pipeline: str, sink: str, ids: list[str]) -> list[tuple]:
        self.con.register("ledger_ids", pa.table({"message_id": pa.array(ids, pa.string())}))
        rows = self.con.execute(
            "SELECT message_id, status, epoch(coalesce(sent_at, updated_at)), day FROM redrive_ledger "
            "JOIN ledger_ids USING (message_id) WHERE pipeline = $pipeline AND sink = $sink "
            "AND status IN ('delivered', 'sending', 'unknown')",
            {"pipeline": pipeline, "sink": sink},
        ).fetchall()
        self.con.unregister("ledger_ids")
        return rows

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
        params = _record_params(pipeline, sink, day, status, run_id, error, possible_duplicate)
        self._write.register("ledger_ids", pa.table({"message_id": pa.array(ids, pa.string())}))
        insert = self.INSERT
        try:
            if status != SENDING:
                (updated,) = self._write.execute(
                    f"UPDATE redrive_ledger SET {OUTCOME} FROM ledger_ids WHERE redrive_ledger.message_id = "
                    "ledger_ids.message_id AND pipeline = $pipeline AND sink = $sink",
                    params,
                ).fetchone()
                if updated == len(ids):
                    return
            else:
                try:  # ids never sent (the usual intent): a plain insert costs half an upsert in DuckDB
                    self._write.execute(insert, {**params, "now": time.time()})
                    return
                except duckdb.ConstraintException:  # some were sent before: nothing was inserted
                    pass
            self._write.execute(
                f"{insert} ON CONFLICT (pipeline, sink, message_id) DO UPDATE SET {UPSERT}",
                {**params, "now": time.time()},
            )
        finally:
            self._write.unregister("ledger_ids")

    def claim(self, pipeline: str, sink: str, day: str, ids: list[str], run_id: str) -> bool:
        # On the lookups' connection (the caller's thread); the primary key refuses the whole
        # insert when any id is there.
        params = _record_params(pipeline, sink, day, SENDING, run_id, None, False)
        self.con.register("ledger_ids", pa.table({"message_id": pa.array(ids, pa.string())}))
        try:
            self.con.execute(self.INSERT, {**params, "now": time.time()})
            return True
        except duckdb.ConstraintException:
            return False
        finally:
            self.con.unregister("ledger_ids")

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
