"""Source kind `ClickHouseSourceSpec`: a ClickHouse table read by keyset pages (engine:
`replay_defs/clickhouse_table/`).

raw_events[D] records the run's selection (filters, time window) and the engine's count of its rows;
parsed_events[D] reads the selection page by page and maps the rows to events; two checks only
tables have (the selection's rows changed since; billing's found = delivered + dropped + errors);
and the redrive's metadata gains billing's figures."""

import time
from typing import Optional

import dagster as dg
import pydantic
from pydantic import Field

from assets.checks import DayCheck, not_built
from assets.common import DayVerdict, asset_key, pipeline_asset, pipeline_pool
from assets.parsed import ALLOW_SHRINK, publish_parsed_day, shrink_metadata, staged_quarantine
from replay_defs.clickhouse_table.parsing import KeysetReader, TableSelection, parse_table_day
from replay_defs.core.lake import Lake
from replay_defs.core.naming import PARSED, RAW, REDRIVE, manifest_name, owner
from replay_defs.pipeline.committed import parsed_state
from replay_defs.pipeline.delivery import RedriveCounts
from replay_defs.pipeline.spec import PipelineSpec
from resources import ClickHouseResource, LakeResource

# ---- raw_events: the run's selection and the engine's count of it -------------------------------


def selection_config(spec: PipelineSpec) -> type[dg.Config]:
    """Run config of a table source's raw_events: one optional field per filter of the source,
    plus the time window."""
    fields = {
        name: (Optional[str], Field(default=None, description=f"Only rows whose `{column}` equals this."))
        for name, column in spec.source.filters.items()
    }
    fields["start"] = (
        Optional[str],
        Field(default=None, description="RFC 3339 (e.g. 2024-01-01T06:00:00Z): only rows at or after it."),
    )
    fields["end"] = (Optional[str], Field(default=None, description="RFC 3339: only rows before it."))
    return pydantic.create_model(f"{spec.name}_selection", __base__=dg.Config, **fields)


def table_selection(spec: PipelineSpec, config) -> TableSelection:
    try:
        return TableSelection.of(
            spec.source, {k: getattr(config, k) for k in spec.source.filters}, config.start, config.end
        )
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc


def selection_manifest(spec: PipelineSpec, day: str, ch, selection: TableSelection, rows: int) -> dict:
    """raw_events' manifest of a table day: the selection and the engine's count of its rows."""
    src = spec.source
    return {
        "day": day,
        "source": {"kind": "clickhouse", "table": src.table, "database": ch.database, "at": ch.where},
        "selection": selection.to_json(),
        "files": [],
        "totals": {"files": 0, "bytes": 0, "bytes_uncompressed": 0, "lines": rows, "unreadable_files": 0},
    }


def build_raw_events(spec: PipelineSpec) -> dg.AssetsDefinition:
    src = spec.source
    SelectionConfig = selection_config(spec)

    @pipeline_asset(
        spec,
        RAW,
        kinds={"clickhouse"},
        description=(
            f"The day's rows of ClickHouse table `{src.table}`{' (FINAL)' if src.final else ''} selected by the run's filters "
            f"({', '.join(src.filters)}, start/end), as a manifest: the selection and the row count, counted by the engine "
            "independently of the keyset reader."
        ),
    )
    def raw_events(
        context: dg.AssetExecutionContext, config: SelectionConfig, lake: LakeResource, clickhouse: ClickHouseResource
    ) -> dg.MaterializeResult:
        the_lake = lake.get()
        selection = table_selection(spec, config)
        with clickhouse.open() as ch:
            for day in context.partition_keys:
                t0 = time.monotonic()
                rows = KeysetReader(ch, src, day, selection).count()
                the_lake.write_json(
                    owner(spec, RAW), manifest_name(day), selection_manifest(spec, day, ch, selection, rows)
                )
                context.log.info(f"{day}: {rows:,} rows of {src.table} selected by {selection.to_json()}")
                context.add_asset_metadata(
                    {
                        "dagster/row_count": rows,
                        "rows": rows,
                        "duration_s": round(time.monotonic() - t0, 3),
                        **{f"filter_{k}": v for k, v in selection.to_json()["filters"].items()},
                    },
                    partition_key=day,
                )
        return dg.MaterializeResult()

    return raw_events


# ---- parsed_events: the selection read by keyset and mapped to events ---------------------------


class TableParseConfig(dg.Config):
    batch_size: int = Field(
        default=50_000,
        ge=1,
        le=1_000_000,
        description="Rows per keyset page: memory is bounded by this, not by the day's size (each page costs a fixed "
        "~20-80 ms of query overhead, so pages much smaller than 10k slow a big day down).",
    )
    allow_shrink: bool = ALLOW_SHRINK


def materialize_day(lake: Lake, spec: PipelineSpec, day: str, ch, config: TableParseConfig, run_id: str, log) -> dict:
    """Read the day's selected rows (the raw_events manifest's selection) by keyset, transform them,
    and swap the day's Parquet and quarantine in whole."""
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    if manifest is None:
        raise dg.Failure(
            f"raw_events[{day}] is not materialized: materialize {spec.name}/raw_events (it holds the selection) first"
        )
    selection = TableSelection.from_json(manifest["selection"])

    def read(staged) -> dict:
        quarantine = str(staged_quarantine(staged, spec, day))
        stats = parse_table_day(ch, spec, day, selection, config.batch_size, str(staged), quarantine, log.info)
        stats.update(
            day=day,
            selection=manifest["selection"],
            raw_files=0,
            raw_lines=manifest["totals"]["lines"],
            parser_lines=stats["found"],
            routed_in=0,
            routed_out=0,
            duplicates=0,
            bytes_uncompressed=0,
            mb_per_s=0,
        )
        return stats

    return publish_parsed_day(lake, spec, day, run_id, log, config.allow_shrink, read)


def build_parsed_events(spec: PipelineSpec) -> dg.AssetsDefinition:
    rules = ", ".join(r.name for r in spec.mapping.rules)

    @pipeline_asset(
        spec,
        PARSED,
        pool=pipeline_pool(spec),
        deps=[asset_key(spec, RAW)],
        kinds={"parquet"},
        description=(
            f"The day's selected `{spec.source.table}` rows, read by keyset pagination on "
            f"({', '.join(spec.source.order_by)}) and mapped to events, as Parquet under `{spec.parsed_prefix}/type=<t>/day=<d>/`. "
            f"Rows failing a validation rule ({rules}) are dropped with the rule's name as reason, rows that cannot be "
            f"transformed are counted as transformation errors; both go to `quarantine/{spec.name}/day=<d>/`. "
            "Each day is staged and swapped in whole; the previous version is kept for rollback."
        ),
    )
    def parsed_events(
        context: dg.AssetExecutionContext, config: TableParseConfig, lake: LakeResource, clickhouse: ClickHouseResource
    ) -> dg.MaterializeResult:
        the_lake = lake.get()
        with clickhouse.open() as ch:
            for day in context.partition_keys:
                stats = materialize_day(the_lake, spec, day, ch, config, context.run.run_id, context.log)
                context.log.info(
                    f"{day}: found {stats['found']:,}, {stats['parsed']:,} events, dropped {stats['dropped']:,} "
                    f"{stats['dropped_by_reason']}, transformation errors {stats['transformation_errors']:,} "
                    f"{stats['transformation_errors_by_reason']}, {stats['batches']} keyset queries; now version {stats['version']}"
                )
                context.add_asset_metadata(parsed_metadata(stats), partition_key=day)
        return dg.MaterializeResult()

    return parsed_events


METADATA_COUNTS = (
    "found",
    "parsed",
    "dropped",
    "transformation_errors",
    "batches",
    "batch_size",
    "duration_s",
    "events_per_s",
    "version",
)


def parsed_metadata(stats: dict) -> dict:
    return {
        "dagster/row_count": stats["parsed"],
        **{k: stats[k] for k in METADATA_COUNTS},
        **{f"dropped_{r}": n for r, n in stats["dropped_by_reason"].items()},
        **{f"transformation_error_{r}": n for r, n in stats["transformation_errors_by_reason"].items()},
        **{f"rows_type_{t}": n for t, n in stats["rows_by_type"].items()},
        **shrink_metadata(stats),
    }


# ---- the redrive's figures and the checks only tables have ---------------------------------------


def redrive_figures(the_lake, spec: PipelineSpec, day: str, counts: RedriveCounts) -> dict:
    """Billing's figures for a table source's day: rows found, published, dropped by validation
    rule, transformation errors, publish failures, and the share of found rows the sink has."""
    stats = parsed_state(the_lake, spec, day).stats
    found = stats["found"]
    delivered = counts.published + counts.skipped_already_delivered
    return {
        "found": found,
        "dropped": stats["dropped"] + counts.dropped,
        **{f"dropped_{r}": n for r, n in stats["dropped_by_reason"].items()},
        "transformation_errors": stats["transformation_errors"],
        **{f"transformation_error_{r}": n for r, n in stats["transformation_errors_by_reason"].items()},
        "publish_failures": counts.failed,
        "success_rate_percent": round(100 * delivered / found, 2) if found else 100.0,
    }


def table_rows_current(lake: Lake, spec: PipelineSpec, day: str, ch) -> DayVerdict:
    """A table source's selected rows counted by the engine now, against raw_events' count."""
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    if manifest is None:
        return not_built("raw_events")
    then = manifest["totals"]["lines"]
    now = KeysetReader(ch, spec.source, day, TableSelection.from_json(manifest["selection"])).count()
    return DayVerdict(
        now == then,
        f"out of date, re-materialize the day: the selection holds {now} rows now, {then} when raw_events counted it"
        if now != then
        else f"the selection still holds the {now} rows raw_events counted",
        {"rows_now": now, "rows_built_from": then, "difference": now - then},
    )


def found_accounted_for(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    """Table sources (billing): found = published + already delivered + dropped + transformation
    errors + publish failures, with no publish failure."""
    last = lake.read_json(owner(spec, REDRIVE), f"last/day={day}.json")
    state = parsed_state(lake, spec, day)
    if last is None or state is None:
        return not_built("parsed_events or redrive")
    s = state.stats
    md = {
        "found": s["found"],
        "published": last["published"],
        "skipped_already_delivered": last["skipped_already_delivered"],
        "dropped": s["dropped"] + last["dropped"],
        "transformation_errors": s["transformation_errors"],
        "publish_failures": last["failed"],
    }
    if last["dry_run"]:
        return DayVerdict(True, "dry run: nothing sent", md)
    if not last.get("whole_day", True):
        return DayVerdict(True, "the last redrive sent part of the day (mode, type or limit): not applicable", md)
    right = (
        last["published"]
        + last["skipped_already_delivered"]
        + md["dropped"]
        + s["transformation_errors"]
        + last["failed"]
    )
    problems = []
    if s["found"] != right:
        problems.append(
            f"found {s['found']} but published {last['published']} + already delivered {last['skipped_already_delivered']} + "
            f"dropped {md['dropped']} + transformation errors {s['transformation_errors']} + publish failures {last['failed']} = {right}"
        )
    if last["selected"] != s["parsed"]:
        problems.append(f"redrive selected {last['selected']} events, parsed_events holds {s['parsed']}")
    if last["failed"]:
        problems.append(f"{last['failed']} publish failures")
    md["difference"] = s["found"] - right
    return DayVerdict(not problems, "; ".join(problems) or f"{s['found']} rows found, all accounted for", md)


def _table_rows_current(r, spec, day):
    with r.clickhouse.open() as ch:
        return table_rows_current(r.lake.get(), spec, day, ch)


CHECKS = (
    DayCheck(
        "raw_rows_current",
        PARSED,
        "The rows of the day's selection counted by the engine now, against the count raw_events recorded.",
        _table_rows_current,
        resources=frozenset({"lake", "clickhouse"}),
    ),
    DayCheck(
        "found_accounted_for",
        REDRIVE,
        "Rows found (counted by the engine) = published + already delivered + dropped (by rule) + "
        "transformation errors + publish failures, with no publish failure.",
        lambda r, spec, d: found_accounted_for(r.lake.get(), spec, d),
    ),
)
