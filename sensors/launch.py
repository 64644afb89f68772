"""Launching a backfill from a sensor, seeing which days already have one, and reading a day's
latest check executions: the project's uses of Dagster's private APIs, here and only here.

Dagster 1.13 has no public way for a sensor to launch a backfill: `RunRequest.for_asset_graph_subset`
is private and loses a run config on the wire, so the sensor adds the backfill to the instance as the
daemon would; reading a backfill's target needs private types too. Nor has it a public query for the
latest execution of a check per partition (`event-replay status`), planned ones included, nor a
public name for the materialization a check evaluation logged per day refers to (`check_each_day`).
"""

import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationTargetMaterializationData
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.utils import make_new_backfill_id


def submit_backfill(
    instance: dg.DagsterInstance,
    asset_graph,
    asset_keys: Iterable[dg.AssetKey],
    days: Iterable[str],
    tags: dict[str, str],
    run_config: dict | None = None,
) -> str:
    """Add one backfill of `asset_keys` x `days`, every run of it with `run_config`; returns its id.
    The sensor adds it itself, as the daemon does for a `RunRequest.for_asset_graph_subset`: such a
    request loses its run config on its way from the code server to the daemon (its `__new__`
    drops `run_config` when it is rebuilt from the wire), and a refill or a tenant's backfill needs it."""
    subset = AssetGraphSubset.from_asset_partition_set(
        {AssetKeyPartitionKey(key, day) for key in asset_keys for day in days}, asset_graph=asset_graph
    )
    backfill_id = make_new_backfill_id()
    instance.add_backfill(
        PartitionBackfill.from_asset_graph_subset(
            backfill_id=backfill_id,
            dynamic_partitions_store=instance,
            backfill_timestamp=time.time(),
            asset_graph_subset=subset,
            tags=tags,
            title=None,
            description=None,
            run_config=run_config or {},
        )
    )
    return backfill_id


def days_being_backfilled(
    instance: dg.DagsterInstance, asset_graph, asset_keys: Iterable[dg.AssetKey], run_config: dict | None = None
) -> set[str]:
    """Days of `asset_keys` targeted by a backfill that is still in progress and covers what
    `run_config` selects: one with the same run config, or with none (it selects everything)."""
    keys = set(asset_keys)
    days: set[str] = set()
    for backfill in instance.get_backfills(status=BulkActionStatus.REQUESTED):
        if not backfill.is_asset_backfill or (backfill.run_config and backfill.run_config != (run_config or {})):
            continue
        try:
            target = backfill.get_asset_backfill_data(asset_graph).target_subset
        except Exception:  # a backfill of assets this code location no longer has
            continue
        for key in keys & set(target.asset_keys):
            days.update(target.get_partitions_subset(key).get_partition_keys())
    return days


class CheckExecution(NamedTuple):
    """A check's latest execution for a day. `evaluation` (an AssetCheckEvaluation) and `timestamp`
    (when it was recorded) are None while the execution is only planned: its step has not reported."""

    run_id: str
    timestamp: float | None
    evaluation: Any


def latest_check_executions(
    instance: dg.DagsterInstance, check_keys: Iterable[dg.AssetCheckKey], day: str
) -> dict[dg.AssetCheckKey, CheckExecution]:
    """The latest execution of each of `check_keys` for partition `day`; a check never run is absent."""
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        list(check_keys), partition_filter=PartitionKeyFilter(key=day)
    )
    out = {}
    for key, record in latest.items():
        if record.status == AssetCheckExecutionRecordStatus.PLANNED or record.event is None:
            out[key] = CheckExecution(record.run_id, None, None)
        else:
            out[key] = CheckExecution(
                record.run_id, record.event.timestamp, record.event.dagster_event.event_specific_data
            )
    return out


def latest_materialization_targets(instance, asset: dg.AssetKey, days: list[str]) -> dict[str, Any]:
    """Each day's latest materialization of `asset`, as the target a logged check evaluation names
    (so the UI shows the verdict on that day); a day never materialized is absent. Two queries,
    whatever the number of days (a ranged run's check logs one evaluation per day)."""
    latest = instance.event_log_storage.get_latest_storage_id_by_partition(
        asset, dg.DagsterEventType.ASSET_MATERIALIZATION, set(days)
    )
    if not latest:
        return {}
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset, storage_ids=list(latest.values())), limit=len(latest)
    ).records
    by_id = {r.storage_id: r for r in records}
    return {
        day: AssetCheckEvaluationTargetMaterializationData(storage_id=i, run_id=r.run_id, timestamp=r.timestamp)
        for day, i in latest.items()
        if (r := by_id.get(i)) is not None
    }
