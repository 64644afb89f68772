"""The embedded store: DuckDB for projections and the redrive ledger.

A DuckDB file admits one writing process at a time, and Dagster may run steps in parallel
processes, so every connection is taken under a file lock and kept only for one unit of work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from filelock import FileLock

from replay_defs.spec import EventSchema, Projection


def ident(*names: str) -> str:
    """Quote identifiers that were validated against SAFE_NAME when the spec was built."""
    return ".".join('"' + n.replace('"', '""') + '"' for n in names)


class DuckDBStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", is_singleton=True):
            con = duckdb.connect(str(self.path))
            try:
                yield con
            finally:
                con.close()

    # ---- projections -----------------------------------------------------------------------
    def fold(self, pipeline: str, p: Projection, schema: EventSchema, day: str, files: list[str]) -> int:
        """Fold one day's parsed events into projection `p`; returns the rows written.

        increment: delete the day's rows and insert the new fold in one transaction.
        replace: replace the day's latest event per key, then recompute the keys it touched.
        """
        table = ident(pipeline, p.name)
        with self.connect() as con:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {ident(pipeline)}")
            if p.kind == "increment":
                return self._fold_increment(con, table, p, day, files)
            return self._fold_replace(con, pipeline, p, schema, day, files)

    def _fold_increment(self, con, table: str, p: Projection, day: str, files: list[str]) -> int:
        keys = ", ".join(ident(k) for k in p.key)
        aggs = ", ".join(f"{expr} AS {ident(col)}" for col, expr in p.values.items())
        select = f"SELECT $day::DATE AS day, {keys}, {aggs} FROM read_parquet($files) GROUP BY ALL"
        con.execute("BEGIN")
        try:
            if files:
                con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS {select} LIMIT 0", {"day": day, "files": files})
            elif not self._exists(con, table):
                con.execute("COMMIT")
                return 0
            con.execute(f"DELETE FROM {table} WHERE day = $day::DATE", {"day": day})
            n = 0
            if files:
                n = con.execute(f"INSERT INTO {table} {select}", {"day": day, "files": files}).fetchone()[0]
            con.execute("COMMIT")
            return n
        except Exception:
            con.execute("ROLLBACK")
            raise

    def _fold_replace(self, con, pipeline: str, p: Projection, schema: EventSchema, day: str, files: list[str]) -> int:
        """Exact under replays and rollbacks: `<name>__by_day` holds each day's latest row per key;
        the day's rows there are replaced, then every key the old or the new version of the day
        touched is recomputed from all days' rows (never merged), so what a replaced version
        contributed cannot survive it."""
        table, by_day = ident(pipeline, p.name), ident(pipeline, f"{p.name}__by_day")
        keys = [ident(k) for k in p.key]
        params = {"day": day, "files": files}
        by_day_existed = self._exists(con, by_day)
        if not files and not by_day_existed:
            return 0
        if files:
            latest = self._latest_per_key(p, schema, "read_parquet($files)", extra=", $day::DATE AS _day")
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS {latest} LIMIT 0", params)
            con.execute(f"CREATE TABLE IF NOT EXISTS {by_day} AS SELECT * FROM {table} LIMIT 0")
        same_key = " AND ".join(f"t.{k} IS NOT DISTINCT FROM s.{k}" for k in keys)
        con.execute("BEGIN")
        try:
            if not by_day_existed:  # a store folded before per-day rows existed: start from its rows
                con.execute(f"INSERT INTO {by_day} SELECT * FROM {table}")
            con.execute(f"CREATE OR REPLACE TEMP TABLE _touched AS SELECT DISTINCT {', '.join(keys)} FROM {by_day} WHERE _day = $day::DATE", {"day": day})
            con.execute(f"DELETE FROM {by_day} WHERE _day = $day::DATE", {"day": day})
            n = 0
            if files:
                n = con.execute(f"INSERT INTO {by_day} {latest}", params).fetchone()[0]
                con.execute(f"INSERT INTO _touched SELECT {', '.join(keys)} FROM {by_day} WHERE _day = $day::DATE", {"day": day})
            con.execute(f"DELETE FROM {table} AS t WHERE EXISTS (SELECT 1 FROM _touched AS s WHERE {same_key})")
            con.execute(
                f"INSERT INTO {table} SELECT DISTINCT ON ({', '.join(keys)}) * FROM {by_day} AS t "
                f"WHERE EXISTS (SELECT 1 FROM _touched AS s WHERE {same_key}) "
                f"ORDER BY {', '.join(keys)}, _order DESC, _event_id DESC"
            )
            con.execute("DROP TABLE _touched")
            con.execute("COMMIT")
            return n
        except Exception:
            con.execute("ROLLBACK")
            raise

    @staticmethod
    def _latest_per_key(p: Projection, schema: EventSchema, source: str, extra: str = "") -> str:
        """The latest event per key of `source` (latest `order_by`, then highest event id), as the
        projection's columns plus `_order` and `_event_id`."""
        keys = [ident(k) for k in p.key]
        cols = ", ".join(f"{ident(src)} AS {ident(col)}" for col, src in p.values.items())
        order, eid = ident(p.order_by), ident(schema.id_field)
        return (
            f"SELECT DISTINCT ON ({', '.join(keys)}) {', '.join(keys)}, {cols}, {order} AS _order, {eid} AS _event_id{extra} "
            f"FROM {source} ORDER BY {', '.join(keys)}, {order} DESC, {eid} DESC"
        )

    def replace_mismatches(
        self, pipeline: str, p: Projection, schema: EventSchema, day: str, day_files: list[str], all_files: list[str]
    ) -> tuple[int, int, list[str]]:
        """Compare replace projection `p` with a from-scratch fold of `all_files` (every committed
        day), for the keys the day touches: those in its Parquet and those whose row came from it.
        Returns (keys compared, keys that differ, a sample of differing keys)."""
        table = ident(pipeline, p.name)
        keys = [ident(k) for k in p.key]
        cols = [ident(c) for c in p.values] + ["_order", "_event_id"]
        with self.connect() as con:
            if not self._exists(con, table):
                return 0, 0, []
            touched = f"SELECT {', '.join(keys)} FROM {table} WHERE _day = $day::DATE"
            params: dict = {"day": day}
            if day_files:
                touched += f" UNION SELECT {', '.join(keys)} FROM read_parquet($day_files)"
                params["day_files"] = day_files
            same_key = " AND ".join(f"t.{k} IS NOT DISTINCT FROM s.{k}" for k in keys)
            truth = f"SELECT * FROM {table} WHERE FALSE"
            if all_files:
                params["all_files"] = all_files
                scan = f"(SELECT * FROM read_parquet($all_files) AS t WHERE EXISTS (SELECT 1 FROM touched AS s WHERE {same_key}))"
                truth = self._latest_per_key(p, schema, scan)
            differs = " OR ".join(f"f.{c} IS DISTINCT FROM c.{c}" for c in cols)
            on = " AND ".join(f"f.{k} IS NOT DISTINCT FROM c.{k}" for k in keys)
            key_text = " || '/' || ".join(f"coalesce(CAST(coalesce(f.{k}, c.{k}) AS VARCHAR), 'NULL')" for k in keys)
            sql = (
                f"WITH touched AS ({touched}), truth AS ({truth}), "
                f"cur AS (SELECT * FROM {table} AS t WHERE EXISTS (SELECT 1 FROM touched AS s WHERE {same_key})) "
                f"SELECT (SELECT count(*) FROM touched), count(*), list({key_text} ORDER BY {key_text})[1:5] "
                f"FROM truth AS f FULL OUTER JOIN cur AS c ON {on} WHERE {differs}"
            )
            compared, differing, sample = con.execute(sql, params).fetchone()
            return compared, differing, sample or []

    @staticmethod
    def _exists(con, table: str) -> bool:
        try:
            con.execute(f"SELECT 1 FROM {table} LIMIT 0")
            return True
        except duckdb.CatalogException:
            return False

    def increment_total(self, pipeline: str, p: Projection, day: str) -> int:
        table = ident(pipeline, p.name)
        with self.connect() as con:
            if not self._exists(con, table):
                return 0
            return con.execute(
                f"SELECT coalesce(sum({ident(p.count_column)}), 0)::BIGINT FROM {table} WHERE day = $day::DATE",
                {"day": day},
            ).fetchone()[0]

    def query(self, sql: str, params: dict | None = None) -> list[tuple]:
        with self.connect() as con:
            return con.execute(sql, params or {}).fetchall()
