"""A DuckDB file shared by processes: the embedded store of projections and the redrive ledger.

A DuckDB file admits one writing process at a time, and Dagster may run steps in parallel
processes, so every connection is taken under a file lock and kept only for one unit of work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from filelock import FileLock


def ident(*names: str) -> str:
    """Quote identifiers that were validated against SAFE_NAME when the spec was built."""
    return ".".join('"' + n.replace('"', '""') + '"' for n in names)


class DuckDBFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock", is_singleton=True):
            con = duckdb.connect(str(self.path))
            try:
                yield con
            finally:
                con.close()

    def query(self, sql: str, params: dict | None = None) -> list[tuple]:
        with self.connect() as con:
            return con.execute(sql, params or {}).fetchall()
