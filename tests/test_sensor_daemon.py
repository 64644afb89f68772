"""Dead-letter queues filling up launch the right backfills and runs with no human action: the
shipped code location with its DLQ sensors set in the environment (EVENT_REPLAY_DEAD_LETTERS__*),
in one real Dagster daemon (`dagster dev`) for four systems at once — telemetry (SQS on moto),
billing (a Kafka DLQ topic; raw_events in chDB), the ingestion refill (BullMQ failed jobs) and
processed events (Postgres rows in error, replayed to RabbitMQ). Every launch completes, its checks
pass, and each carried the run config its system needs."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pika
import psycopg
import redis
from services import Moto, Tansu, dagster_dev, graphql, rabbitmq_port
from test_dead_letter_sensors import fail_jobs

DAYS = ["2025-11-25", "2025-11-26"]
TICKS = """
query {
  repositoriesOrError { ... on RepositoryConnection { nodes { sensors { name sensorState { ticks(limit: 10) { status skipReason } } } } } }
}"""


def _ticks(base: str) -> dict[str, list[dict]]:
    nodes = graphql(base, TICKS)["repositoriesOrError"]["nodes"]
    return {s["name"]: s["sensorState"]["ticks"] for n in nodes for s in n["sensors"]}


def _refill_csv(path) -> list[str]:
    """An access-log export (seed 005) with four keys PUT on each of DAYS."""
    keys = [f"proj-1/trace/body-{i}/evt-{i}.json" for i in range(8)]
    lines = ['"operation","key","requestdatetime"']
    lines += [f'"REST.PUT.OBJECT","{k}","{25 + i % 2}/Nov/2025:10:00:00 +0000"' for i, k in enumerate(keys)]
    path.write_text("\n".join(lines) + "\n")
    return keys


def _wait(what: str, done, timeout: float, log) -> None:
    deadline = time.time() + timeout
    while not done():
        assert time.time() < deadline, f"{what}: timed out; dagster dev log: {log.read_text()[-3000:]}"
        time.sleep(2)


def test_dlq_growth_of_four_systems_launches_what_the_daemon_completes(
    env, tmp_path, redis_url, postgres_dsn, monkeypatch
):
    tag = uuid.uuid4().hex[:6]
    sqs_dlq, kafka_dlq, billing_out = f"telemetry-dlq-{tag}", f"billing-dlq-{tag}", f"billing-out-{tag}"
    refill_queue, pe_table, exchange = f"ingestion-{tag}", f"pe_{tag}", f"habitat-{tag}"
    csv = env["lake"] / "refill-source" / "keys.csv"
    csv.parent.mkdir()
    refill_keys = _refill_csv(csv)
    chdb = tmp_path / "chdb"
    moto, tansu = Moto().start(), Tansu().start()
    rabbit_url = f"amqp://guest:guest@127.0.0.1:{rabbitmq_port()}/%2F"
    r = redis.Redis.from_url(redis_url)
    amqp = pika.BlockingConnection(pika.URLParameters(rabbit_url))
    channel = amqp.channel()
    try:
        settings = {
            "EVENT_REPLAY_SQS_ENDPOINT": moto.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "EVENT_REPLAY_KAFKA_BOOTSTRAP": tansu.bootstrap,
            "EVENT_REPLAY_REDIS_URL": redis_url,
            "EVENT_REPLAY_POSTGRES_URL": postgres_dsn,
            "EVENT_REPLAY_RABBITMQ_URL": rabbit_url,
            "EVENT_REPLAY_CHDB": str(chdb),
            "EVENT_REPLAY_SINK__BILLING_REPROCESSING": f"kafka:{billing_out}",
            "EVENT_REPLAY_SINK__INGESTION_REFILL": f"redis:{refill_queue}?job_name=ingestion-job",
            "EVENT_REPLAY_DEAD_LETTERS__TELEMETRY": f"sqs:{sqs_dlq}?growth=5&interval_s=5",
            "EVENT_REPLAY_DEAD_LETTERS__BILLING_REPROCESSING": f"kafka:{kafka_dlq}?growth=5&interval_s=5",
            "EVENT_REPLAY_DEAD_LETTERS__INGESTION_REFILL": (
                f"bullmq:{refill_queue}?growth=5&interval_s=5&source=csv&location={csv}&force=true"
            ),
            "EVENT_REPLAY_DEAD_LETTERS__PROCESSED_EVENTS": (
                f"postgres:{pe_table}?growth=3&interval_s=5&exchange={exchange}&rate_limit=0"
            ),
        }
        for key, value in settings.items():
            monkeypatch.setenv(key, value)
        sqs = moto.client("sqs")
        sqs_url = sqs.create_queue(QueueName=sqs_dlq)["QueueUrl"]
        tansu.create_topic(kafka_dlq, partitions=1)
        tansu.create_topic(billing_out, partitions=1)
        # chDB locks its directory per process: the billing source is filled before dagster dev starts.
        subprocess.run(
            [str(Path(sys.executable).parent / "event-replay"), "billing", "generate", "--start", DAYS[0]]
            + ["--days", "2", "--rows-per-day", "40"],
            check=True,
            env=os.environ.copy(),
            capture_output=True,
        )
        channel.exchange_declare(exchange, "topic")
        replayed = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(replayed, exchange, "#")
        from replay_defs.processed_events.engine import create_processed_events_table

        with psycopg.connect(postgres_dsn, autocommit=True) as con:
            create_processed_events_table(con, pe_table)

        log = tmp_path / "dagster-dev.log"
        dlq_sensors = {
            f"telemetry__dlq_sqs_{sqs_dlq.replace('-', '_')}",
            f"billing_reprocessing__dlq_kafka_{kafka_dlq.replace('-', '_')}",
            f"ingestion_refill__dlq_bullmq_{refill_queue.replace('-', '_')}",
            f"processed_events__dlq_postgres_{pe_table}",
        }
        with dagster_dev(log) as base:  # the shipped location (workspace.yaml)
            instance = dg.DagsterInstance.get()

            def baselines_read() -> bool:
                ticks = _ticks(base)
                assert dlq_sensors <= set(ticks), set(ticks)
                return all(any("not firing" in (t["skipReason"] or "") for t in ticks[s]) for s in dlq_sensors)

            _wait("the DLQ sensors' baseline readings", baselines_read, 120, log)

            # The dead letters arrive: redrive messages of raw files, billing events of tenant acme
            # (and two that name no tenant), failed ingestion jobs, processed events in error.
            for i in range(6):
                key = f"raw/json_telemetry/day={DAYS[i % 2]}/hour=0{i}/f{i}.jsonl.gz"
                sqs.send_message(QueueUrl=sqs_url, MessageBody=json.dumps({"bucket": "raw", "key": key}))
            from confluent_kafka import Producer

            producer = Producer({"bootstrap.servers": tansu.bootstrap})
            for i in range(8):
                event = {"event_id": f"b{i}", "timestamp": f"{DAYS[i % 2]}T10:00:00Z"}
                if i < 6:
                    event |= {"tenant_id": "acme", "environment_id": "prod"}
                producer.produce(kafka_dlq, json.dumps(event).encode())
                assert producer.flush(15) == 0
            fail_jobs(
                redis_url, refill_queue, [json.dumps({"timestamp": f"{DAYS[i % 2]}T08:00:00Z"}) for i in range(6)]
            )
            with psycopg.connect(postgres_dsn, autocommit=True) as con:
                for i in range(4):
                    con.execute(
                        f"INSERT INTO {pe_table} (event_type, event_id, idempotency_key, payload, status, processed_at) "
                        "VALUES ('contribution.submitted', %s, %s, '{\"n\": 1}', 'error', %s)",
                        (f"pe{i}", f"idem{i}", f"2025-11-25 1{i}:00:00+00"),
                    )

            def launched_and_done() -> bool:
                backfills = instance.get_backfills()
                runs = instance.get_runs(filters=dg.RunsFilter(job_name="processed_events_replay_failed"))
                return (
                    len(backfills) == 3
                    and all(b.status.value != "REQUESTED" for b in backfills)
                    and len(runs) == 1
                    and runs[0].is_finished
                )

            _wait("the backfills and the replay run", launched_and_done, 600, log)
            backfills = {b.tags["event_replay/trigger"].split(":")[0]: b for b in instance.get_backfills()}
            (replay,) = instance.get_runs(filters=dg.RunsFilter(job_name="processed_events_replay_failed"))
            ticks = _ticks(base)

        from replay_defs.definitions import build_definitions

        asset_graph = build_definitions().get_repository_def().asset_graph
        for kind, group in (("sqs", "telemetry"), ("kafka", "billing_reprocessing"), ("bullmq", "ingestion_refill")):
            backfill = backfills[kind]
            assert backfill.status.value in ("COMPLETED", "COMPLETED_SUCCESS"), f"{group}: {backfill.status}"
            target = backfill.get_asset_backfill_data(asset_graph).target_subset
            assert {k.path[0] for k in target.asset_keys} == {group}
            for key in target.asset_keys:
                assert set(target.get_partitions_subset(key).get_partition_keys()) == set(DAYS), (group, key)
            _assert_checks_pass(instance, asset_graph, target.asset_keys, group)
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill.backfill_id}))
            assert runs and all(run.status.value == "SUCCESS" for run in runs), group
            for run in runs:
                assert dict(run.run_config) == dict(backfill.run_config or {}), "each run carried the backfill's config"

        assert not backfills["sqs"].run_config
        selection = backfills["kafka"].run_config["ops"]["billing_reprocessing__raw_events"]["config"]
        assert selection == {"tenant": "acme", "environment": "prod"}, "one tenant's backfill, never all tenants"
        billing_ticks = ticks[f"billing_reprocessing__dlq_kafka_{kafka_dlq.replace('-', '_')}"]
        assert any("2 of 8 peeked dead letters name no tenant" in (t["skipReason"] or "") for t in billing_ticks)
        assert tansu.read_all(billing_out, idle_s=1), "the tenant's events were redriven"
        refill_ops = backfills["bullmq"].run_config["ops"]
        assert refill_ops["ingestion_refill__event_keys"]["config"] == {"source": "csv", "location": str(csv)}
        assert refill_ops["ingestion_refill__redrive"]["config"] == {"force": True}
        assert r.zcard(f"bull:{refill_queue}:failed") == 6, "the sensor must not consume the dead letters"
        assert r.llen(f"bull:{refill_queue}:wait") == len(refill_keys), "one new job per key of the two days"

        assert replay.status.value == "SUCCESS", replay.status
        config = replay.run_config["ops"]["replay_failed_events"]["config"]
        assert (config["since"], config["until"]) == ("2025-11-25T10:00:00+00:00", "2025-11-25T13:00:00.000001+00:00")
        assert config["requested_by"] == f"sensor:processed_events__dlq_postgres_{pe_table}"
        assert replay.tags["event_replay/requested_by"] == config["requested_by"]
        got = [channel.basic_get(replayed, auto_ack=True)[2] for _ in range(5)]
        assert len([b for b in got if b]) == 4, "the 4 rows in error, published once"
        with psycopg.connect(postgres_dsn) as con:
            assert con.execute(f"SELECT count(*) FROM {pe_table} WHERE status = 'error'").fetchone()[0] == 0
    finally:
        r.delete(*r.keys(f"bull:{refill_queue}:*") or ["-"])
        r.close()
        amqp.close()
        tansu.stop()
        moto.stop()


def _assert_checks_pass(instance, asset_graph, asset_keys, group: str) -> None:
    """Every check of the assets has a verdict for each day, passed or a warning (the demo lake
    has late events on purpose: `late_events_within_window` warns)."""
    from sensors.launch import latest_check_executions

    keys = [k for k in asset_graph.asset_check_keys if k.asset_key in asset_keys]
    assert keys, group
    infos = instance.event_log_storage.get_asset_check_partition_info(keys, after_storage_id=None)
    passed = {(i.check_key, i.partition_key) for i in infos if i.latest_execution_status.value == "SUCCEEDED"}
    for key in keys:
        for day in DAYS:
            if (key, day) in passed:
                continue
            latest = latest_check_executions(instance, [key], day).get(key)
            verdict = latest and latest.evaluation
            assert verdict, f"{group}: {key.name} has no verdict for {day}"
            assert verdict.severity == dg.AssetCheckSeverity.WARN, f"{group}: {key.name} failed for {day}: {verdict}"
