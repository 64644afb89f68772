"""Projection replay: fold a tenant's history from ClickHouse `event_log` into projections.

One place for the concept:

- `Event`, `EventLogProjection` and `PROJECTIONS` (the registry, with two examples that mirror the seed's
  `experimentRunState` and `tenantDailyEventStats`): a projection is a fold — `key(event)`, `init()`,
  `apply(state, event)` — plus the store it lives in and the SQL that folds the same thing from
  scratch (the check compares the two).
- `EventLog`: the `event_log` table; discovery of aggregates, counts, the cutoff, and keyset reads
  (`WHERE (aggregate_id, event_id) > (last) ORDER BY aggregate_id, event_id LIMIT n`), so memory is
  bounded by the page. Every value is a `{name:Type}` parameter.
- stores (`replay_defs/projection_replay/stores.py`): ClickHouse latest-row-wins (ReplacingMergeTree by
  version) and a Postgres increment store; both keep the replay's progress.
- `replay_day`: one day partition of one projection for one tenant, under the live-traffic
  protocol of `replay_defs/projection_replay/live.py`, resumable, logged as JSONL, verified before unmarking.

Partitions are days of event time. A projection's `scope` says what a day's replay rewrites:
- `day` (increment stores, keys hold the event's day): the rows of (tenant, day) are deleted first,
  then every event of the window <= cutoff is folded; a window marker defers/skips live events of
  that window, whatever their aggregate;
- `aggregate` (latest-row stores, key = the aggregate): the aggregates with events in the window are
  marked, and each is folded from *all* its events <= cutoff and rewritten (latest row wins), so a
  re-run or an overlapping day rewrites the same rows.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal, NamedTuple

import msgspec

from replay_defs.pipeline.spec import SAFE_NAME

EVENT_LOG = "event_log"
DAY_MS = 86_400_000
EPOCH = date(1970, 1, 1)

EVENT_LOG_DDL = """CREATE TABLE IF NOT EXISTS {table} (
    tenant String,
    aggregate_id String,
    event_id String,
    time DateTime64(3, 'UTC'),
    type LowCardinality(String),
    payload String,
    INDEX time_idx time TYPE minmax GRANULARITY 4
) ENGINE = MergeTree PARTITION BY toYYYYMM(time) ORDER BY (tenant, aggregate_id, event_id)"""


class Event(NamedTuple):
    aggregate_id: str
    event_id: str
    time_ms: int
    type: str
    payload: str


@dataclass(frozen=True)
class EventLogProjection:
    """A projection of a tenant's `event_log`, written as a fold in Python and replayed day by day (not
    the day pipelines' `pipeline.spec.ProjectionSpec`, which DuckDB folds from committed Parquet).
    `state` is a list of the `value_columns` (in order); `apply` updates it in place. Increment
    projections (`store="postgres"`) hold integer counters that add up (two states of one key merge
    by adding), scope `day`, and a `day` key column (days since 1970-01-01 in the fold, a DATE in
    the store). Latest-row projections (`store="clickhouse"`) have scope `aggregate` and key
    `(aggregate_id,)`. `fold_sql` selects the key and value columns from `event_log` for `{where}`
    (a fixed condition with parameters), grouped by key: the check's from-scratch fold."""

    name: str
    description: str
    store: Literal["clickhouse", "postgres"]
    scope: Literal["aggregate", "day"]
    key_columns: tuple[tuple[str, str], ...]  # (name, ClickHouse type)
    value_columns: tuple[tuple[str, str], ...]
    key: Callable[[Event], tuple]
    init: Callable[[], list]
    apply: Callable[[list, Event], None]
    fold_sql: str
    from_row: Callable[[dict], list] | None = None  # store row -> state (latest-row live apply)

    def __post_init__(self) -> None:
        for n in (self.name, *(c for c, _ in self.key_columns), *(c for c, _ in self.value_columns)):
            if not SAFE_NAME.fullmatch(n):
                raise ValueError(f"projection {self.name!r}: {n!r} is not a safe identifier")
        if self.store == "postgres" and (self.scope != "day" or "day" not in dict(self.key_columns)):
            raise ValueError(f"projection {self.name!r}: an increment store needs scope 'day' and a 'day' key column")
        if self.store == "clickhouse" and (
            self.scope != "aggregate" or [c for c, _ in self.key_columns] != ["aggregate_id"]
        ):
            raise ValueError(
                f"projection {self.name!r}: a latest-row store needs scope 'aggregate' and key (aggregate_id,)"
            )

    @property
    def kind(self) -> str:
        return "increment" if self.store == "postgres" else "latest"

    @property
    def table(self) -> str:
        return f"projection_{self.name}"

    def summary(self) -> dict:
        return {
            "name": self.name,
            "store": self.store,
            "kind": self.kind,
            "scope": self.scope,
            "table": self.table,
            "key": [c for c, _ in self.key_columns],
            "values": [c for c, _ in self.value_columns],
            "description": self.description,
        }


# ---- the two example projections -------------------------------------------------------------

_decode = msgspec.json.Decoder()


def _units(payload: str) -> int:
    """`payload.units` when it is an integer, else 0 (as ClickHouse's JSONExtractInt)."""
    if '"units"' not in payload:
        return 0
    try:
        v = _decode.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return 0
    u = v.get("units") if isinstance(v, dict) else None
    return u if type(u) is int else 0


def _daily_apply(s: list, e: Event) -> None:
    s[0] += 1
    s[1] += _units(e.payload)


def _state_apply(s: list, e: Event) -> None:
    # events arrive in event id order per aggregate (replay reads, live consumers)
    s[0] += 1
    s[1] = e.time_ms if s[1] is None or e.time_ms < s[1] else s[1]
    s[2] = e.time_ms if s[2] is None or e.time_ms > s[2] else s[2]
    s[3] = e.type
    s[4] = e.event_id


def _ms(v) -> int:
    return int(v.timestamp() * 1000) if isinstance(v, datetime) else int(v)


TENANT_DAILY_EVENT_COUNTS = EventLogProjection(
    name="tenant_daily_event_counts",
    description="Events and billable units per tenant, day and event type (an increment store in Postgres; "
    "the seed's tenantDailyEventStats).",
    store="postgres",
    scope="day",
    key_columns=(("day", "Date"), ("type", "String")),
    value_columns=(("events", "Int64"), ("units", "Int64")),
    key=lambda e: (e.time_ms // DAY_MS, e.type),
    init=lambda: [0, 0],
    apply=_daily_apply,
    fold_sql="SELECT toDate(time) AS day, toString(type) AS type, toInt64(count()) AS events, "
    "toInt64(sum(JSONExtractInt(payload, 'units'))) AS units FROM {table} WHERE {where} GROUP BY day, type",
)

AGGREGATE_STATE = EventLogProjection(
    name="aggregate_state",
    description="Per aggregate: event count, first and last event time, last event type and id (latest row "
    "wins in ClickHouse; the seed's experimentRunState / traceSummary).",
    store="clickhouse",
    scope="aggregate",
    key_columns=(("aggregate_id", "String"),),
    value_columns=(
        ("events", "UInt64"),
        ("first_time", "DateTime64(3, 'UTC')"),
        ("last_time", "DateTime64(3, 'UTC')"),
        ("last_type", "String"),
        ("last_event_id", "String"),
    ),
    key=lambda e: (e.aggregate_id,),
    init=lambda: [0, None, None, "", ""],
    apply=_state_apply,
    fold_sql="SELECT aggregate_id, toUInt64(count()) AS events, min(time) AS first_time, max(time) AS last_time, "
    "toString(argMax(type, event_id)) AS last_type, max(event_id) AS last_event_id FROM {table} WHERE {where} GROUP BY aggregate_id",
    from_row=lambda r: [
        int(r["events"]),
        _ms(r["first_time"]),
        _ms(r["last_time"]),
        r["last_type"],
        r["last_event_id"],
    ],
)

PROJECTIONS: dict[str, EventLogProjection] = {p.name: p for p in (AGGREGATE_STATE, TENANT_DAILY_EVENT_COUNTS)}


def get_projection(name: str) -> EventLogProjection:
    try:
        return PROJECTIONS[name]
    except KeyError:
        raise ValueError(f"no projection {name!r}; known: {', '.join(sorted(PROJECTIONS))}") from None


# ---- event_log --------------------------------------------------------------------------------


def day_window(day: str) -> tuple[datetime, datetime]:
    d = date.fromisoformat(day)
    lo = datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
    return lo, lo + timedelta(days=1)


def to_ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


TS = "DateTime64(3, 'UTC')"
_SELECT = "SELECT aggregate_id, event_id, toUnixTimestamp64Milli(time) AS time_ms, toString(type) AS type, payload"


class EventLog:
    """Reads of `event_log` for one tenant. `ch` is a `replay_defs.core.clickhouse.ClickHouse`."""

    def __init__(self, ch, tenant: str, table: str = EVENT_LOG):
        if not SAFE_NAME.fullmatch(table):
            raise ValueError(f"{table!r} is not a safe table name")
        self.ch, self.tenant, self.table = ch, tenant, table
        self.queries = 0

    def _rows(self, sql: str, params: dict) -> list[tuple]:
        self.queries += 1
        return self.ch.rows(sql.replace("{table}", self.table), {"tenant": self.tenant, **params})

    def cutoff(self) -> str:
        """The tenant's latest event id ('' when it has none)."""
        return self._rows("SELECT max(event_id) FROM {table} WHERE tenant = {tenant:String}", {})[0][0] or ""

    def counts(self, lo: datetime, hi: datetime, whole_aggregates: bool) -> dict:
        """Dry run: aggregates with events in [lo, hi) and the events a replay would fold."""
        w = f"tenant = {{tenant:String}} AND time >= {{lo:{TS}}} AND time < {{hi:{TS}}}"
        aggs, events = self._rows(
            f"SELECT uniqExact(aggregate_id), count() FROM {{table}} WHERE {w}", {"lo": lo, "hi": hi}
        )[0]
        out = {"aggregates": int(aggs), "events_in_window": int(events)}
        if whole_aggregates:
            out["events_to_fold"] = int(
                self._rows(
                    f"SELECT count() FROM {{table}} WHERE tenant = {{tenant:String}} AND aggregate_id IN (SELECT aggregate_id FROM {{table}} WHERE {w})",
                    {"lo": lo, "hi": hi},
                )[0][0]
            )
        else:
            out["events_to_fold"] = out["events_in_window"]
        return out

    def aggregates(self, lo: datetime, hi: datetime, max_event_id: str, after: str, limit: int) -> list[str]:
        """The next `limit` aggregates (id order, after `after`) with events in [lo, hi) whose id
        is <= `max_event_id`: keyset, never OFFSET."""
        rows = self._rows(
            f"SELECT aggregate_id FROM {{table}} WHERE tenant = {{tenant:String}} AND time >= {{lo:{TS}}} AND time < {{hi:{TS}}} "
            "AND event_id <= {cutoff:String} AND aggregate_id > {after:String} GROUP BY aggregate_id ORDER BY aggregate_id LIMIT {n:UInt64}",
            {"lo": lo, "hi": hi, "cutoff": max_event_id, "after": after, "n": limit},
        )
        return [r[0] for r in rows]

    def pages(
        self,
        first: str,
        last: str,
        cutoff: str,
        page_size: int,
        window: tuple[datetime, datetime] | None = None,
        only: list[str] | None = None,
    ) -> Iterator[Any]:
        """Events of the aggregates in [first, last] (only those in `only` when given; only in
        `window` when given) with id <= cutoff, in (aggregate_id, event_id) order, as Arrow pages
        of at most `page_size` rows."""
        conds = [
            "tenant = {tenant:String}",
            "aggregate_id >= {first:String}",
            "aggregate_id <= {last:String}",
            "event_id <= {cutoff:String}",
            "(aggregate_id, event_id) > ({ka:String}, {ke:String})",
            # the same bound on the key's column alone: the primary key range starts there (2x faster pages)
            "aggregate_id >= {ka:String}",
        ]
        params: dict = {"first": first, "last": last, "cutoff": cutoff, "n": page_size, "tenant": self.tenant}
        if window:
            conds += [f"time >= {{lo:{TS}}}", f"time < {{hi:{TS}}}"]
            params |= {"lo": window[0], "hi": window[1]}
        if only is not None:
            conds.append("aggregate_id IN {only:Array(String)}")
            params["only"] = only
        sql = f"{_SELECT} FROM {self.table} WHERE {' AND '.join(conds)} ORDER BY aggregate_id, event_id LIMIT {{n:UInt64}}"
        ka, ke = "", ""
        while True:
            self.queries += 1
            page = self.ch.query(sql, {**params, "ka": ka, "ke": ke})
            if page.num_rows == 0:
                return
            yield page
            if page.num_rows < page_size:
                return
            ka = page.column("aggregate_id")[-1].as_py()
            ke = page.column("event_id")[-1].as_py()


def fold_pages(projection: EventLogProjection, pages, rows: dict | None = None) -> tuple[dict, int]:
    """Fold Arrow pages of events into `rows` (projection key -> state): coalesced, so a key
    touched by many events (or aggregates) is one entry. Returns (rows, events)."""
    rows = {} if rows is None else rows
    key, init, apply = projection.key, projection.init, projection.apply
    n = 0
    for page in pages:
        cols = [page.column(c).to_pylist() for c in ("aggregate_id", "event_id", "time_ms", "type", "payload")]
        for ev in map(Event, *cols):
            k = key(ev)
            s = rows.get(k)
            if s is None:
                s = rows[k] = init()
            apply(s, ev)
        n += page.num_rows
    return rows, n


def merge_rows(projection: EventLogProjection, into: dict, other: dict) -> dict:
    for k, s in other.items():
        cur = into.get(k)
        if cur is None:
            into[k] = s
        elif projection.kind == "increment":
            for i, v in enumerate(s):
                cur[i] += v
        else:
            raise RuntimeError(f"{projection.name}: key {k!r} folded by two streams (aggregates must not be split)")
    return into


def generate_event_log(
    ch,
    tenant: str,
    rows: int,
    per_aggregate: int = 25,
    start: str = "2025-06-01",
    days: int = 5,
    other_tenant_every: int = 20,
) -> None:
    """Demo / benchmark data, written by ClickHouse itself: `rows` events of `tenant` (every
    `other_tenant_every`-th of another tenant), `per_aggregate` consecutive events per aggregate,
    spread evenly over `days` days from `start`, with a small JSON payload holding `units`."""
    ch.command(EVENT_LOG_DDL.replace("{table}", EVENT_LOG))
    ch.command(
        f"""INSERT INTO {EVENT_LOG}
        SELECT if(number % {{every:UInt64}} = 0, concat({{tenant:String}}, '-other'), {{tenant:String}}) AS tenant,
               concat('agg-', leftPad(toString(intDiv(number, {{per:UInt64}})), 9, '0')) AS aggregate_id,
               concat('ev', leftPad(toString(number), 12, '0')) AS event_id,
               toDateTime64({{start:String}}, 3, 'UTC') + toIntervalMillisecond(intDiv(number * {{span:UInt64}}, {{rows:UInt64}})) AS time,
               ['run.started', 'run.step', 'run.step', 'run.finished'][number % 4 + 1] AS type,
               concat('{{"units":', toString(number % 7), ',"model":"gpt-x","note":"', repeat('x', 40), '"}}') AS payload
        FROM numbers({{rows:UInt64}})""",
        {
            "tenant": tenant,
            "per": per_aggregate,
            "start": start + " 00:00:00",
            "span": days * DAY_MS,
            "rows": rows,
            "every": other_tenant_every,
        },
    )


# ---- the replay log ---------------------------------------------------------------------------


class ReplayLog:
    """JSON lines, one per step, flushed as written: `tail -f` shows progress."""

    def __init__(self, path: str | None, echo: Callable[[str], None] | None = None):
        self.path = path
        self.echo = echo
        self._f = None
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: str, **fields) -> None:
        line = json.dumps(
            {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}, default=str
        )
        with self._lock:
            if self._f:
                self._f.write(line + "\n")
                self._f.flush()
        if self.echo:
            self.echo(line)

    def close(self) -> None:
        if self._f:
            self._f.close()


# ---- one day ----------------------------------------------------------------------------------


@dataclass
class ReplayState:
    """A replay's progress, kept in the projection's store (atomically with the writes for the
    increment store)."""

    projection: str
    tenant: str
    day: str
    replay_id: str
    status: str = "running"  # running | done | abandoned
    cutoff: str = ""
    discovery_cutoff: str = ""
    last_aggregate: str = ""
    aggregates: int = 0
    events: int = 0


@dataclass
class ReplayOptions:
    batch_size: int = 5000  # events per ClickHouse page
    aggregate_batch: int = 1000  # aggregates per batch (one store write per key per batch)
    concurrency: int = 4  # aggregate streams read and folded in parallel per batch
    dry_run: bool = False
    drain_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for f in ("batch_size", "aggregate_batch", "concurrency"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be at least 1")


class ReplayBusy(RuntimeError):
    """Another replay of the same projection, tenant and day holds it."""


@dataclass
class DayResult:
    day: str
    tenant: str
    projection: str
    dry_run: bool
    replay_id: str = ""
    resumed: bool = False
    cutoff: str = ""
    aggregates: int = 0
    events: int = 0
    keys_written: int = 0
    batches: int = 0
    skipped_aggregates: int = 0
    drained_handlers: int = 0
    markers: int = 0
    seconds: float = 0.0
    verified: bool | None = None
    verification: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    unmark: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("verification", "counts", "unmark")}
        d |= {f"dry_run_{k}": v for k, v in self.counts.items()}
        d |= {f"verify_{k}": v for k, v in self.verification.items() if isinstance(v, (int, float, str, bool))}
        d |= {f"unmark_{k}": v for k, v in self.unmark.items()}
        return d


def replay_day(
    projection: EventLogProjection,
    tenant: str,
    day: str,
    ch_factory: Callable[[], Any],
    store,
    coordinator,
    options: ReplayOptions,
    log: ReplayLog,
    after_batch: Callable[[DayResult], None] | None = None,
) -> DayResult:
    """Replay one day partition of `projection` for `tenant` (see the module docstring).

    `ch_factory()` opens a ClickHouse client (one per parallel stream); `store` is the projection's
    store (`stores.open_store`); `coordinator` a `live.Coordinator`. `after_batch(result)` is
    called after each batch is written and its progress kept: a test raises there to crash the
    replay at a chosen point (production passes nothing)."""
    t0 = time.monotonic()
    res = DayResult(day=day, tenant=tenant, projection=projection.name, dry_run=options.dry_run)
    ch = ch_factory()
    try:
        if options.dry_run:
            return _dry_run(projection, EventLog(ch, tenant), day, log, res, t0)
        token = uuid.uuid4().hex
        holder = coordinator.acquire(tenant, day, token)
        if holder is not None:
            raise ReplayBusy(
                f"another replay of {projection.name} for this tenant and {day} is running (lock {holder}); "
                "wait for it, or after a crash run `event-replay projections cleanup-markers`"
            )
        try:
            replay = _DayReplay(projection, tenant, day, ch, ch_factory, store, coordinator, options, log, res)
            replay.run(token, after_batch)
            res.seconds = time.monotonic() - t0
            log.write(
                "done",
                day=day,
                aggregates=res.aggregates,
                events=res.events,
                keys_written=res.keys_written,
                seconds=round(res.seconds, 3),
                verified=res.verified,
            )
            return res
        finally:
            coordinator.release(tenant, day, token)
    finally:
        ch.close()


def _dry_run(projection: EventLogProjection, elog: EventLog, day: str, log: ReplayLog, res: DayResult, t0: float):
    """Count what the day's replay would fold; write nothing."""
    lo, hi = day_window(day)
    res.counts = elog.counts(lo, hi, whole_aggregates=projection.scope == "aggregate")
    res.aggregates, res.events = res.counts["aggregates"], res.counts["events_to_fold"]
    log.write("dry_run", projection=projection.name, day=day, **res.counts)
    res.seconds = time.monotonic() - t0
    return res


class _DayReplay:
    """One day's replay, holding the (projection, tenant, day) lock: the live-traffic protocol's
    steps in order (mark, drain, cutoff, batches, verify, unmark), resumed where a crash left it."""

    def __init__(self, projection, tenant, day, ch, ch_factory, store, coordinator, options, log, res):
        self.projection, self.tenant, self.day = projection, tenant, day
        self.ch, self.ch_factory, self.store, self.coordinator = ch, ch_factory, store, coordinator
        self.options, self.log, self.res = options, log, res
        self.lo, self.hi = day_window(day)
        self.elog = EventLog(ch, tenant)

    def run(self, token: str, after_batch: Callable[[DayResult], None] | None) -> None:
        state = self._start_or_resume()
        rid = self.res.replay_id = state.replay_id
        self.coordinator.register(rid, self.tenant, self.day, to_ms(self.lo), to_ms(self.hi), self.projection.scope)
        self._mark(rid, state)
        self._drain_and_cutoff(rid, state)
        self._fold_batches(rid, state, token, after_batch)
        self._verify_and_unmark(rid, state)

    def _start_or_resume(self) -> ReplayState:
        """The day's progress of a replay that did not finish (resumed), else a new replay."""
        res, prev = self.res, self.store.progress(self.projection, self.tenant, self.day)
        if prev is not None and prev.status == "running":
            res.resumed, res.skipped_aggregates = True, prev.aggregates
            self.log.write(
                "resume",
                projection=self.projection.name,
                day=self.day,
                replay_id=prev.replay_id,
                cutoff=prev.cutoff,
                after_aggregate=prev.last_aggregate,
                aggregates_done=prev.aggregates,
                events_done=prev.events,
            )
            return prev
        state = ReplayState(self.projection.name, self.tenant, self.day, replay_id=uuid.uuid4().hex)
        self.log.write("start", projection=self.projection.name, day=self.day, replay_id=state.replay_id)
        return state

    def _mark(self, rid: str, state: ReplayState) -> None:
        """1. Mark what the replay rewrites: the day's window, or each aggregate with events in it."""
        res, elog = self.res, self.elog
        if self.projection.scope == "day":
            self.coordinator.mark_window(rid, self.tenant, to_ms(self.lo), to_ms(self.hi))
            res.markers = 1
        else:
            if not state.discovery_cutoff:
                state.discovery_cutoff = elog.cutoff()
            after = ""
            while ids := elog.aggregates(self.lo, self.hi, state.discovery_cutoff, after, 10_000):
                res.markers += self.coordinator.mark_aggregates(rid, self.tenant, ids)
                after = ids[-1]
        self.log.write("marked", day=self.day, markers=res.markers, scope=self.projection.scope)

    def _drain_and_cutoff(self, rid: str, state: ReplayState) -> None:
        """2. Wait for in-flight live handlers, 3. fix the cutoff (a resumed replay keeps its
        cutoff: what it already wrote was folded to it)."""
        res = self.res
        res.drained_handlers, waited = self.coordinator.drain(self.tenant, self.options.drain_timeout_s)
        self.log.write("drained", day=self.day, handlers=res.drained_handlers, seconds=round(waited, 3))
        if not res.resumed:
            state.cutoff = self.elog.cutoff()
            self.coordinator.set_cutoff(rid, state.cutoff)
            # increment store: the day's rows removed (with the progress row)
            self.store.begin(self.projection, state, self.day)
        else:
            self.coordinator.set_cutoff(rid, state.cutoff)
        res.cutoff = state.cutoff
        self.log.write("cutoff", day=self.day, cutoff=state.cutoff)

    def _next_batch(self, rid: str, state: ReplayState) -> list[str]:
        """The next aggregates after the last one done: the marked ones, or those with events in the day."""
        n = self.options.aggregate_batch
        if self.projection.scope == "aggregate":
            return self.coordinator.marked_after(rid, state.last_aggregate, n)
        return self.elog.aggregates(self.lo, self.hi, state.cutoff, state.last_aggregate, n)

    def _fold_batches(self, rid: str, state: ReplayState, token: str, after_batch) -> None:
        """4. Batches of aggregates, folded in `concurrency` streams, each key written once per batch."""
        options = self.options
        with ThreadPoolExecutor(max_workers=options.concurrency) as pool:
            clients = [self.ch] + [self.ch_factory() for _ in range(options.concurrency - 1)]
            try:
                while (batch := self._next_batch(rid, state)) and state.cutoff:
                    window = (self.lo, self.hi)
                    rows, n = _fold_batch(
                        self.projection, self.tenant, batch, state.cutoff, window, clients, pool, options
                    )
                    self._write_batch(state, token, batch, rows, n)
                    if after_batch is not None:
                        after_batch(self.res)
            finally:
                for c in clients[1:]:
                    c.close()

    def _write_batch(self, state: ReplayState, token: str, batch: list[str], rows: dict, n: int) -> None:
        """Write a folded batch with its progress, keep the lock, count and log it."""
        res = self.res
        state.last_aggregate = batch[-1]
        state.aggregates += len(batch)
        state.events += n
        self.store.write_batch(self.projection, state, rows)
        self.coordinator.refresh(self.tenant, self.day, token)
        res.batches += 1
        res.aggregates += len(batch)
        res.events += n
        res.keys_written += len(rows)
        self.log.write(
            "batch",
            day=self.day,
            batch=res.batches,
            aggregates=len(batch),
            events=n,
            keys_written=len(rows),
            last_aggregate=state.last_aggregate,
            aggregates_done=state.aggregates,
            events_done=state.events,
        )

    def _verify_and_unmark(self, rid: str, state: ReplayState) -> None:
        """5. Verify before unmarking (no live write can touch these rows yet), 6. unmark:
        deferred live events resume."""
        res = self.res
        res.verification = self.store.verify(self.projection, self.ch, self.tenant, self.day, state)
        res.verified = bool(res.verification["passed"])
        self.log.write("verified", day=self.day, **res.verification)
        state.status = "done"
        self.store.finish(self.projection, state)
        res.unmark = self.coordinator.unmark(rid)
        self.log.write("unmarked", day=self.day, **res.unmark)


def _fold_batch(
    projection: EventLogProjection,
    tenant: str,
    batch: list[str],
    cutoff: str,
    window,
    clients,
    pool,
    options: ReplayOptions,
):
    streams = min(options.concurrency, len(batch))
    size = -(-len(batch) // streams)
    parts = [batch[i : i + size] for i in range(0, len(batch), size)]
    scoped = window if projection.scope == "day" else None

    def one(i: int):
        part = parts[i]
        elog = EventLog(clients[i], tenant)
        only = part if projection.scope == "aggregate" else None
        return fold_pages(projection, elog.pages(part[0], part[-1], cutoff, options.batch_size, scoped, only))

    results = list(pool.map(one, range(len(parts)))) if len(parts) > 1 else [one(0)]
    rows, n = {}, 0
    for r, k in results:
        merge_rows(projection, rows, r)
        n += k
    return rows, n
