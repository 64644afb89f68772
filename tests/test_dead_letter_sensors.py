"""DLQ-growth sensors, evaluated with build_sensor_context against the real dead-letter queues."""

import dataclasses
import json
import uuid

import dagster as dg
import pika
import psycopg
import pytest
import redis
from services import Moto, Tansu, rabbitmq_port

from replay_defs.pipeline.spec import DeadLettersSpec
from replay_defs.pipelines import TELEMETRY
from sensors.dead_letters import day_of, grown

DAYS = ["2025-11-25", "2025-11-26"]


def letters(n: int) -> list[str]:
    """Dead letters as the redrive sends them (event unit): JSON with the event time."""
    return [
        json.dumps({"event_id": f"e{i}", "ts": f"{DAYS[i % 2]}T0{i % 10}:00:00Z", "type": "lock"}) for i in range(n)
    ]


def build(source: DeadLettersSpec):
    from replay_defs.definitions import build_definitions

    spec = dataclasses.replace(TELEMETRY, dead_letters=(source,))
    defs = build_definitions([spec])
    (sensor,) = [s for s in defs.sensors if "__dlq_" in s.name]
    return defs, sensor


def tick(defs, sensor, instance, cursor=None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, repository_def=defs.get_repository_def(), resources=defs.resources
    )
    return sensor(context)


def backfill_days(defs, backfill) -> dict[dg.AssetKey, set[str]]:
    """The days of each asset a backfill targets."""
    target = backfill.get_asset_backfill_data(defs.get_repository_def().asset_graph).target_subset
    return {key: set(target.get_partitions_subset(key).get_partition_keys()) for key in target.asset_keys}


def added_backfill(instance, result):
    """The one backfill a firing tick added to the instance (the sensor adds it itself: its tick's
    reason names it, and it asks the daemon for no run)."""
    (backfill,) = instance.get_backfills()
    assert not result.run_requests and backfill.backfill_id in result.skip_reason.skip_message
    return backfill


def assert_fires_on_growth_only(defs, sensor, instance, add, depth):
    """Tick on the empty source (baseline), add 30 dead letters, tick (fires for their days, one
    backfill of the whole pipeline), tick again (no new growth: skips)."""
    first = tick(defs, sensor, instance)
    assert not first.run_requests and "not firing" in first.skip_reason.skip_message
    add(30)
    second = tick(defs, sensor, instance, first.cursor)
    backfill = added_backfill(instance, second)
    days = backfill_days(defs, backfill)
    assert set(days) == {
        dg.AssetKey(["telemetry", a]) for a in ("raw_events", "parsed_events", "projections", "redrive")
    }
    assert all(d == set(DAYS) for d in days.values())
    assert backfill.tags["event_replay/dead_letter_depth"] == "30"
    assert depth() == 30, "peeking must not consume the dead letters"
    third = tick(defs, sensor, instance, second.cursor)
    assert not third.run_requests and "grew 0" in third.skip_reason.skip_message
    assert len(instance.get_backfills()) == 1


def test_sqs_dead_letter_queue(env, instance, monkeypatch):
    moto = Moto().start()
    try:
        monkeypatch.setenv("EVENT_REPLAY_SQS_ENDPOINT", moto.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        sqs = moto.client("sqs")
        url = sqs.create_queue(QueueName="telemetry-dlq")["QueueUrl"]
        defs, sensor = build(DeadLettersSpec("sqs", "telemetry-dlq", growth=10))

        def add(n):
            for i, body in enumerate(letters(n)):
                sqs.send_message(QueueUrl=url, MessageBody=body)

        def depth():
            return int(
                sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
                    "ApproximateNumberOfMessages"
                ]
            )

        assert_fires_on_growth_only(defs, sensor, instance, add, depth)
    finally:
        moto.stop()


def test_bullmq_failed_jobs(env, instance, redis_url, monkeypatch):
    queue = f"dlq-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
    r = redis.Redis.from_url(redis_url)
    defs, sensor = build(DeadLettersSpec("bullmq", queue, growth=10))

    def add(n):
        # Jobs a real BullMQ worker failed: added with bullmq's Queue, failed by a Worker.
        fail_jobs(redis_url, queue, letters(n))

    try:
        assert_fires_on_growth_only(defs, sensor, instance, add, lambda: r.zcard(f"bull:{queue}:failed"))
    finally:
        r.delete(*r.keys(f"bull:{queue}:*") or ["-"])
        r.close()


def fail_jobs(url: str, queue: str, bodies: list[str], prefix: str = "bull") -> None:
    import asyncio

    from bullmq import Queue, Worker

    async def run():
        q = Queue(queue, {"connection": url, "prefix": prefix})
        await q.addBulk([{"name": "lock", "data": json.loads(b)} for b in bodies])
        failed = asyncio.Event()
        count = 0

        async def process(job, _token):
            raise RuntimeError("downstream rejected the event")

        def on_failed(*_):
            nonlocal count
            count += 1
            if count == len(bodies):
                failed.set()

        worker = Worker(queue, process, {"connection": url, "prefix": prefix, "drainDelay": 1, "concurrency": 10})
        worker.on("failed", on_failed)
        await asyncio.wait_for(failed.wait(), 30)
        await worker.close()
        await q.close()

    asyncio.run(run())


def test_kafka_dead_letter_topic(env, instance, monkeypatch):
    tansu = Tansu().start()
    try:
        tansu.create_topic("telemetry-dlq", partitions=2)
        monkeypatch.setenv("EVENT_REPLAY_KAFKA_BOOTSTRAP", tansu.bootstrap)
        defs, sensor = build(DeadLettersSpec("kafka", "telemetry-dlq", growth=10))
        from confluent_kafka import Producer

        def add(n):
            # One record per batch: Tansu 0.6 reports a partition's end offset as the last
            # *batch's* base offset + 1 (Kafka: the last record's + 1), so batches would hide depth.
            p = Producer({"bootstrap.servers": tansu.bootstrap})
            for body in letters(n):
                p.produce("telemetry-dlq", body.encode())
                assert p.flush(15) == 0

        assert_fires_on_growth_only(defs, sensor, instance, add, lambda: len(tansu.read_all("telemetry-dlq", idle_s=1)))
    finally:
        tansu.stop()


def test_rabbitmq_dead_letter_queue(env, instance, monkeypatch):
    port = rabbitmq_port()
    url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
    queue = f"dlq-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("EVENT_REPLAY_RABBITMQ_URL", url)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_declare(queue)
    defs, sensor = build(DeadLettersSpec("rabbitmq", queue, growth=10))
    try:

        def add(n):
            for body in letters(n):
                ch.basic_publish("", queue, body.encode())

        assert_fires_on_growth_only(
            defs, sensor, instance, add, lambda: ch.queue_declare(queue, passive=True).method.message_count
        )
    finally:
        ch.queue_delete(queue)
        conn.close()


def test_postgres_rows_in_error(env, instance, postgres_dsn, monkeypatch):
    monkeypatch.setenv("EVENT_REPLAY_POSTGRES_URL", postgres_dsn)
    with psycopg.connect(postgres_dsn, autocommit=True) as con:
        con.execute("DROP TABLE IF EXISTS processed_events")
        con.execute(
            "CREATE TABLE processed_events (id serial PRIMARY KEY, event_id text, status text, created_at timestamptz)"
        )
        defs, sensor = build(DeadLettersSpec("postgres", "processed_events", growth=10, time_field="created_at"))

        def add(n):
            for i in range(n):
                con.execute(
                    "INSERT INTO processed_events (event_id, status, created_at) VALUES (%s, 'error', %s)",
                    (f"e{i}", f"{DAYS[i % 2]} 12:00:00+00"),
                )
            con.execute(
                "INSERT INTO processed_events (event_id, status, created_at) VALUES ('ok', 'processed', '2025-11-20 12:00:00+00')"
            )

        assert_fires_on_growth_only(
            defs,
            sensor,
            instance,
            add,
            lambda: con.execute("SELECT count(*) FROM processed_events WHERE status = 'error'").fetchone()[0],
        )


def test_no_second_backfill_for_days_already_being_backfilled(env, instance, redis_url, monkeypatch):
    """While the sensor's first backfill is in progress, more growth for the same days does not
    launch another, and the skip reason says why."""
    queue = f"dlq-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
    defs, sensor = build(DeadLettersSpec("bullmq", queue, growth=10))
    r = redis.Redis.from_url(redis_url)
    try:
        first = tick(defs, sensor, instance)
        fail_jobs(redis_url, queue, letters(30))
        fired = tick(defs, sensor, instance, first.cursor)
        added_backfill(instance, fired)
        fail_jobs(redis_url, queue, letters(30))
        again = tick(defs, sensor, instance, fired.cursor)
        assert not again.run_requests
        assert "already being backfilled: 2025-11-25, 2025-11-26" in again.skip_reason.skip_message
        assert len(instance.get_backfills()) == 1
    finally:
        r.delete(*r.keys(f"bull:{queue}:*") or ["-"])
        r.close()


def test_days_come_from_event_time_or_the_raw_files_key():
    assert day_of('{"ts": "2025-11-25T23:59:59.5+00:00"}', "ts") == "2025-11-25"
    assert day_of('{"ts": "2025-11-25T23:30:00-01:00"}', "ts") == "2025-11-26", "event time is taken in UTC"
    assert (
        day_of('{"kind": "redrive_raw_file", "key": "raw/x/year=2025/month=11/day=24/hour=03/f.gz"}', "ts")
        == "2025-11-24"
    )
    assert (
        day_of("not json", "ts") is None and day_of('{"ts": "yesterday"}', "ts") is None and day_of("[1]", "ts") is None
    )


def test_growth_is_measured_within_the_window():
    samples = [[0, 50], [100, 10], [200, 30]]
    assert grown(samples, 250, 40, 600) == 30, "from the lowest depth in the window"
    assert grown(samples, 750, 40, 600) == 10, "samples older than the window no longer count"
    assert grown([], 0, 7, 600) == 0, "a first reading is a baseline, not growth"


@pytest.mark.parametrize(
    "bad",
    [dict(kind="nope", name="q"), dict(kind="postgres", name="bad;table"), dict(kind="sqs", name="q", window_s=0)],
)
def test_bad_dead_letter_declarations_are_refused(bad):
    with pytest.raises(ValueError):
        DeadLettersSpec(**bad)
