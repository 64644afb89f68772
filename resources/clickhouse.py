from contextlib import contextmanager
from typing import Any

import dagster as dg
import pyarrow as pa
from pydantic import Field

from replay_defs.core.clickhouse import ClickHouse
from replay_defs.core.redact import register_url
from replay_defs.deployment import CHDB, deployed_path


class ClickHouseResource(dg.ConfigurableResource):
    """ClickHouse: a server through clickhouse-connect when `url` is set (env CLICKHOUSE_URL),
    else chDB, the engine in-process, with its data in `data_path` (env EVENT_REPLAY_CHDB). The
    same SQL runs on both; values go in as `{name:Type}` parameters."""

    url: str = Field(
        default="",
        description="http(s)://user:password@host:8123 of a ClickHouse server (env CLICKHOUSE_URL); empty: chDB in-process.",
        json_schema_extra={"dagster__is_secret": True},
    )
    data_path: str = Field(default="data/chdb", description="chDB data directory (one per process) when no URL is set.")
    database: str = Field(default="default", description="Database that unqualified table names resolve in.")

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.url)

    def get(self) -> ClickHouse:
        """A client; close it when done (or use `open()`)."""
        # chDB writes into its data directory, the deployment's setting; a server has none here.
        return ClickHouse(self.url, self.data_path if self.url else deployed_path(self.data_path, CHDB), self.database)

    @contextmanager
    def open(self):
        with self.get() as ch:
            yield ch

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> pa.Table:
        with self.open() as ch:
            return ch.query(sql, parameters)

    def command(self, sql: str, parameters: dict[str, Any] | None = None):
        with self.open() as ch:
            return ch.command(sql, parameters)

    def insert(self, table: str, data: pa.Table) -> None:
        with self.open() as ch:
            ch.insert(table, data)
