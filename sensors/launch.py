"""Launching a backfill from a sensor, and seeing which days already have one.

Dagster 1.13 has no public way for a sensor to launch a backfill: `RunRequest.for_asset_graph_subset`
works but is private, and reading a backfill's target needs private types too. Both live here, and
only here, so they can be swapped for `RunRequest.for_asset_partition_range` when it is released.
"""

from collections.abc import Iterable

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.backfill import BulkActionStatus


def backfill_request(
    asset_graph, asset_keys: Iterable[dg.AssetKey], days: Iterable[str], tags: dict[str, str]
) -> dg.RunRequest:
    """A RunRequest that makes the daemon launch one backfill of `asset_keys` x `days`."""
    subset = AssetGraphSubset.from_asset_partition_set(
        {AssetKeyPartitionKey(key, day) for key in asset_keys for day in days}, asset_graph=asset_graph
    )
    return dg.RunRequest.for_asset_graph_subset(subset, tags=tags)


def days_being_backfilled(instance: dg.DagsterInstance, asset_graph, asset_keys: Iterable[dg.AssetKey]) -> set[str]:
    """Days of `asset_keys` targeted by a backfill that is still in progress."""
    keys = set(asset_keys)
    days: set[str] = set()
    for backfill in instance.get_backfills(status=BulkActionStatus.REQUESTED):
        if not backfill.is_asset_backfill:
            continue
        try:
            target = backfill.get_asset_backfill_data(asset_graph).target_subset
        except Exception:  # a backfill of assets this code location no longer has
            continue
        for key in keys & set(target.asset_keys):
            days.update(target.get_partitions_subset(key).get_partition_keys())
    return days
