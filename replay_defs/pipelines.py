"""The pipelines shipped with the project, each declared as a spec, and `served()`: what the code
location serves (these, as the environment keeps them, plus the user's own declared in
EVENT_REPLAY_PIPELINES, with sinks from EVENT_REPLAY_SINK__<NAME>: `replay_defs/pipeline/declared.py`)."""

import os

from replay_defs.ingestion_refill.spec import RefillSpec
from replay_defs.pipeline.spec import (
    ClickHouseSourceSpec,
    EventSchema,
    Field,
    JsonlSourceSpec,
    Mapping,
    PipelineSpec,
    ProjectionSpec,
    RedriveSpec,
    Rule,
)
from replay_defs.sinks.kafka import KafkaSinkSpec
from replay_defs.sinks.redis import RedisSinkSpec

# Telemetry: raw JSONL.gz telemetry by arrival hour -> Parquet by type -> redrive per raw file.
TELEMETRY = PipelineSpec(
    name="telemetry",
    description="Telemetry parser redrive: hourly JSONL.gz -> Parquet by type.",
    start_date="2025-11-01",
    source=JsonlSourceSpec(prefix="raw/json_telemetry"),
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
        ProjectionSpec(
            name="daily_counts",
            kind="increment",
            key=("type", "device_id"),
            values={"events": "count(*)", "last_seq": "max(seq)"},
            count_column="events",
        ),
        ProjectionSpec(
            name="device_latest",
            kind="replace",
            key=("device_id",),
            values={"last_type": "type", "last_seq": "seq"},
            order_by="ts",
        ),
    ),
    redrive=RedriveSpec(unit="raw_file"),
)

# Billing: ClickHouse raw_events (ReplacingMergeTree) -> the Bento mapping with its named
# validation rules -> Kafka, filtered by tenant / environment / customer / event name / time.
BILLING = PipelineSpec(
    name="billing_reprocessing",
    description="Billing raw events reprocessing: ClickHouse raw_events -> mapping + validation rules -> Kafka.",
    start_date="2024-01-01",
    source=ClickHouseSourceSpec(
        table="raw_events",
        order_by=("tenant_id", "environment_id", "external_customer_id", "timestamp", "event_name", "id"),
        time_column="timestamp",
        id_column="id",
        payload_column="payload",
        filters={
            "tenant": "tenant_id",
            "environment": "environment_id",
            "customer": "external_customer_id",
            "event_name": "event_name",
        },
    ),
    schema=EventSchema(
        fields=(
            Field("event_id", "string"),
            Field("event_name", "string"),
            Field("tenant_id", "string"),
            Field("environment_id", "string"),
            Field("external_customer_id", "string"),
            Field("timestamp", "timestamp"),
            Field("source", "string"),
            Field("properties", "json"),
        ),
        id_field="event_id",
        time_field="timestamp",
        type_field="event_name",
    ),
    mapping=Mapping(
        rules=(
            Rule("missing_orgId", ("payload.orgId",)),
            Rule("missing_methodName", ("payload.methodName",)),
            Rule("missing_providerName_or_serviceName", ("payload.providerName", "payload.serviceName"), need="any"),
            Rule("missing_data_modelName", ("payload.data.modelName",)),
            Rule("missing_id_or_createdAt", ("payload.id", "payload.createdAt")),
        ),
        fields={
            "event_id": ("id",),
            "event_name": ("event_name",),
            "tenant_id": ("tenant_id",),
            "environment_id": ("environment_id",),
            "external_customer_id": ("external_customer_id",),
            "timestamp": ("timestamp",),
        },
        objects={
            "properties": {
                "request_id": ("payload.id",),
                "org_id": ("payload.orgId",),
                "method": ("payload.methodName",),
                "provider": ("payload.providerName", "payload.serviceName"),
                "model": ("payload.data.modelName",),
                "input_tokens": ("payload.data.usage.inputTokens",),
                "output_tokens": ("payload.data.usage.outputTokens",),
                "created_at": ("payload.createdAt",),
            }
        },
        constants={"source": "raw_events_reprocessing"},
    ),
    parsed_prefix="billing_events",
    # One message per event on prod_events_v4, keyed by customer: a customer's events stay in order.
    redrive=RedriveSpec(unit="event", sink=KafkaSinkSpec("prod_events_v4"), key_field="external_customer_id"),
)

# The source table as the seed declares it (tests and the benchmark create it in chDB).
BILLING_RAW_EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS raw_events (
    id String,
    tenant_id String,
    environment_id String,
    external_customer_id String,
    event_name String,
    source String DEFAULT '',
    payload String,
    timestamp DateTime64(3, 'UTC'),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3),
    version UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toDate(timestamp)
PRIMARY KEY (tenant_id, environment_id, external_customer_id, timestamp)
ORDER BY (tenant_id, environment_id, external_customer_id, timestamp, event_name, id)
"""

PIPELINES = (TELEMETRY, BILLING)

# Ingestion refill: keys of one-object-per-event uploads, from S3 access logs -> BullMQ ingestion jobs,
# in the queue and job shape Langfuse's ingestion workers consume.
INGESTION_REFILL = RefillSpec(
    name="ingestion_refill",
    description="Ingestion refill: keys from S3 access logs -> one BullMQ job per event object.",
    start_date="2025-01-01",
    known_types=("trace", "observation", "score"),
    redrive=RedriveSpec(
        unit="event", sink=RedisSinkSpec(key="ingestion-queue", mode="bullmq", job_name="ingestion-job")
    ),
)

REFILLS = (INGESTION_REFILL,)


def served() -> tuple[tuple[PipelineSpec, ...], tuple[RefillSpec, ...]]:
    """(pipelines, refills) this code location serves, read from the environment each call: the
    shipped ones that EVENT_REPLAY_SHIPPED_PIPELINES keeps (default all), then those declared in
    EVENT_REPLAY_PIPELINES, each with its EVENT_REPLAY_SINK__<NAME> sink. Raises DeclarationError."""
    from replay_defs.pipeline.declared import serve

    return serve(PIPELINES, REFILLS, os.environ)
