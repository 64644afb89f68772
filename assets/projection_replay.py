"""Projection replay in Dagster: one daily-partitioned asset per registered projection
(`projection_replay/<name>`, partitions = UTC days of event time), the `projection_replay` job that
selects them, and the `projection_replay_cleanup_markers` job for markers left by a crash.

A run over a range of days (a UI backfill runs as one run: `BackfillPolicy.single_run()`; the CLI
passes the range as tags) replays the days in order with `replay_defs.projection_replay.engine.replay_day`.
Every day's counts go into the materialization's metadata for that day, and the blocking check
`matches_from_scratch_fold` fails the run when a day's rows differ from the SQL fold of event_log.
"""

import os
from datetime import date, datetime, timezone

import dagster as dg
from pydantic import Field

from assets.common import daily_asset
from replay_defs.projection_replay.engine import (
    PROJECTIONS,
    DayResult,
    EventLogProjection,
    ReplayLog,
    ReplayOptions,
    replay_day,
)
from replay_defs.projection_replay.stores import open_store
from resources import ClickHouseResource, ProjectionReplayResource

GROUP = "projection_replay"
CHECK = "matches_from_scratch_fold"
PROJECTION_DAYS = dg.DailyPartitionsDefinition(
    start_date=os.environ.get("EVENT_REPLAY_PROJECTION_START", "2024-01-01"), timezone="UTC", end_offset=1
)


class ProjectionReplayConfig(dg.Config):
    tenant: str = Field(description="Tenant whose events are replayed (required).")
    since: str = Field(
        default="",
        description="YYYY-MM-DD: days of the selected range before it are skipped (the CLI's --since picks the range itself).",
    )
    dry_run: bool = Field(
        default=False, description="Count the aggregates and events each day would fold; write nothing, set no marker."
    )
    batch_size: int = Field(default=5000, description="Events per ClickHouse page (keyset); memory is bounded by it.")
    aggregate_batch: int = Field(
        default=1000, description="Aggregates per batch: each projection key is written once per batch."
    )
    concurrency: int = Field(default=4, description="Aggregate streams read and folded in parallel within a batch.")
    drain_timeout_s: float = Field(
        default=120.0, description="How long to wait for in-flight live handlers before failing."
    )


def projection_key(p: EventLogProjection) -> dg.AssetKey:
    return dg.AssetKey([GROUP, p.name])


def build_projection_asset(p: EventLogProjection) -> dg.AssetsDefinition:
    key = projection_key(p)

    @daily_asset(
        key,
        group=GROUP,
        partitions=PROJECTION_DAYS,
        kinds={"clickhouse", "redis"} if p.store == "clickhouse" else {"clickhouse", "postgres", "redis"},
        description=f"{p.description} Replayed from ClickHouse event_log for one tenant per run "
        f"({'latest row wins' if p.kind == 'latest' else 'increment store: the day rows are removed first'}).",
        check_specs=[
            dg.AssetCheckSpec(
                CHECK,
                asset=key,
                blocking=True,
                description="Every replayed row equals the from-scratch SQL fold of event_log "
                "(events <= the replay's cutoff), checked before the markers come down.",
            )
        ],
        metadata={"store": p.store, "scope": p.scope, "table": p.table},
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: ProjectionReplayConfig,
        clickhouse: ClickHouseResource,
        projection_replay: ProjectionReplayResource,
    ) -> dg.MaterializeResult:
        days = [
            d for d in context.partition_keys if not config.since or d >= date.fromisoformat(config.since).isoformat()
        ]
        path = projection_replay.log_path(f"projection-replay-{p.name}-{context.run.run_id}.jsonl")
        log = ReplayLog(path, echo=context.log.info)
        log.write(
            "run",
            projection=p.name,
            days=len(days),
            first=days[0] if days else None,
            last=days[-1] if days else None,
            dry_run=config.dry_run,
            batch_size=config.batch_size,
            aggregate_batch=config.aggregate_batch,
            concurrency=config.concurrency,
        )
        results = replay_days(context, p, config, days, clickhouse, projection_replay, log)
        return replay_result(config, results, path)

    return _asset


def replay_options(config: ProjectionReplayConfig) -> ReplayOptions:
    return ReplayOptions(
        batch_size=config.batch_size,
        aggregate_batch=config.aggregate_batch,
        concurrency=config.concurrency,
        dry_run=config.dry_run,
        drain_timeout_s=config.drain_timeout_s,
    )


def replay_days(
    context: dg.AssetExecutionContext,
    p: EventLogProjection,
    config: ProjectionReplayConfig,
    days: list[str],
    clickhouse: ClickHouseResource,
    projection_replay: ProjectionReplayResource,
    log: ReplayLog,
) -> list[DayResult]:
    """Replay the days in order, each day's counts attached to its partition; closes the log."""
    opts = replay_options(config)
    store = None if config.dry_run else open_store(p, clickhouse, projection_replay.postgres_url)
    coord = projection_replay.coordinator(p.name)
    results = []
    try:
        for day in days:
            r = replay_day(p, config.tenant, day, clickhouse.get, store, coord, opts, log)
            results.append(r)
            context.add_asset_metadata(r.metadata(), partition_key=day)
            if context.has_partition_key_range and len(context.partition_keys) > 1 and not config.dry_run:
                # a ranged run: each day's verdict is also recorded for that day (the summary blocks)
                context.log_event(day_evaluation(projection_key(p), day, r))
    finally:
        coord.close()
        if store is not None:
            store.close()
        log.close()
    return results


def day_evaluation(key: dg.AssetKey, day: str, r: DayResult) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=CHECK,
        passed=bool(r.verified),
        partition=day,
        description=f"{day}: {r.verification.get('mismatched_rows', 0)} of {r.verification.get('expected_rows', 0)} rows differ "
        "from the from-scratch fold",
        metadata={k: v for k, v in r.verification.items() if isinstance(v, (int, str, bool))},
    )


def replay_result(config: ProjectionReplayConfig, results: list[DayResult], log_path: str) -> dg.MaterializeResult:
    """The run's totals, and the check's verdict over every day (it fails if any day failed)."""
    failed = [r.day for r in results if r.verified is False]
    totals = {
        k: sum(getattr(r, k) for r in results)
        for k in ("aggregates", "events", "keys_written", "batches", "skipped_aggregates")
    }
    summary = {
        "tenant": config.tenant,
        "days": len(results),
        "dry_run": config.dry_run,
        "replay_log": log_path,
        **totals,
        "days_failed": len(failed),
        "finished": datetime.now(timezone.utc).isoformat(),
    }
    if config.dry_run:
        desc = f"dry run: {totals['aggregates']} aggregates, {totals['events']} events over {len(results)} day(s); nothing written"
    else:
        desc = f"{len(results) - len(failed)}/{len(results)} day(s) equal the from-scratch fold" + (
            f"; failed: {', '.join(failed)}" if failed else ""
        )
    return dg.MaterializeResult(
        metadata={**summary, "dagster/row_count": totals["keys_written"]},
        check_results=[
            dg.AssetCheckResult(
                check_name=CHECK,
                passed=not failed,
                description=desc,
                metadata={
                    "days_checked": len(results),
                    "days_failed": len(failed),
                    "failed_days": ", ".join(failed) or "none",
                    "dry_run": config.dry_run,
                },
            )
        ],
    )


class CleanupMarkersConfig(dg.Config):
    projection: str = Field(description="Projection whose stuck markers are removed.")
    tenant: str = Field(default="", description="Only this tenant's replays (default: all).")
    older_than_minutes: float = Field(default=0.0, description="Only replays started longer ago than this.")


def cleanup_markers(
    projection_replay: ProjectionReplayResource,
    clickhouse: ClickHouseResource,
    name: str,
    tenant: str | None,
    older_than_s: float = 0.0,
) -> dict:
    """Remove the markers of replays that crashed (their deferred live events are released) and
    mark their progress abandoned, so the next replay of those days starts afresh."""
    p = PROJECTIONS[name]
    coord = projection_replay.coordinator(name)
    try:
        cleaned = coord.cleanup(tenant, older_than_s)
        stale = coord.clear_stale_inflight()
    finally:
        coord.close()
    abandoned = 0
    if cleaned:
        store = open_store(p, clickhouse, projection_replay.postgres_url)
        try:
            for t in sorted({c.get("tenant") for c in cleaned if c.get("tenant")}):
                abandoned += store.abandon(p, t)
        finally:
            store.close()
    return {
        "projection": name,
        "replays_cleaned": len(cleaned),
        "progress_abandoned": abandoned,
        "markers_removed": sum(c["markers_removed"] for c in cleaned),
        "aggregates_released": sum(c["aggregates_ready"] for c in cleaned),
        "stale_inflight_removed": stale,
        "replays": [{k: c.get(k) for k in ("replay_id", "tenant", "day", "cutoff")} for c in cleaned],
    }


@dg.op(description="Remove stuck markers of crashed projection replays; their deferred live events are released.")
def cleanup_projection_markers(
    context: dg.OpExecutionContext,
    config: CleanupMarkersConfig,
    projection_replay: ProjectionReplayResource,
    clickhouse: ClickHouseResource,
) -> dict:
    if config.projection not in PROJECTIONS:
        raise dg.Failure(f"no projection {config.projection!r}; known: {', '.join(sorted(PROJECTIONS))}")
    out = cleanup_markers(
        projection_replay, clickhouse, config.projection, config.tenant or None, config.older_than_minutes * 60
    )
    context.log.info(f"cleanup: {out}")
    context.add_output_metadata({k: v for k, v in out.items() if k != "replays"})
    return out


@dg.job(
    name="projection_replay_cleanup_markers",
    description="After a crashed projection replay: remove its markers, release deferred live events.",
)
def cleanup_markers_job():
    cleanup_projection_markers()


def build_projection_replay() -> tuple[list, list]:
    assets = [build_projection_asset(p) for p in PROJECTIONS.values()]
    job = dg.define_asset_job(
        name="projection_replay",
        selection=dg.AssetSelection.groups(GROUP),
        description="Replay projections from ClickHouse event_log for a tenant over a range of days "
        "(select the projection's asset and the days; config: tenant, dry_run, batch_size, concurrency).",
    )
    return assets, [job, cleanup_markers_job]
