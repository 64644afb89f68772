"""raw_events: the day's raw files as a manifest, with line counts made independently of the parser."""

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from typing import Optional

import dagster as dg
import pydantic
from pydantic import Field

from assets.common import asset_key
from partitions import daily_partitions
from replay_defs.clickhouse_table.parsing import KeysetReader, TableSelection
from replay_defs.core.lake import file_sha256
from replay_defs.core.naming import RAW, manifest_name, owner
from replay_defs.jsonl_files.parsing import count_lines
from replay_defs.pipeline.spec import PipelineSpec
from resources import ClickHouseResource, LakeResource


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
        lines, size, error = count_lines(str(lake.path(ref.rel_path)))
        return {
            "rel_path": ref.rel_path,
            "uri": ref.uri,
            "arrival": ref.arrival.isoformat(),
            "bytes": ref.size,
            "mtime_ns": ref.mtime_ns,
            "sha256": file_sha256(lake.path(ref.rel_path)),
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
    if spec.from_table:
        return build_table_raw_events(spec)

    @dg.asset(
        key=asset_key(spec, RAW),
        group_name=spec.name,
        partitions_def=daily_partitions(spec),
        backfill_policy=dg.BackfillPolicy.single_run(),
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


def build_table_raw_events(spec: PipelineSpec) -> dg.AssetsDefinition:
    src = spec.source
    SelectionConfig = selection_config(spec)

    @dg.asset(
        key=asset_key(spec, RAW),
        group_name=spec.name,
        partitions_def=daily_partitions(spec),
        backfill_policy=dg.BackfillPolicy.single_run(),
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
                manifest = {
                    "day": day,
                    "source": {"kind": "clickhouse", "table": src.table, "database": ch.database, "at": ch.where},
                    "selection": selection.to_json(),
                    "files": [],
                    "totals": {"files": 0, "bytes": 0, "bytes_uncompressed": 0, "lines": rows, "unreadable_files": 0},
                }
                the_lake.write_json(owner(spec, RAW), manifest_name(day), manifest)
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
