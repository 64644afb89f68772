from contextlib import contextmanager
from typing import Optional

import dagster as dg
from pydantic import Field

from replay_defs.core.ledger import open_ledger
from replay_defs.core.redact import register_url
from replay_defs.deployment import DUCKDB, deployed_path
from replay_defs.pipeline.store import DuckDBStore


class LedgerResource(dg.ConfigurableResource):
    """The redrive idempotency ledger: Postgres when `postgres_url` is set (env
    EVENT_REPLAY_LEDGER_URL), else the embedded DuckDB store (env EVENT_REPLAY_DUCKDB)."""

    duckdb_path: str = Field(description="DuckDB database file used when no Postgres URL is set.")
    postgres_url: Optional[str] = Field(
        default=None,
        description="postgresql://user:password@host:5432/db (env EVENT_REPLAY_LEDGER_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.postgres_url)

    @contextmanager
    def open(self):
        store = None if self.postgres_url else DuckDBStore(deployed_path(self.duckdb_path, DUCKDB))
        with open_ledger(self.postgres_url, store) as ledger:
            yield ledger
