"""Projection stores: where a projection's rows live, how a replay rewrites them safely, and where
the replay's progress is kept.

- `ClickHouseLatestStore` (latest row wins): `projection_<name>` is a ReplacingMergeTree(version);
  a replay writes every folded key once per batch with a newer version, reads use FINAL, so a re-run
  simply rewrites. Progress rows go to `projection_replay_progress` (also ReplacingMergeTree) after
  each batch; re-applying a batch after a crash is harmless (same rows, newer version).
- `PostgresIncrementStore` (increments): `projection_<name>` keyed by (tenant, day, key...); a replay
  first deletes the (tenant, day) rows, in one transaction with its progress row, then adds each
  batch's coalesced counters (`INSERT ... ON CONFLICT DO UPDATE SET c = c + EXCLUDED.c`) in one
  transaction with the batch's progress, so a crash never leaves counters without their progress
  record: a resumed replay adds exactly what is missing, a fresh one starts from deleted rows.

Both verify a day against the projection's from-scratch SQL fold on `event_log`.
"""

from __future__ import annotations

import threading
import time
from datetime import date, timedelta

import pyarrow as pa

from replay_defs.core import connect
from replay_defs.core.redact import redact
from replay_defs.projection_replay.engine import (
    EPOCH,
    EVENT_LOG,
    TS,
    Event,
    EventLogProjection,
    ReplayState,
    day_window,
)

PROGRESS = "projection_replay_progress"
_PROGRESS_FIELDS = ("replay_id", "status", "cutoff", "discovery_cutoff", "last_aggregate", "aggregates", "events")


def _arrow_type(ch_type: str) -> pa.DataType:
    if ch_type.startswith("DateTime64"):
        return pa.timestamp("ms", tz="UTC")
    return {"String": pa.string(), "UInt64": pa.uint64(), "Int64": pa.int64(), "Date": pa.date32()}[ch_type]


def _where(projection: EventLogProjection) -> str:
    if projection.scope == "day":
        return f"tenant = {{tenant:String}} AND time >= {{lo:{TS}}} AND time < {{hi:{TS}}} AND event_id <= {{cutoff:String}}"
    return (
        f"tenant = {{tenant:String}} AND event_id <= {{cutoff:String}} AND aggregate_id IN (SELECT aggregate_id FROM {EVENT_LOG} "
        f"WHERE tenant = {{tenant:String}} AND time >= {{lo:{TS}}} AND time < {{hi:{TS}}} AND event_id <= {{dcut:String}})"
    )


def fold_sql(projection: EventLogProjection) -> str:
    """The projection's from-scratch fold for a replayed day (parameters: tenant, lo, hi, cutoff, dcut)."""
    return projection.fold_sql.replace("{table}", EVENT_LOG).replace("{where}", _where(projection))


def _fold_params(tenant: str, day: str, state: ReplayState) -> dict:
    lo, hi = day_window(day)
    return {"tenant": tenant, "lo": lo, "hi": hi, "cutoff": state.cutoff, "dcut": state.discovery_cutoff}


class ClickHouseLatestStore:
    PROGRESS_EVERY_S = 2.0

    def __init__(self, ch):
        self.ch = ch  # a replay_defs.core.clickhouse.ClickHouse (the same database as event_log)
        self._saved_at = time.monotonic()

    def close(self) -> None:
        self.ch.close()

    def ensure(self, projection: EventLogProjection) -> None:
        cols = ", ".join(
            f"{n} {t}"
            for n, t in (
                ("tenant", "String"),
                *projection.key_columns,
                *projection.value_columns,
                ("version", "UInt64"),
            )
        )
        keys = ", ".join(["tenant", *(n for n, _ in projection.key_columns)])
        self.ch.command(
            f"CREATE TABLE IF NOT EXISTS {projection.table} ({cols}) ENGINE = ReplacingMergeTree(version) ORDER BY ({keys})"
        )
        self.ch.command(
            f"CREATE TABLE IF NOT EXISTS {PROGRESS} (projection_name String, tenant String, day Date, replay_id String, status String, "
            "cutoff String, discovery_cutoff String, last_aggregate String, aggregates UInt64, events UInt64, version UInt64) "
            "ENGINE = ReplacingMergeTree(version) ORDER BY (projection_name, tenant, day)"
        )

    # progress
    def progress(self, projection: EventLogProjection, tenant: str, day: str) -> ReplayState | None:
        rows = self.ch.rows(
            f"SELECT {', '.join(_PROGRESS_FIELDS)} FROM {PROGRESS} FINAL WHERE projection_name = {{p:String}} AND tenant = {{t:String}} AND day = {{d:Date}}",
            {"p": projection.name, "t": tenant, "d": date.fromisoformat(day)},
        )
        if not rows:
            return None
        return ReplayState(projection.name, tenant, day, **dict(zip(_PROGRESS_FIELDS, rows[0])))

    def _save(self, s: ReplayState) -> None:
        self.ch.insert(
            PROGRESS,
            pa.table(
                {
                    "projection_name": [s.projection],
                    "tenant": [s.tenant],
                    "day": pa.array([date.fromisoformat(s.day)], pa.date32()),
                    **{
                        f: pa.array([getattr(s, f)], pa.uint64() if f in ("aggregates", "events") else pa.string())
                        for f in _PROGRESS_FIELDS
                    },
                    "version": pa.array([time.time_ns()], pa.uint64()),
                }
            ),
        )

    def begin(self, projection: EventLogProjection, state: ReplayState, day: str) -> None:
        self._save(state)  # latest row wins: nothing to remove, the replay rewrites each row

    def finish(self, projection: EventLogProjection, state: ReplayState) -> None:
        self._save(state)

    def abandon(self, projection: EventLogProjection, tenant: str | None = None) -> int:
        rows = self.ch.rows(
            f"SELECT tenant, day, {', '.join(_PROGRESS_FIELDS)} FROM {PROGRESS} FINAL WHERE projection_name = {{p:String}} AND status = 'running'"
            + (" AND tenant = {t:String}" if tenant is not None else ""),
            {"p": projection.name, **({"t": tenant} if tenant is not None else {})},
        )
        for r in rows:
            s = ReplayState(projection.name, r[0], r[1].isoformat(), **dict(zip(_PROGRESS_FIELDS, r[2:])))
            s.status = "abandoned"
            self._save(s)
        return len(rows)

    # rows
    def _table(self, projection: EventLogProjection, tenant: str, rows: dict, version: int) -> pa.Table:
        keys = list(rows)
        cols = {"tenant": pa.array([tenant] * len(keys), pa.string())}
        for i, (n, t) in enumerate(projection.key_columns):
            cols[n] = pa.array([k[i] for k in keys], _arrow_type(t))
        states = list(rows.values())
        for i, (n, t) in enumerate(projection.value_columns):
            cols[n] = pa.array([s[i] for s in states], _arrow_type(t))
        cols["version"] = pa.array([version] * len(keys), pa.uint64())
        return pa.table(cols)

    def write_batch(self, projection: EventLogProjection, state: ReplayState, rows: dict) -> None:
        if rows:
            self.ch.insert(projection.table, self._table(projection, state.tenant, rows, time.time_ns()))
        # Progress at most every PROGRESS_EVERY_S: a ClickHouse insert costs tens of ms, and losing
        # the last seconds of progress only means rewriting those rows again (same values).
        if time.monotonic() - self._saved_at >= self.PROGRESS_EVERY_S:
            self._save(state)
            self._saved_at = time.monotonic()

    def apply_live(self, projection: EventLogProjection, tenant: str, event: Event) -> None:
        """A live consumer's write of one event: read the row, fold the event in, write it back."""
        event = as_event(event)
        cur = self.ch.query(
            f"SELECT * FROM {projection.table} FINAL WHERE tenant = {{t:String}} AND aggregate_id = {{a:String}}",
            {"t": tenant, "a": event.aggregate_id},
        ).to_pylist()
        state = projection.from_row(cur[0]) if cur else projection.init()
        projection.apply(state, event)
        self.ch.insert(
            projection.table, self._table(projection, tenant, {projection.key(event): state}, time.time_ns())
        )

    def rows(self, projection: EventLogProjection, tenant: str) -> dict:
        out = {}
        for r in self.ch.query(
            f"SELECT * FROM {projection.table} FINAL WHERE tenant = {{t:String}}", {"t": tenant}
        ).to_pylist():
            out[tuple(r[n] for n, _ in projection.key_columns)] = tuple(r[n] for n, _ in projection.value_columns)
        return out

    def verify(self, projection: EventLogProjection, ch, tenant: str, day: str, state: ReplayState) -> dict:
        """The replayed rows against the from-scratch fold, compared inside ClickHouse."""
        keys = [n for n, _ in projection.key_columns]
        vals = [n for n, _ in projection.value_columns]
        differs = " OR ".join(f"f.{v} != s.{v}" for v in vals)
        sql = (
            f"SELECT count() AS expected, countIf(s.present = 0 OR {differs}) AS mismatched "
            f"FROM ({fold_sql(projection)}) AS f LEFT JOIN (SELECT {', '.join(keys + vals)}, 1 AS present FROM {projection.table} FINAL "
            f"WHERE tenant = {{tenant:String}}) AS s USING ({', '.join(keys)}) SETTINGS join_use_nulls = 0"
        )
        expected, mismatched = ch.rows(sql, _fold_params(tenant, day, state))[0]
        return {
            "passed": int(mismatched) == 0,
            "expected_rows": int(expected),
            "mismatched_rows": int(mismatched),
            "compared_with": "from-scratch fold of event_log (ClickHouse SQL)",
        }


_pg_type = {"Date": "date", "String": "text", "Int64": "bigint", "UInt64": "bigint"}


class PostgresIncrementStore:
    def __init__(self, url: str):
        import psycopg

        try:
            self.con = connect.postgres(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise RuntimeError(redact(f"cannot connect to PostgreSQL: {exc}")) from None
        self._lock = threading.Lock()

    def close(self) -> None:
        self.con.close()

    def _t(self, projection: EventLogProjection):
        from psycopg import sql

        return sql.Identifier(projection.table)

    def ensure(self, projection: EventLogProjection) -> None:
        from psycopg import sql

        cols = (
            [("tenant", "text")]
            + [(n, _pg_type[t]) for n, t in projection.key_columns]
            + [(n, "bigint") for n, _ in projection.value_columns]
        )
        keys = ["tenant"] + [n for n, _ in projection.key_columns]
        with self._lock:
            self.con.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
                    self._t(projection),
                    sql.SQL(", ").join(sql.SQL("{} " + t).format(sql.Identifier(n)) for n, t in cols),
                    sql.SQL(", ").join(map(sql.Identifier, keys)),
                )
            )
            self.con.execute(
                f"CREATE TABLE IF NOT EXISTS {PROGRESS} (projection_name text, tenant text, day date, replay_id text, status text, "
                "cutoff text, discovery_cutoff text, last_aggregate text, aggregates bigint, events bigint, "
                "updated timestamptz DEFAULT now(), PRIMARY KEY (projection_name, tenant, day))"
            )

    def progress(self, projection: EventLogProjection, tenant: str, day: str) -> ReplayState | None:
        with self._lock:
            row = self.con.execute(
                f"SELECT {', '.join(_PROGRESS_FIELDS)} FROM {PROGRESS} WHERE projection_name = %s AND tenant = %s AND day = %s",
                (projection.name, tenant, date.fromisoformat(day)),
            ).fetchone()
        return ReplayState(projection.name, tenant, day, **dict(zip(_PROGRESS_FIELDS, row))) if row else None

    def _save(self, s: ReplayState) -> None:
        self.con.execute(
            f"INSERT INTO {PROGRESS} (projection_name, tenant, day, {', '.join(_PROGRESS_FIELDS)}, updated) VALUES (%s, %s, %s, "
            + ", ".join(["%s"] * len(_PROGRESS_FIELDS))
            + ", now()) ON CONFLICT (projection_name, tenant, day) DO UPDATE SET "
            + ", ".join(f"{f} = EXCLUDED.{f}" for f in _PROGRESS_FIELDS)
            + ", updated = now()",
            (s.projection, s.tenant, date.fromisoformat(s.day), *(getattr(s, f) for f in _PROGRESS_FIELDS)),
        )

    def begin(self, projection: EventLogProjection, state: ReplayState, day: str) -> None:
        """Re-replay safety: the day's rows go, in the transaction that records the replay."""
        from psycopg import sql

        with self._lock, self.con.transaction():
            self.con.execute(
                sql.SQL("DELETE FROM {} WHERE tenant = %s AND day = %s").format(self._t(projection)),
                (state.tenant, date.fromisoformat(day)),
            )
            self._save(state)

    def finish(self, projection: EventLogProjection, state: ReplayState) -> None:
        with self._lock:
            self._save(state)

    def abandon(self, projection: EventLogProjection, tenant: str | None = None) -> int:
        with self._lock:
            cur = self.con.execute(
                f"UPDATE {PROGRESS} SET status = 'abandoned', updated = now() WHERE projection_name = %s AND status = 'running'"
                + (" AND tenant = %s" if tenant is not None else ""),
                (projection.name, *((tenant,) if tenant is not None else ())),
            )
            return cur.rowcount

    def _upsert_sql(self, projection: EventLogProjection):
        from psycopg import sql

        keys = ["tenant"] + [n for n, _ in projection.key_columns]
        vals = [n for n, _ in projection.value_columns]
        return sql.SQL("INSERT INTO {t} ({cols}) VALUES ({ph}) ON CONFLICT ({keys}) DO UPDATE SET {sets}").format(
            t=self._t(projection),
            cols=sql.SQL(", ").join(map(sql.Identifier, keys + vals)),
            ph=sql.SQL(", ").join(sql.Placeholder() * len(keys + vals)),
            keys=sql.SQL(", ").join(map(sql.Identifier, keys)),
            sets=sql.SQL(", ").join(
                sql.SQL("{c} = {t}.{c} + EXCLUDED.{c}").format(c=sql.Identifier(v), t=self._t(projection)) for v in vals
            ),
        )

    @staticmethod
    def _key_values(projection: EventLogProjection, key: tuple) -> tuple:
        return tuple(EPOCH + timedelta(days=k) if n == "day" else k for (n, _), k in zip(projection.key_columns, key))

    def write_batch(self, projection: EventLogProjection, state: ReplayState, rows: dict) -> None:
        """The batch's coalesced counters (one row per key) and its progress, in one transaction."""
        params = [(state.tenant, *self._key_values(projection, k), *s) for k, s in rows.items()]
        with self._lock, self.con.transaction():
            if params:
                with self.con.cursor() as cur:
                    cur.executemany(self._upsert_sql(projection), params)
            self._save(state)

    def apply_live(self, projection: EventLogProjection, tenant: str, event: Event) -> None:
        event = as_event(event)
        s = projection.init()
        projection.apply(s, event)
        with self._lock:
            self.con.execute(
                self._upsert_sql(projection), (tenant, *self._key_values(projection, projection.key(event)), *s)
            )

    def rows(self, projection: EventLogProjection, tenant: str, day: str | None = None) -> dict:
        from psycopg import sql

        keys = [n for n, _ in projection.key_columns]
        vals = [n for n, _ in projection.value_columns]
        q = sql.SQL("SELECT {} FROM {} WHERE tenant = %s").format(
            sql.SQL(", ").join(map(sql.Identifier, keys + vals)), self._t(projection)
        )
        args: tuple = (tenant,)
        if day is not None:
            q += sql.SQL(" AND day = %s")
            args += (date.fromisoformat(day),)
        with self._lock:
            out = self.con.execute(q, args).fetchall()
        return {tuple(r[: len(keys)]): tuple(r[len(keys) :]) for r in out}

    def verify(self, projection: EventLogProjection, ch, tenant: str, day: str, state: ReplayState) -> dict:
        """The day's rows against the from-scratch fold (ClickHouse SQL on event_log), key by key."""
        keys = [n for n, _ in projection.key_columns]
        vals = [n for n, _ in projection.value_columns]
        expected = {}
        if state.cutoff:
            for r in ch.query(fold_sql(projection), _fold_params(tenant, day, state)).to_pylist():
                expected[tuple(r[k] for k in keys)] = tuple(int(r[v]) for v in vals)
        got = self.rows(projection, tenant, day)
        bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        totals = {f"total_{v}": sum(x[i] for x in got.values()) for i, v in enumerate(vals)}
        return {
            "passed": not bad,
            "expected_rows": len(expected),
            "mismatched_rows": len(bad),
            "first_mismatch": repr(bad[0]) if bad else "",
            **totals,
            "compared_with": "from-scratch fold of event_log (ClickHouse SQL)",
        }


def as_event(e) -> Event:
    """An `Event` from anything with its fields (e.g. a live_replay.LiveEvent)."""
    return e if type(e) is Event else Event(e.aggregate_id, e.event_id, e.time_ms, e.type, e.payload)


def open_store(projection: EventLogProjection, clickhouse=None, postgres_url: str | None = None):
    """The projection's store, its tables created. `clickhouse`: a ClickHouseResource (or anything
    with `.get()` returning a ClickHouse client)."""
    if projection.store == "clickhouse":
        store = ClickHouseLatestStore(clickhouse.get())
    else:
        if not postgres_url:
            raise ValueError(f"projection {projection.name!r} needs PostgreSQL: set EVENT_REPLAY_POSTGRES_URL")
        store = PostgresIncrementStore(postgres_url)
    store.ensure(projection)
    return store
