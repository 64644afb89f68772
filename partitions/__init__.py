"""Partition definitions: one daily (UTC) partitioning per pipeline.

Raw files are partitioned by the day they *arrived*; parsed events by their *event time*. An event
that arrived at 23:59 stamped with the next day belongs to the next day's partition, so parsed day D
reads the raw files of D and those of D-1 and D+1 within the pipeline's lateness window. That reading
is the parsed asset's own (it lists the neighbours' files when it builds, and records them for its
`raw_files_current` check); in Dagster's graph, parsed_events[D] depends on raw_events[D] alone
(identity mapping), so a backfill rebuilds exactly the days picked, for every asset, and the UI's
backfill preview shows what a job backfill launches. A -1..+1 mapping made asset backfills of raw
day D also rebuild parsed D-1 and D+1 (but not their redrive), and the preview promise days a job
backfill never builds.
"""

import dagster as dg

from replay_defs.pipeline.spec import PipelineSpec


def daily_partitions(spec: PipelineSpec) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=spec.start_date, timezone="UTC")
