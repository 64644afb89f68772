"""ClickHouse as a source and store, on two backends behind one client.

- a server, over HTTP with clickhouse-connect, when a URL is given (`http://user:pass@host:8123/db`);
- chDB, ClickHouse's engine in-process, at a data directory: the embedded default.

Both go through clickhouse-connect (its `chdb` interface drives the engine in-process), so the
same SQL, the same parameter binding and the same Arrow conversion apply on both. Values are passed
as parameters in ClickHouse's `{name:Type}` syntax, bound by the engine, never formatted into SQL.

chDB allows one data directory per process: every client of the process must use the same path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from replay_defs.core.redact import redact, register_url


class ClickHouseError(RuntimeError):
    """A ClickHouse call failed; the message never holds the URL's password."""


class ClickHouse:
    def __init__(self, url: str = "", data_path: str = "data/chdb", database: str = "default", compress: bool = True):
        import clickhouse_connect

        register_url(url)  # masked by value from now on, in every message of this process
        self.backend = "http" if url else "chdb"
        self.where = redact(url) if url else f"chdb:{os.path.realpath(data_path)}"
        self.database = database
        try:
            if url:
                self._client = clickhouse_connect.get_client(
                    dsn=url, database=database, compress=compress, autogenerate_session_id=False
                )
            else:
                os.makedirs(data_path, exist_ok=True)
                self._client = clickhouse_connect.get_client(interface="chdb", path=data_path)
                # The embedded engine is ours: its database is created on first use.
                self._client.command(f"CREATE DATABASE IF NOT EXISTS {quote_ident(database)}")
                self._client.close()
                self._client = clickhouse_connect.get_client(interface="chdb", path=data_path, database=database)
        except Exception as exc:
            raise ClickHouseError(
                redact(f"cannot connect to ClickHouse at {self.where}: {type(exc).__name__}: {exc}")
            ) from None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise ClickHouseError(
                redact(f"ClickHouse ({self.where}) {what} failed: {type(exc).__name__}: {exc}")
            ) from None

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> pa.Table:
        """The result as an Arrow table."""
        return self._call("query", self._client.query_arrow, sql, parameters=parameters or {})

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        """The result as Python rows (small results: counts, lookups)."""
        return self._call("query", self._client.query, sql, parameters=parameters or {}).result_rows

    def command(self, sql: str, parameters: dict[str, Any] | None = None):
        """DDL and statements without a result set (or a single value)."""
        return self._call("command", self._client.command, sql, parameters=parameters or {})

    def insert(self, table: str, data: pa.Table) -> None:
        """Insert an Arrow table (columns by name) into `table` of the database."""
        self._call("insert", self._client.insert_arrow, table, data, database=self.database)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "ClickHouse":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quote_ident(name: str) -> str:
    """A backquoted identifier; names come from specs validated against SAFE_NAME."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


@contextmanager
def connect(url: str = "", data_path: str = "data/chdb", database: str = "default") -> Iterator[ClickHouse]:
    ch = ClickHouse(url, data_path, database)
    try:
        yield ch
    finally:
        ch.close()
