"""What every source kind's parsed_events shares: how a day's new version is staged and published,
and the shrink consent it is checked against."""

import shutil
from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from replay_defs.core.lake import Lake
from replay_defs.core.naming import PARSED, owner
from replay_defs.pipeline.committed import TYPE, parsed_state, parsed_tables, quarantine_table
from replay_defs.pipeline.shrink import unconsented_shrink
from replay_defs.pipeline.spec import PipelineSpec

ONLY_TYPE = Field(
    default=None,
    description="Rebuild only this event type of the day: its events are replaced; the other types' events and the "
    "day's quarantine stay as committed.",
)
ALLOW_SHRINK = Field(
    default=False,
    description="Consent to a new version holding fewer events of a type than the one it replaces (beyond the "
    "spec's shrink_tolerance); otherwise the blocking no_unconsented_shrink check fails. Recorded in the day's state.",
)


def publish_parsed_day(
    lake: Lake,
    spec: PipelineSpec,
    day: str,
    run_id: str,
    log,
    allow_shrink: bool,
    build: Callable[[Path], dict],
    only_type: str | None = None,
) -> dict:
    """A parsed day's new version, the same steps for every source kind: under the day's lock,
    drop the staging an interrupted earlier run left (`recover`), stage the new version
    (`build(staging dir)` writes it there and returns its counts), and publish it with the shrink
    baseline its check compares with (`only_type`: replace only that type's events of the day).
    Returns the counts, with the published version."""
    own = owner(spec, PARSED)
    with lake.lock(own, day):
        if lake.recover(own, day):
            log.warning(f"{day}: cleaned up the staging an interrupted earlier run left")
        previous = shrink_baseline(spec, parsed_state(lake, spec, day))
        staged = lake.new_staging(own, day)
        stats = build(staged)
        stats.update(previous=previous, allow_shrink=allow_shrink)
        only = {TYPE: only_type} if only_type else None
        if only:
            keep_only(staged, spec, only_type)
        state = lake.publish(own, day, staged, parsed_tables(spec), stats, run_id=run_id, only=only)
        stats["version"] = state.version
        return stats


def keep_only(staged: Path, spec: PipelineSpec, event_type: str) -> None:
    """A one-type rebuild publishes that type's events only: the parse staged every type and the
    day's quarantine, which stay as committed."""
    for path in staged.iterdir():
        if path.name != spec.parsed_prefix.split("/")[0]:
            shutil.rmtree(path)
    for path in Path(staged, spec.parsed_prefix).iterdir():
        if path.name != f"{TYPE}={event_type}":
            shutil.rmtree(path)


def staged_quarantine(staged: Path, spec: PipelineSpec, day: str) -> Path:
    """Where a staged version holds the day's one quarantine file."""
    return staged / quarantine_table(spec) / f"day={day}" / "quarantine.parquet"


def shrink_baseline(spec: PipelineSpec, state) -> dict | None:
    """What the shrink check compares a new version with: the replaced version's counts, or, when
    that version was itself an unconsented shrink (its check failed), the baseline it failed
    against, so retrying a rejected build cannot make it the new normal."""
    if state is None:
        return None
    if unconsented_shrink(state.stats, spec.shrink_tolerance):
        return state.stats["previous"]
    return {
        "version": state.version,
        "rows_by_type": state.stats.get("rows_by_type", {}),
        "parsed": state.stats.get("parsed", 0),
    }


def shrink_metadata(stats: dict) -> dict:
    """The version the shrink check compares with (see `shrink_baseline`) and whether the run
    consented to a shrink, next to the counts."""
    prev = stats["previous"]
    return {
        "allow_shrink": stats["allow_shrink"],
        "shrink_baseline_version": prev["version"] if prev else 0,
        "shrink_baseline_parsed": prev["parsed"] if prev else 0,
    }
