import dagster as dg
from pydantic import Field

from replay_defs.deployment import DUCKDB, deployed_path
from replay_defs.pipeline.store import DuckDBStore


class StoreResource(dg.ConfigurableResource):
    """Projection store and redrive ledger: a DuckDB file on the embedded default."""

    path: str = Field(description="DuckDB database file (env EVENT_REPLAY_DUCKDB).")

    def get(self) -> DuckDBStore:
        return DuckDBStore(deployed_path(self.path, DUCKDB))
