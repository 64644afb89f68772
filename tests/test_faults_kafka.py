"""Kafka's fault matrix (issue 18): a broker stopped before the run, frozen 30 s mid-run, the
redrive process SIGKILLed at seeded random points; each followed by a re-run. An independent
consumer (assign() on every partition) counts the `message_id` headers: exactly once."""

import json
import os
import subprocess
import time
from functools import partial

import psycopg
import pytest
from faults import frozen, judge, kill_at_random_points, ledger_summary, redrive_command, run_redrive
from redrive_process import message_ids
from services import Tansu, TcpProxy, free_port
from warm_process import WarmPopen

SINK = "kafka:{topic}"


@pytest.fixture
def broker():
    tansu = Tansu().start()
    yield tansu
    tansu.stop()


def _env(broker: Tansu) -> dict:
    return {"EVENT_REPLAY_KAFKA_BOOTSTRAP": broker.bootstrap, "EVENT_REPLAY_SINK_TIMEOUT_S": "5"}


def _delivered(dsn: str, pipeline: str, topic: str) -> int:
    try:
        return ledger_summary(dsn, pipeline, SINK.format(topic=topic))["statuses"].get("delivered", 0)
    except psycopg.errors.UndefinedTable:  # the run has not created its ledger yet
        return 0


def _consumed(broker: Tansu, topic: str) -> list[str]:
    return [dict(m.headers())["message_id"].decode() for m in broker.read_all(topic)]


def test_a_stopped_broker_fails_the_run_fast_naming_the_setting_then_a_rerun_delivers(broker, postgres_dsn):
    topic, n = "faults-stopped", 2000
    broker.stop()
    cmd = redrive_command({"kind": "kafka", "topic": topic}, postgres_dsn, n, pipeline="kafka-stopped")
    started = time.monotonic()
    down = run_redrive(cmd, _env(broker))
    assert time.monotonic() - started < 30, "a broker that refuses connections fails the run within seconds"
    assert down["failed"] == n and down["published"] == down["unknown"] == 0  # nothing was sent
    assert "EVENT_REPLAY_KAFKA_BOOTSTRAP" in down["first_error"] and broker.bootstrap in down["first_error"]
    assert ledger_summary(postgres_dsn, "kafka-stopped", SINK.format(topic=topic))["statuses"] == {"failed": n}

    broker.start()
    broker.create_topic(topic)
    up = run_redrive(cmd, _env(broker))
    assert up["published"] == n and up["failed"] == up["unknown"] == 0
    judge(_consumed(broker, topic), message_ids(n), exactly_once=True, possible_duplicates=set())


def test_a_broker_frozen_30s_mid_run_is_used_again_after_it_thaws_and_a_rerun_completes(broker, postgres_dsn):
    """60 messages/s for 50 s; the broker is SIGSTOPped for 30 s once 100 are delivered. The producer's reports time
    out (in doubt), Tansu then fences it: it is replaced, and the messages paced after the thaw go."""
    topic, n = "faults-frozen", 3000
    broker.create_topic(topic)
    sink = {"kind": "kafka", "topic": topic}
    cmd = redrive_command(sink, postgres_dsn, n, pipeline="kafka-frozen", rate=60)
    run = WarmPopen(cmd, env={**os.environ, **_env(broker)}, stdout=subprocess.PIPE, text=True)
    while _delivered(postgres_dsn, "kafka-frozen", topic) < 100:
        assert run.poll() is None, "the run ended before the broker was frozen"
        time.sleep(0.2)
    with frozen(broker.proc.pid, 30):
        pass
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0
    first = json.loads(out.strip().splitlines()[-1])
    assert first["unknown"] > 0, "deliveries sent to the frozen broker are in doubt, not failed"
    assert first["published"] + first["failed"] + first["unknown"] == n
    after = _consumed(broker, topic)
    assert any(int(m[1:]) >= 2700 for m in after), "the broker is used again after it thawed"

    again = run_redrive(redrive_command(sink, postgres_dsn, n, pipeline="kafka-frozen"), _env(broker))
    assert again["reconciled"] + again["published"] == first["failed"] + first["unknown"]
    assert again["failed"] == again["unknown"] == 0
    judge(_consumed(broker, topic), message_ids(n), exactly_once=True, possible_duplicates=set())
    assert ledger_summary(postgres_dsn, "kafka-frozen", SINK.format(topic=topic))["statuses"] == {"delivered": n}


@pytest.fixture
def proxied_broker():
    """A broker its clients reach through a `TcpProxy` (it advertises the proxy's port)."""
    tansu = Tansu(advertised_port=free_port())
    proxy = TcpProxy(tansu.port, port=tansu.advertised_port).start()
    tansu.start()
    yield tansu, proxy
    tansu.stop()
    proxy.stop()


def test_five_seeded_kills_mid_delivery_then_a_rerun_leave_every_message_once(proxied_broker, postgres_dsn):
    """Paced at 100/s, each of five runs is killed 0.5 to 3 s after it starts delivering (counted from its
    first recorded delivery, not from its start: start-up takes 2 to 10 s on a busy machine), so five
    runs send at most 1,500 of the 5,000 before their kills."""
    broker, proxy = proxied_broker
    topic, n = "faults-killed", 5000
    broker.create_topic(topic)
    sink = {"kind": "kafka", "topic": topic}
    paced = redrive_command(sink, postgres_dsn, n, pipeline="kafka-killed", rate=100)
    delivered = partial(_delivered, postgres_dsn, "kafka-killed", topic)
    kill_at_random_points(paced, seed=18, kills=5, window_s=(0.5, 3.0), env=_env(broker), held=delivered)
    before = _delivered(postgres_dsn, "kafka-killed", topic)
    assert 0 < before < n, "the kills landed mid-delivery"
    # A sixth run killed with a chunk surely stored but not confirmed: one batch, whose messages in
    # doubt are settled first (recorded as delivered, up to `in_doubt` of them). Once more than those
    # are delivered, its producer has had produce replies; the broker's next replies are held until
    # it is killed, and a held reply is then a chunk the broker took.
    statuses = ledger_summary(postgres_dsn, "kafka-killed", SINK.format(topic=topic))["statuses"]
    in_doubt = sum(statuses.values()) - statuses.get("delivered", 0)
    one_batch = redrive_command(sink, postgres_dsn, n, pipeline="kafka-killed", rate=100, batch_size=n)
    run = WarmPopen(one_batch, env={**os.environ, **_env(broker)}, stdout=subprocess.DEVNULL)
    while _delivered(postgres_dsn, "kafka-killed", topic) <= before + in_doubt:
        assert run.poll() is None, "the sixth run ended before it delivered"
        time.sleep(0.1)
    proxy.freeze(replies_only=True)
    deadline = time.monotonic() + 10
    while proxy.held_replies == 0:
        assert time.monotonic() < deadline, "the sixth run sent nothing more"
        time.sleep(0.05)
    run.kill()
    run.wait(10)
    proxy.thaw()
    final = run_redrive(redrive_command(sink, postgres_dsn, n, pipeline="kafka-killed"), _env(broker))
    assert final["reconciled"] > 0, "messages a killed run sent but never recorded are found, not sent again"
    assert final["failed"] == final["unknown"] == final["possible_duplicates"] == 0
    judge(_consumed(broker, topic), message_ids(n), exactly_once=True, possible_duplicates=set())
    assert ledger_summary(postgres_dsn, "kafka-killed", SINK.format(topic=topic))["statuses"] == {"delivered": n}
