"""Source kinds: what a pipeline's first two assets are, and what else depends on where its events
come from. One module per kind beside this file, and one entry in `SOURCES`, keyed by the class of
the spec's `source` (`replay_defs/pipeline/spec.py`); nothing else in the Dagster layer branches on
the source kind. Every kind then shares the rest: projections, redrive, the lake's versioned swap
(`assets/parsed.py`) and the checks of `assets/checks.py`."""

from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from assets.checks import DayCheck
from assets.sources import clickhouse_table, jsonl_files
from replay_defs.pipeline.spec import ClickHouseSourceSpec, JsonlSourceSpec, PipelineSpec


@dataclass(frozen=True)
class SourceKind:
    raw_events: Callable[[PipelineSpec], dg.AssetsDefinition]  # `<name>/raw_events`: the day's input, counted
    parsed_events: Callable[[PipelineSpec], dg.AssetsDefinition]  # `<name>/parsed_events`: events by type
    replay_steps: str  # what the `<name>_replay` job does before the redrive, for its description
    checks: tuple[DayCheck, ...] = ()  # the checks only this kind has
    # Its raw input is files in the lake, which can arrive or change after a day was built: a
    # sensor (`sensors/raw_files.py`) re-checks such days.
    raw_files_sensor: bool = False
    # (lake, spec, day, redrive counts) -> more metadata for the redrive of a day.
    redrive_figures: Callable | None = None


SOURCES: dict[type, SourceKind] = {
    JsonlSourceSpec: SourceKind(
        jsonl_files.build_raw_events,
        jsonl_files.build_parsed_events,
        "list raw files, parse and swap in each day, fold projections, redrive, ",
        jsonl_files.CHECKS,
        raw_files_sensor=True,
    ),
    ClickHouseSourceSpec: SourceKind(
        clickhouse_table.build_raw_events,
        clickhouse_table.build_parsed_events,
        "select the day's table rows, read them by keyset and map them, swap in each day, redrive, ",
        clickhouse_table.CHECKS,
        redrive_figures=clickhouse_table.redrive_figures,
    ),
}


def source_kind(spec: PipelineSpec) -> SourceKind:
    return SOURCES[type(spec.source)]
