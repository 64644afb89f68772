"""The SQS fault matrix (issue 18): a FIFO queue (its 5-minute deduplication makes a re-send of
messages in doubt harmless: exactly once) and a standard queue (it cannot say what it holds: every
duplicate must be one the ledger marks as a possible duplicate), side by side in each test, on
moto in its own process (`MotoProcess`, frozen with SIGSTOP). Each ends with a re-run and an
independent consumer (boto3 receive_message + delete) counting by the body's id.

moto deduplicates a FIFO re-send only against messages still on the queue (AWS: whether or not
they were consumed), so the consumer reads once, after the re-run. moto's SQS calls slow
as a queue grows (each looks at every message; tests/moto_speedups.py makes that 5x cheaper), hence a
few hundred messages a queue."""

import json
import os
import subprocess
import threading
import time
import uuid

import psycopg
import pytest
from faults import frozen, judge, kill_at_random_points, ledger_summary, redrive_command, run_redrive
from redrive_process import message_ids
from services import MotoProcess
from warm_process import WarmPopen

from replay_defs.core.ledger import SENDING, UNKNOWN, open_ledger
from replay_defs.pipeline import delivery as rd
from replay_defs.pipeline.store import DuckDBStore
from replay_defs.sinks.base import Batch, unknown

KINDS = ("fifo", "standard")
TIMEOUT_S = 20  # EVENT_REPLAY_SINK_TIMEOUT_S: a call gets 5 s to connect and 5 s to be answered


@pytest.fixture
def moto():
    server = MotoProcess().start()
    yield server
    server.stop()


def _env(moto) -> dict:
    return {
        "EVENT_REPLAY_SQS_ENDPOINT": moto.endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "EVENT_REPLAY_SINK_TIMEOUT_S": str(TIMEOUT_S),
    }


def _queues(test: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"fifo": f"{test}-{tag}.fifo", "standard": f"{test}-{tag}"}


def _create(moto, queues: dict[str, str]) -> None:
    for kind, queue in queues.items():
        moto.client("sqs").create_queue(QueueName=queue, Attributes={"FifoQueue": "true"} if kind == "fifo" else {})


def _commands(queues, ledger: str, messages: int, **options) -> dict[str, list[str]]:
    return {
        kind: redrive_command({"kind": "sqs", "queue": q}, ledger, messages, pipeline=q, **options)
        for kind, q in queues.items()
    }


def _run_both(commands: dict[str, list[str]], env: dict) -> dict[str, dict]:
    """Both redrives at once (each in its process); their counts."""
    out: dict[str, dict] = {}
    threads = [
        threading.Thread(target=lambda k=k, c=c: out.update({k: run_redrive(c, env)})) for k, c in commands.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(out) == set(commands), "a redrive process failed (see the thread's error above)"
    return out


def _consume(moto, queue: str) -> list[str]:
    return [json.loads(m["Body"])["id"] for m in moto.drain(queue)]


def _judge(moto, postgres_dsn, kind: str, queue: str, messages: int, reported_dups: int | None) -> dict:
    """The consumer's count for one queue; `reported_dups`: the runs' possible duplicates, which
    must add up to the ledger's (None when a killed run's counts were lost)."""
    ledger = ledger_summary(postgres_dsn, queue, f"sqs:{queue}")
    dups = ledger["possible_duplicates"]
    if kind == "fifo":
        assert not dups, "a FIFO re-send within 5 minutes is deduplicated: no possible duplicates"
    if reported_dups is not None:
        assert reported_dups == len(dups)
    assert ledger["statuses"] == {"delivered": messages}
    consumed = _consume(moto, queue)
    judge(consumed, message_ids(messages), exactly_once=kind == "fifo", possible_duplicates=dups)
    return {"consumed": len(consumed), "ledger_possible_duplicates": len(dups)}


def test_endpoint_down_before_the_run_fails_fast_then_a_rerun_delivers(moto, postgres_dsn):
    """A few thousand messages fail in seconds (each chunk retried twice, then the target counts
    as down) with an error naming the endpoint and its variable; a re-run delivers them."""
    n, queues, env = 400, _queues("down"), _env(moto)
    _create(moto, queues)
    moto.stop()
    started = time.monotonic()
    big = {
        k: redrive_command({"kind": "sqs", "queue": q}, postgres_dsn, 5000, pipeline=q + "-5k")
        for k, q in queues.items()
    }
    down = _run_both(big, env)
    took = time.monotonic() - started
    assert took < 40, f"5000 messages to a dead endpoint took {took:.0f} s to fail"
    down = _run_both(_commands(queues, postgres_dsn, n), env) | {k + "-5k": c for k, c in down.items()}
    for counts in down.values():
        assert counts["failed"] == counts["selected"] and counts["published"] == counts["unknown"] == 0
        assert "EVENT_REPLAY_SQS_ENDPOINT" in counts["first_error"] and moto.endpoint in counts["first_error"]
    moto.start()  # a new moto: the queues are gone with its state
    _create(moto, queues)
    up = _run_both(_commands(queues, postgres_dsn, n), env)
    for kind, queue in queues.items():
        assert up[kind]["published"] == n
        _judge(moto, postgres_dsn, kind, queue, n, up[kind]["possible_duplicates"])


def _depth(moto, queue: str) -> int:
    sqs = moto.client("sqs")
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"])


def test_moto_frozen_30s_mid_run_then_a_rerun(moto, postgres_dsn):
    """Frozen, moto answers nothing: calls time out after they were sent (in doubt), later chunks
    fail at once; thawed, it stores what it had received, and the run goes on. The re-run
    re-sends what is in doubt: deduplicated by the FIFO queue, possible duplicates on the other."""
    n, queues, env = 500, _queues("frozen"), _env(moto)
    _create(moto, queues)
    procs = {
        kind: WarmPopen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
        for kind, cmd in _commands(queues, postgres_dsn, n, rate=10).items()
    }
    deadline = time.monotonic() + 60
    while min(_depth(moto, q) for q in queues.values()) < 30:
        assert time.monotonic() < deadline, "the redrives never started delivering"
        time.sleep(0.2)
    with frozen(moto.server.pid, 30):
        outs = {kind: p.communicate(timeout=120)[0] for kind, p in procs.items()}
    first = {kind: json.loads(out.strip().splitlines()[-1]) for kind, out in outs.items()}
    for kind, queue in queues.items():
        counts = first[kind]
        assert counts["unknown"] > 0 and counts["failed"] > 0 and 30 <= counts["published"] < n, counts
        last = ledger_summary(postgres_dsn, queue, f"sqs:{queue}")
        assert last["statuses"].get("delivered", 0) == counts["published"]
    again = _run_both(_commands(queues, postgres_dsn, n), env)
    for kind, queue in queues.items():
        dups = first[kind]["possible_duplicates"] + again[kind]["possible_duplicates"]
        seen = _judge(moto, postgres_dsn, kind, queue, n, dups)
        if kind == "standard":  # the calls that timed out were stored: real duplicates, all marked
            assert again[kind]["possible_duplicates"] >= first["standard"]["unknown"] > 0
            assert seen["consumed"] > n, "moto stored none of the calls that timed out: nothing was in doubt"
    for queue in queues.values():  # SQS was used again once thawed, in the same run
        assert _delivered_in(postgres_dsn, queue, message_ids(n)[-n // 5 :]) > 0


def _delivered_in(dsn: str, queue: str, ids: list[str]) -> int:
    with psycopg.connect(dsn) as con:
        return con.execute(
            "SELECT count(*) FROM redrive_ledger WHERE pipeline = %s AND status = 'delivered' AND message_id = ANY(%s)",
            (queue, ids),
        ).fetchone()[0]


def test_five_seeded_sigkills_then_a_rerun(moto, postgres_dsn):
    """Killed at random points, a run leaves its chunk in flight recorded as sent (`sending`), never
    unrecorded: no message on the queue lacks a ledger row. The re-run re-sends what is in doubt."""
    n, queues, env = 600, _queues("kill"), _env(moto)
    _create(moto, queues)
    commands = _commands(queues, postgres_dsn, n, rate=8)
    # Kill points 1 to 4 s after the run's first delivery (start-up takes 2 to 10 s), while it
    # delivers; 5 kills stay far inside the FIFO queue's 5-minute deduplication window.
    threads = [
        threading.Thread(
            target=kill_at_random_points,
            args=(cmd, seed, 5, (1.0, 4.0), env),
            kwargs={"held": lambda q=queue: _depth(moto, q)},
        )
        for seed, (cmd, queue) in enumerate(zip(commands.values(), queues.values()), start=18)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for kind, queue in queues.items():
        statuses = ledger_summary(postgres_dsn, queue, f"sqs:{queue}")["statuses"]
        in_doubt = statuses.get(SENDING, 0) + statuses.get(UNKNOWN, 0)
        assert in_doubt > 0 and statuses.get("delivered", 0) > 0, statuses
        if kind == "fifo":  # no duplicates there: every message on it is delivered or in doubt
            assert _depth(moto, queue) <= statuses["delivered"] + in_doubt
    again = _run_both(_commands(queues, postgres_dsn, n), env)  # the re-run unpaced
    for kind, queue in queues.items():
        assert 0 < again[kind]["published"] < n and again[kind]["skipped_already_delivered"] > 0
        _judge(moto, postgres_dsn, kind, queue, n, None)


def test_a_refusal_after_an_attempt_in_doubt_stays_in_doubt(tmp_path):
    """The delivery loop (core): an attempt in doubt, then a refusal (SQS timed out, then went
    away): the message may be held, so it is recorded in doubt, not failed."""

    class TimesOutThenRefuses:
        name = "sqs:scripted"
        answers = [unknown("ReadTimeoutError"), "EndpointConnectionError"]

        def deliver(self, pipeline, day, batch, run_id="", resend=False):
            return [self.answers.pop(0) if self.answers else "EndpointConnectionError"] * len(batch)

        def close(self):
            pass

    with open_ledger(None, DuckDBStore(tmp_path / "l.duckdb")) as ledger:
        batch = Batch.of([("a", {}, None)])
        counts = rd.redrive(
            TimesOutThenRefuses(), ledger, "p", "2025-11-25", [batch], "r", retries=1, retry_backoff_s=0
        )
        assert counts.unknown == 1 and counts.failed == 0
        assert ledger.in_doubt("p", "sqs:scripted", ["a"]).keys() == {"a"}
