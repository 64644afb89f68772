"""What a refill declares: its name, first day, known event types and where its jobs go."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from replay_defs.core.lake import DayTable
from replay_defs.core.naming import keys_table, refill_quarantine_table
from replay_defs.pipeline.spec import SAFE_NAME, SAFE_TYPE_VALUE, RedriveSpec


@dataclass(frozen=True)
class RefillSpec:
    """A refill from S3 access logs (the ingestion refill): the keys of one-object-per-event uploads
    (`projectId/type/eventBodyId/eventId.json`) written on a day are re-enqueued as ingestion
    jobs (`replay_defs/ingestion_refill/access_logs.py`). Assets: `<name>/event_keys` (validated, de-duplicated
    keys as Parquet) and `<name>/redrive` (one job per key into `redrive.sink`)."""

    name: str
    start_date: str
    known_types: tuple[str, ...]
    redrive: RedriveSpec
    description: str = ""
    # Dagster owners of the assets (emails or "team:<name>"), shown in the UI and used by its filters.
    owners: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not SAFE_NAME.fullmatch(self.name):
            raise ValueError(f"pipeline name {self.name!r} is not a safe identifier")
        for value in self.known_types:
            if not SAFE_TYPE_VALUE.fullmatch(value):
                raise ValueError(f"known type {value!r} is not a safe value")
        if self.redrive.unit != "event":
            raise ValueError("a refill delivers one message per key: use RedriveSpec(unit='event')")


# What `access_logs` writes: a day's keys, and its quarantined rows.
KEYS_SCHEMA = pa.schema([("key", pa.string()), ("first_put", pa.timestamp("us", tz="UTC")), ("puts", pa.int64())])
QUARANTINE_SCHEMA = pa.schema(
    [("reason", pa.string()), ("raw", pa.string()), ("request_time", pa.timestamp("us", tz="UTC"))]
)


def refill_tables(spec: RefillSpec) -> list[DayTable]:
    """The Delta tables a refill day publishes: its keys (primary) and its quarantine."""
    return [DayTable(keys_table(spec), KEYS_SCHEMA), DayTable(refill_quarantine_table(spec), QUARANTINE_SCHEMA)]
