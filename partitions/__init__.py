"""Partition definitions: one daily (UTC) partitioning per pipeline, and the event-time mapping.

Raw files are partitioned by the day they *arrived*; parsed events by their *event time*. An
event that arrived at 23:59 stamped with the next day belongs to the next day's partition, so
parsed day D depends on raw days D-1, D and D+1 (as far as the pipeline's lateness allows).
"""

from datetime import timedelta

import dagster as dg

from replay_defs.pipeline.spec import PipelineSpec


def daily_partitions(spec: PipelineSpec) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=spec.start_date, timezone="UTC")


def event_time_mapping(spec: PipelineSpec) -> dg.TimeWindowPartitionMapping:
    """parsed_events[D] <- raw_events[D-1 .. D+1]: early arrivals come the day before, late ones after."""
    return dg.TimeWindowPartitionMapping(
        start_offset=-1 if spec.lateness.early > timedelta(0) else 0,
        end_offset=1 if spec.lateness.late > timedelta(0) else 0,
        allow_nonexistent_upstream_partitions=True,
    )
