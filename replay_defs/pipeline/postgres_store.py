"""The projection store in Postgres (`EVENT_REPLAY_STORE_URL=postgresql://...`): the projections
of run workers on several machines in one place, with the semantics of `ProjectionStore`
(`store.py`).

DuckDB (in memory) computes what it computes for the DuckDB file: the day's fold is streamed into
Postgres by COPY, and a check loads the store's rows it compares into DuckDB. The replacement of a
day and the recompute of the keys it touched run in Postgres, in one transaction under an advisory
lock per projection, so folds of different days by processes on different machines serialize and
give what sequential folds give. A schema per pipeline; text columns are created with the "C"
collation, so Postgres orders event ids byte-wise as DuckDB does (which row is latest must not
depend on the store).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import pyarrow as pa

from replay_defs.core import connect
from replay_defs.core.duckdb_file import ident
from replay_defs.core.redact import redact
from replay_defs.pipeline.store import Events, ProjectionStore, Session, has_rows

LOCK_NAMESPACE = "event_replay.projections"  # the first key of the advisory locks: a projection's, DDL's
COPY_BATCH = 50_000


class PostgresStore(ProjectionStore):
    def __init__(self, url: str):
        self._url = url

    def __repr__(self) -> str:  # never the URL: it holds the password
        return "PostgresStore()"

    @contextmanager
    def session(self, events: dict[str, Events]) -> Iterator[Session]:
        import psycopg

        try:
            pg = connect.postgres(self._url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:  # the message may quote the URL: keep the password out
            raise RuntimeError(redact(f"cannot connect to the Postgres projection store: {exc}")) from None
        duck = duckdb.connect()
        try:
            for name, ev in events.items():
                if has_rows(ev):
                    duck.register(name, ev)
            yield _PostgresSession(pg, duck)
        finally:
            duck.close()
            pg.close()


class _PostgresSession(Session):
    DAY = "%(day)s::date"

    def __init__(self, pg, duck: duckdb.DuckDBPyConnection):
        self.pg, self.duck = pg, duck

    @contextmanager
    def writing(self, table: str):
        # Read committed, so each statement after the lock sees the fold that held it before.
        with self.pg.transaction():
            self.pg.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", (LOCK_NAMESPACE, table))
            yield

    @contextmanager
    def reading(self):
        import psycopg

        self.pg.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        try:
            with self.pg.transaction():
                yield
        finally:
            self.pg.isolation_level = None

    def exists(self, schema: str, name: str) -> bool:
        # A query of the catalog, not to_regclass: its cache may remember that the table was missing
        # before another process's creation committed (an advisory lock does not refresh it).
        return self.pg.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s)",
            (schema, name),
        ).fetchone()[0]

    def execute(self, sql: str, params: dict | None = None) -> None:
        self.pg.execute(sql, params)

    def query(self, sql: str, params: dict | None = None) -> list[tuple]:
        return self.pg.execute(sql, params).fetchall()

    def create_table(self, schema: str, name: str, select: str, params: dict, indexes: list[list[str]]) -> None:
        if self.exists(schema, name):
            return
        # Creating schemas and tables concurrently races on the catalog: one creator at a time.
        self.pg.execute("SELECT pg_advisory_xact_lock(hashtext(%s), 0)", (LOCK_NAMESPACE,))
        if self.exists(schema, name):
            return
        arrow_schema = self.duck.sql(f"SELECT * FROM ({select}) LIMIT 0", params=params).to_arrow_table().schema
        columns = ", ".join(f"{ident(f.name)} {postgres_type(f.type)}" for f in arrow_schema)
        self.pg.execute(f"CREATE SCHEMA IF NOT EXISTS {ident(schema)}")
        self.pg.execute(f"CREATE TABLE {ident(schema, name)} ({columns})")
        for cols in indexes:
            self.pg.execute(f"CREATE INDEX ON {ident(schema, name)} ({', '.join(ident(c) for c in cols)})")

    def insert(self, table: str, select: str, params: dict) -> int:
        reader = self.duck.sql(select, params=params).to_arrow_reader(COPY_BATCH)
        columns = ", ".join(ident(f.name) for f in reader.schema)
        n = 0
        with self.pg.cursor() as cur, cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for batch in reader:
                for row in zip(*(column.to_pylist() for column in batch.columns)):
                    copy.write_row(row)
                n += batch.num_rows
        return n

    def ship(self, name: str, select: str) -> None:
        arrow_schema = self.duck.sql(f"SELECT * FROM ({select}) LIMIT 0").to_arrow_table().schema
        columns = ", ".join(f"{ident(f.name)} {postgres_type(f.type)}" for f in arrow_schema)
        self.pg.execute(f"CREATE TEMP TABLE {ident(name)} ({columns})")
        self.insert(ident(name), select, {})

    def load(self, name: str, sql: str, params: dict) -> None:
        with self.pg.cursor() as cur:
            cur.execute(sql, params)
            types = [arrow_type(c.type_code, c.precision, c.scale) for c in cur.description]
            names = [c.name for c in cur.description]
            rows = cur.fetchall()
        columns = list(zip(*rows)) if rows else [[] for _ in names]
        table = pa.Table.from_arrays([pa.array(list(c), t) for c, t in zip(columns, types)], names=names)
        self.duck.register(name, table)


# ---- types: DuckDB's results (as Arrow) as Postgres columns, and back -----------------------------


def postgres_type(t: pa.DataType) -> str:
    """The Postgres column type that holds Arrow type `t` exactly."""
    if pa.types.is_decimal(t):
        return f"NUMERIC({t.precision}, {t.scale})"
    if pa.types.is_timestamp(t) and t.unit != "ns":
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return 'TEXT COLLATE "C"'
    for is_type, pg in _TO_POSTGRES:
        if is_type(t):
            return pg
    raise TypeError(f"a projection column of type {t} cannot be stored in the Postgres projection store")


_TO_POSTGRES = [
    (pa.types.is_boolean, "BOOLEAN"),
    (lambda t: t in (pa.int8(), pa.int16(), pa.uint8()), "SMALLINT"),
    (lambda t: t in (pa.int32(), pa.uint16()), "INTEGER"),
    (lambda t: t in (pa.int64(), pa.uint32()), "BIGINT"),
    (lambda t: t == pa.uint64(), "NUMERIC(20, 0)"),
    (lambda t: t == pa.float32(), "REAL"),
    (lambda t: t == pa.float64(), "DOUBLE PRECISION"),
    (pa.types.is_date32, "DATE"),
    (lambda t: t == pa.time64("us"), "TIME"),
    (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "BYTEA"),
]

_FROM_POSTGRES = {  # type OID -> Arrow type
    16: pa.bool_(),
    17: pa.binary(),
    20: pa.int64(),
    21: pa.int16(),
    23: pa.int32(),
    25: pa.string(),
    700: pa.float32(),
    701: pa.float64(),
    1043: pa.string(),
    1082: pa.date32(),
    1083: pa.time64("us"),
    1114: pa.timestamp("us"),
    1184: pa.timestamp("us", tz="UTC"),
}


def arrow_type(oid: int, precision: int | None, scale: int | None) -> pa.DataType:
    """The Arrow type of a Postgres result column (of a type `postgres_type` creates)."""
    if oid == 1700:  # numeric
        if precision is None:
            raise TypeError(
                "an unconstrained NUMERIC column cannot be compared exactly; the store creates NUMERIC(p, s)"
            )
        return pa.decimal128(precision, scale or 0)
    try:
        return _FROM_POSTGRES[oid]
    except KeyError:
        raise TypeError(f"the Postgres projection store cannot read a column of type OID {oid}") from None
