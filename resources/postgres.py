import dagster as dg
from pydantic import Field


class PostgresResource(dg.ConfigurableResource):
    """A PostgreSQL database the pipelines read (e.g. `processed_events` rows in error)."""

    url: str = Field(
        description="postgresql://user:password@host:5432/db (env EVENT_REPLAY_POSTGRES_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )
