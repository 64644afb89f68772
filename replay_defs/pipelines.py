"""The pipelines this code location serves, each declared as a spec."""

from replay_defs.spec import (
    EventSchema,
    Field,
    JsonlSource,
    PipelineSpec,
    Projection,
    RedisSink,
    Redrive,
    RefillSpec,
)

# Seed 004: raw JSONL.gz telemetry by arrival hour -> Parquet by type -> redrive per raw file.
TELEMETRY = PipelineSpec(
    name="telemetry",
    description="Telemetry parser redrive (seed 004): hourly JSONL.gz -> Parquet by type.",
    start_date="2025-11-01",
    source=JsonlSource(prefix="raw/json_telemetry"),
    schema=EventSchema(
        fields=(
            Field("event_id", "string"),
            Field("ts", "timestamp"),
            Field("type", "string"),
            Field("device_id", "string"),
            Field("seq", "int"),
            Field("payload", "json", required=False),
        ),
        known_types=("lock", "bridge", "video_doorbell"),
    ),
    parsed_prefix="telemetry_flat",
    projections=(
        Projection(
            name="daily_counts",
            kind="increment",
            key=("type", "device_id"),
            values={"events": "count(*)", "last_seq": "max(seq)"},
            count_column="events",
        ),
        Projection(
            name="device_latest",
            kind="replace",
            key=("device_id",),
            values={"last_type": "type", "last_seq": "seq"},
            order_by="ts",
        ),
    ),
    redrive=Redrive(unit="raw_file"),
)

PIPELINES = (TELEMETRY,)

# Seed 000: keys of one-object-per-event uploads, from S3 access logs -> BullMQ ingestion jobs,
# in the queue and job shape Langfuse's ingestion workers consume.
INGESTION_REFILL = RefillSpec(
    name="ingestion_refill",
    description="Ingestion refill (seed 000): keys from S3 access logs -> one BullMQ job per event object.",
    start_date="2025-01-01",
    known_types=("trace", "observation", "score"),
    redrive=Redrive(unit="event", sink=RedisSink(key="ingestion-queue", mode="bullmq", job_name="ingestion-job")),
)

REFILLS = (INGESTION_REFILL,)
