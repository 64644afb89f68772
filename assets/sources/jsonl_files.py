"""Source kind `JsonlSourceSpec`: hourly JSONL(.gz) files in the lake (engine: `replay_defs/jsonl_files/`).

raw_events[D] is the manifest of the files that arrived on D, with line counts made independently
of the parser; parsed_events[D] parses them and the neighbours' files of the lateness window in
worker processes; two checks only files have (a raw file arrived or changed since the build; events
outside the lateness window); and a sensor re-checks days whose raw files changed."""

import builtins
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone

import dagster as dg
import pyarrow.parquet as pq
from pydantic import Field

from assets.checks import DayCheck, count_rows, not_built
from assets.common import DayVerdict, asset_key, pipeline_asset, pipeline_pool
from assets.parsed import (
    ALLOW_SHRINK,
    DRY_RUN,
    ONLY_TYPE,
    log_plan,
    plan_metadata,
    publish_parsed_day,
    replaced_files,
    shrink_metadata,
    staged_quarantine,
)
from replay_defs.core.lake import Lake
from replay_defs.core.naming import PARSED, RAW, manifest_name, owner
from replay_defs.jsonl_files.demo import PacificClockDecoder
from replay_defs.jsonl_files.parsing import (
    QUARANTINE_SCHEMA,
    EventDecoder,
    FileTask,
    ParseJob,
    ParseResult,
    count_lines,
    parse_day,
    worker_pool,
)
from replay_defs.pipeline.committed import committed_quarantine, parsed_state
from replay_defs.pipeline.spec import PipelineSpec
from resources import LakeResource

# ---- raw_events: the day's files as a manifest ------------------------------------------------


def day_start(day: str) -> datetime:
    d = date.fromisoformat(day)
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)


def raw_listing(lake, spec: PipelineSpec, start: datetime, end: datetime) -> dict[str, list[int]]:
    """The raw files that arrived in [start, end) as {lake path: [bytes, mtime_ns]}: what a build
    read, recorded so a later arrival or rewrite shows the build is out of date."""
    return {
        r.rel_path: [r.size, r.mtime_ns] for r in lake.list_raw(spec.source.prefix, start, end, spec.source.suffixes)
    }


def listing_changes(built: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
    """How the raw listing `now` differs from the one a build read, file by file."""
    changes = [f"arrived after the build: {f}" for f in sorted(set(now) - set(built))]
    changes += [f"gone since the build: {f}" for f in sorted(set(built) - set(now))]
    changes += [
        f"rewritten since the build: {f}" for f in sorted(set(now) & set(built)) if list(now[f]) != list(built[f])
    ]
    return changes


def manifest_listing(manifest: dict) -> dict[str, list[int]]:
    return {f["rel_path"]: [f["bytes"], f.get("mtime_ns")] for f in manifest["files"]}


def build_manifest(lake, spec: PipelineSpec, day: str, workers: int = 2) -> dict:
    start = day_start(day)
    refs = lake.list_raw(spec.source.prefix, start, start + timedelta(days=1), spec.source.suffixes)

    def entry(ref):
        lines, size, error = count_lines(lake.storage.reader_path(ref.rel_path))
        return {
            "rel_path": ref.rel_path,
            "uri": ref.uri,
            "arrival": ref.arrival.isoformat(),
            "bytes": ref.size,
            "mtime_ns": ref.mtime_ns,
            "sha256": lake.storage.sha256(ref.rel_path),
            "bytes_uncompressed": size,
            "lines": lines,
            "error": None if error is None else {"reason": error.reason, "detail": error.detail},
        }

    with ThreadPoolExecutor(max(1, workers)) as pool:
        files = list(pool.map(entry, refs))
    return {
        "day": day,
        "files": files,
        "totals": {
            "files": len(files),
            "bytes": sum(f["bytes"] for f in files),
            "bytes_uncompressed": sum(f["bytes_uncompressed"] for f in files),
            "lines": sum(f["lines"] for f in files),
            "unreadable_files": sum(1 for f in files if f["error"]),
        },
    }


def build_raw_events(spec: PipelineSpec) -> dg.AssetsDefinition:
    @pipeline_asset(
        spec,
        RAW,
        kinds={"jsonl"},
        description=(
            f"Raw files that arrived on the day under `{spec.source.prefix}/year=/month=/day=/hour=/`, "
            "as a manifest: source refs, bytes and line counts (counted independently of the parser; "
            "unreadable files are flagged, not skipped)."
        ),
    )
    def raw_events(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
        the_lake = lake.get()
        for day in context.partition_keys:
            t0 = time.monotonic()
            manifest = build_manifest(the_lake, spec, day)
            the_lake.write_json(owner(spec, RAW), manifest_name(day), manifest)
            t = manifest["totals"]
            bad = [f["rel_path"] for f in manifest["files"] if f["error"]]
            if bad:
                context.log.warning(f"{day}: {len(bad)} unreadable raw file(s), they will be quarantined: {bad}")
            if not manifest["files"]:
                context.log.warning(f"{day}: no raw files under {spec.source.prefix} for this day")
            context.log.info(f"{day}: {t['files']} files, {t['lines']:,} lines, {t['bytes']:,} bytes")
            context.add_asset_metadata(
                {
                    "files": t["files"],
                    "lines": t["lines"],
                    "bytes": t["bytes"],
                    "bytes_uncompressed": t["bytes_uncompressed"],
                    "unreadable_files": t["unreadable_files"],
                    "duration_s": round(time.monotonic() - t0, 3),
                },
                partition_key=day,
            )
        return dg.MaterializeResult()

    return raw_events


# ---- parsed_events: the day's events, parsed in worker processes --------------------------------


# A parse process costs about 2 CPU-s to start (Python, our modules, and the main module of the
# process that starts it, e.g. Dagster's CLI): a day with fewer lines than this (its lateness
# window included) parses faster in the run's own process (600k lines: 2.8 s there, 3.7 s with two).
POOL_FROM_LINES = 500_000


def pool_size(config: "ParseConfig") -> int:
    """The parse's processes when it spawns them: `workers`, else one per core."""
    return config.workers or os.cpu_count() or 1


class ParseConfig(dg.Config):
    workers: int = Field(
        default=0,
        ge=0,
        le=256,
        description=f"Parse processes; 0 means one per CPU core for a day of {POOL_FROM_LINES:,} lines or more "
        "(its lateness window included), and the run's own process for a smaller one.",
    )
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
    type: str | None = ONLY_TYPE
    dry_run: bool = DRY_RUN

    @property
    def decoder(self) -> builtins.type[EventDecoder]:  # `type` here is the field
        """The parser the run deploys: the demo's buggy one when asked for, else the real one."""
        return PacificClockDecoder if self.simulate_parser_bug else EventDecoder


def file_tasks(lake: Lake, spec: PipelineSpec, day: str, manifest: dict) -> tuple[list[FileTask], dict[str, list[int]]]:
    """The day's own files (from its raw manifest) plus neighbours' files in the lateness window,
    and the listing of all of them ({lake path: [bytes, mtime_ns]}, recorded as the build's sources)."""
    tasks = [
        FileTask(lake.storage.reader_path(f["rel_path"]), f["uri"], datetime.fromisoformat(f["arrival"]), True, i)
        for i, f in enumerate(manifest["files"])
    ]
    sources = manifest_listing(manifest)
    for lo, hi in lateness_windows(spec, day):
        for ref in lake.list_raw(spec.source.prefix, lo, hi, spec.source.suffixes):
            tasks.append(FileTask(lake.storage.reader_path(ref.rel_path), ref.uri, ref.arrival, False, len(tasks)))
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
    # Missing when a UI backfill of raw days D..E also targets parsed D-1 and E+1 (the event-time
    # mapping makes them downstream); stale when raw files arrived or changed since.
    manifest = current_manifest(lake, spec, day, log)

    def parse(staged) -> dict:
        t0 = time.monotonic()
        tasks, sources = file_tasks(lake, spec, day, manifest)
        lat = spec.lateness
        est_events = manifest["totals"]["lines"] * (1 + (lat.early + lat.late) / timedelta(days=1))
        job = ParseJob(
            schema=spec.schema,
            day=date.fromisoformat(day),
            early=lat.early,
            late=lat.late,
            buckets=max(1, math.ceil(est_events / config.bucket_rows)),
            stage_dir=str(staged / "_work"),
        )
        done = []

        def progress(r):
            done.append(r)
            if len(done) % 10 == 0 or len(done) == len(tasks):
                log.info(f"{day}: parsed {len(done)}/{len(tasks)} files")

        workers = pool_size(config) if config.workers or est_events >= POOL_FROM_LINES else 1
        out = str(staged / spec.parsed_prefix)
        result = parse_day(
            job, tasks, out, workers, on_progress=progress, pool=pool if workers > 1 else None, decoder=config.decoder
        )
        merge_quarantine(result.quarantine_files, str(staged_quarantine(staged, spec, day)))
        stats = day_stats(day, manifest, result, time.monotonic() - t0)
        stats["sources"] = sources
        stats["parse_processes"] = workers  # 1: the run's own process
        return stats

    return publish_parsed_day(lake, spec, day, run_id, log, config.allow_shrink, parse, only_type=config.type)


def build_parsed_events(spec: PipelineSpec) -> dg.AssetsDefinition:
    @pipeline_asset(
        spec,
        PARSED,
        pool=pipeline_pool(spec),
        # parsed[D] <- raw[D]: the neighbours' files in the lateness window are read by file_tasks (partitions/).
        deps=[asset_key(spec, RAW)],
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
        if config.type is not None and config.type not in spec.schema.known_types:
            raise dg.Failure(
                f"type {config.type!r} is not a known type of {spec.name}: {', '.join(spec.schema.known_types)}"
            )
        if config.dry_run:
            for day in context.partition_keys:
                plan = replaced_files(parsed_state(the_lake, spec, day), spec, config.type)
                log_plan(context.log, day, "replace", plan)
                context.add_asset_metadata({"dry_run": True, **plan_metadata("would_replace", plan)}, partition_key=day)
            return dg.MaterializeResult()
        pool = worker_pool(pool_size(config))  # its processes start with its first task
        try:
            for day in context.partition_keys:
                stats = materialize_day(the_lake, spec, day, config, context.run.run_id, context.log, pool)
                context.log.info(
                    f"{day}: {stats['parsed']:,} events, {stats['duplicates']:,} duplicates, "
                    f"{stats['quarantined']:,} quarantined {stats['quarantined_by_reason']}, "
                    f"{stats['events_per_s']:,} lines/s in {stats['parse_processes']} process(es); "
                    f"now version {stats['version']}"
                )
                context.add_asset_metadata(parsed_metadata(stats), partition_key=day)
        finally:
            if pool:
                pool.shutdown()
        return dg.MaterializeResult()

    return parsed_events


METADATA_COUNTS = (
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
    "parse_processes",
    "version",
)


def parsed_metadata(stats: dict) -> dict:
    """Numbers only (plus the reason table), so the UI can plot them per partition."""
    md = {"dagster/row_count": stats["parsed"], **{k: stats[k] for k in METADATA_COUNTS}}
    md.update(shrink_metadata(stats))
    for reason, n in stats["quarantined_by_reason"].items():
        md[f"quarantined_{reason}"] = n
    for t, n in stats["rows_by_type"].items():
        md[f"rows_type_{t}"] = n
    return md


# ---- the checks only files have ----------------------------------------------------------------

LATE = "outside_lateness_window"


def raw_files_current(lake: Lake, spec: PipelineSpec, day: str, content: bool = True) -> DayVerdict:
    """The raw files the committed version read (recorded at build time) against the listing of
    the day and its lateness window now: a late arrival or a rewrite makes the day out of date.
    `content`: also compare the day's own files with the SHA-256 raw_events recorded (a rewrite
    that kept size and mtime); a full read of the day's raw bytes."""
    state = parsed_state(lake, spec, day)
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    if state is None or manifest is None:
        return not_built("parsed_events or raw_events")
    start = day_start(day)
    home_now = raw_listing(lake, spec, start, start + timedelta(days=1))
    changes = [f"raw_events: {c}" for c in listing_changes(manifest_listing(manifest), home_now)]
    built = state.stats.get("sources")
    if built is None:  # a version built before sources were recorded: the home files are all we know
        built = manifest_listing(manifest)
    now = dict(home_now)
    for lo, hi in lateness_windows(spec, day):
        now.update(raw_listing(lake, spec, lo, hi))
    changes += [f"parsed_events: {c}" for c in listing_changes(built, now)]
    if content and not changes:
        changes += [
            f"raw_events: rewritten since the build (same size and mtime, other bytes): {f['rel_path']}"
            for f in manifest["files"]
            if f.get("sha256") and lake.storage.sha256(f["rel_path"]) != f["sha256"]
        ]
    return DayVerdict(
        not changes,
        f"out of date, re-materialize the day: {'; '.join(changes[:10])}"
        if changes
        else f"the {len(now)} raw files of the day and its lateness window are the ones the build read",
        {"raw_files_now": len(now), "raw_files_built_from": len(built), "changes": len(changes)},
    )


def late_quarantine(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    """Lines quarantined as outside the lateness window, counted in the quarantine files."""
    state = parsed_state(lake, spec, day)
    if state is None:
        return not_built("parsed_events")
    late = count_rows(
        lake,
        committed_quarantine(state, spec),
        f"SELECT coalesce(sum(lines) FILTER (WHERE reason = '{LATE}'), 0)::BIGINT FROM files",
    )
    lat = spec.lateness
    return DayVerdict(
        late == 0,
        f"{late} events arrived outside the lateness window ({lat.early} early, {lat.late} late) and were quarantined as "
        f"{LATE}: widen `lateness=Lateness(early=..., late=...)` in the {spec.name} PipelineSpec and re-run the days"
        if late
        else "no event arrived outside the lateness window",
        {
            LATE: late,
            "lateness_early_s": int(lat.early.total_seconds()),
            "lateness_late_s": int(lat.late.total_seconds()),
        },
        severity=dg.AssetCheckSeverity.WARN,
    )


CHECKS = (
    DayCheck(
        "raw_files_current",
        PARSED,
        "The raw files the committed version read (names, sizes, mtimes recorded at build time) "
        "against the listing of the day and its lateness window now, and the day's own files against the SHA-256 raw_events "
        "recorded: a late or rewritten raw file makes the day out of date.",
        lambda r, spec, d: raw_files_current(r.lake.get(), spec, d),
    ),
    DayCheck(
        "late_events_within_window",
        PARSED,
        "WARN when the quarantine files hold events outside the lateness window: "
        "the count, and the spec setting to widen.",
        lambda r, spec, d: late_quarantine(r.lake.get(), spec, d),
        blocking=False,
    ),
)
