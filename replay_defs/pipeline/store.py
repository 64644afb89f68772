"""The projection store of the day pipelines: folds of a day's committed Parquet into DuckDB tables."""

from __future__ import annotations

import duckdb

from replay_defs.core.duckdb_file import DuckDBFile, ident
from replay_defs.pipeline.spec import EventSchema, ProjectionSpec


class DuckDBStore(DuckDBFile):
    """The projections of the day pipelines, folded into the DuckDB file."""

    # ---- projections -----------------------------------------------------------------------
    def fold(self, pipeline: str, p: ProjectionSpec, schema: EventSchema, day: str, files: list[str]) -> int:
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

    @staticmethod
    def _increment_fold(p: ProjectionSpec) -> str:
        """The day's rows of increment projection `p`, folded from `$files`."""
        keys = ", ".join(ident(k) for k in p.key)
        aggs = ", ".join(f"{expr} AS {ident(col)}" for col, expr in p.values.items())
        return f"SELECT $day::DATE AS day, {keys}, {aggs} FROM read_parquet($files) GROUP BY ALL"

    def _fold_increment(self, con, table: str, p: ProjectionSpec, day: str, files: list[str]) -> int:
        select = self._increment_fold(p)
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

    def _fold_replace(
        self, con, pipeline: str, p: ProjectionSpec, schema: EventSchema, day: str, files: list[str]
    ) -> int:
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
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE _touched AS SELECT DISTINCT {', '.join(keys)} FROM {by_day} WHERE _day = $day::DATE",
                {"day": day},
            )
            con.execute(f"DELETE FROM {by_day} WHERE _day = $day::DATE", {"day": day})
            n = 0
            if files:
                n = con.execute(f"INSERT INTO {by_day} {latest}", params).fetchone()[0]
                con.execute(
                    f"INSERT INTO _touched SELECT {', '.join(keys)} FROM {by_day} WHERE _day = $day::DATE", {"day": day}
                )
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
    def _latest_per_key(p: ProjectionSpec, schema: EventSchema, source: str, extra: str = "") -> str:
        """The latest event per key of `source` (latest `order_by`, then highest event id), as the
        projection's columns plus `_order` and `_event_id`."""
        keys = [ident(k) for k in p.key]
        cols = ", ".join(f"{ident(src)} AS {ident(col)}" for col, src in p.values.items())
        order, eid = ident(p.order_by), ident(schema.id_field)
        return (
            f"SELECT DISTINCT ON ({', '.join(keys)}) {', '.join(keys)}, {cols}, {order} AS _order, {eid} AS _event_id{extra} "
            f"FROM {source} ORDER BY {', '.join(keys)}, {order} DESC, {eid} DESC"
        )

    def fold_mismatches(
        self,
        pipeline: str,
        p: ProjectionSpec,
        schema: EventSchema,
        day: str,
        day_files: list[str],
        all_days: list[str],
        all_files: list[str],
    ) -> tuple[dict, list[str]]:
        """Compare projection `p` with a from-scratch fold of the committed Parquet: an increment
        projection's rows of the day with a fold of `day_files`; a replace projection's rows for
        the keys the day touches with a fold of `all_files` (every committed day), plus its rows of
        no committed day and its per-day rows of the day. Returns (metadata, problems)."""
        table = ident(pipeline, p.name)
        with self.connect() as con:
            if not self._exists(con, table):
                return {f"{p.name}_rows_differing": len(day_files)}, [
                    f"{p.name}: the table does not exist"
                ] if day_files else []
            if p.kind == "increment":
                fold = self._increment_fold(p) if day_files else f"SELECT * FROM {table} WHERE FALSE"
                cur = f"SELECT * FROM {table} WHERE day = $day::DATE"
                compared, differing, sample = self._compare(
                    con,
                    fold,
                    cur,
                    ["day", *p.key],
                    list(p.values),
                    {"day": day, "files": day_files} if day_files else {"day": day},
                    table,
                )
                problems = (
                    [
                        f"{p.name}: {differing} of {compared} rows of the day differ from a fold of its committed Parquet, e.g. {sample}"
                    ]
                    if differing
                    else []
                )
                return {f"{p.name}_rows_compared": compared, f"{p.name}_rows_differing": differing}, problems
            return self._replace_mismatches(con, table, p, schema, day, day_files, all_days, all_files)

    def _replace_mismatches(
        self, con, table, p: ProjectionSpec, schema: EventSchema, day, day_files, all_days, all_files
    ):
        compared, differing, sample = self._compare_touched_keys(con, table, p, schema, day, day_files, all_files)
        problems = (
            [
                f"{p.name}: {differing} of {compared} keys the day touches differ from a fold of the committed days, e.g. {sample}"
            ]
            if differing
            else []
        )
        orphans = con.execute(
            f"SELECT count(*) FROM {table} WHERE _day IS NULL OR NOT list_contains($days, _day::VARCHAR)",
            {"days": all_days},
        ).fetchall()[0][0]
        if orphans:
            problems.append(f"{p.name}: {orphans} rows come from no committed day")
        day_rows, differing_by_day = self._compare_by_day(con, table, p, schema, day, day_files)
        if differing_by_day:
            problems.append(
                f"{p.name}__by_day: {differing_by_day} of the day's {day_rows} rows differ from its committed Parquet"
            )
        md = {
            f"{p.name}_keys_compared": compared,
            f"{p.name}_keys_differing": differing,
            f"{p.name}_orphan_rows": orphans,
            f"{p.name}_by_day_rows_differing": differing_by_day,
        }
        return md, problems

    def _compare_touched_keys(self, con, table, p: ProjectionSpec, schema: EventSchema, day, day_files, all_files):
        """The replace projection's rows for the keys the day touches (in the store or in its
        Parquet) against the latest event per key of every committed day."""
        keys = [ident(k) for k in p.key]
        same_key = " AND ".join(f"t.{k} IS NOT DISTINCT FROM s.{k}" for k in keys)
        touched = f"SELECT {', '.join(keys)} FROM {table} WHERE _day = $day::DATE"
        params: dict = {"day": day}
        if day_files:
            touched += f" UNION SELECT {', '.join(keys)} FROM read_parquet($day_files)"
            params["day_files"] = day_files
        truth = f"SELECT * FROM {table} WHERE FALSE"
        if all_files:
            params["all_files"] = all_files
            scan = f"(SELECT * FROM read_parquet($all_files) AS t WHERE EXISTS (SELECT 1 FROM touched AS s WHERE {same_key}))"
            truth = self._latest_per_key(p, schema, scan)
        cur = f"SELECT * FROM {table} AS t WHERE EXISTS (SELECT 1 FROM touched AS s WHERE {same_key})"
        return self._compare(
            con,
            truth,
            cur,
            list(p.key),
            [*p.values, "_order", "_event_id"],
            params,
            table,
            prelude=f"touched AS ({touched})",
        )

    def _compare_by_day(self, con, table, p: ProjectionSpec, schema: EventSchema, day, day_files) -> tuple[int, int]:
        """The day's rows of `<name>__by_day` against the latest event per key of its Parquet:
        (rows compared, rows differing); (0, 0) without that table."""
        by_day = ident(table.split(".")[0].strip('"'), f"{p.name}__by_day")
        if not self._exists(con, by_day):
            return 0, 0
        latest = (
            self._latest_per_key(p, schema, "read_parquet($files)", extra=", $day::DATE AS _day")
            if day_files
            else f"SELECT * FROM {by_day} WHERE FALSE"
        )
        day_rows, differing, _ = self._compare(
            con,
            latest,
            f"SELECT * FROM {by_day} WHERE _day = $day::DATE",
            list(p.key),
            [*p.values, "_order", "_event_id"],
            {"day": day, "files": day_files} if day_files else {"day": day},
            by_day,
        )
        return day_rows, differing

    @staticmethod
    def _compare(
        con, expected: str, actual: str, keys: list[str], values: list[str], params: dict, table: str, prelude: str = ""
    ) -> tuple[int, int, list[str]]:
        """Rows of two queries matched on `keys`: (rows compared, rows that differ or have no
        match, a sample of their keys). `table`'s floating columns may differ by rounding (1e-9
        relative): a fold's float sums depend on the order DuckDB's threads add them in."""
        k = [ident(c) for c in keys]
        on = " AND ".join(f"e.{c} IS NOT DISTINCT FROM a.{c}" for c in k)
        floats = {
            name
            for name, kind, *_ in con.execute(f"DESCRIBE {table}").fetchall()
            if kind in ("FLOAT", "DOUBLE", "REAL")
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
            f"a AS (SELECT *, TRUE AS _present FROM ({actual})) "
            f"SELECT count(*), count(*) FILTER (WHERE {bad}), (list({key_text} ORDER BY {key_text}) FILTER (WHERE {bad}))[1:5] "
            f"FROM e FULL OUTER JOIN a ON {on}"
        )
        compared, differing, sample = con.execute(sql, params).fetchall()[0]
        return compared, differing, sample or []

    @staticmethod
    def _exists(con, table: str) -> bool:
        try:
            con.execute(f"SELECT 1 FROM {table} LIMIT 0")
            return True
        except duckdb.CatalogException:
            return False

    def increment_total(self, pipeline: str, p: ProjectionSpec, day: str) -> int:
        table = ident(pipeline, p.name)
        with self.connect() as con:
            if not self._exists(con, table):
                return 0
            return con.execute(
                f"SELECT coalesce(sum({ident(p.count_column)}), 0)::BIGINT FROM {table} WHERE day = $day::DATE",
                {"day": day},
            ).fetchone()[0]
