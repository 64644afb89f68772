"""A parsed day's committed version: its Delta tables, its state, and the Parquet every later step
(projections, redrive, checks) reads."""

from __future__ import annotations

from replay_defs.core.lake import DAY, DayState, DayTable, Lake
from replay_defs.core.naming import PARSED, owner
from replay_defs.pipeline.spec import PipelineSpec

TYPE = "type"  # the parsed table's second partition column: the event's type (`spec.schema.type_field`)


class DayNotReady(Exception):
    """The parsed day is not materialized, or its committed files no longer hold the committed bytes."""


def parsed_tables(spec: PipelineSpec) -> list[DayTable]:
    """The Delta tables a parsed day publishes: the events by type and day (primary), and the
    day's quarantine."""
    from replay_defs.jsonl_files.parsing import QUARANTINE_SCHEMA, event_arrow_schema

    return [
        DayTable(spec.parsed_prefix, event_arrow_schema(spec.schema), (TYPE, DAY)),
        DayTable(quarantine_table(spec), QUARANTINE_SCHEMA),
    ]


OUT = "out_for_redrive"  # in a day's stats: files a parquet-mode redrive took out until their sources are re-ingested


def out_for_redrive(stats: dict) -> list[dict]:
    """The files a parquet-mode redrive took out of the day: [{"file", "type", "rows", "source_refs", "run_id"}]."""
    return stats.get(OUT, [])


def out_rows_by_type(stats: dict) -> dict[str, int]:
    """Rows per type that are out of the day until their sources are re-ingested."""
    out: dict[str, int] = {}
    for o in out_for_redrive(stats):
        out[o["type"]] = out.get(o["type"], 0) + o["rows"]
    return out


def file_type(spec: PipelineSpec, rel: str) -> str:
    """The event type of a parsed file, from its `type=<t>/` directory."""
    inner = rel[len(spec.parsed_prefix) + 1 :]
    return dict(p.split("=", 1) for p in inner.split("/")[:-1] if "=" in p)[TYPE]


def quarantine_table(spec: PipelineSpec) -> str:
    return f"quarantine/{spec.name}"


def parsed_state(lake: Lake, spec: PipelineSpec, day: str) -> DayState | None:
    """The parsed day's committed state (None before its first build)."""
    return lake.state(owner(spec, PARSED), day, spec.parsed_prefix)


def committed_parquet(lake: Lake, spec: PipelineSpec, day: str, state: DayState | None = None) -> list[str]:
    """The parsed day's Parquet files (lake-relative) as committed: a snapshot, never a glob."""
    state = state or parsed_state(lake, spec, day)
    if state is None:
        raise DayNotReady(f"parsed_events[{day}] is not materialized: materialize {spec.name}/parsed_events first")
    return state.files_of(spec.parsed_prefix)


def committed_quarantine(state: DayState, spec: PipelineSpec) -> list[str]:
    return state.files_of(quarantine_table(spec))


def verified_parquet(lake: Lake, spec: PipelineSpec, day: str) -> list[str]:
    """`committed_parquet`, after checking each file still holds the committed bytes (its hash):
    what a step that builds on the day (projections, redrive) may read."""
    state = parsed_state(lake, spec, day)
    committed = committed_parquet(lake, spec, day, state)
    damaged = lake.damaged_files(state, committed)
    if damaged:
        raise DayNotReady(
            f"parsed_events[{day}]: {len(damaged)} committed file(s) no longer hold the committed bytes, refusing to read "
            f"them ({'; '.join(damaged[:5])}). Re-materialize {spec.name}/parsed_events for the day, or roll it back."
        )
    return committed


def events_dataset(lake: Lake, spec: PipelineSpec, files: list[str]):
    """Committed parsed files as one dataset of the spec's event schema (an empty one for no files)."""
    from replay_defs.jsonl_files.parsing import event_arrow_schema

    return lake.dataset(files, schema=event_arrow_schema(spec.schema))
