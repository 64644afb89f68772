import dagster as dg
from pydantic import Field


class PostgresResource(dg.ConfigurableResource):
    """A PostgreSQL database: dead-letter rows a sensor watches, and the `processed_events` table
    the processed-events jobs replay (with their `event_replay_audit` and `event_replay_snapshot`)."""

    url: str = Field(
        description="postgresql://user:password@host:5432/db (env EVENT_REPLAY_POSTGRES_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )
