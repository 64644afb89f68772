import os

import dagster as dg
from pydantic import Field

from replay_defs.core.redact import register_url
from replay_defs.deployment import PROJECTION_LOGS, deployed_path
from replay_defs.projection_replay.live import DEFAULT_PREFIX, Coordinator


class ProjectionReplayResource(dg.ConfigurableResource):
    """What projection replays need besides ClickHouse (resource `clickhouse`): Redis for the
    live-traffic markers, PostgreSQL for increment stores, and where the JSONL replay logs go."""

    redis_url: str = Field(
        description="redis://[:password@]host:6379/0 for the live-traffic markers (env EVENT_REPLAY_REDIS_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )
    postgres_url: str = Field(
        default="",
        description="postgresql://user:password@host/db of the increment stores (env EVENT_REPLAY_POSTGRES_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )
    redis_prefix: str = Field(
        default=DEFAULT_PREFIX, description="Prefix of every marker key (env EVENT_REPLAY_PROJECTION_PREFIX)."
    )
    log_dir: str = Field(
        default="data/projection_replay", description="JSONL replay logs (env EVENT_REPLAY_PROJECTION_LOG_DIR)."
    )

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.redis_url)
        register_url(self.postgres_url)

    def log_path(self, name: str) -> str:
        """Where a replay log goes: in the deployment's log directory (a run config cannot move it)."""
        return os.path.join(deployed_path(self.log_dir, PROJECTION_LOGS), name)

    def coordinator(self, projection: str) -> Coordinator:
        return Coordinator(self.redis_url, projection, prefix=self.redis_prefix)
