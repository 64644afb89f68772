"""What the asset factories share: lake names of a pipeline's outputs, and per-day checks."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from replay_defs.spec import PipelineSpec

RAW, PARSED, PROJECTIONS, REDRIVE = "raw_events", "parsed_events", "projections", "redrive"


def asset_key(spec: PipelineSpec, name: str) -> dg.AssetKey:
    return dg.AssetKey([spec.name, name])


def owner(spec: PipelineSpec, name: str) -> str:
    """The lake's bookkeeping namespace for one asset of a pipeline."""
    return f"{spec.name}/{name}"


def pipeline_pool(spec) -> str:
    """The concurrency pool of a pipeline's rebuilds: one rebuild of its days at a time."""
    return f"event_replay.pipeline.{spec.name}"


def sink_pool(spec) -> str:
    """The concurrency pool of everything that delivers to the spec's sink."""
    return "event_replay.sink." + re.sub(r"[^A-Za-z0-9_.-]", "_", spec.redrive.sink.name)


def parsed_slot_patterns(spec: PipelineSpec, day: str) -> list[str]:
    """Every lake directory that parsed_events[day] owns: Parquet per type, and its quarantine."""
    return [f"{spec.parsed_prefix}/type=*/day={day}", f"quarantine/{spec.name}/day={day}"]


def manifest_name(day: str) -> str:
    return f"manifest/day={day}.json"


@dataclass
class DayVerdict:
    passed: bool
    description: str
    metadata: dict


def check_each_day(
    context: dg.AssetCheckExecutionContext,
    asset: dg.AssetKey,
    check_name: str,
    verify: Callable[[str], DayVerdict],
) -> dg.AssetCheckResult:
    """Run `verify` for every day of the run and keep each day's verdict visible per day.

    A single-partition run reports the day's result. A ranged run (CLI `--partition-range`, or a
    single-run UI backfill) gets one evaluation per day logged with its partition, plus the
    returned summary, which fails (and so blocks) if any day failed.
    """
    if not context.has_partition_key_range:
        v = verify(context.partition_key)
        return dg.AssetCheckResult(passed=v.passed, description=v.description, metadata=v.metadata)
    days = context.partition_keys
    failed = []
    for day in days:
        v = verify(day)
        context.op_execution_context.log_event(
            dg.AssetCheckEvaluation(
                asset_key=asset,
                check_name=check_name,
                passed=v.passed,
                partition=day,
                description=v.description,
                metadata=v.metadata,
            )
        )
        if not v.passed:
            failed.append(day)
    return dg.AssetCheckResult(
        passed=not failed,
        description=f"{len(days) - len(failed)}/{len(days)} days passed"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        metadata={"days_checked": len(days), "days_failed": len(failed), "failed_days": ", ".join(failed) or "none"},
    )
