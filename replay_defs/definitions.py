"""The code location: Definitions built from the pipeline specs `replay_defs.pipelines.served()`
returns: the shipped ones and the user's own (EVENT_REPLAY_PIPELINES, EVENT_REPLAY_SHIPPED_PIPELINES,
EVENT_REPLAY_SINK__<PIPELINE>: `replay_defs/pipeline/declared.py`), with a DLQ sensor for each
dead-letter source a spec declares or EVENT_REPLAY_DEAD_LETTERS__<SYSTEM> sets.

Storage locations come from env vars, with an embedded default under ./data (a sink's variables
are declared by its module in `replay_defs/sinks/`, `SINK.settings`):
EVENT_REPLAY_LAKE (lake root), EVENT_REPLAY_DUCKDB (projections and ledger),
EVENT_REPLAY_STORE_URL (a Postgres projection store instead of the DuckDB one),
EVENT_REPLAY_OUTBOX (outbox sink), EVENT_REPLAY_KAFKA_BOOTSTRAP (Kafka sinks),
EVENT_REPLAY_SQS_ENDPOINT and the usual AWS_* variables (SQS sinks), EVENT_REPLAY_RABBITMQ_URL
(RabbitMQ sinks), EVENT_REPLAY_REDIS_URL (Redis sinks and BullMQ dead letters),
EVENT_REPLAY_LEDGER_URL (a Postgres redrive ledger instead of the DuckDB one),
EVENT_REPLAY_POSTGRES_URL (Postgres dead-letter rows and the processed_events table the
processed-events jobs in `jobs/` replay to EVENT_REPLAY_RABBITMQ_URL), EVENT_REPLAY_S3_ENDPOINT
with AWS_REGION and the usual AWS credentials (refill sources in S3), CLICKHOUSE_URL (a ClickHouse
server for table sources; unset: chDB in-process with its data in EVENT_REPLAY_CHDB, default
data/chdb), CLICKHOUSE_DATABASE (default `default`); projection replays also read
EVENT_REPLAY_REDIS_URL (markers), EVENT_REPLAY_POSTGRES_URL (increment stores),
EVENT_REPLAY_PROJECTION_PREFIX, EVENT_REPLAY_PROJECTION_LOG_DIR and EVENT_REPLAY_PROJECTION_START
(first partition).
"""

import os

import dagster as dg

from assets import build_pipeline, build_refill
from assets.projection_replay import build_projection_replay
from assets.sources import source_kind
from jobs import JOBS as OPERATION_JOBS
from replay_defs.deployment import CHDB, DUCKDB, LAKE, PROJECTION_LOGS, STORE_URL, deployed
from replay_defs.pipeline.declared import DeclarationError, dead_letters_from_env, dead_letters_var
from replay_defs.pipelines import served
from replay_defs.sinks import sink_type, sink_types
from resources import (
    ClickHouseResource,
    LakeResource,
    LedgerResource,
    PostgresResource,
    ProjectionReplayResource,
    S3Resource,
    StoreResource,
)
from sensors import build_dead_letter_sensor, build_raw_files_sensor
from sensors.dead_letters import PROCESSED_EVENTS, dead_letter_reader, launch_options


def _setting(env: str, default: str):
    return deployed((env, default))


def build_definitions(pipelines=None, refills=None) -> dg.Definitions:
    """The code location of `pipelines` and `refills` (each, when None: what `served()` gives)."""
    if pipelines is None or refills is None:
        in_force = served()
        pipelines = in_force[0] if pipelines is None else pipelines
        refills = in_force[1] if refills is None else refills
    assets, checks, jobs, sensors = [], [], [], []
    for built in [*map(build_pipeline, pipelines), *map(build_refill, refills)]:
        assets += built.assets
        checks += built.checks
        jobs += [built.job, built.verify_job]
    dlq_sensors, watched = _dead_letter_sensors(pipelines, refills)
    sensors += dlq_sensors
    sensors += [build_raw_files_sensor(spec) for spec in pipelines if source_kind(spec).raw_files_sensor]
    # Projection replays (assets/projection_replay.py) read ClickHouse event_log, so it is always there.
    projection_assets, projection_jobs = build_projection_replay()
    assets += projection_assets
    jobs += projection_jobs
    # Steps of a run execute in its process: a day's steps run in sequence anyway (raw -> parsed ->
    # projections -> redrive), the parse has its own process pool, and a process per step costs
    # ~3 s of imports each (~20 s a run). Scale-out is one run per partition chunk (deploy/README.md).
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs + OPERATION_JOBS,
        sensors=sensors,
        resources={**_system_resources(), **_sink_resources(pipelines, refills, watched)},
        executor=dg.in_process_executor,
    )


def _system_resources() -> dict:
    """The resources of every code location: the lake, the stores, S3, ClickHouse, Postgres."""
    duckdb_path = deployed(DUCKDB)
    # S3 (moto or MinIO via the endpoint): the lake when it is on S3, and refill sources there.
    s3 = S3Resource(
        endpoint_url=_setting("EVENT_REPLAY_S3_ENDPOINT", None), region_name=_setting("AWS_REGION", "us-east-1")
    )
    return {
        "lake": LakeResource(
            root=deployed(LAKE),
            s3_endpoint_url=s3.endpoint_url,
            region=s3.region_name,
            retention_hours=deployed(("EVENT_REPLAY_LAKE_RETENTION_HOURS", 168)),
        ),
        "store": StoreResource(path=duckdb_path, postgres_url=deployed(STORE_URL)),
        "ledger": LedgerResource(duckdb_path=duckdb_path, postgres_url=_setting("EVENT_REPLAY_LEDGER_URL", None)),
        "s3": s3,
        "projection_replay": ProjectionReplayResource(
            redis_url=_setting("EVENT_REPLAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
            postgres_url=_setting("EVENT_REPLAY_POSTGRES_URL", ""),
            redis_prefix=_setting("EVENT_REPLAY_PROJECTION_PREFIX", "er:proj"),
            log_dir=deployed(PROJECTION_LOGS),
        ),
        "clickhouse": ClickHouseResource(
            url=_setting("CLICKHOUSE_URL", ""),
            data_path=deployed(CHDB),
            database=_setting("CLICKHOUSE_DATABASE", "default"),
        ),
        # The processed-events jobs (jobs/) need Postgres (and RabbitMQ, a sink's resource that is
        # always there); nothing connects before a run uses them.
        "postgres": PostgresResource(
            url=_setting("EVENT_REPLAY_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
        ),
    }


def _dead_letter_sensors(pipelines, refills) -> tuple[list, list]:
    """A DLQ sensor for every dead-letter source a pipeline spec declares or
    EVENT_REPLAY_DEAD_LETTERS__<SYSTEM> sets (one of the same kind and name replaces the spec's),
    and those sources. Systems: the pipelines, the refills and the processed-events jobs."""
    systems = {s.name: s for s in (*pipelines, *refills)} | {PROCESSED_EVENTS: PROCESSED_EVENTS}
    from_env = dead_letters_from_env({name: launch_options(s) for name, s in systems.items()}, os.environ)
    sensors, watched = [], []
    for name, system in systems.items():
        set_here = from_env.get(name, ())
        labels = {source.label for source, _ in set_here}
        for source in getattr(system, "dead_letters", ()):
            if source.label not in labels:
                sensors.append(build_dead_letter_sensor(system, source))
                watched.append(source)
        for source, options in set_here:
            try:
                sensors.append(build_dead_letter_sensor(system, source, options))
            except ValueError as exc:
                raise DeclarationError(f"{dead_letters_var(name)}: {exc}") from None
            watched.append(source)
    return sensors, watched


def _sink_resources(pipelines, refills, watched=()) -> dict:
    """The resource of each sink a spec names, or a dead-letter source reads through, or that is
    always there (`SinkType.always`), built from its env settings (the registry's `settings`)."""
    needed = {sink_type(spec.redrive.sink).resource_key for spec in (*pipelines, *refills)}
    needed |= {dead_letter_reader(source.kind)[0] for source in watched}
    return {
        t.resource_key: t.resource(**{field: deployed(setting) for field, setting in t.settings.items()})
        for t in sink_types().values()
        if t.always or t.resource_key in needed
    }


defs = build_definitions()
