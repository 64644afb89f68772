"""Refill assets (ingestion refill): event keys from S3 access logs, and the ingestion jobs they become.

`<name>/event_keys[D]`: the keys of the objects PUT on day D, validated and de-duplicated, as
Parquet (`refill/<name>/day=D/keys.parquet`); bad rows in `quarantine/<name>/day=D/`. Staged and
swapped in like parsed events, so a re-run replaces the day whole.
`<name>/redrive[D]`: one job per key into the refill's sink, through the idempotency ledger.
"""

import time
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from assets.checks import DayCheck, build_checks, deliveries_check
from assets.common import DayVerdict, asset_key, pipeline_asset, pipeline_pool, sink_pool
from assets.factory import PipelineDefs
from assets.redrive import DeliveryConfig, deliver_day
from replay_defs.core.lake import Lake
from replay_defs.core.naming import EVENT_KEYS, REDRIVE, keys_table, owner, refill_quarantine_table
from replay_defs.ingestion_refill.access_logs import ROOTS_ENV, collect_keys, job_batches, refill_roots, time_window
from replay_defs.ingestion_refill.spec import RefillSpec, refill_tables
from replay_defs.sinks import open_sink
from resources import LakeResource, S3Resource


def keys_state(lake: Lake, spec: RefillSpec, day: str):
    return lake.state(owner(spec, EVENT_KEYS), day, keys_table(spec))


def committed_keys(lake: Lake, spec: RefillSpec, day: str) -> list[str]:
    """The day's committed key files (lake-relative)."""
    state = keys_state(lake, spec, day)
    return state.files_of(keys_table(spec)) if state else []


class KeySourceConfig(dg.Config):
    source: Literal["csv", "access_logs", "listing"] = Field(
        default="csv",
        description=(
            'csv: an access-log export with header "operation","key" (optional "requestdatetime", "httpstatus"); '
            "access_logs: S3 server access log files (a directory or s3://bucket/prefix, simple or date-partitioned "
            "layout); listing: objects of s3://bucket/prefix last modified on the day."
        ),
    )
    location: str = Field(
        description="Local path or s3:// URI of the CSV, the log files, or the bucket/prefix to list. A local path (and every "
        f"file read under it) must resolve, symlinks followed, under {ROOTS_ENV} (colon-separated directories; default: the "
        "lake root and the code server's current directory), else the run fails before reading it."
    )
    window_start: str | None = Field(
        default=None,
        description="Only records at or after this time (request time; a listing's LastModified), e.g. "
        "2025-07-09T00:30:00 (UTC unless an offset is given; Athena's 2025-07-09:00:30:00 also works). Unset: the "
        "start of the first day. The days are still the partitions selected: the window clips the first and last.",
    )
    window_end: str | None = Field(
        default=None,
        description="Only records before this time (excluded), e.g. 2025-07-09T07:45:00. Unset: the end of the last day.",
    )


def build_event_keys(spec: RefillSpec) -> dg.AssetsDefinition:
    @pipeline_asset(
        spec,
        EVENT_KEYS,
        pool=pipeline_pool(spec),
        kinds={"s3", "parquet"},
        description=(
            "Keys of the objects PUT on the day (`projectId/type/eventBodyId/eventId.json`), from an access-log CSV, "
            "raw S3 access logs or a listing; validated (shape, no path traversal, known type "
            f"{', '.join(spec.known_types)}), de-duplicated, in the Delta table `{keys_table(spec)}` (by day). "
            f"Bad rows go to `{refill_quarantine_table(spec)}` with a reason."
        ),
    )
    def event_keys(
        context: dg.AssetExecutionContext, config: KeySourceConfig, lake: LakeResource, s3: S3Resource
    ) -> dg.MaterializeResult:
        the_lake = lake.get()
        days = context.partition_keys
        staged = stage_days(the_lake, spec, days, context.log)
        t0 = time.monotonic()
        found = collect_day_keys(the_lake, spec, config, days, staged, s3, context.log)
        seconds = round(time.monotonic() - t0, 2)
        context.log.info(
            f"read {found.rows:,} rows in {seconds} s: {found.other_operations:,} not {'REST.PUT.OBJECT'}, "
            f"{found.other_days:,} PUTs on days outside this run, {found.outside_window:,} outside the time window, "
            f"{found.malformed:,} malformed"
        )
        for day, keys in found.days.items():
            stats = {**keys.__dict__, "quarantined": keys.quarantined, "source": config.source, "read_s": seconds}
            state = the_lake.publish(
                owner(spec, EVENT_KEYS),
                day,
                staged[day],
                refill_tables(spec),
                stats,
                run_id=context.run.run_id,
            )
            context.add_asset_metadata(keys_metadata(keys, state.version), partition_key=day)
        return dg.MaterializeResult()

    return event_keys


def stage_days(lake: Lake, spec: RefillSpec, days: list[str], log) -> dict[str, Path]:
    """A staging directory per day of the run, after finishing or dropping what an interrupted
    earlier run left."""
    own = owner(spec, EVENT_KEYS)
    staged = {}
    for day in days:
        if lake.recover(own, day):
            log.warning(f"{day}: cleaned up the staging an interrupted earlier run left")
        staged[day] = lake.new_staging(own, day)
    return staged


def collect_day_keys(lake: Lake, spec: RefillSpec, config: KeySourceConfig, days, staged, s3: S3Resource, log):
    """Read the configured source once for every day of the run, writing each day's keys and
    quarantine into its staging directory."""
    needs_s3 = config.location.startswith("s3://") or config.source == "listing"
    try:
        window = time_window(config.window_start, config.window_end, days)
        return collect_keys(
            config.source,
            config.location,
            days,
            spec.known_types,
            keys_dir=lambda d: staged[d] / keys_table(spec) / f"day={d}",
            quarantine_dir=lambda d: staged[d] / refill_quarantine_table(spec) / f"day={d}",
            work_dir=staged[days[0]] / "_work",
            s3=s3.get_client() if needs_s3 else None,
            log=log.info,
            roots=refill_roots(lake.root if lake.is_local else None),
            window=window,
            warn=log.warning,
        )
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc


def keys_metadata(keys, version: int) -> dict:
    """A day's key counts for the UI, with a table of keys per project and type."""
    return {
        "dagster/row_count": keys.keys,
        "put_rows": keys.put_rows,
        "keys": keys.keys,
        "duplicates": keys.duplicates,
        "quarantined": keys.quarantined,
        "malformed_rows": keys.malformed_rows,
        "window": keys.window,
        "outside_window": keys.outside_window,
        **({"log_files": keys.log_files} if keys.log_files is not None else {}),
        **({"missing_logs": keys.missing_logs} if keys.missing_logs else {}),
        "version": version,
        **{f"quarantined_{r}": n for r, n in keys.quarantined_by_reason.items()},
        "keys_by_project_and_type": dg.MetadataValue.md(
            "| project | type | keys |\n|---|---|---|\n"
            + "".join(f"| {pt.split('/')[0]} | {pt.split('/')[1]} | {n} |\n" for pt, n in keys.by_project_type.items())
        ),
    }


def build_refill_redrive(spec: RefillSpec) -> dg.AssetsDefinition:
    @pipeline_asset(
        spec,
        REDRIVE,
        pool=sink_pool(spec),
        deps=[asset_key(spec, EVENT_KEYS)],
        kinds={spec.redrive.sink.kind},
        required_resource_keys={"lake", "ledger", spec.redrive.sink.kind},
        description=(
            f"One ingestion job per key into {spec.redrive.sink.name}, grouped by project and type; the job id is the "
            "key, and the ledger makes a re-run send nothing twice unless `force`."
        ),
    )
    def redrive(context: dg.AssetExecutionContext, config: DeliveryConfig) -> dg.MaterializeResult:
        the_lake = context.resources.lake.get()
        sink = open_sink(context.resources, spec.redrive.sink, config.dry_run)
        try:
            for day in context.partition_keys:
                files = committed_keys(the_lake, spec, day)
                with context.resources.ledger.open() as ledger:
                    deliver_day(
                        context,
                        config,
                        spec,
                        the_lake,
                        sink,
                        ledger,
                        day,
                        lambda: job_batches([the_lake.storage.open(f) for f in files], config.batch_size),
                        None,
                        {"key_files": len(files)},
                        whole_day=config.limit is None,
                    )
        finally:
            sink.close()
        return dg.MaterializeResult()

    return redrive


def no_duplicate_keys(lake: Lake, spec: RefillSpec, day: str) -> DayVerdict:
    # What a reader of the Delta table sees for the day now, whatever the recorded state says.
    files = sorted(lake.live_files(refill_tables(spec)[0], day))
    if not files:
        return DayVerdict(True, "no keys for this day", {"keys": 0})
    [(rows, distinct)] = lake.sql(files, "SELECT count(*), count(DISTINCT key) FROM files")
    return DayVerdict(
        rows == distinct, f"{rows - distinct} keys listed twice", {"keys": rows, "duplicate_keys": rows - distinct}
    )


def keys_accounted_for(lake: Lake, spec: RefillSpec, day: str) -> DayVerdict:
    """PUT rows + malformed rows read = keys + their repeats + quarantined rows, counted on disk."""
    state = keys_state(lake, spec, day)
    if state is None:
        return DayVerdict(False, "event_keys not materialized for this day", {})
    s = state.stats
    keys = state.files_of(keys_table(spec))
    quarantine = state.files_of(refill_quarantine_table(spec))
    n_keys, puts = lake.sql(keys, "SELECT count(*), coalesce(sum(puts), 0)::BIGINT FROM files")[0] if keys else (0, 0)
    quarantined = lake.sql(quarantine, "SELECT count(*) FROM files")[0][0] if quarantine else 0
    read = s["put_rows"] + s["malformed_rows"]
    ok = read == puts + quarantined and n_keys == s["keys"]
    return DayVerdict(
        ok,
        f"{read} rows read = {n_keys} keys + {puts - n_keys} repeats + {quarantined} quarantined"
        if ok
        else f"{read} rows read but {n_keys} keys + {puts - n_keys} repeats + {quarantined} quarantined on disk (run reported {s['keys']} keys)",
        {
            "rows_read": read,
            "keys": n_keys,
            "repeats": puts - n_keys,
            "quarantined": quarantined,
            "difference": read - puts - quarantined,
        },
    )


def build_refill_checks(spec: RefillSpec) -> list[dg.AssetChecksDefinition]:
    return build_checks(
        spec,
        (
            DayCheck(
                "no_duplicate_keys",
                EVENT_KEYS,
                "No key appears twice among the day's files in the keys' Delta table now (committed by this project or not).",
                lambda r, s, d: no_duplicate_keys(r.lake.get(), s, d),
            ),
            DayCheck(
                "rows_accounted_for",
                EVENT_KEYS,
                "PUT rows + malformed rows read = distinct keys + repeated keys + quarantined rows on disk.",
                lambda r, s, d: keys_accounted_for(r.lake.get(), s, d),
            ),
            deliveries_check(expected=lambda lake, day: (day_keys(lake, spec, day), [])),
        ),
    )


def day_keys(lake: Lake, spec: RefillSpec, day: str) -> list[str]:
    """The day's whole message set: one job per committed key (the key is the job id)."""
    files = committed_keys(lake, spec, day)
    return [r[0] for r in lake.sql(files, "SELECT key FROM files")]


def build_refill(spec: RefillSpec):
    """The refill's assets, checks and job (`<name>_replay`)."""
    job = dg.define_asset_job(
        name=f"{spec.name}_replay",
        selection=dg.AssetSelection.groups(spec.name),
        description=f"Refill {spec.name}: collect the day's event keys from the access logs, enqueue one job per key, verify.",
    )
    return PipelineDefs([build_event_keys(spec), build_refill_redrive(spec)], build_refill_checks(spec), job)
