"""Raw-listing sensors: when raw files arrive or change after a day was built, run that day's
checks (the `<pipeline>_verify` job), so the day shows as out of date in the UI — its
`raw_files_current` check fails and names the files — without anyone running `verify` by hand.

Each tick compares the raw files every recently built day read (recorded in its state) with the
listing now; the cursor remembers what it reported per day, so a change launches one run.
"""

import hashlib
import json

import dagster as dg

from assets.checks import committed_days
from assets.sources.jsonl_files import raw_files_current
from replay_defs.pipeline.spec import PipelineSpec
from resources import LakeResource

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def build_raw_files_sensor(spec: PipelineSpec, interval_s: int = 300, lookback_days: int = 31) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{spec.name}__raw_files_changed",
        job_name=f"{spec.name}_verify",
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Every {interval_s // 60} min: for the last {lookback_days} built days of {spec.name}, compares the raw files each "
            "day was built from with the listing now; for a day whose raw files arrived or changed since, runs its checks "
            f"({spec.name}_verify), so `raw_files_current` marks it out of date. Re-materialize such a day to take the files in."
        ),
    )
    def raw_files_changed(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult:
        the_lake = lake.get()
        reported: dict[str, str] = json.loads(context.cursor or "{}")  # day -> digest of the change last reported
        requests, current = [], {}
        for day in committed_days(the_lake, spec)[-lookback_days:]:
            verdict = raw_files_current(
                the_lake, spec, day, content=False
            )  # a listing per tick, not a read of every byte
            if verdict.passed:
                continue
            digest = hashlib.sha256(verdict.description.encode()).hexdigest()[:16]
            current[day] = digest
            if reported.get(day) != digest:
                context.log.info(f"{day}: {verdict.description}")
                requests.append(dg.RunRequest(run_key=f"{day}:{digest}", tags={RANGE_START: day, RANGE_END: day}))
        skip = (
            None
            if requests
            else (f"{len(current)} day(s) out of date, already reported" if current else "every built day is current")
        )
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(current, sort_keys=True), skip_reason=skip)

    return raw_files_changed
