"""A parsed day's committed Parquet: the snapshot every later step (projections, redrive, checks) reads."""

from __future__ import annotations

from replay_defs.core.lake import Lake
from replay_defs.core.naming import PARSED, owner
from replay_defs.pipeline.spec import PipelineSpec


class DayNotReady(Exception):
    """The parsed day is not materialized, or its committed files no longer hold the committed bytes."""


def committed_parquet(lake: Lake, spec: PipelineSpec, day: str) -> list[str]:
    """The parsed day's Parquet files (lake-relative) as committed: a snapshot, never a glob."""
    state = lake.state(owner(spec, PARSED), day)
    if state is None:
        raise DayNotReady(f"parsed_events[{day}] is not materialized: materialize {spec.name}/parsed_events first")
    return [f for f in state.files if f.startswith(spec.parsed_prefix + "/")]


def verified_parquet(lake: Lake, spec: PipelineSpec, day: str) -> list[str]:
    """`committed_parquet`, after checking each file still holds the committed bytes (its hash):
    what a step that builds on the day (projections, redrive) may read."""
    committed = committed_parquet(lake, spec, day)
    damaged = lake.damaged_files(owner(spec, PARSED), day, committed)
    if damaged:
        raise DayNotReady(
            f"parsed_events[{day}]: {len(damaged)} committed file(s) no longer hold the committed bytes, refusing to read "
            f"them ({'; '.join(damaged[:5])}). Re-materialize {spec.name}/parsed_events for the day, or roll it back."
        )
    return committed
