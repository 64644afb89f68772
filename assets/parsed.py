"""parsed_events: validated, de-duplicated events as Parquet by type, swapped in atomically."""

import math
import os
import time
from datetime import date, datetime, timedelta

import dagster as dg
import pyarrow.parquet as pq
from pydantic import Field

from assets.common import asset_key, pipeline_pool
from assets.raw import build_manifest, day_start, listing_changes, manifest_listing, raw_listing
from partitions import daily_partitions, event_time_mapping
from replay_defs.clickhouse_table.parsing import TableSelection, parse_table_day
from replay_defs.core.lake import Lake
from replay_defs.core.naming import PARSED, RAW, manifest_name, owner, parsed_slot_patterns
from replay_defs.jsonl_files.parsing import QUARANTINE_SCHEMA, FileTask, ParseJob, ParseResult, parse_day, worker_pool
from replay_defs.pipeline.shrink import unconsented_shrink
from replay_defs.pipeline.spec import PipelineSpec
from resources import ClickHouseResource, LakeResource

ALLOW_SHRINK = Field(
    default=False,
    description="Consent to a new version holding fewer events of a type than the one it replaces (beyond the "
    "spec's shrink_tolerance); otherwise the blocking no_unconsented_shrink check fails. Recorded in the day's state.",
)


class ParseConfig(dg.Config):
    workers: int = Field(default=0, ge=0, le=256, description="Parse processes; 0 means one per CPU core.")
    bucket_rows: int = Field(
        default=500_000,
        ge=1_000,
        le=100_000_000,
        description="Events per de-duplication bucket: memory is bounded by this, not by the day's size.",
    )
    simulate_parser_bug: bool = Field(
        default=False,
        description="Demo only: parse timestamps as if UTC were US/Pacific (+8h), producing a wrong partition.",
    )
    allow_shrink: bool = ALLOW_SHRINK


def file_tasks(lake: Lake, spec: PipelineSpec, day: str, manifest: dict) -> tuple[list[FileTask], dict[str, list[int]]]:
    """The day's own files (from its raw manifest) plus neighbours' files in the lateness window,
    and the listing of all of them ({lake path: [bytes, mtime_ns]}, recorded as the build's sources)."""
    tasks = [
        FileTask(str(lake.path(f["rel_path"])), f["uri"], datetime.fromisoformat(f["arrival"]), True, i)
        for i, f in enumerate(manifest["files"])
    ]
    sources = manifest_listing(manifest)
    for lo, hi in lateness_windows(spec, day):
        for ref in lake.list_raw(spec.source.prefix, lo, hi, spec.source.suffixes):
            tasks.append(FileTask(str(lake.path(ref.rel_path)), ref.uri, ref.arrival, False, len(tasks)))
            sources[ref.rel_path] = [ref.size, ref.mtime_ns]
    return tasks, sources


def lateness_windows(spec: PipelineSpec, day: str) -> list[tuple[datetime, datetime]]:
    """Arrival windows of the neighbours' files whose events may belong to `day`."""
    start, lat = day_start(day), spec.lateness
    windows = [(start - lat.early, start), (start + timedelta(days=1), start + timedelta(days=1) + lat.late)]
    return [(lo, hi) for lo, hi in windows if hi > lo]


def current_manifest(lake: Lake, spec: PipelineSpec, day: str, log) -> dict:
    """raw_events' manifest of the day, listed and counted again when it is missing or the raw
    listing changed since (a late file, a rewrite): a rebuild never parses a stale listing."""
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    start = day_start(day)
    if manifest is not None:
        changes = listing_changes(manifest_listing(manifest), raw_listing(lake, spec, start, start + timedelta(days=1)))
        if not changes:
            return manifest
        log.warning(
            f"{day}: the raw files changed since raw_events listed them ({len(changes)}: {'; '.join(changes[:5])}); listing and counting them again"
        )
    manifest = build_manifest(lake, spec, day)
    lake.write_json(owner(spec, RAW), manifest_name(day), manifest)
    log.info(f"{day}: listed and counted {manifest['totals']['files']} raw files for raw_events")
    return manifest


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


def merge_quarantine(files: list[str], dest: str) -> int:
    """One quarantine file per day, streamed batch by batch."""
    if not files:
        return 0
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    rows = 0
    with pq.ParquetWriter(dest, QUARANTINE_SCHEMA, compression="zstd") as w:
        for f in files:
            for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(10_000):  # no cache of every row group
                w.write_batch(batch)
                rows += batch.num_rows
    return rows


def day_stats(day: str, manifest: dict, result: ParseResult, seconds: float) -> dict:
    quarantined = dict(sorted(result.quarantined.items()))
    home_bytes = manifest["totals"]["bytes_uncompressed"]
    return {
        "day": day,
        "raw_files": manifest["totals"]["files"],
        "raw_lines": manifest["totals"]["lines"],  # independent count (raw_events manifest)
        "parser_lines": result.home_lines,
        "neighbour_files": sum(1 for f in result.files if not f.home),
        "routed_in": result.routed_in,
        "routed_out": sum(result.routed_out.values()),
        "routed_out_by_day": dict(sorted(result.routed_out.items())),
        "parsed": result.dedupe.rows_out,
        "duplicates": result.duplicates,
        "quarantined": sum(quarantined.values()),
        "quarantined_by_reason": quarantined,
        "rows_by_type": dict(sorted(result.dedupe.rows_by_type.items())),
        "bytes_uncompressed": home_bytes,
        "duration_s": round(seconds, 3),
        "events_per_s": round(result.home_lines / seconds) if seconds else 0,
        "mb_per_s": round(home_bytes / 1e6 / seconds, 1) if seconds else 0,
    }


def materialize_day(lake: Lake, spec: PipelineSpec, day: str, config: ParseConfig, run_id: str, log, pool=None) -> dict:
    own = owner(spec, PARSED)
    # Missing when a UI backfill of raw days D..E also targets parsed D-1 and E+1 (the event-time
    # mapping makes them downstream); stale when raw files arrived or changed since.
    manifest = current_manifest(lake, spec, day, log)
    workers = config.workers or os.cpu_count() or 1
    with lake.lock(own, day):
        if lake.recover(own, day):
            log.warning(f"{day}: finished or cleaned up an interrupted earlier run before starting")
        previous = shrink_baseline(spec, lake.state(own, day))
        t0 = time.monotonic()
        tasks, sources = file_tasks(lake, spec, day, manifest)
        lat = spec.lateness
        est_events = manifest["totals"]["lines"] * (1 + (lat.early + lat.late) / timedelta(days=1))
        staged = lake.new_staging(own, day)
        job = ParseJob(
            schema=spec.schema,
            day=date.fromisoformat(day),
            early=lat.early,
            late=lat.late,
            buckets=max(1, math.ceil(est_events / config.bucket_rows)),
            stage_dir=str(staged / "_work"),
            simulate_parser_bug=config.simulate_parser_bug,
        )
        done = []

        def progress(r):
            done.append(r)
            if len(done) % 10 == 0 or len(done) == len(tasks):
                log.info(f"{day}: parsed {len(done)}/{len(tasks)} files")

        result = parse_day(job, tasks, str(staged / spec.parsed_prefix), workers, on_progress=progress, pool=pool)
        merge_quarantine(
            result.quarantine_files, str(staged / "quarantine" / spec.name / f"day={day}" / "quarantine.parquet")
        )
        stats = day_stats(day, manifest, result, time.monotonic() - t0)
        stats.update(sources=sources, previous=previous, allow_shrink=config.allow_shrink)
        state = lake.publish(own, day, staged, parsed_slot_patterns(spec, day), stats, run_id=run_id)
        stats["version"] = state.version
        return stats


def build_parsed_events(spec: PipelineSpec) -> dg.AssetsDefinition:
    if spec.from_table:
        return build_table_parsed_events(spec)

    @dg.asset(
        key=asset_key(spec, PARSED),
        group_name=spec.name,
        partitions_def=daily_partitions(spec),
        pool=pipeline_pool(spec),
        backfill_policy=dg.BackfillPolicy.single_run(),
        ins={
            "raw": dg.AssetIn(asset_key(spec, RAW), partition_mapping=event_time_mapping(spec), dagster_type=dg.Nothing)
        },
        kinds={"parquet"},
        description=(
            f"Events by event-time day as Parquet under `{spec.parsed_prefix}/type=<t>/day=<d>/`, each row "
            f"with its source_ref, de-duplicated by `{spec.schema.id_field}`. Bad lines go to "
            f"`quarantine/{spec.name}/day=<d>/` with a reason. Each day is staged and swapped in whole; "
            f"the previous version is kept for rollback."
        ),
    )
    def parsed_events(
        context: dg.AssetExecutionContext, config: ParseConfig, lake: LakeResource
    ) -> dg.MaterializeResult:
        the_lake = lake.get()
        pool = worker_pool(config.workers or os.cpu_count() or 1)
        try:
            for day in context.partition_keys:
                stats = materialize_day(the_lake, spec, day, config, context.run.run_id, context.log, pool)
                context.log.info(
                    f"{day}: {stats['parsed']:,} events, {stats['duplicates']:,} duplicates, "
                    f"{stats['quarantined']:,} quarantined {stats['quarantined_by_reason']}, "
                    f"{stats['events_per_s']:,} lines/s; now version {stats['version']}"
                )
                context.add_asset_metadata(_metadata(stats), partition_key=day)
        finally:
            if pool:
                pool.shutdown()
        return dg.MaterializeResult()

    return parsed_events


def shrink_metadata(stats: dict) -> dict:
    """The version the shrink check compares with (see `shrink_baseline`) and whether the run
    consented to a shrink, next to the counts."""
    prev = stats["previous"]
    return {
        "allow_shrink": stats["allow_shrink"],
        "shrink_baseline_version": prev["version"] if prev else 0,
        "shrink_baseline_parsed": prev["parsed"] if prev else 0,
    }


def _metadata(stats: dict) -> dict:
    """Numbers only (plus the reason table), so the UI can plot them per partition."""
    md = {
        "dagster/row_count": stats["parsed"],
        **{
            k: stats[k]
            for k in (
                "raw_files",
                "raw_lines",
                "parsed",
                "duplicates",
                "quarantined",
                "routed_in",
                "routed_out",
                "bytes_uncompressed",
                "duration_s",
                "events_per_s",
                "mb_per_s",
                "version",
            )
        },
    }
    md.update(shrink_metadata(stats))
    for reason, n in stats["quarantined_by_reason"].items():
        md[f"quarantined_{reason}"] = n
    for t, n in stats["rows_by_type"].items():
        md[f"rows_type_{t}"] = n
    return md


class TableParseConfig(dg.Config):
    batch_size: int = Field(
        default=50_000,
        ge=1,
        le=1_000_000,
        description="Rows per keyset page: memory is bounded by this, not by the day's size (each page costs a fixed "
        "~20-80 ms of query overhead, so pages much smaller than 10k slow a big day down).",
    )
    allow_shrink: bool = ALLOW_SHRINK


def materialize_table_day(
    lake: Lake, spec: PipelineSpec, day: str, ch, config: "TableParseConfig", run_id: str, log
) -> dict:
    """Read the day's selected rows (the raw_events manifest's selection) by keyset, transform them,
    and swap the day's Parquet and quarantine in whole."""
    own = owner(spec, PARSED)
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    if manifest is None:
        raise dg.Failure(
            f"raw_events[{day}] is not materialized: materialize {spec.name}/raw_events (it holds the selection) first"
        )
    selection = TableSelection.from_json(manifest["selection"])
    with lake.lock(own, day):
        if lake.recover(own, day):
            log.warning(f"{day}: finished or cleaned up an interrupted earlier run before starting")
        previous = shrink_baseline(spec, lake.state(own, day))
        staged = lake.new_staging(own, day)
        quarantine = staged / "quarantine" / spec.name / f"day={day}" / "quarantine.parquet"
        stats = parse_table_day(ch, spec, day, selection, config.batch_size, str(staged), str(quarantine), log.info)
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
            previous=previous,
            allow_shrink=config.allow_shrink,
        )
        state = lake.publish(own, day, staged, parsed_slot_patterns(spec, day), stats, run_id=run_id)
        stats["version"] = state.version
        return stats


def build_table_parsed_events(spec: PipelineSpec) -> dg.AssetsDefinition:
    rules = ", ".join(r.name for r in spec.mapping.rules)

    @dg.asset(
        key=asset_key(spec, PARSED),
        group_name=spec.name,
        partitions_def=daily_partitions(spec),
        pool=pipeline_pool(spec),
        backfill_policy=dg.BackfillPolicy.single_run(),
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
                stats = materialize_table_day(the_lake, spec, day, ch, config, context.run.run_id, context.log)
                context.log.info(
                    f"{day}: found {stats['found']:,}, {stats['parsed']:,} events, dropped {stats['dropped']:,} "
                    f"{stats['dropped_by_reason']}, transformation errors {stats['transformation_errors']:,} "
                    f"{stats['transformation_errors_by_reason']}, {stats['batches']} keyset queries; now version {stats['version']}"
                )
                md = {
                    "dagster/row_count": stats["parsed"],
                    **{
                        k: stats[k]
                        for k in (
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
                    },
                    **{f"dropped_{r}": n for r, n in stats["dropped_by_reason"].items()},
                    **{f"transformation_error_{r}": n for r, n in stats["transformation_errors_by_reason"].items()},
                    **{f"rows_type_{t}": n for t, n in stats["rows_by_type"].items()},
                    **shrink_metadata(stats),
                }
                context.add_asset_metadata(md, partition_key=day)
        return dg.MaterializeResult()

    return parsed_events
