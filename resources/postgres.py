import dagster as dg
from pydantic import Field

from replay_defs.core.redact import register_url


class PostgresResource(dg.ConfigurableResource):
    """A PostgreSQL database: dead-letter rows a sensor watches, and the `processed_events` table
    the processed-events jobs replay (with their `event_replay_audit` and `event_replay_snapshot`)."""

    url: str = Field(
        description="postgresql://user:password@host:5432/db (env EVENT_REPLAY_POSTGRES_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.url)
