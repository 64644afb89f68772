"""The DLQ sensors the environment sets (EVENT_REPLAY_DEAD_LETTERS__<SYSTEM>), one per system whose
seed has a dead-letter source, built by `build_definitions()` as the shipped code location is and
evaluated against the real dead-letter sources: SQS on moto, the Kafka-protocol broker, BullMQ in
Redis, Postgres rows."""

import json
import uuid

import dagster as dg
import psycopg
import pytest
import redis
from services import Moto, Tansu
from test_dead_letter_sensors import backfill_days, fail_jobs

from replay_defs.pipeline.declared import DeclarationError

DAYS = ["2025-11-25", "2025-11-26"]


@pytest.fixture(scope="module")
def moto():
    server = Moto().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tansu():
    server = Tansu().start()
    yield server
    server.stop()


def location_with(monkeypatch, var: str, value: str, system: str, source: str):
    """The shipped code location with `var=value`, and the DLQ sensor it then has."""
    from replay_defs.definitions import build_definitions

    monkeypatch.setenv(var, value)
    defs = build_definitions()
    by_name = {s.name: s for s in defs.sensors}
    assert f"{system}__dlq_{source}" in by_name, set(by_name)
    sensor = by_name[f"{system}__dlq_{source}"]
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING, "set in the environment: on by default"
    return defs, sensor


def tick(defs, sensor, instance, cursor=None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, repository_def=defs.get_repository_def(), resources=defs.resources
    )
    return sensor(context)


def group_keys(defs, group: str) -> set[dg.AssetKey]:
    return set(dg.AssetSelection.groups(group).resolve(defs.get_repository_def().asset_graph))


def assert_backfill(defs, backfill, group: str, days: list[str], run_config: dict):
    """`backfill` targets exactly `days` of every asset of `group`, with `run_config`."""
    targeted = backfill_days(defs, backfill)
    assert set(targeted) == group_keys(defs, group)
    assert all(d == set(days) for d in targeted.values()), targeted
    assert dict(backfill.run_config or {}) == run_config


def baseline(defs, sensor, instance):
    first = tick(defs, sensor, instance)
    assert not first.run_requests and "not firing" in first.skip_reason.skip_message
    return first


def test_telemetry_sqs_dlq_backfills_the_days_of_the_raw_files(env, instance, moto, monkeypatch):
    monkeypatch.setenv("EVENT_REPLAY_SQS_ENDPOINT", moto.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    sqs = moto.client("sqs")
    queue = f"telemetry-processing-redrive-queue-dlq-{uuid.uuid4().hex[:6]}"
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    defs, sensor = location_with(
        monkeypatch,
        "EVENT_REPLAY_DEAD_LETTERS__TELEMETRY",
        f"sqs:{queue}?growth=5",
        "telemetry",
        f"sqs_{queue.replace('-', '_')}",
    )
    first = baseline(defs, sensor, instance)
    # The processor's redrive messages (seed 004): a raw file each, in both key layouts.
    keys = [f"raw/json_telemetry/year=2025/month=11/day=25/hour=0{i}/f{i}.jsonl.gz" for i in range(5)]
    keys += [f"raw/json_telemetry/day=2025-11-26/hour=0{i}/g{i}.jsonl.gz" for i in range(5)]
    for key in keys:
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"bucket": "telemetry-raw", "key": key}))
    fired = tick(defs, sensor, instance, first.cursor)
    (backfill,) = instance.get_backfills()
    assert backfill.backfill_id in fired.skip_reason.skip_message and not fired.run_requests
    assert_backfill(defs, backfill, "telemetry", DAYS, {})
    assert backfill.tags["event_replay/trigger"] == f"sqs:{queue}"
    depth = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    assert depth["Attributes"]["ApproximateNumberOfMessages"] == "10", "peeking must not consume the dead letters"
    again = tick(defs, sensor, instance, fired.cursor)
    assert "grew 0" in again.skip_reason.skip_message and len(instance.get_backfills()) == 1


def billing_letter(i: int, tenant: str | None, environment: str, day: str) -> bytes:
    event = {"event_id": f"b{i}", "event_name": "llm.call", "timestamp": f"{day}T10:00:{i % 60:02d}Z"}
    if tenant:
        event |= {"tenant_id": tenant, "environment_id": environment, "external_customer_id": "c1"}
    return json.dumps(event).encode()


def test_billing_kafka_dlq_backfills_each_tenant_with_its_selection(env, instance, tansu, monkeypatch):
    from confluent_kafka import Producer

    topic = f"billing-dlq-{uuid.uuid4().hex[:6]}"
    tansu.create_topic(topic, partitions=1)
    monkeypatch.setenv("EVENT_REPLAY_KAFKA_BOOTSTRAP", tansu.bootstrap)
    defs, sensor = location_with(
        monkeypatch,
        "EVENT_REPLAY_DEAD_LETTERS__BILLING_REPROCESSING",
        f"kafka:{topic}?growth=5",
        "billing_reprocessing",
        f"kafka_{topic.replace('-', '_')}",
    )
    first = baseline(defs, sensor, instance)
    letters = [billing_letter(i, "t1", "prod", DAYS[0]) for i in range(4)]
    letters += [billing_letter(i, "t2", "dev", DAYS[i % 2]) for i in range(4, 8)]
    letters += [billing_letter(i, None, "", DAYS[0]) for i in range(8, 10)]
    producer = Producer({"bootstrap.servers": tansu.bootstrap})
    for body in letters:  # one record a batch: Tansu's end offset counts batches (test_dead_letter_sensors)
        producer.produce(topic, body)
        assert producer.flush(15) == 0
    fired = tick(defs, sensor, instance, first.cursor)
    reason = fired.skip_reason.skip_message
    assert "2 of 10 peeked dead letters name no tenant" in reason, reason
    by_tenant = {b.tags["event_replay/tenant"]: b for b in instance.get_backfills()}
    assert set(by_tenant) == {"t1", "t2"}, "one backfill per tenant, none of every tenant"
    raw = "billing_reprocessing__raw_events"
    assert_backfill(
        defs,
        by_tenant["t1"],
        "billing_reprocessing",
        [DAYS[0]],
        {"ops": {raw: {"config": {"tenant": "t1", "environment": "prod"}}}},
    )
    assert_backfill(
        defs,
        by_tenant["t2"],
        "billing_reprocessing",
        DAYS,
        {"ops": {raw: {"config": {"tenant": "t2", "environment": "dev"}}}},
    )
    assert len(tansu.read_all(topic, idle_s=1)) == 10, "peeking must not consume the dead letters"


def refill_job(i: int, day: str) -> str:
    """An ingestion job's data as Langfuse enqueues it (job_batches): it carries its timestamp."""
    return json.dumps(
        {
            "id": f"ev{i}",
            "timestamp": f"{day}T08:00:00.000Z",
            "name": "ingestion-job",
            "payload": {"data": {"type": "trace-create", "eventBodyId": f"b{i}", "fileKey": f"ev{i}"}},
        }
    )


@pytest.mark.parametrize("force", [False, True])
def test_refill_bullmq_failed_jobs_backfill_with_the_key_source(env, instance, redis_url, monkeypatch, force):
    prefix = f"dlq{uuid.uuid4().hex[:6]}"  # the queue's real name, in keys of this test's own
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
    value = f"bullmq:ingestion-queue?prefix={prefix}&growth=5&source=csv&location=/data/refill/keys.csv"
    defs, sensor = location_with(
        monkeypatch,
        "EVENT_REPLAY_DEAD_LETTERS__INGESTION_REFILL",
        value + ("&force=true" if force else ""),
        "ingestion_refill",
        "bullmq_ingestion_queue",
    )
    r = redis.Redis.from_url(redis_url)
    try:
        first = baseline(defs, sensor, instance)
        fail_jobs(redis_url, "ingestion-queue", [refill_job(i, DAYS[i % 2]) for i in range(8)], prefix=prefix)
        fired = tick(defs, sensor, instance, first.cursor)
        (backfill,) = instance.get_backfills()
        config = {
            "ops": {"ingestion_refill__event_keys": {"config": {"source": "csv", "location": "/data/refill/keys.csv"}}}
        }
        if force:
            config["ops"]["ingestion_refill__redrive"] = {"config": {"force": True}}
        assert_backfill(defs, backfill, "ingestion_refill", DAYS, config)
        assert backfill.tags["event_replay/force"] == str(force).lower()
        said = fired.skip_reason.skip_message
        assert ("force=true: every key of these days is enqueued again" in said) == force, said
        assert ("force=false: the keys are re-read" in said) != force, said
        assert r.zcard(f"{prefix}:ingestion-queue:failed") == 8, "peeking must not consume the dead letters"
    finally:
        r.delete(*r.keys(f"{prefix}:*") or ["-"])
        r.close()


def test_processed_events_rows_in_error_request_a_replay_failed_run(env, instance, postgres_dsn, monkeypatch):
    table = f"pe_dlq_{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("EVENT_REPLAY_POSTGRES_URL", postgres_dsn)
    defs, sensor = location_with(
        monkeypatch,
        "EVENT_REPLAY_DEAD_LETTERS__PROCESSED_EVENTS",
        f"postgres:{table}?growth=3&exchange=habitat-replayed",
        "processed_events",
        f"postgres_{table}",
    )
    name = f"processed_events__dlq_postgres_{table}"
    with psycopg.connect(postgres_dsn, autocommit=True) as con:
        con.execute(f"CREATE TABLE {table} (event_id text, status text, processed_at timestamptz)")
        try:
            first = baseline(defs, sensor, instance)
            for i in range(5):
                con.execute(f"INSERT INTO {table} VALUES (%s, 'error', %s)", (f"e{i}", f"2025-11-25 1{i}:00:00.25+00"))
            con.execute(f"INSERT INTO {table} VALUES ('ok', 'processed', '2025-11-20 12:00:00+00')")
            fired = tick(defs, sensor, instance, first.cursor)
            (request,) = fired.run_requests
            assert request.job_name == "processed_events_replay_failed"
            config = request.run_config["ops"]["replay_failed_events"]["config"]
            assert config["since"] == "2025-11-25T10:00:00.250000+00:00"
            assert config["until"] == "2025-11-25T14:00:00.250001+00:00", "exclusive: just after the newest row"
            assert config["exchange"] == "habitat-replayed" and config["table"] == table
            assert config["requested_by"] == f"sensor:{name}"
            assert config["reason"].startswith(f"sensor {name}: postgres:{table}: depth 5 grew 5")
            assert request.run_key, "a run key: the same rise is launched once"
            again = tick(defs, sensor, instance, first.cursor)  # the same tick evaluated again
            assert again.run_requests[0].run_key == request.run_key
            quiet = tick(defs, sensor, instance, fired.cursor)
            assert not quiet.run_requests and "grew 0" in quiet.skip_reason.skip_message
            assert con.execute(f"SELECT count(*) FROM {table} WHERE status = 'error'").fetchone()[0] == 5
        finally:
            con.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize(
    "var, value, says",
    [
        ("EVENT_REPLAY_DEAD_LETTERS__NOPE", "sqs:q", "names no served system"),
        ("EVENT_REPLAY_DEAD_LETTERS__TELEMETRY", "sqs", "expected <kind>:<name>"),
        ("EVENT_REPLAY_DEAD_LETTERS__TELEMETRY", "sqs:q?grow=5", "'grow=5' is not an option"),
        ("EVENT_REPLAY_DEAD_LETTERS__TELEMETRY", "sqs:q?growth=many", "growth: expected a number"),
        ("EVENT_REPLAY_DEAD_LETTERS__telemetry", "sqs:q", "(the name is upper case): set one of"),
        ("EVENT_REPLAY_DEAD_LETTERS__TELEMETRY", "sqs:q?growth=1&growth=2", "option 'growth' is given twice"),
        ("EVENT_REPLAY_DEAD_LETTERS__TELEMETRY", "sqs:q?interval_s=0", "interval_s > 0"),
        ("EVENT_REPLAY_DEAD_LETTERS__TELEMETRY", "smtp:q", "unknown dead-letter kind 'smtp' (kinds: bullmq, kafka,"),
        ("EVENT_REPLAY_DEAD_LETTERS__TELEMETRY", "sqs:q,sqs:q", "listed twice"),
        ("EVENT_REPLAY_DEAD_LETTERS__INGESTION_REFILL", "bullmq:ingestion-queue", "option 'location' is required"),
        ("EVENT_REPLAY_DEAD_LETTERS__INGESTION_REFILL", "bullmq:q?location=x&source=ftp", "source: Input should be"),
        ("EVENT_REPLAY_DEAD_LETTERS__PROCESSED_EVENTS", "kafka:t", "rows in error (postgres:<table>)"),
    ],
)
def test_a_bad_dead_letter_variable_is_an_error_at_load_naming_it(env, monkeypatch, var, value, says):
    from replay_defs.definitions import build_definitions

    monkeypatch.setenv(var, value)
    with pytest.raises(DeclarationError) as err:
        build_definitions()
    assert var in str(err.value) and says in str(err.value), str(err.value)


def test_env_sources_add_to_the_spec_declared_ones_and_replace_the_same_source(env, monkeypatch):
    import dataclasses

    from replay_defs.definitions import build_definitions
    from replay_defs.pipeline.spec import DeadLettersSpec
    from replay_defs.pipelines import TELEMETRY

    spec = dataclasses.replace(
        TELEMETRY, dead_letters=(DeadLettersSpec("sqs", "declared-dlq"), DeadLettersSpec("sqs", "both-dlq", growth=7))
    )
    monkeypatch.setenv("EVENT_REPLAY_DEAD_LETTERS__TELEMETRY", "sqs:both-dlq?growth=50,kafka:telemetry.dlq")
    sensors = {s.name: s for s in build_definitions([spec], []).sensors if "__dlq_" in s.name}
    assert set(sensors) == {
        "telemetry__dlq_sqs_declared_dlq",
        "telemetry__dlq_sqs_both_dlq",
        "telemetry__dlq_kafka_telemetry_dlq",
    }
    assert sensors["telemetry__dlq_sqs_declared_dlq"].default_status == dg.DefaultSensorStatus.STOPPED
    assert sensors["telemetry__dlq_sqs_both_dlq"].default_status == dg.DefaultSensorStatus.RUNNING
    assert "more than 50 " in sensors["telemetry__dlq_sqs_both_dlq"].description, "the environment's source wins"
