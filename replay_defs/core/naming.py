"""Names of a day pipeline's outputs: its assets, and where their bookkeeping and files live in the lake.

One place for these rules, so the assets, the checks, the CLI and the definitions agree on them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replay_defs.ingestion_refill.spec import RefillSpec
    from replay_defs.pipeline.spec import PipelineSpec

RAW, PARSED, PROJECTIONS, REDRIVE = "raw_events", "parsed_events", "projections", "redrive"


def owner(spec: PipelineSpec, name: str) -> str:
    """The lake's bookkeeping namespace for one asset of a pipeline."""
    return f"{spec.name}/{name}"


def manifest_name(day: str) -> str:
    return f"manifest/day={day}.json"


def whole_day_marker(day: str) -> str:
    """Written by a redrive that delivered the whole day without failure: from then on its check
    reconciles the whole day, so a later dry or partial run cannot hide a loss."""
    return f"whole/day={day}.json"


EVENT_KEYS = "event_keys"  # a refill's first asset: the day's validated, de-duplicated object keys


def keys_table(spec: RefillSpec) -> str:
    """The Delta table of a refill's keys (partitioned by day)."""
    return f"refill/{spec.name}"


def refill_quarantine_table(spec: RefillSpec) -> str:
    return f"quarantine/{spec.name}"
