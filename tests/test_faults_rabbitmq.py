"""The fault matrix of the RabbitMQ sink (issue 18). The redrive process (`redrive_process.py`)
publishes through a `TcpProxy` in front of the machine's broker, which is never stopped nor frozen
itself: the proxy is not listening before a run, frozen (bytes held, sockets open: a hung broker) or
cut mid-run, or the process is SIGKILLed; a re-run then completes the day. A pika consumer on a
queue bound to the test's own exchange counts the deliveries by their `message_id` property.
RabbitMQ cannot say which messages it holds, so every message must arrive at least once, and every
duplicate must be one the ledger marks as a possible duplicate."""

import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from types import SimpleNamespace

import faults
import pika
import pytest
from redrive_process import message_ids
from services import TcpProxy, rabbitmq_port
from warm_process import WarmPopen

TIMEOUT_S = 5  # EVENT_REPLAY_SINK_TIMEOUT_S: a connect gives up in 5 s, a hung broker is found within 12 s
HUNG_FOUND_WITHIN_S = 12


@contextmanager
def amqp(port: int):
    conn = pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F"))
    try:
        yield conn.channel()
    finally:
        conn.close()


@pytest.fixture
def rabbit(postgres_dsn):
    """A durable topic exchange of the test's own with a queue bound to everything, and a proxy in
    front of the broker (not started: each test starts it when the broker is to be reachable)."""
    port, name = rabbitmq_port(), f"faults-{uuid.uuid4().hex[:10]}"
    with amqp(port) as ch:
        ch.exchange_declare(name, "topic", durable=True)
        ch.queue_declare(name, durable=True)
        ch.queue_bind(name, name, "#")
    proxy = TcpProxy(port)
    env = {
        "EVENT_REPLAY_RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F",
        "EVENT_REPLAY_SINK_TIMEOUT_S": str(TIMEOUT_S),
    }

    def command(messages: int, **options) -> list[str]:
        return faults.redrive_command(
            {"kind": "rabbitmq", "exchange": name}, postgres_dsn, messages, pipeline=name, **options
        )

    yield SimpleNamespace(port=port, name=name, proxy=proxy, env=env, command=command, ledger=postgres_dsn)
    proxy.stop()
    with amqp(port) as ch:
        ch.queue_delete(name)
        ch.exchange_delete(name)


def depth(rabbit) -> int:
    with amqp(rabbit.port) as ch:
        return ch.queue_declare(rabbit.name, passive=True).method.message_count


def consumed_ids(rabbit) -> list[str]:
    """Every message on the queue (taken off it), by its `message_id` property."""
    ids = []
    with amqp(rabbit.port) as ch:
        ch.basic_qos(prefetch_count=1000)
        for method, props, _ in ch.consume(rabbit.name, auto_ack=True, inactivity_timeout=1):
            if method is None:  # a second without a message: the queue is drained
                return ids
            ids.append(props.message_id)
    return ids


def judge(rabbit, messages: int, runs: list[dict]) -> dict:
    """The consumer's count against the ledger: every message at least once, every duplicate a
    possible duplicate the ledger marks, all of which the runs' counts reported."""
    ledger = faults.ledger_summary(rabbit.ledger, rabbit.name, f"rabbitmq:{rabbit.name}")
    faults.judge(consumed_ids(rabbit), message_ids(messages), False, ledger["possible_duplicates"])
    assert ledger["statuses"] == {"delivered": messages}
    assert sum(r["possible_duplicates"] for r in runs) == len(ledger["possible_duplicates"])
    return ledger


def started(cmd: list[str], env: dict) -> tuple[subprocess.Popen, list[tuple[float, str]]]:
    """The redrive process, its log lines kept with the time each came."""
    proc = WarmPopen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: lines.extend((time.monotonic(), ln) for ln in proc.stderr), daemon=True).start()
    return proc, lines


def finished(proc: subprocess.Popen, lines) -> dict:
    """The process's counts once it ended (its stdout is that one line, its stderr read by `started`)."""
    assert proc.wait(120) == 0, "".join(ln for _, ln in lines)[-3000:]
    return json.loads(proc.stdout.read().strip().splitlines()[-1])


def wait_for_depth(rabbit, proc, n: int) -> None:
    deadline = time.monotonic() + 60
    while depth(rabbit) < n:
        assert proc.poll() is None and time.monotonic() < deadline, "the redrive never got going"
        time.sleep(0.1)


def test_broker_down_before_the_run_fails_fast_then_a_rerun_delivers(rabbit):
    """Nothing listens where the URL points: every message fails as not sent (none in doubt),
    fast, with an error naming the variable to set; once it listens, a re-run delivers each once."""
    cmd = rabbit.command(2000)
    t0 = time.monotonic()
    down = faults.run_redrive(cmd, rabbit.env)
    took = time.monotonic() - t0
    assert down["failed"] == 2000 and down["published"] == down["unknown"] == 0, down
    assert took < 20, f"a broker that refuses connections took {took:.1f}s to fail the day"
    assert "EVENT_REPLAY_RABBITMQ_URL" in down["first_error"] and "guest:guest@" not in down["first_error"]
    assert depth(rabbit) == 0
    rabbit.proxy.start()
    up = faults.run_redrive(cmd, rabbit.env)
    assert up["published"] == 2000 and up["possible_duplicates"] == 0, up
    assert not judge(rabbit, 2000, [down, up])["possible_duplicates"]


def test_broker_frozen_30s_mid_run_is_found_in_time_then_a_rerun_delivers(rabbit):
    """The proxy stops forwarding for 30 s mid-run (a hung broker: sockets open, no answer). The
    publish in flight is found in doubt within the heartbeat bound, not waited on forever; the rest
    fails as not sent. The re-run sends the failed ones and the one in doubt, as a possible duplicate."""
    rabbit.proxy.start()
    proc, lines = started(rabbit.command(3000, rate=1000), rabbit.env)
    wait_for_depth(rabbit, proc, 300)
    rabbit.proxy.freeze()
    frozen_at = time.monotonic()
    time.sleep(30)
    rabbit.proxy.thaw()
    down = finished(proc, lines)
    found = [t for t, ln in lines if "in doubt (unknown: connection lost" in ln]
    assert found and found[0] - frozen_at < HUNG_FOUND_WITHIN_S + 2, "".join(ln for _, ln in lines)[-3000:]
    print(f"hung broker found after {found[0] - frozen_at:.1f}s")
    assert down["unknown"] == 1, down  # the publish in flight; what was never written is failed
    up = faults.run_redrive(rabbit.command(3000), rabbit.env)
    assert up["published"] == down["failed"] + down["unknown"] and up["possible_duplicates"] == down["unknown"], up
    judge(rabbit, 3000, [down, up])


def test_connection_cut_mid_run_then_a_rerun_delivers(rabbit):
    """The proxy closes every connection mid-run and listens again 10 s later: the publish in
    flight is in doubt, the rest fails as not sent until the run's probe finds the broker back and
    uses it again; the re-run sends what is left, the one in doubt as a possible duplicate."""
    rabbit.proxy.start()
    proc, lines = started(rabbit.command(2400, rate=150), rabbit.env)
    wait_for_depth(rabbit, proc, 300)
    rabbit.proxy.stop()
    at_cut = depth(rabbit)
    time.sleep(10)
    rabbit.proxy.start()
    down = finished(proc, lines)
    assert down["unknown"] <= 1 and down["failed"] > 0, down
    assert depth(rabbit) > at_cut + 100, "the broker back mid-run was not used again"
    up = faults.run_redrive(rabbit.command(2400), rabbit.env)
    assert up["published"] == down["failed"] + down["unknown"] and up["possible_duplicates"] == down["unknown"], up
    judge(rabbit, 2400, [down, up])


def kill_mid_delivery(rabbit, cmd: list[str], seed: int, kills: int, window_s: tuple[float, float]) -> list[float]:
    """`faults.kill_at_random_points`, each seeded delay counted from the run's first delivery (the
    queue grew) rather than from its start: the process's imports take 2 to 8 s on a loaded machine."""
    rng = random.Random(seed)
    delays = sorted(round(rng.uniform(*window_s), 2) for _ in range(kills))
    for delay in delays:
        proc, lines = started(cmd, rabbit.env)
        wait_for_depth(rabbit, proc, depth(rabbit) + 1)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before its kill point: {''.join(ln for _, ln in lines)[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    return delays


def test_redrive_killed_at_5_random_points_then_a_rerun_delivers(rabbit):
    """SIGKILLed mid-delivery at 5 seeded points: each kill leaves its chunks in flight in doubt
    (`sending`); the next run sends them again as possible duplicates (some are real: confirmed,
    killed before recorded). Killed runs report no counts, so the last run's possible duplicates
    are a part of the ledger's."""
    rabbit.proxy.start()
    kill_mid_delivery(rabbit, rabbit.command(4000, rate=200), seed=18, kills=5, window_s=(0.2, 3.0))
    assert depth(rabbit) > 0
    last = faults.run_redrive(rabbit.command(4000), rabbit.env)
    ledger = faults.ledger_summary(rabbit.ledger, rabbit.name, f"rabbitmq:{rabbit.name}")
    assert ledger["possible_duplicates"], "a kill mid-delivery leaves a chunk in doubt"
    assert 0 < last["published"] < 4000 and last["possible_duplicates"] <= len(ledger["possible_duplicates"]), last
    faults.judge(consumed_ids(rabbit), message_ids(4000), False, ledger["possible_duplicates"])
    assert ledger["statuses"] == {"delivered": 4000}
