"""The Redis sink: BullMQ jobs, list or stream entries, one atomic step per batch. Its resource
also reads BullMQ queues' failed jobs as dead letters (`DeadLettersSpec("bullmq", queue)`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import dagster as dg
from pydantic import Field

from replay_defs.core import connect
from replay_defs.core.redact import redact, register_url
from replay_defs.sinks.base import Batch, SinkType


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
    reply was lost can be sent again safely, and the consumer sees each message once."""

    # KEYS[1] target list/stream, KEYS[2] set of ids already appended for this pipeline and day.
    # ARGV: mode, seen ttl, force (1: append even seen ids), then id, type, body triples.
    APPEND = """
    local fresh = {}
    for i = 4, #ARGV, 3 do
      if redis.call('SADD', KEYS[2], ARGV[i]) == 1 or ARGV[3] == '1' then
        if ARGV[1] == 'stream' then
          redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'type', ARGV[i + 1], 'body', ARGV[i + 2])
        else
          fresh[#fresh + 1] = ARGV[i + 2]
        end
      end
    end
    for i = 1, #fresh, 1000 do
      redis.call('RPUSH', KEYS[1], unpack(fresh, i, math.min(i + 999, #fresh)))
    end
    redis.call('EXPIRE', KEYS[2], ARGV[2])
    return #fresh
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
    ):
        import redis

        self.url, self.key, self.mode, self.prefix, self.seen_ttl_s = url, key, mode, prefix, seen_ttl_s
        self.job_name = job_name
        self.name = f"redis:{mode}:{key}"
        # A few quick retries; the redrive loop retries whole batches with longer backoff.
        retry = redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=1, base=0.1), 2)
        self._redis = connect.redis(url, retry=retry, socket_timeout=30, socket_connect_timeout=5)
        self._append = self._redis.register_script(self.APPEND)
        self._loop = None
        self._queue = None

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        try:
            if self.mode == "bullmq":
                self._add_jobs(batch, run_id if resend else None)
            else:
                self._append_all(pipeline, day, batch, resend)
        except Exception as exc:  # the server is down, or refused the batch as a whole
            self._queue = None  # reconnect on the next batch
            return [redact(f"{type(exc).__name__} ({self.url}): {exc}")] * len(batch)
        return [None] * len(batch)

    def _append_all(self, pipeline: str, day: str, batch: Batch, resend: bool) -> None:
        seen = f"{self.key}:replay-seen:{pipeline}:{day}"
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(batch), self.SCRIPT_CHUNK):
            args: list = [self.mode, self.seen_ttl_s, "1" if resend else "0"]
            for i in range(start, min(start + self.SCRIPT_CHUNK, len(batch))):
                args += (batch.ids[i], batch.types[i] or "", batch.bodies[i])
            self._append(keys=[self.key, seen], args=args, client=pipe)
        pipe.execute()

    def _add_jobs(self, batch: Batch, resend_run_id: str | None) -> None:
        import asyncio

        import msgspec
        from bullmq import Queue

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        if self._queue is None:
            self._queue = Queue(self.key, {"connection": self._async_client(), "prefix": self.prefix})
        decode = msgspec.json.decode
        # BullMQ's addStandardJob returns the existing job for an id it already holds, so a batch
        # sent twice adds each job once. A forced re-send is a new job: the run id salts the id.
        salt = f"-{resend_run_id}" if resend_run_id else ""
        jobs = [
            {"name": self.job_name or t or "redrive", "data": decode(body), "opts": {"jobId": mid + salt}}
            for mid, body, t in zip(batch.ids, batch.bodies, batch.types)
        ]
        self._loop.run_until_complete(self._queue.addBulk(jobs))

    def _async_client(self):
        import redis.asyncio

        retry = redis.asyncio.retry.Retry(redis.backoff.ExponentialBackoff(cap=1, base=0.1), 2)
        return connect.redis_async(
            self.url, decode_responses=True, retry=retry, socket_timeout=30, socket_connect_timeout=5
        )

    def close(self) -> None:
        if self._queue is not None:
            self._loop.run_until_complete(self._queue.close())
            self._queue = None
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

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.url)

    def sink(self, target: RedisSinkSpec) -> RedisSink:
        return RedisSink(self.url, target.key, target.mode, target.prefix, target.seen_ttl_s, target.job_name)


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
    settings={"url": ("EVENT_REPLAY_REDIS_URL", "redis://127.0.0.1:6379/0")},
    open=lambda resource, spec: resource.sink(spec),
    dead_letters={"bullmq": peek_bullmq_failed_jobs},
)
