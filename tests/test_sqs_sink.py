"""Redrive into SQS (moto's server mode), read back with boto3 receive_message."""

import dataclasses
import json
import threading
import time

import pytest
from services import Moto

from replay_defs.pipeline.spec import RedriveSpec
from replay_defs.pipelines import TELEMETRY
from replay_defs.sinks.base import Batch, Unknown
from replay_defs.sinks.sqs import SqsSink, SqsSinkSpec

DAY = "2025-11-25"


def spec_for(queue: str, max_visible=None):
    return dataclasses.replace(
        TELEMETRY,
        name="telemetry_sqs",
        parsed_prefix="telemetry_sqs_flat",
        redrive=RedriveSpec(sink=SqsSinkSpec(queue, max_visible)),
    )


@pytest.fixture
def moto(monkeypatch):
    server = Moto().start()
    monkeypatch.setenv("EVENT_REPLAY_SQS_ENDPOINT", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    yield server
    server.stop()


def _run(spec, instance, config=None):
    from replay_defs.definitions import build_definitions

    job = build_definitions([spec]).resolve_job_def("telemetry_sqs_replay")
    return job.execute_in_process(instance=instance, partition_key=DAY, run_config=config or {}, raise_on_error=False)


def _md(result):
    (mat,) = result.asset_materializations_for_node("telemetry_sqs__redrive")
    return {k: v.value for k, v in mat.metadata.items()}


def test_each_raw_file_becomes_one_redrive_raw_file_message(env, instance, moto):
    moto.client("sqs").create_queue(QueueName="redrive")
    first = _run(spec_for("redrive"), instance)
    assert first.success
    md = _md(first)
    assert md["published"] == md["selected"] > 0 and md["failed"] == 0
    got = moto.drain("redrive")
    assert len(got) == md["published"]
    bodies = [json.loads(m["Body"]) for m in got]
    assert len({b["key"] for b in bodies}) == len(bodies)
    assert all(
        b["kind"] == "redrive_raw_file" and b["bucket"] and b["key"].startswith("raw/json_telemetry/") for b in bodies
    )
    assert all(m["MessageAttributes"]["replay_run_id"]["StringValue"] == first.run_id for m in got)
    again = _run(spec_for("redrive"), instance)
    assert again.success and _md(again)["published"] == 0
    assert moto.drain("redrive") == []


def test_fifo_queue_gets_deduplication_ids_and_force_is_not_swallowed(env, instance, moto):
    moto.client("sqs").create_queue(QueueName="redrive.fifo", Attributes={"FifoQueue": "true"})
    first = _run(spec_for("redrive.fifo"), instance)
    n = _md(first)["published"]
    assert first.success and len(moto.drain("redrive.fifo")) == n > 0
    forced = _run(spec_for("redrive.fifo"), instance, {"ops": {"telemetry_sqs__redrive": {"config": {"force": True}}}})
    assert forced.success and _md(forced)["published"] == n
    assert len(moto.drain("redrive.fifo")) == n, "a forced re-send within 5 minutes must still arrive"


def test_an_entry_the_queue_refuses_fails_alone_as_refused(moto):
    """A message too big for the queue refuses its whole SendMessageBatch (moto): the entries are
    then sent one by one, and only the culprit fails, as a refusal (the queue does not hold it)."""
    sqs = moto.client("sqs")
    sqs.create_queue(QueueName="small", Attributes={"MaximumMessageSize": "1024"})
    sink = SqsSink(sqs, "small")
    msgs = Batch.of([("ok", {"x": "a"}, None), ("big", {"x": "b" * 4000}, None), ("ok2", {"x": "c"}, None)])
    errors = sink.deliver("p", DAY, msgs, run_id="r")
    assert errors[0] is None and errors[2] is None
    assert "1024 bytes" in errors[1] and not isinstance(errors[1], Unknown)
    assert sorted(json.loads(m["Body"])["id"] for m in moto.drain("small")) == ["ok", "ok2"]


def test_backpressure_pauses_until_a_consumer_drains_the_queue(moto):
    sqs = moto.client("sqs")
    sqs.create_queue(QueueName="slow")
    sink = SqsSink(sqs, "slow", max_visible=15, poll_s=0.2)
    received, stop = [], threading.Event()

    def consumer():  # a slow downstream: a few messages every half second
        own = moto.client("sqs")
        while not stop.is_set():
            time.sleep(0.5)
            received.extend(_take(own, "slow", 5))

    t = threading.Thread(target=consumer, daemon=True)
    t.start()
    msgs = Batch.of([(f"m{i}", {"i": i}, None) for i in range(60)])
    errors = sink.deliver("p", DAY, msgs, run_id="r")
    time.sleep(1.5)
    stop.set()
    t.join(5)
    received += moto.drain("slow")
    assert errors == [None] * 60
    assert sink.paused_s > 0, "the sink never waited although the queue was over its limit"
    assert sorted(json.loads(m["Body"])["i"] for m in received) == list(range(60))


def _take(sqs, queue: str, n: int) -> list[dict]:
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    batch = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=n).get("Messages", [])
    if batch:
        sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)]
        )
    return batch


def test_endpoint_outage_fails_the_run_then_a_rerun_delivers_exactly_once(env, instance, moto):
    moto.client("sqs").create_queue(QueueName="redrive")
    spec = spec_for("redrive")
    moto.stop()
    down = _run(
        spec, instance, {"ops": {"telemetry_sqs__redrive": {"config": {"retries": 0}}}}
    )  # no backoff: it is down
    md = _md(down)
    assert md["failed"] == md["selected"] > 0 and not down.success
    moto.start()
    moto.client("sqs").create_queue(QueueName="redrive")
    up = _run(spec, instance)
    assert up.success and _md(up)["published"] == md["selected"]
    got = moto.drain("redrive")
    assert len(got) == md["selected"] == len({json.loads(m["Body"])["key"] for m in got})
