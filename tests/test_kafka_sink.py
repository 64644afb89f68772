"""Redrive into a real Kafka-protocol broker (Tansu), read back with a real consumer."""

import dataclasses
import json

import pytest
from conftest import check_verdicts
from services import Tansu

from replay_defs.pipeline.spec import RedriveSpec
from replay_defs.pipelines import TELEMETRY
from replay_defs.sinks.kafka import KafkaSinkSpec

TOPIC = "telemetry-redrive"
KAFKA = dataclasses.replace(
    TELEMETRY,
    name="telemetry_kafka",
    parsed_prefix="telemetry_kafka_flat",
    redrive=RedriveSpec(sink=KafkaSinkSpec(TOPIC)),
)
DAY = "2025-11-25"


@pytest.fixture
def broker(monkeypatch):
    tansu = Tansu().start()
    tansu.create_topic(TOPIC)
    monkeypatch.setenv("EVENT_REPLAY_KAFKA_BOOTSTRAP", tansu.bootstrap)
    monkeypatch.setenv("EVENT_REPLAY_SINK_TIMEOUT_S", "4")
    yield tansu
    tansu.stop()


@pytest.fixture
def kafka_defs(env, broker):
    from replay_defs.definitions import build_definitions

    return build_definitions([KAFKA])


def _run(defs, instance, config=None):
    job = defs.resolve_job_def("telemetry_kafka_replay")
    run_config = {"ops": {"telemetry_kafka__redrive": {"config": config}}} if config else {}
    return job.execute_in_process(instance=instance, partition_key=DAY, run_config=run_config, raise_on_error=False)


def _redrive_md(result):
    (mat,) = [m for m in result.asset_materializations_for_node("telemetry_kafka__redrive")]
    return {k: v.value for k, v in mat.metadata.items()}


def test_each_raw_file_reaches_kafka_once_with_the_run_id(kafka_defs, instance, broker):
    first = _run(kafka_defs, instance)
    assert first.success
    md = _redrive_md(first)
    assert md["published"] == md["selected"] > 0 and md["failed"] == 0
    messages = broker.read_all(TOPIC)
    assert len(messages) == md["published"]
    keys = [m.key() for m in messages]
    assert len(set(keys)) == len(keys)
    for m in messages:
        body = json.loads(m.value())
        assert body["kind"] == "redrive_raw_file" and body["key"].startswith("raw/json_telemetry/")
        assert m.key().decode() == body["id"]
        assert dict(m.headers())["replay_run_id"].decode() == first.run_id
    assert check_verdicts(first)[("deliveries_reconcile", DAY)] is True

    again = _run(kafka_defs, instance)
    assert again.success
    md2 = _redrive_md(again)
    assert md2["published"] == 0 and md2["skipped_already_delivered"] == md["selected"]
    assert len(broker.read_all(TOPIC)) == len(messages), "a re-run must not send again"


def test_broker_outage_fails_the_run_then_a_rerun_delivers_exactly_once(kafka_defs, instance, broker, env):
    broker.stop()
    down = _run(kafka_defs, instance, {"retries": 0})  # no backoff: the broker is down
    md = _redrive_md(down)
    assert md["failed"] == md["selected"] > 0 and md["published"] == 0
    assert not down.success, "failed deliveries must fail the blocking deliveries check"
    assert check_verdicts(down)[("deliveries_reconcile", DAY)] is False
    dead = list((env["lake"] / "_replay/telemetry_kafka/redrive/dead_letter" / f"day={DAY}").glob("*.jsonl"))
    letters = [json.loads(line) for line in dead[0].read_text().splitlines()]
    assert len(dead) == 1 and len(letters) == md["failed"] and len({d["id"] for d in letters}) == md["failed"]
    assert all(
        d["sink"] == "kafka:telemetry-redrive" and d["error"] and json.loads(d["message"])["kind"] == "redrive_raw_file"
        for d in letters
    )

    broker.start()
    broker.create_topic(TOPIC)
    up = _run(kafka_defs, instance)
    assert up.success
    md_up = _redrive_md(up)
    assert md_up["published"] == md["selected"] and md_up["failed"] == 0
    messages = broker.read_all(TOPIC)
    assert len(messages) == md["selected"] and len({m.key() for m in messages}) == md["selected"]


def test_event_unit_keys_messages_by_the_spec_field(env, instance, broker):
    from replay_defs.definitions import build_definitions

    spec = dataclasses.replace(
        KAFKA, redrive=RedriveSpec(unit="event", sink=KafkaSinkSpec(TOPIC), key_field="device_id")
    )
    result = _run(build_definitions([spec]), instance)
    assert result.success
    md = _redrive_md(result)
    messages = broker.read_all(TOPIC)
    assert len(messages) == md["published"] == md["selected"] > 1000
    bodies = [json.loads(m.value()) for m in messages]
    assert len({b["event_id"] for b in bodies}) == len(bodies)
    assert all(m.key().decode() == b["device_id"] for m, b in zip(messages, bodies))
    assert all(dict(m.headers())["replay_run_id"].decode() == result.run_id for m in messages[:100])
    by_device = {}
    for m, b in zip(messages, bodies):  # one key, one Kafka partition: a device's events stay in order
        by_device.setdefault(b["device_id"], set()).add(m.partition())
    assert all(len(parts) == 1 for parts in by_device.values())
