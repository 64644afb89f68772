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
        replace: upsert the day's latest event per key; an existing newer row wins.
        """
        table = ident(pipeline, p.name)
        with self.connect() as con:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {ident(pipeline)}")
            if p.kind == "increment":
                return self._fold_increment(con, table, p, day, files)
            return self._fold_replace(con, table, p, schema, day, files)

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

    def _fold_replace(self, con, table: str, p: Projection, schema: EventSchema, day: str, files: list[str]) -> int:
        if not files:
            return 0
        order, eid = ident(p.order_by), ident(schema.id_field)
        keys = [ident(k) for k in p.key]
        cols = ", ".join(f"{ident(src)} AS {ident(col)}" for col, src in p.values.items())
        latest = (
            f"SELECT DISTINCT ON ({', '.join(keys)}) {', '.join(keys)}, {cols}, {order} AS _order, "
            f"{eid} AS _event_id, $day::DATE AS _day FROM read_parquet($files) "
            f"ORDER BY {', '.join(keys)}, {order} DESC, {eid} DESC"
        )
        params = {"day": day, "files": files}
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS {latest} LIMIT 0", params)
        on = " AND ".join(f"t.{k} = s.{k}" for k in keys)
        all_cols = [*keys, *(ident(c) for c in p.values), "_order", "_event_id", "_day"]
        sets = ", ".join(f"{c} = s.{c}" for c in all_cols if c not in keys)
        con.execute("BEGIN")
        try:
            n = con.execute(
                f"MERGE INTO {table} AS t USING ({latest}) AS s ON ({on}) "
                f"WHEN MATCHED AND (s._order > t._order OR (s._order = t._order AND s._event_id >= t._event_id)) "
                f"THEN UPDATE SET {sets} "
                f"WHEN NOT MATCHED THEN INSERT ({', '.join(all_cols)}) VALUES ({', '.join('s.' + c for c in all_cols)})",
                params,
            ).fetchone()[0]
            con.execute("COMMIT")
            return n
        except Exception:
            con.execute("ROLLBACK")
            raise

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
