"""Live traffic during a projection replay: the protocol between a replay and the live consumers, in Redis.

Both sides of the protocol live here: `Coordinator` is what a replay calls, `LiveProjector` is the
small library a live consumer calls for every event it would fold into a projection.

The replay (per projection P, tenant T and day window [lo, hi), under a replay id R):

1. **Mark** — per-aggregate markers `marker(P, T, A) = R` for every aggregate it will fold (projections
   whose key is the aggregate), or a window marker `(R, lo, hi)` for projections whose key holds
   the event's day (increment stores: every event of the window feeds the rows it rewrites, also
   the events of aggregates that appear while it runs).
2. **Drain** — wait until every live handler that was applying an event when the markers went up
   has finished (handlers register atomically with their marker check, so none is missed).
3. **Cutoff** — the tenant's latest event id, recorded under R. The replay folds events <= cutoff.
4. **Unmark** — remove the markers; the aggregates whose events were deferred go to a ready set.

The live consumer, per event and projection (one Lua script, atomic with the markers):

- covered by a marker and event id <= cutoff: **skip** (the replay folds it);
- covered and id > cutoff, or the cutoff is not known yet: **defer** (appended to the aggregate's
  deferred list, in order);
- not covered, but the aggregate still has deferred events: **defer** behind them (keeps order);
- otherwise **apply**, registered as in flight until the store write returned.

`LiveProjector.resume_ready()` applies the deferred events of unmarked aggregates in order, again
skipping those <= the cutoff of the replay that deferred them. Call `handle` and `resume_ready`
from the thread that owns the aggregate (one consumer per aggregate partition, as a Kafka or
BullMQ group consumer does), so an aggregate's events are applied in order.

Event ids are compared as strings: they must be fixed width and increase with insertion into
`event_log` (KSUID/ULID style, or zero-padded sequences), as the seed's EventId cutoff assumes.

After a crash, markers stay up (live events keep being deferred, never lost) until the replay is
run again (it resumes) or `Coordinator.cleanup()` removes them and releases the deferred events.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

DEFAULT_PREFIX = "er:proj"

# KEYS: 1 aggregate marker, 2 window hash, 3 in-flight hash, 4 deferred list, 5 ready set, 6 through hash
# ARGV: 1 scope, 2 event time (ms), 3 event id, 4 token, 5 event JSON, 6 replay-hash prefix,
#       7 deferred-set prefix, 8 ready member, 9 mode: 'handle' (a new event) or 'resume' (the head
#       of the aggregate's deferred list: never appended again, 'hold' keeps it at the head),
#       10 through field (the aggregate, or the event's day number), 11 now (ms, for stale in-flight entries)
_DECIDE = """
local through = redis.call('HGET', KEYS[6], ARGV[10])
if through and ARGV[3] <= through then return 'skip' end
local rid = false
if ARGV[1] == 'aggregate' then
  rid = redis.call('GET', KEYS[1])
else
  local wins = redis.call('HGETALL', KEYS[2])
  local t = tonumber(ARGV[2])
  for i = 1, #wins, 2 do
    local w = cjson.decode(wins[i + 1])
    if t >= w[1] and t < w[2] then rid = wins[i]; break end
  end
end
if rid then
  local cutoff = redis.call('HGET', ARGV[6] .. rid, 'cutoff')
  if cutoff and ARGV[3] <= cutoff then return 'skip' end
  redis.call('SADD', ARGV[7] .. rid, ARGV[8])
  if ARGV[9] == 'resume' then return 'hold' end
  redis.call('RPUSH', KEYS[4], cjson.encode({rid, ARGV[5]}))
  return 'defer'
end
if ARGV[9] == 'handle' and redis.call('LLEN', KEYS[4]) > 0 then
  redis.call('RPUSH', KEYS[4], cjson.encode({'', ARGV[5]}))
  redis.call('SADD', KEYS[5], ARGV[8])
  return 'defer'
end
redis.call('HSET', KEYS[3], ARGV[4], ARGV[11])
return 'apply'
"""


_REFRESH = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) return 1 end return 0"
_MAX = "local c = redis.call('HGET', KEYS[1], ARGV[1]) if not c or c < ARGV[2] then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return 1"


# KEYS: 1 marked zset; ARGV: 1 replay id, 2 marker key prefix, 3.. aggregates
_MARK = """
for i = 3, #ARGV do
  redis.call('SET', ARGV[2] .. ARGV[i], ARGV[1])
  redis.call('ZADD', KEYS[1], 0, ARGV[i])
end
return #ARGV - 2
"""
# KEYS: 1 through hash; ARGV: 1 replay id, 2 marker key prefix, 3 cutoff ('' = record nothing), 4.. aggregates
_UNMARK = """
local n = 0
for i = 4, #ARGV do
  if ARGV[3] ~= '' then
    local c = redis.call('HGET', KEYS[1], ARGV[i])
    if not c or c < ARGV[3] then redis.call('HSET', KEYS[1], ARGV[i], ARGV[3]) end
  end
  local k = ARGV[2] .. ARGV[i]
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k); n = n + 1 end
end
return n
"""


def _redis(url: str):
    from replay_defs.core import connect

    return connect.redis(url, socket_timeout=30, socket_connect_timeout=10, decode_responses=True)


@dataclass
class Keys:
    """Every Redis key of one projection's coordination, in one place."""

    prefix: str
    projection: str

    def _p(self) -> str:
        return f"{self.prefix}:{self.projection}"

    def marker(self, tenant: str, aggregate: str) -> str:
        return f"{self._p()}:m:{tenant}\x00{aggregate}"

    def through(self, tenant: str) -> str:
        """Hash: aggregate (or day number) -> the cutoff a completed replay folded it through."""
        return f"{self._p()}:thr:{tenant}"

    def windows(self, tenant: str) -> str:
        return f"{self._p()}:w:{tenant}"

    def inflight(self, tenant: str) -> str:
        return f"{self._p()}:inflight:{tenant}"

    def deferred(self, tenant: str, aggregate: str) -> str:
        return f"{self._p()}:d:{tenant}\x00{aggregate}"

    def replay_prefix(self) -> str:
        return f"{self._p()}:r:"

    def replay(self, rid: str) -> str:
        return self.replay_prefix() + rid

    def marked_prefix(self) -> str:
        return f"{self._p()}:marked:"

    def marked(self, rid: str) -> str:
        """Sorted set (all scores 0, so ordered by aggregate id) of the aggregates R marked."""
        return self.marked_prefix() + rid

    def deferred_set_prefix(self) -> str:
        return f"{self._p()}:ds:"

    def ready(self) -> str:
        return f"{self._p()}:ready"

    def lock(self, tenant: str, day: str) -> str:
        return f"{self._p()}:lock:{tenant}\x00{day}"

    def replays(self) -> str:
        """Set of the replay ids with markers up (what cleanup looks at)."""
        return f"{self._p()}:active"


def member(tenant: str, aggregate: str) -> str:
    return f"{tenant}\x00{aggregate}"


class Coordinator:
    """The replay's side: mark, drain, cutoff, unmark, and cleanup after a crash."""

    def __init__(self, redis_url: str, projection: str, prefix: str = DEFAULT_PREFIX, keep_s: int = 7 * 86400):
        self.r = _redis(redis_url)
        self.k = Keys(prefix, projection)
        self.keep_s = keep_s  # replay records outlive the replay: deferred events still need the cutoff

    def close(self) -> None:
        self.r.close()

    def register(self, rid: str, tenant: str, day: str, lo_ms: int, hi_ms: int, scope: str) -> None:
        self.r.hset(
            self.k.replay(rid),
            mapping={"tenant": tenant, "day": day, "lo": lo_ms, "hi": hi_ms, "scope": scope, "started": time.time()},
        )
        self.r.sadd(self.k.replays(), rid)

    def acquire(self, tenant: str, day: str, token: str, ttl_s: int = 300) -> str | None:
        """One replay per (projection, tenant, day) at a time: None when acquired, else the holder's
        token. A replay refreshes it as it goes; one killed hard holds the day for `ttl_s` at most."""
        if self.r.set(self.k.lock(tenant, day), token, nx=True, ex=ttl_s):
            return None
        return self.r.get(self.k.lock(tenant, day)) or "?"

    def refresh(self, tenant: str, day: str, token: str, ttl_s: int = 300) -> None:
        if self.r.eval(_REFRESH, 1, self.k.lock(tenant, day), token, ttl_s) != 1:
            raise RuntimeError(f"lost the replay lock of {tenant} {day} (expired and taken by another replay?)")

    def release(self, tenant: str, day: str, token: str) -> None:
        self.r.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1,
            self.k.lock(tenant, day),
            token,
        )

    def mark_window(self, rid: str, tenant: str, lo_ms: int, hi_ms: int) -> None:
        self.r.hset(self.k.windows(tenant), rid, json.dumps([lo_ms, hi_ms]))

    def mark_aggregates(self, rid: str, tenant: str, aggregates: Iterable[str]) -> int:
        """Set the markers of `aggregates` (one script call per 2,000)."""
        ids = list(aggregates)
        for i in range(0, len(ids), 2000):
            chunk = ids[i : i + 2000]
            self.r.eval(_MARK, 1, self.k.marked(rid), rid, self.k.marker(tenant, ""), *chunk)
        return len(ids)

    def marked_after(self, rid: str, after: str, limit: int) -> list[str]:
        """The next `limit` aggregates R marked, in id order, after `after` (keyset)."""
        lo = "(" + after if after else "-"
        return self.r.zrangebylex(self.k.marked(rid), lo, "+", start=0, num=limit)

    def drain(self, tenant: str, timeout_s: float = 120.0, poll_s: float = 0.01) -> tuple[int, float]:
        """Wait for the live handlers in flight now (they began before the markers) to finish.
        Returns (handlers waited for, seconds)."""
        t0 = time.monotonic()
        waiting = set(self.r.hkeys(self.k.inflight(tenant)))
        n = len(waiting)
        while waiting:
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(
                    f"{len(waiting)} live handler(s) still in flight after {timeout_s:.0f}s: a crashed consumer? "
                    "`event-replay projections cleanup-markers` removes in-flight entries older than 5 minutes"
                )
            time.sleep(poll_s)
            waiting &= set(self.r.hkeys(self.k.inflight(tenant)))
        return n, time.monotonic() - t0

    def set_cutoff(self, rid: str, cutoff: str) -> None:
        self.r.hset(self.k.replay(rid), "cutoff", cutoff)

    def cutoff(self, rid: str) -> str | None:
        return self.r.hget(self.k.replay(rid), "cutoff")

    def unmark(self, rid: str, completed: bool = True) -> dict:
        """Remove R's markers; aggregates with deferred events become ready to resume. A completed
        replay first records what it folded through (aggregate or day -> cutoff): live events
        <= that are skipped from then on, also when a lagging consumer sees them after the unmark."""
        info = self.r.hgetall(self.k.replay(rid))
        tenant = info.get("tenant")
        cutoff = info.get("cutoff")
        record = completed and tenant is not None and bool(cutoff)
        if record and info.get("scope") == "day":
            self.r.eval(_MAX, 1, self.k.through(tenant), str(int(info["lo"]) // 86_400_000), cutoff)
        removed, after = 0, ""
        while True:
            batch = self.marked_after(rid, after, 2000)
            if not batch:
                break
            # Through-marks first, then only our own markers go (a newer replay keeps its own).
            removed += int(
                self.r.eval(
                    _UNMARK, 1, self.k.through(tenant), rid, self.k.marker(tenant, ""), cutoff if record else "", *batch
                )
            )
            after = batch[-1]
        ready = self._release(rid, tenant)
        self.r.expire(self.k.replay(rid), self.keep_s)
        if record:
            self.r.expire(self.k.through(tenant), self.keep_s)
        return {"markers_removed": removed, "aggregates_ready": ready, "through_recorded": record}

    def _release(self, rid: str, tenant: str | None) -> int:
        pipe = self.r.pipeline(transaction=True)
        if tenant is not None:
            pipe.hdel(self.k.windows(tenant), rid)
        pipe.delete(self.k.marked(rid))
        ds = self.k.deferred_set_prefix() + rid
        pipe.scard(ds)
        pipe.sunionstore(self.k.ready(), [self.k.ready(), ds])
        pipe.delete(ds)
        pipe.srem(self.k.replays(), rid)
        res = pipe.execute()
        return int(res[-4])

    def active(self, tenant: str | None = None) -> list[dict]:
        out = []
        for rid in sorted(self.r.smembers(self.k.replays())):
            info = self.r.hgetall(self.k.replay(rid))
            if tenant is None or info.get("tenant") == tenant:
                out.append({"replay_id": rid, **info, "markers": self.r.zcard(self.k.marked(rid))})
        return out

    def clear_stale_inflight(self, older_than_s: float = 300.0) -> int:
        """In-flight entries of live handlers that never finished (their consumer died)."""
        limit = (time.time() - older_than_s) * 1000
        n = 0
        for key in self.r.scan_iter(match=self.k.inflight("*"), count=1000):
            stale = [tok for tok, started in self.r.hgetall(key).items() if float(started) < limit]
            if stale:
                n += self.r.hdel(key, *stale)
        return n

    def cleanup(self, tenant: str | None = None, older_than_s: float = 0.0) -> list[dict]:
        """Remove the markers of replays that are not running any more (crashed), started more than
        `older_than_s` ago: their deferred events are released to the live consumers. Returns
        what was cleaned, per replay."""
        cleaned = []
        for rep in self.active(tenant):
            if time.time() - float(rep.get("started") or 0) < older_than_s:
                continue
            res = self.unmark(rep["replay_id"], completed=False)
            if rep.get("tenant") is not None and rep.get("day"):
                self.r.delete(self.k.lock(rep["tenant"], rep["day"]))
            if rep.get("tenant") is None:  # a marker set without its record: drop the id
                self.r.srem(self.k.replays(), rep["replay_id"])
            cleaned.append({**rep, **res})
        return cleaned


@dataclass(frozen=True)
class LiveEvent:
    tenant: str
    aggregate_id: str
    event_id: str
    time_ms: int
    type: str
    payload: str

    def to_json(self) -> str:
        return json.dumps([self.tenant, self.aggregate_id, self.event_id, self.time_ms, self.type, self.payload])

    @staticmethod
    def from_json(s: str) -> "LiveEvent":
        return LiveEvent(*json.loads(s))


class LiveProjector:
    """The live consumer's side. `apply(projection_name, event)` writes one event to the
    projection's store (`apply_live` of `ClickHouseLatestStore` or `PostgresIncrementStore`); `projections` maps name -> scope
    ("aggregate" or "day")."""

    def __init__(
        self,
        redis_url: str,
        projections: dict[str, str],
        apply: Callable[[str, LiveEvent], None],
        prefix: str = DEFAULT_PREFIX,
    ):
        self.r = _redis(redis_url)
        self.projections = projections
        self.keys = {p: Keys(prefix, p) for p in projections}
        self.apply = apply
        self._decide = self.r.register_script(_DECIDE)
        self.counts = {"applied": 0, "skipped": 0, "deferred": 0, "resumed": 0, "resume_skipped": 0}

    def close(self) -> None:
        self.r.close()

    def _run(self, name: str, scope: str, event: LiveEvent, token: str, mode: str) -> str:
        k = self.keys[name]
        return self._decide(
            keys=[
                k.marker(event.tenant, event.aggregate_id),
                k.windows(event.tenant),
                k.inflight(event.tenant),
                k.deferred(event.tenant, event.aggregate_id),
                k.ready(),
                k.through(event.tenant),
            ],
            args=[
                scope,
                event.time_ms,
                event.event_id,
                token,
                event.to_json(),
                k.replay_prefix(),
                k.deferred_set_prefix(),
                member(event.tenant, event.aggregate_id),
                mode,
                event.aggregate_id if scope == "aggregate" else str(event.time_ms // 86_400_000),
                int(time.time() * 1000),
            ],
        )

    def _apply(self, name: str, event: LiveEvent, token: str) -> None:
        try:
            self.apply(name, event)
        finally:
            self.r.hdel(self.keys[name].inflight(event.tenant), token)

    def handle(self, event: LiveEvent) -> dict[str, str]:
        """Decide and, where it is ours to do, apply the event for every projection."""
        out = {}
        for name, scope in self.projections.items():
            token = uuid.uuid4().hex
            decision = self._run(name, scope, event, token, "handle")
            if decision == "apply":
                self._apply(name, event, token)
                self.counts["applied"] += 1
            else:
                self.counts["skipped" if decision == "skip" else "deferred"] += 1
            out[name] = decision
        return out

    def resume_ready(self, limit: int = 1000) -> int:
        """Apply (in order) the deferred events of aggregates whose replay has unmarked them;
        events <= the cutoff of the replay that deferred them (or of one covering them now) are
        skipped. An aggregate held by a newer replay waits for that one's unmark. Returns the
        number of events applied."""
        applied = 0
        for name, scope in self.projections.items():
            k = self.keys[name]
            for m in self.r.spop(k.ready(), limit) or []:
                tenant, _, aggregate = m.partition("\x00")
                applied += self._resume(name, scope, k, tenant, aggregate)
        return applied

    def _resume(self, name: str, scope: str, k: Keys, tenant: str, aggregate: str) -> int:
        applied = 0
        while True:
            raw = self.r.lindex(k.deferred(tenant, aggregate), 0)
            if raw is None:
                return applied
            event = LiveEvent.from_json(json.loads(raw)[1])
            token = uuid.uuid4().hex
            decision = self._run(name, scope, event, token, "resume")
            if decision == "hold":
                return applied  # a replay covers it now: its unmark makes the aggregate ready again
            if decision == "skip":  # the replay that deferred it (or a later one) folded it
                self.counts["resume_skipped"] += 1
            else:
                self._apply(name, event, token)
                applied += 1
                self.counts["resumed"] += 1
            self.r.lpop(k.deferred(tenant, aggregate))  # popped after the write: a crash re-applies, never loses

    def pending(self) -> int:
        """Deferred events not applied yet (all projections, all tenants)."""
        n = 0
        for k in self.keys.values():
            for key in self.r.scan_iter(match=k.deferred("*", "*").replace("\x00", "?"), count=1000):
                n += self.r.llen(key)
        return n
