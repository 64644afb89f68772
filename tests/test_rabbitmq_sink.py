"""Redrive into RabbitMQ (the machine's broker, behind a proxy we can cut), read back with pika."""

import dataclasses
import json
import threading
import time
import uuid

import pika
import pytest
from services import TcpProxy, rabbitmq_port

from replay_defs.pipeline.spec import RedriveSpec
from replay_defs.pipelines import TELEMETRY
from replay_defs.sinks.rabbitmq import RabbitMQSinkSpec

DAY = "2025-11-25"


@pytest.fixture
def rabbit(monkeypatch):
    """A fresh topic exchange with a queue bound to everything, reached through a proxy."""
    port = rabbitmq_port()
    proxy = TcpProxy(port).start()
    exchange, queue = f"replay-test-{uuid.uuid4().hex[:8]}", f"replay-test-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F"))
    ch = conn.channel()
    ch.exchange_declare(exchange, "topic", auto_delete=False)
    ch.queue_declare(queue)
    ch.queue_bind(queue, exchange, "#")
    monkeypatch.setenv("EVENT_REPLAY_RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
    yield {"proxy": proxy, "exchange": exchange, "queue": queue, "channel": ch}
    proxy.stop()
    ch.queue_delete(queue)
    ch.exchange_delete(exchange)
    conn.close()


def drain(ch, queue: str) -> list[tuple]:
    out = []
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((method.routing_key, props.headers, json.loads(body), props.message_id))


def _run(exchange: str, instance, unit: str = "raw_file", config: dict | None = None):
    from replay_defs.definitions import build_definitions

    spec = dataclasses.replace(
        TELEMETRY,
        name="telemetry_amqp",
        parsed_prefix="telemetry_amqp_flat",
        redrive=RedriveSpec(unit=unit, sink=RabbitMQSinkSpec(exchange)),
    )
    job = build_definitions([spec]).resolve_job_def("telemetry_amqp_replay")
    run_config = {"ops": {"telemetry_amqp__redrive": {"config": config}}} if config else {}
    result = job.execute_in_process(instance=instance, partition_key=DAY, run_config=run_config, raise_on_error=False)
    (mat,) = result.asset_materializations_for_node("telemetry_amqp__redrive")
    return result, {k: v.value for k, v in mat.metadata.items()}


def test_messages_are_routed_by_type_and_confirmed_once(env, instance, rabbit):
    first, md = _run(rabbit["exchange"], instance)
    assert first.success and md["published"] == md["selected"] > 0
    got = drain(rabbit["channel"], rabbit["queue"])
    assert len(got) == md["published"] == len({b["key"] for _, _, b, _ in got})
    assert {rk for rk, _, _, _ in got} <= {"lock", "bridge", "video_doorbell"}
    assert all(
        h["replay_run_id"] == first.run_id and b["kind"] == "redrive_raw_file" and mid == b["id"]
        for _, h, b, mid in got
    )
    again, md2 = _run(rabbit["exchange"], instance)
    assert again.success and md2["published"] == 0 and drain(rabbit["channel"], rabbit["queue"]) == []


def test_unroutable_messages_count_as_failed_not_silently_dropped(env, instance, rabbit):
    rabbit["channel"].queue_unbind(rabbit["queue"], rabbit["exchange"], "#")
    result, md = _run(rabbit["exchange"], instance)
    assert md["failed"] == md["selected"] > 0 and not result.success


def test_connection_cut_fails_the_run_then_a_rerun_delivers_exactly_once(env, instance, rabbit):
    rabbit["proxy"].stop()
    down, md = _run(rabbit["exchange"], instance)
    assert md["failed"] == md["selected"] > 0 and not down.success, {
        k: md[k] for k in ("published", "failed", "skipped_already_delivered", "dropped")
    }
    dead = next((env["lake"] / "_replay/telemetry_amqp/redrive/dead_letter" / f"day={DAY}").glob("*.jsonl")).read_text()
    assert "guest:guest@" not in dead, "the broker URL's password leaked into the dead letters"
    rabbit["proxy"].start()
    up, md_up = _run(rabbit["exchange"], instance)
    assert up.success and md_up["published"] == md["selected"]
    got = drain(rabbit["channel"], rabbit["queue"])
    assert len(got) == md["selected"] == len({b["key"] for _, _, b, _ in got})


def test_broker_connection_cut_mid_redrive_ends_with_each_event_once(env, instance, rabbit):
    """Cut the connection while events are being published, restore it after the redrive's
    retries gave up on some: the re-run sends the rest. By message id, the consumer gets every
    event exactly once; a raw copy beyond that can only be the message in flight at the cut, in
    doubt in the first run and a possible duplicate in the re-run."""
    result = {}
    t = threading.Thread(
        target=lambda: result.update(zip(("run", "md"), _run(rabbit["exchange"], instance, "event", {"retries": 1})))
    )
    t.start()
    ch, queue = rabbit["channel"], rabbit["queue"]
    deadline = time.time() + 60
    while ch.queue_declare(queue, passive=True).method.message_count < 500:
        assert time.time() < deadline, "the redrive never started publishing"
        time.sleep(0.02)
    rabbit["proxy"].stop()
    time.sleep(2.5)  # longer than the retry backoff: the rest of the day fails
    t.join(120)
    rabbit["proxy"].start()
    down, md = result["run"], result["md"]
    assert not down.success and md["published"] > 0 and md["failed"] > 0 and md["unknown"] <= 1
    assert md["published"] + md["failed"] + md["unknown"] == md["selected"]
    up, md_up = _run(rabbit["exchange"], instance, "event", {"retries": 1})
    assert up.success and md_up["published"] == md["failed"] + md["unknown"]
    assert md_up["possible_duplicates"] == md["unknown"]
    got = drain(ch, queue)
    ids = [mid for _, _, _, mid in got]
    assert len(set(ids)) == md["selected"], "every event must arrive"
    assert len(ids) - len(set(ids)) <= md["unknown"], "only the publish in flight at the cut may arrive twice"
    assert all(body["event_id"] == mid for _, _, body, mid in got)


def test_a_message_refused_for_its_shape_fails_alone_in_a_batch(rabbit):
    """A 300-byte type as routing key, a body over max_message_bytes: each fails with its own
    `refused: ...` error (what the redrive counts and dead-letters); the rest of the batch, and
    the next batch on the same connection, are published."""
    from replay_defs.sinks.base import Batch
    from replay_defs.sinks.rabbitmq import RabbitMQSink

    ex = RabbitMQSink(
        f"amqp://guest:guest@127.0.0.1:{rabbit['proxy'].port}/%2F", rabbit["exchange"], max_message_bytes=2048
    )
    try:
        batch = Batch.of(
            [
                ("a", {"n": 1}, "lock"),
                ("long", {"n": 2}, "t" * 300),
                ("b", {"n": 3}, "lock"),
                ("big", {"blob": "z" * 3000}, "lock"),
                ("c", {"n": 4}, "bridge"),
            ]
        )
        errors = ex.deliver("telemetry_amqp", DAY, batch, run_id="r1")
        assert errors[0] is None and errors[2] is None and errors[4] is None, errors
        assert errors[1] == "refused: routing_key_too_long: 300 bytes > 255"
        assert errors[3].startswith("refused: body_too_large: ") and "> 2048" in errors[3]
        assert ex.deliver("telemetry_amqp", DAY, Batch.of([("d", {"n": 5}, "lock")]), run_id="r1") == [None]
    finally:
        ex.close()
    assert sorted(mid for _, _, _, mid in drain(rabbit["channel"], rabbit["queue"])) == ["a", "b", "c", "d"]


def test_the_sink_timeout_setting_reaches_the_sender(monkeypatch):
    """EVENT_REPLAY_SINK_TIMEOUT_S (a float, which Dagster's config cannot take from the
    environment) is read when the code location loads; a value that is no number names the variable."""
    import dagster as dg

    from replay_defs.definitions import build_definitions
    from replay_defs.sinks import open_sink

    spec = dataclasses.replace(TELEMETRY, redrive=RedriveSpec(sink=RabbitMQSinkSpec("x")))
    monkeypatch.setenv("EVENT_REPLAY_SINK_TIMEOUT_S", "7.5")
    with dg.build_resources({"rabbitmq": build_definitions([spec]).resources["rabbitmq"]}) as built:
        sender = open_sink(built, spec.redrive.sink)
        assert sender.timeout_s == 7.5
        sender.close()
    monkeypatch.setenv("EVENT_REPLAY_SINK_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="EVENT_REPLAY_SINK_TIMEOUT_S must be a number"):
        build_definitions([spec])
