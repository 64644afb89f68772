import os
from typing import Optional

import dagster as dg
from pydantic import Field

from replay_defs.core.redact import register_url
from replay_defs.deployment import DUCKDB, STORE_URL, deployed_path
from replay_defs.pipeline.store import ProjectionStore, open_store


class StoreResource(dg.ConfigurableResource):
    """The projection store: Postgres when `postgres_url` is set (env EVENT_REPLAY_STORE_URL), for
    run workers on several machines; else the DuckDB file (env EVENT_REPLAY_DUCKDB)."""

    path: str = Field(description="DuckDB database file (env EVENT_REPLAY_DUCKDB).")
    postgres_url: Optional[str] = Field(
        default=None,
        description="postgresql://user:password@host:5432/db (env EVENT_REPLAY_STORE_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.postgres_url)

    def get(self) -> ProjectionStore:
        if (self.postgres_url or None) != (os.environ.get(STORE_URL[0]) or None):
            # (the values are not quoted: they hold passwords)
            raise dg.Failure(
                f"the run's config points the projection store elsewhere than {STORE_URL[0]} says: where data is "
                "written is the deployment's setting (set the environment variable), not a run's"
            )
        if self.postgres_url:
            return open_store(self.path, self.postgres_url)
        return open_store(deployed_path(self.path, DUCKDB))
