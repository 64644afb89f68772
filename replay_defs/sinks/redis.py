"""The Redis sink: BullMQ jobs, list or stream entries, one atomic step per batch. Its resource
also reads BullMQ queues' failed jobs as dead letters (`DeadLettersSpec("bullmq", queue)`)."""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from typing import Literal

import dagster as dg
from pydantic import Field

from replay_defs.core import connect
from replay_defs.core.redact import redact, register_url
from replay_defs.sinks.base import Batch, SinkType, Unreachable, unknown


@dataclass(frozen=True)
class RedisSinkSpec:
    """Deliveries into Redis (resource `redis`) at `key`:

    - `bullmq`: one job per delivery in BullMQ queue `key` (keys `<prefix>:<key>:*`), job name the
      event type, job id the message id, so BullMQ itself refuses a second copy of a job it holds;
    - `list`: RPUSH of the JSON message onto list `key`;
    - `stream`: XADD to stream `key` with fields id, type, body.

    List and stream writes go through a script that remembers the ids it appended (a set per
    pipeline and day, kept `seen_ttl_s`), so a batch re-sent after a lost reply is not appended twice.
    `job_name`: the BullMQ job name when the consumer expects a fixed one (else the event type).
    """

    key: str
    mode: Literal["bullmq", "list", "stream"] = "bullmq"
    prefix: str = "bull"
    seen_ttl_s: int = 7 * 24 * 3600
    job_name: str | None = None
    kind: Literal["redis"] = "redis"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.:{}-]{1,200}", self.key):
            raise ValueError(f"{self.key!r} is not a valid Redis key for a sink")
        if self.mode not in ("bullmq", "list", "stream"):
            raise ValueError(f"unknown Redis sink mode {self.mode!r}: use bullmq, list or stream")

    @property
    def name(self) -> str:
        return f"redis:{self.mode}:{self.key}"


class RedisSink:
    """Redis as a sink, in one of three modes (see `RedisSinkSpec`). Every batch is one atomic
    server-side step: BullMQ's own add-job scripts in one MULTI (`Queue.addBulk`), or our script
    for lists and streams, which appends only ids it has not appended before. So a batch whose
    reply was lost can be sent again safely, and the consumer sees each message once.

    Outcomes: a server that refuses the connection (or does not answer it) and a server's error
    reply fail the batch; a connection lost or timed out while the batch ran leaves it in doubt
    (`unknown`), which `held` settles."""

    # KEYS[1] target list/stream, KEYS[2] set of ids already appended for this pipeline and day.
    # ARGV: mode, seen ttl, force (1: append even seen ids), n, then n ids, n bodies (and for a
    # stream n types). Appended first, remembered after: an append the server refuses (a key of
    # another type) leaves its ids unseen, so a later attempt appends them. When none was seen
    # (the usual case), the values go from ARGV to RPUSH / SADD 1,000 per command, uncopied.
    APPEND = """
    local n = tonumber(ARGV[4])
    local ids, bodies, types, io, bo, to = ARGV, ARGV, ARGV, 4, 4 + n, 4 + 2 * n
    if ARGV[3] ~= '1' and n > 0 then
      local seen = redis.call('SMISMEMBER', KEYS[2], unpack(ARGV, 5, 4 + n))
      local fresh = {}
      for i = 1, n do
        if seen[i] == 0 then fresh[#fresh + 1] = i end
      end
      if #fresh < n then
        ids, bodies, types, io, bo, to = {}, {}, {}, 0, 0, 0
        for k, i in ipairs(fresh) do
          ids[k], bodies[k], types[k] = ARGV[4 + i], ARGV[4 + n + i], ARGV[4 + 2 * n + i]
        end
        n = #fresh
      end
    end
    local function chunked(command, key, values, first, last)
      for i = first, last, 1000 do
        redis.call(command, key, unpack(values, i, math.min(i + 999, last)))
      end
    end
    if ARGV[1] == 'stream' then
      for i = 1, n do
        redis.call('XADD', KEYS[1], '*', 'id', ids[io + i], 'type', types[to + i], 'body', bodies[bo + i])
      end
    else
      chunked('RPUSH', KEYS[1], bodies, bo + 1, bo + n)
    end
    chunked('SADD', KEYS[2], ids, io + 1, io + n)
    redis.call('EXPIRE', KEYS[2], ARGV[2])
    return n
    """
    SCRIPT_CHUNK = 2000  # messages per script call; several calls ride one pipeline

    def __init__(
        self,
        url: str,
        key: str,
        mode: str = "bullmq",
        prefix: str = "bull",
        seen_ttl_s: int = 7 * 24 * 3600,
        job_name: str | None = None,
        timeout_s: float = 30.0,
    ):
        self.url, self.key, self.mode, self.prefix, self.seen_ttl_s = url, key, mode, prefix, seen_ttl_s
        self.job_name = job_name
        self.name = f"redis:{mode}:{key}"
        # One attempt per call (retry=None), each wait for the server bounded by timeout_s: the
        # redrive loop retries whole chunks. A broken connection is replaced on the next call.
        self._options = {"retry": None, "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        self._redis = connect.redis(url, **self._options)
        self._append_sha = hashlib.sha1(self.APPEND.encode()).hexdigest()
        self._loop = None
        self._queue = None
        self._async = None  # the BullMQ queue's client
        self._forced_run: str | None = None  # the run id of the last call, when it was a forced re-send

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        import redis

        self._forced_run = run_id if resend else None
        try:
            self._connect()
        except redis.RedisError as exc:  # refused, unanswered or unauthenticated: nothing was sent
            return [Unreachable(self._error(exc))] * len(batch)
        try:
            if self.mode == "bullmq":
                self._add_jobs(batch, run_id if resend else None)
            else:
                self._append_all(pipeline, day, batch, resend)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # lost while Redis ran the batch
            return [unknown(self._error(exc))] * len(batch)
        except Exception as exc:  # refused by the server (WRONGTYPE, OOM) or unsendable: none of it held
            return [self._error(exc)] * len(batch)
        return [None] * len(batch)

    def _seen_key(self, pipeline: str, day: str) -> str:
        """The set of ids the append script appended for a pipeline's day (lists and streams)."""
        return f"{self.key}:replay-seen:{pipeline}:{day}"

    def _error(self, exc: Exception) -> str:
        return redact(f"{type(exc).__name__} ({self.url}): {exc}")

    def _connect(self) -> None:
        """Takes a connection from the pool, opened now if need be, before anything is sent: a
        server that refuses or does not answer fails here, told apart from one lost mid-batch."""
        if self.mode != "bullmq":
            pool = self._redis.connection_pool
            pool.release(pool.get_connection())
            return
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        if self._async is None:
            self._async = connect.redis_async(self.url, decode_responses=True, **self._options)

        async def checkout():
            pool = self._async.connection_pool
            await pool.release(await pool.get_connection())

        self._loop.run_until_complete(checkout())

    def _append_all(self, pipeline: str, day: str, batch: Batch, resend: bool) -> None:
        import redis

        seen = self._seen_key(pipeline, day)
        calls = []
        for start in range(0, len(batch), self.SCRIPT_CHUNK):
            ids = batch.ids[start : start + self.SCRIPT_CHUNK]
            args = [self.mode, self.seen_ttl_s, "1" if resend else "0", len(ids), *ids]
            args += batch.bodies[start : start + self.SCRIPT_CHUNK]
            if self.mode == "stream":
                args += [t or "" for t in batch.types[start : start + self.SCRIPT_CHUNK]]
            calls.append(args)
        # EVALSHA straight away: a redis-py Script in a pipeline first asks SCRIPT EXISTS, one
        # more round trip per batch, during which a frozen server holds nothing of the batch yet.
        try:
            self._evalsha(seen, calls)
        except redis.exceptions.NoScriptError:  # the server lost its scripts (a restart): none ran
            self._redis.script_load(self.APPEND)
            self._evalsha(seen, calls)

    def _evalsha(self, seen: str, calls: list[list]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for args in calls:
            pipe.evalsha(self._append_sha, 2, self.key, seen, *args)
        pipe.execute()

    def _add_jobs(self, batch: Batch, resend_run_id: str | None) -> None:
        import msgspec
        from bullmq import Queue

        if self._queue is None:
            self._queue = Queue(self.key, {"connection": self._async, "prefix": self.prefix})
        decode = msgspec.json.decode
        # BullMQ's addStandardJob returns the existing job for an id it already holds, so a batch
        # sent twice adds each job once. A forced re-send is a new job: the run id salts the id.
        salt = f"-{resend_run_id}" if resend_run_id else ""
        jobs = [
            {"name": self.job_name or t or "redrive", "data": decode(body), "opts": {"jobId": mid + salt}}
            for mid, body, t in zip(batch.ids, batch.bodies, batch.types)
        ]
        self._loop.run_until_complete(self._queue.addBulk(jobs))

    def held(self, pipeline: str, day: str, ids: list[str], since: float) -> set[str] | None:
        """Which of `ids` Redis holds (`since` is not needed: an id names its copy). Lists and
        streams: those in the day's "seen" set the append script keeps (SMISMEMBER). BullMQ:
        those whose job hash `<prefix>:<queue>:<jobId>` exists (EXISTS, pipelined).

        What it cannot tell: a job a worker already removed (`removeOnComplete`) looks absent, as
        does an id whose seen set expired (`seen_ttl_s`), so a re-send adds it again; after a forced
        re-send of a list or stream (the seen set holds the first copies) it answers None: cannot tell."""
        if self._forced_run is not None and self.mode != "bullmq":
            return None
        salt = f"-{self._forced_run}" if self._forced_run is not None else ""
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(ids), 1000):
            part = ids[start : start + 1000]
            if self.mode == "bullmq":
                for m in part:
                    pipe.exists(f"{self.prefix}:{self.key}:{m}{salt}")
            else:
                pipe.smismember(self._seen_key(pipeline, day), part)
        found = [f for reply in pipe.execute() for f in (reply if isinstance(reply, list) else [reply])]
        return {m for m, f in zip(ids, found) if f}

    def close(self) -> None:
        if self._queue is not None:
            self._loop.run_until_complete(self._queue.close())  # closes its client too
        elif self._async is not None:
            self._loop.run_until_complete(self._async.aclose())
        self._queue = self._async = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self._redis.close()


class RedisResource(dg.ConfigurableResource):
    """A Redis server for redrive sinks (redis-py; BullMQ jobs via the `bullmq` package)."""

    url: str = Field(
        description="redis://[:password@]host:6379/0 (env EVENT_REPLAY_REDIS_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )

    timeout_s: float = Field(
        default=30.0,
        description="How long a delivery waits for Redis: to connect, then for a batch's reply "
        "(env EVENT_REPLAY_SINK_TIMEOUT_S). Past it a batch is failed (not connected) or in doubt.",
    )

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.url)

    def sink(self, target: RedisSinkSpec) -> RedisSink:
        return RedisSink(
            self.url, target.key, target.mode, target.prefix, target.seen_ttl_s, target.job_name, self.timeout_s
        )


def peek_bullmq_failed_jobs(source, redis_resource: RedisResource, peek: bool):
    """A BullMQ queue's failed jobs: how many, and with `peek` the data of the newest ones."""
    r = connect.redis(redis_resource.url, socket_timeout=10, retry=None)
    try:
        failed = f"{source.prefix}:{source.name}:failed"
        depth = r.zcard(failed)
        letters = []
        if peek:
            ids = r.zrevrange(failed, 0, source.peek - 1)
            pipe = r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(f"{source.prefix}:{source.name}:{job_id.decode()}", "data")
            letters = [d.decode() for d in pipe.execute() if d is not None]
        return depth, letters
    finally:
        r.close()


SINK = SinkType(
    kind="redis",
    spec=RedisSinkSpec,
    resource=RedisResource,
    settings={
        "url": ("EVENT_REPLAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "timeout_s": ("EVENT_REPLAY_SINK_TIMEOUT_S", 30.0),
    },
    open=lambda resource, spec: resource.sink(spec),
    dead_letters={"bullmq": peek_bullmq_failed_jobs},
)
