"""The projection store of the day pipelines: folds of a day's parsed events into tables.

What a fold and its check mean lives here, once (`ProjectionStore`); a store only says where its
tables live (a `Session`): `DuckDBStore` keeps them in the DuckDB file (the embedded default),
`PostgresStore` (`postgres_store.py`, `EVENT_REPLAY_STORE_URL=postgresql://...`) in Postgres, so
run workers on several machines share them. Either way DuckDB computes: the day's events arrive as
a pyarrow Dataset or Table (a day of the lake), registered on a DuckDB connection as a view, and the
fold and the from-scratch fold a check compares with are DuckDB SQL over it. The statements that act
on the store's tables are written in the SQL DuckDB and Postgres share, with the day as the
session's `DAY` parameter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Union

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from replay_defs.core.duckdb_file import DuckDBFile, ident
from replay_defs.pipeline.spec import EventSchema, ProjectionSpec

Events = Union[ds.Dataset, pa.Table, None]
"""Parsed events as DuckDB scans them: a pyarrow Dataset (a day of the lake, filters pushed down)
or Table; None or an empty one (a day without events, a dataset of no files) folds nothing."""


def has_rows(events: Events) -> bool:
    if events is None:
        return False
    return (events.num_rows if isinstance(events, pa.Table) else events.count_rows()) > 0


class Session(ABC):
    """One unit of work on a store. `duck` is the DuckDB connection that computes (the events are
    registered there); the other methods act on the store's tables."""

    DAY: str  # the day parameter in the store's SQL (params {"day": ...})
    duck: duckdb.DuckDBPyConnection

    @abstractmethod
    def writing(self, table: str) -> AbstractContextManager:
        """A transaction that changes projection `table`; folds of it by other processes wait."""

    @abstractmethod
    def reading(self) -> AbstractContextManager:
        """A transaction whose reads see one state of the store."""

    @abstractmethod
    def exists(self, schema: str, name: str) -> bool:
        """Whether the store has table `schema.name` (asked without an error: an error would end
        the transaction)."""

    @abstractmethod
    def execute(self, sql: str, params: dict | None = None) -> None: ...

    @abstractmethod
    def query(self, sql: str, params: dict | None = None) -> list[tuple]: ...

    @abstractmethod
    def create_table(self, schema: str, name: str, select: str, params: dict, indexes: list[list[str]]) -> None:
        """Create `schema.name` (and the schema) with the columns of the DuckDB query `select`,
        unless it exists; `indexes` are the column lists the store's statements look rows up by."""

    @abstractmethod
    def insert(self, table: str, select: str, params: dict) -> int:
        """Insert the rows of the DuckDB query `select` into the store's `table`; the rows inserted."""

    @abstractmethod
    def ship(self, name: str, select: str) -> None:
        """The rows of the DuckDB query `select` as the store's temporary table `name`."""

    @abstractmethod
    def load(self, name: str, sql: str, params: dict) -> None:
        """The store's rows of `sql` as the DuckDB table `name` (what a check compares)."""


class ProjectionStore(ABC):
    """Projections folded from parsed events, and their check against a from-scratch fold."""

    @abstractmethod
    def session(self, events: dict[str, Events]) -> AbstractContextManager[Session]:
        """A session whose `duck` has each of `events` that has rows registered under its name."""

    # ---- folds -------------------------------------------------------------------------------
    def fold(self, pipeline: str, p: ProjectionSpec, schema: EventSchema, day: str, events: Events) -> int:
        """Fold one day's parsed events into projection `p`; returns the rows written.

        increment: delete the day's rows and insert the new fold in one transaction.
        replace: replace the day's latest event per key, then recompute the keys it touched.
        """
        with self.session({"_events": events}) as s, s.writing(ident(pipeline, p.name)):
            if p.kind == "increment":
                return self._fold_increment(s, pipeline, p, day, has_rows(events))
            return self._fold_replace(s, pipeline, p, schema, day, has_rows(events))

    @staticmethod
    def _increment_fold(p: ProjectionSpec, events: str) -> str:
        """The day's rows of increment projection `p`, folded (in DuckDB) from the view `events`."""
        keys = ", ".join(ident(k) for k in p.key)
        aggs = ", ".join(f"{expr} AS {ident(col)}" for col, expr in p.values.items())
        return f"SELECT $day::DATE AS day, {keys}, {aggs} FROM {events} GROUP BY ALL"

    def _fold_increment(self, s: Session, pipeline: str, p: ProjectionSpec, day: str, has: bool) -> int:
        table, params = ident(pipeline, p.name), {"day": day}
        if has:
            s.create_table(pipeline, p.name, self._increment_fold(p, "_events"), params, [["day"]])
        elif not s.exists(pipeline, p.name):
            return 0
        s.execute(f"DELETE FROM {table} WHERE day = {s.DAY}", params)
        return s.insert(table, self._increment_fold(p, "_events"), params) if has else 0

    def _fold_replace(self, s: Session, pipeline: str, p: ProjectionSpec, schema: EventSchema, day: str, has: bool):
        """Exact under replays and rollbacks: `<name>__by_day` holds each day's latest row per key;
        the day's rows there are replaced, then every key the old or the new version of the day
        touched is recomputed from all days' rows (never merged), so what a replaced version
        contributed cannot survive it."""
        table, by_day = ident(pipeline, p.name), ident(pipeline, f"{p.name}__by_day")
        keys, params = ", ".join(ident(k) for k in p.key), {"day": day}
        by_day_existed = s.exists(pipeline, f"{p.name}__by_day")
        if not has and not by_day_existed:
            return 0
        latest = self._latest_per_key(p, schema, "_events", extra=", $day::DATE AS _day")
        if has:
            s.create_table(pipeline, p.name, latest, params, [list(p.key), ["_day"]])
            s.create_table(pipeline, f"{p.name}__by_day", latest, params, [list(p.key), ["_day"]])
        if not by_day_existed:  # a store folded before per-day rows existed: start from its rows
            s.execute(f"INSERT INTO {by_day} SELECT * FROM {table}")
        s.execute(f"CREATE TEMP TABLE _touched AS SELECT DISTINCT {keys} FROM {by_day} WHERE _day = {s.DAY}", params)
        s.execute(f"DELETE FROM {by_day} WHERE _day = {s.DAY}", params)
        n = 0
        if has:
            n = s.insert(by_day, latest, params)
            s.execute(f"INSERT INTO _touched SELECT DISTINCT {keys} FROM {by_day} WHERE _day = {s.DAY}", params)
        for delete in _delete_matching(table, "_touched", p.key):
            s.execute(delete)
        s.execute(
            f"INSERT INTO {table} SELECT DISTINCT ON ({keys}) * FROM ({_matching(by_day, '_touched', p.key)}) AS m "
            f"ORDER BY {keys}, _order DESC NULLS LAST, _event_id DESC NULLS LAST"
        )
        s.execute("DROP TABLE _touched")
        return n

    @staticmethod
    def _latest_per_key(p: ProjectionSpec, schema: EventSchema, source: str, extra: str = "") -> str:
        """The latest event per key of `source` (latest `order_by`, then highest event id), as the
        projection's columns plus `_order` and `_event_id` (DuckDB SQL)."""
        keys = [ident(k) for k in p.key]
        cols = ", ".join(f"{ident(src)} AS {ident(col)}" for col, src in p.values.items())
        order, eid = ident(p.order_by), ident(schema.id_field)
        return (
            f"SELECT DISTINCT ON ({', '.join(keys)}) {', '.join(keys)}, {cols}, {order} AS _order, {eid} AS _event_id{extra} "
            f"FROM {source} ORDER BY {', '.join(keys)}, {order} DESC NULLS LAST, {eid} DESC NULLS LAST"
        )

    def increment_total(self, pipeline: str, p: ProjectionSpec, day: str) -> int:
        table = ident(pipeline, p.name)
        with self.session({}) as s, s.reading():
            if not s.exists(pipeline, p.name):
                return 0
            (total,) = s.query(
                f"SELECT CAST(coalesce(sum({ident(p.count_column)}), 0) AS BIGINT) FROM {table} WHERE day = {s.DAY}",
                {"day": day},
            )[0]
            return total

    # ---- checks ------------------------------------------------------------------------------
    def fold_mismatches(
        self,
        pipeline: str,
        p: ProjectionSpec,
        schema: EventSchema,
        day: str,
        day_events: Events,
        all_days: list[str],
        all_events: Events,
    ) -> tuple[dict, list[str]]:
        """Compare projection `p` with a from-scratch fold of the committed events: an increment
        projection's rows of the day with a fold of `day_events`; a replace projection's rows for
        the keys the day touches with a fold of `all_events` (every committed day), plus its rows of
        no committed day and its per-day rows of the day. Returns (metadata, problems)."""
        table, has_day = ident(pipeline, p.name), has_rows(day_events)
        with self.session({"_day_events": day_events, "_all_events": all_events}) as s, s.reading():
            if not s.exists(pipeline, p.name):
                return {f"{p.name}_rows_differing": int(has_day)}, [
                    f"{p.name}: the table does not exist"
                ] if has_day else []
            if p.kind == "replace":
                return self._replace_mismatches(s, pipeline, p, schema, day, has_day, all_days, has_rows(all_events))
            s.load("_actual", f"SELECT * FROM {table} WHERE day = {s.DAY}", {"day": day})
            fold = self._increment_fold(p, "_day_events") if has_day else "SELECT * FROM _actual WHERE FALSE"
            compared, differing, sample = _compare(
                s.duck, fold, "_actual", ["day", *p.key], list(p.values), {"day": day} if has_day else {}
            )
            problems = (
                [
                    f"{p.name}: {differing} of {compared} rows of the day differ from a fold of its committed events, e.g. {sample}"
                ]
                if differing
                else []
            )
            return {f"{p.name}_rows_compared": compared, f"{p.name}_rows_differing": differing}, problems

    def _replace_mismatches(
        self, s: Session, pipeline, p: ProjectionSpec, schema: EventSchema, day, has_day, all_days, has_all
    ):
        table, by_day = ident(pipeline, p.name), ident(pipeline, f"{p.name}__by_day")
        compared, differing, sample = self._compare_touched_keys(s, table, p, schema, day, has_day, has_all)
        problems = (
            [
                f"{p.name}: {differing} of {compared} keys the day touches differ from a fold of the committed days, e.g. {sample}"
            ]
            if differing
            else []
        )
        committed = set(all_days)
        orphans = sum(
            n
            for d, n in s.query(f"SELECT _day, count(*) FROM {table} GROUP BY _day")
            if d is None or d.isoformat() not in committed
        )
        if orphans:
            problems.append(f"{p.name}: {orphans} rows come from no committed day")
        day_rows, differing_by_day = 0, 0
        if s.exists(pipeline, f"{p.name}__by_day"):
            s.load("_actual_by_day", f"SELECT * FROM {by_day} WHERE _day = {s.DAY}", {"day": day})
            latest = (
                self._latest_per_key(p, schema, "_day_events", extra=", $day::DATE AS _day")
                if has_day
                else "SELECT * FROM _actual_by_day WHERE FALSE"
            )
            day_rows, differing_by_day, _ = _compare(
                s.duck,
                latest,
                "_actual_by_day",
                list(p.key),
                [*p.values, "_order", "_event_id"],
                {"day": day} if has_day else {},
            )
        if differing_by_day:
            problems.append(
                f"{p.name}__by_day: {differing_by_day} of the day's {day_rows} rows differ from its committed events"
            )
        md = {
            f"{p.name}_keys_compared": compared,
            f"{p.name}_keys_differing": differing,
            f"{p.name}_orphan_rows": orphans,
            f"{p.name}_by_day_rows_differing": differing_by_day,
        }
        return md, problems

    def _compare_touched_keys(self, s: Session, table, p: ProjectionSpec, schema: EventSchema, day, has_day, has_all):
        """The replace projection's rows for the keys the day touches (its rows of the day in the
        store, the keys of its events) against the latest event per key of every committed day."""
        keys = ", ".join(ident(k) for k in p.key)
        rows = f"SELECT * FROM {table} WHERE _day = {s.DAY}"
        touched = f"SELECT {keys} FROM _actual WHERE _day = $day::DATE"
        if has_day:
            s.ship("_day_keys", f"SELECT DISTINCT {keys} FROM _day_events")
            rows += f" UNION SELECT * FROM ({_matching(table, '_day_keys', p.key)}) AS m"
            touched += f" UNION SELECT {keys} FROM _day_events"
        s.load("_actual", rows, {"day": day})
        truth = "SELECT * FROM _actual WHERE FALSE"
        if has_all:
            same_key = " AND ".join(f"t.{ident(k)} IS NOT DISTINCT FROM s.{ident(k)}" for k in p.key)
            scan = f"(SELECT * FROM _all_events AS t WHERE EXISTS (SELECT 1 FROM touched AS s WHERE {same_key}))"
            truth = self._latest_per_key(p, schema, scan)
        return _compare(
            s.duck,
            truth,
            "_actual",
            list(p.key),
            [*p.values, "_order", "_event_id"],
            {"day": day},
            prelude=f"touched AS ({touched})",
        )


def _matching(table: str, keys_table: str, key: tuple[str, ...]) -> str:
    """The rows of `table` whose key is one of `keys_table`'s (a set), NULL matching NULL. Two
    branches, so the rows without NULL join on plain equality, which Postgres can hash or look up
    in an index (it cannot for IS NOT DISTINCT FROM)."""
    plain, null_safe = _key_matches(key)
    return (
        f"SELECT t.* FROM {table} AS t JOIN {keys_table} AS s ON {plain} "
        f"UNION ALL SELECT t.* FROM {table} AS t JOIN {keys_table} AS s ON {null_safe}"
    )


def _delete_matching(table: str, keys_table: str, key: tuple[str, ...]) -> list[str]:
    """Statements deleting the rows of `table` whose key is one of `keys_table`'s (as `_matching`)."""
    return [f"DELETE FROM {table} AS t USING {keys_table} AS s WHERE {cond}" for cond in _key_matches(key)]


def _key_matches(key: tuple[str, ...]) -> tuple[str, str]:
    """(t's key equals s's and holds no NULL, t's key holds a NULL and is not distinct from s's)."""
    k = [ident(c) for c in key]
    plain = " AND ".join(f"t.{c} = s.{c}" for c in k)
    null_safe = (
        "("
        + " OR ".join(f"t.{c} IS NULL" for c in k)
        + ") AND "
        + " AND ".join(f"t.{c} IS NOT DISTINCT FROM s.{c}" for c in k)
    )
    return plain, null_safe


def _compare(
    con, expected: str, actual: str, keys: list[str], values: list[str], params: dict, prelude: str = ""
) -> tuple[int, int, list[str]]:
    """The rows of the DuckDB query `expected` and of the DuckDB table `actual` (a store's rows,
    loaded), matched on `keys`: (rows compared, rows that differ or have no match, a sample of their
    keys). Floating columns may differ by rounding (1e-9 relative): a fold's float sums depend on
    the order DuckDB's threads add them in."""
    k = [ident(c) for c in keys]
    on = " AND ".join(f"e.{c} IS NOT DISTINCT FROM a.{c}" for c in k)
    floats = {
        name for name, kind, *_ in con.execute(f"DESCRIBE {actual}").fetchall() if kind in ("FLOAT", "DOUBLE", "REAL")
    }

    def differs(c: str) -> str:
        e, a = f"e.{ident(c)}", f"a.{ident(c)}"
        if c in floats:
            return f"({e} IS DISTINCT FROM {a} AND NOT coalesce(abs({e} - {a}) <= 1e-9 * greatest(abs({e}), abs({a}), 1), false))"
        return f"{e} IS DISTINCT FROM {a}"

    bad = " OR ".join(["e._present IS NULL", "a._present IS NULL", *(differs(c) for c in values)])
    key_text = " || '/' || ".join(f"coalesce(CAST(coalesce(e.{c}, a.{c}) AS VARCHAR), 'NULL')" for c in k)
    sql = (
        f"WITH {prelude + ', ' if prelude else ''}e AS (SELECT *, TRUE AS _present FROM ({expected})), "
        f"a AS (SELECT *, TRUE AS _present FROM {actual}) "
        f"SELECT count(*), count(*) FILTER (WHERE {bad}), (list({key_text} ORDER BY {key_text}) FILTER (WHERE {bad}))[1:5] "
        f"FROM e FULL OUTER JOIN a ON {on}"
    )
    compared, differing, sample = con.execute(sql, params).fetchall()[0]
    return compared, differing, sample or []


# ---- the DuckDB file ---------------------------------------------------------------------------


class DuckDBStore(DuckDBFile, ProjectionStore):
    """The projections of the day pipelines, folded into the DuckDB file (it computes and stores)."""

    @contextmanager
    def session(self, events: dict[str, Events]) -> Iterator[Session]:
        with self.connect() as con:
            for name, ev in events.items():
                if has_rows(ev):
                    con.register(name, ev)
            yield _DuckDBSession(con)


class _DuckDBSession(Session):
    DAY = "$day::DATE"

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.duck = con

    @contextmanager
    def writing(self, table: str):
        # The file lock (DuckDBFile.connect) already keeps other processes out.
        self.duck.execute("BEGIN")
        try:
            yield
            self.duck.execute("COMMIT")
        except BaseException:
            self.duck.execute("ROLLBACK")
            raise

    def reading(self):
        return nullcontext()

    def exists(self, schema: str, name: str) -> bool:
        return bool(
            self.duck.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE schema_name = $s AND table_name = $n AND NOT temporary",
                {"s": schema, "n": name},
            ).fetchone()[0]
        )

    def execute(self, sql: str, params: dict | None = None) -> None:
        self.duck.execute(sql, params or {})

    def query(self, sql: str, params: dict | None = None) -> list[tuple]:
        return self.duck.execute(sql, params or {}).fetchall()

    def create_table(self, schema: str, name: str, select: str, params: dict, indexes: list[list[str]]) -> None:
        self.duck.execute(f"CREATE SCHEMA IF NOT EXISTS {ident(schema)}")
        self.duck.execute(f"CREATE TABLE IF NOT EXISTS {ident(schema, name)} AS {select} LIMIT 0", params)

    def insert(self, table: str, select: str, params: dict) -> int:
        return self.duck.execute(f"INSERT INTO {table} {select}", params).fetchone()[0]

    def ship(self, name: str, select: str) -> None:
        self.duck.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {select}")

    def load(self, name: str, sql: str, params: dict) -> None:
        self.duck.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {sql}", params)


def open_store(duckdb_path: str, postgres_url: str | None = None) -> ProjectionStore:
    """The Postgres store when a URL is given (EVENT_REPLAY_STORE_URL), else the DuckDB file."""
    if postgres_url:
        from replay_defs.pipeline.postgres_store import PostgresStore

        return PostgresStore(postgres_url)
    return DuckDBStore(duckdb_path)
