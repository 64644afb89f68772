"""What the asset factories share: how a daily asset is declared, lake names of a pipeline's
outputs, and per-day checks."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import dagster as dg

from partitions import daily_partitions
from replay_defs.pipeline.committed import DayNotReady, verified_parquet
from replay_defs.pipeline.spec import PipelineSpec


def asset_key(spec: PipelineSpec, name: str) -> dg.AssetKey:
    return dg.AssetKey([spec.name, name])


def daily_asset(
    key: dg.AssetKey,
    *,
    group: str,
    partitions: dg.PartitionsDefinition,
    kinds: set[str],
    description: str,
    pool: str | None = None,
    owners: list[str] | None = None,
    **more,
):
    """The decorator of every partitioned asset of the project. A run over a range of days is one
    run (`single_run`: the CLI's `--partition-range`, a UI backfill), whose steps loop over the
    days and attach each day's metadata to that day. `more`: deps, ins, resource keys, checks."""
    return dg.asset(
        key=key,
        group_name=group,
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=pool,
        kinds=kinds,
        owners=owners,
        description=description,
        **more,
    )


def pipeline_asset(spec, name: str, **declared):
    """`daily_asset` for `<spec.name>/<name>`, in the spec's group, partitioned by its days, owned by its owners."""
    return daily_asset(
        asset_key(spec, name),
        group=spec.name,
        partitions=daily_partitions(spec),
        owners=list(spec.owners) or None,
        **declared,
    )


def pipeline_pool(spec) -> str:
    """The concurrency pool of a pipeline's rebuilds: one rebuild of its days at a time."""
    return f"event_replay.pipeline.{spec.name}"


def sink_pool(spec) -> str:
    """The concurrency pool of everything that delivers to the spec's sink."""
    return "event_replay.sink." + re.sub(r"[^A-Za-z0-9_.-]", "_", spec.redrive.sink.name)


ERRORED_PREFIX = "the check raised "  # how a day's verdict says its check could not conclude


@dataclass
class DayVerdict:
    passed: bool
    description: str
    metadata: dict
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR  # WARN: reported, never blocks


def _day_verdict(context, check_name: str, verify: Callable[[str], DayVerdict], day: str) -> DayVerdict:
    """`verify(day)` with what it took in its metadata (`check_seconds`: the check's own work; its
    step also pays Dagster's per-step costs). One that raises gets a failed verdict marked `errored`."""
    started = time.perf_counter()
    try:
        v = verify(day)
    except Exception as exc:  # noqa: BLE001 - the day's verdict says so; the other days and checks go on
        context.log.error(f"{check_name} {day}: the check raised {type(exc).__name__}: {exc}")
        v = DayVerdict(False, f"{ERRORED_PREFIX}{type(exc).__name__}: {exc}", {"errored": True})
    v.metadata = {**v.metadata, "check_seconds": round(time.perf_counter() - started, 3)}
    return v


def check_each_day(
    context: dg.AssetCheckExecutionContext,
    asset: dg.AssetKey,
    check_name: str,
    verify: Callable[[str], DayVerdict],
    targets: dict,
) -> dg.AssetCheckResult:
    """Run `verify` for every day of the run and keep each day's verdict visible per day.

    A single-partition run reports the day's result. A ranged run (CLI `--partition-range`, or a
    single-run UI backfill) logs one evaluation per day with its partition, plus the returned
    summary, which fails (and so blocks) if any day failed. Dagster shows a day's verdict in the
    check's Partitions tab only when the evaluation names the materialization it checked (as it
    does itself for a returned result), so each logged evaluation carries the day's latest one
    (`targets`: `latest_materializations`). A check that raises for a day gets a failed verdict
    marked `errored` with the exception, and the other days and the step's other checks go on.
    """

    verdict = partial(_day_verdict, context, check_name, verify)
    named = {"asset_key": asset, "check_name": check_name}  # the step reports several checks
    if not context.has_partition_key_range:
        v = verdict(context.partition_key)
        return dg.AssetCheckResult(
            **named, passed=v.passed, description=v.description, metadata=v.metadata, severity=v.severity
        )
    days = context.partition_keys
    failed, warnings_only = [], True
    for day in days:
        v = verdict(day)
        context.op_execution_context.log_event(
            dg.AssetCheckEvaluation(
                asset_key=asset,
                check_name=check_name,
                passed=v.passed,
                partition=day,
                description=v.description,
                metadata=v.metadata,
                severity=v.severity,
                target_materialization_data=targets.get(day),
            )
        )
        if not v.passed:
            failed.append(day)
            warnings_only = warnings_only and v.severity == dg.AssetCheckSeverity.WARN
    return dg.AssetCheckResult(
        **named,
        passed=not failed,
        # A day's ERROR failure blocks; days that only warn leave the run going.
        severity=dg.AssetCheckSeverity.WARN if failed and warnings_only else dg.AssetCheckSeverity.ERROR,
        description=f"{len(days) - len(failed)}/{len(days)} days passed"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        metadata={"days_checked": len(days), "days_failed": len(failed), "failed_days": ", ".join(failed) or "none"},
    )


def latest_materializations(context, asset: dg.AssetKey) -> dict:
    """In a ranged run, the days' latest materializations of `asset`, as the targets of the
    evaluations `check_each_day` logs per day (one query for all the checks of the asset)."""
    if not context.has_partition_key_range:
        return {}
    from sensors.launch import latest_materialization_targets  # lazily: sensors/ imports the checks

    return latest_materialization_targets(context.instance, asset, context.partition_keys)


def verified_day(lake, spec: PipelineSpec, day: str) -> list[str]:
    """`verified_parquet`, its refusal raised as a Dagster Failure: the run shows the reason, not a traceback."""
    try:
        return verified_parquet(lake, spec, day)
    except DayNotReady as exc:
        raise dg.Failure(str(exc)) from exc
