import dagster as dg
from pydantic import Field

from replay_defs.core.redact import register_url
from replay_defs.pipeline.spec import RedisSink
from replay_defs.sinks import RedisTarget


class RedisResource(dg.ConfigurableResource):
    """A Redis server for redrive sinks (redis-py; BullMQ jobs via the `bullmq` package)."""

    url: str = Field(
        description="redis://[:password@]host:6379/0 (env EVENT_REPLAY_REDIS_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.url)

    def sink(self, target: RedisSink) -> RedisTarget:
        return RedisTarget(self.url, target.key, target.mode, target.prefix, target.seen_ttl_s, target.job_name)
