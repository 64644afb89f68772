"""The fault matrix of the Redis sink (issue 18), for each of its modes (BullMQ jobs, list,
stream) against a private redis-server, each counted by an independent consumer by message id: a
BullMQ Worker, LRANGE, XRANGE. (Not durable: nothing is stored before it is stopped, and a server
that fsyncs every write slows the BullMQ worker several times over.)
Redis can tell what it holds (job keys, the append script's seen set), so every message must
arrive exactly once. The three modes' redrive processes run side by side in each test."""

import json
import os
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg
import pytest
import redis
from faults import frozen, judge, kill_at_random_points, ledger_summary, redrive_command, run_redrive
from redrive_process import message_ids
from services import RedisServer, bullmq_consume
from warm_process import WarmPopen

DAY = "2025-11-25"
TIMEOUT_S = 3  # EVENT_REPLAY_SINK_TIMEOUT_S: how long a delivery waits for a frozen server


@pytest.fixture(scope="module")
def server():
    s = RedisServer().start()
    yield s
    s.stop()


@dataclass
class Target:
    """One mode's key and pipeline, and its consumer."""

    mode: str
    key: str = field(default_factory=lambda: f"faults-{uuid.uuid4().hex[:8]}")
    taken: list[str] = field(default_factory=list)  # the jobs the BullMQ worker has processed so far

    @property
    def sink(self) -> str:
        return f"redis:{self.mode}:{self.key}"

    def command(self, ledger_url: str, messages: int, **options) -> list[str]:
        spec = {"kind": "redis", "key": self.key, "mode": self.mode}
        return redrive_command(spec, ledger_url, messages, pipeline=self.key, day=DAY, **options)

    def consumed(self, url: str) -> list[str]:
        """Every message id the consumer has seen, once per copy."""
        if self.mode == "bullmq":
            self.taken += [job_id for job_id, _, _ in bullmq_consume(url, self.key)]
            return list(self.taken)
        r = redis.Redis.from_url(url)
        try:
            if self.mode == "list":
                return [json.loads(body)["id"] for body in r.lrange(self.key, 0, -1)]
            return [fields[b"id"].decode() for _, fields in r.xrange(self.key)]
        finally:
            r.close()

    def held(self, url: str) -> int:
        """How many messages Redis holds for the consumer (BullMQ: jobs waiting)."""
        r = redis.Redis.from_url(url)
        try:
            if self.mode == "bullmq":
                return r.llen(f"bull:{self.key}:wait")
            return r.llen(self.key) if self.mode == "list" else r.xlen(self.key)
        finally:
            r.close()

    def started(self, url: str) -> bool:
        return self.held(url) > 0


def targets() -> list[Target]:
    return [Target("bullmq"), Target("list"), Target("stream")]


def each(function, items) -> list:
    """`function` over the three modes at once."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(function, items))


def env(server: RedisServer) -> dict:
    return {"EVENT_REPLAY_REDIS_URL": server.url, "EVENT_REPLAY_SINK_TIMEOUT_S": str(TIMEOUT_S)}


def in_doubt(ledger_url: str, t: Target) -> set[str]:
    with psycopg.connect(ledger_url) as con:
        rows = con.execute(
            "SELECT message_id FROM redrive_ledger WHERE pipeline = %s AND sink = %s AND status IN ('sending', 'unknown')",
            (t.key, t.sink),
        ).fetchall()
    return {r[0] for r in rows}


def rerun_delivers_each_message_once(server, ledger_url: str, ts: list[Target], n: int) -> list[dict]:
    """The re-run after a fault: what Redis holds of the ids left in doubt (as the consumer saw
    them) is recorded without being sent again, the rest is sent; every message arrives once in
    each mode, and the ledger holds them all as delivered."""
    before = {t.mode: set(t.consumed(server.url)) for t in ts}
    doubt = {t.mode: in_doubt(ledger_url, t) for t in ts}
    delivered = {t.mode: ledger_summary(ledger_url, t.key, t.sink)["statuses"].get("delivered", 0) for t in ts}
    counts = each(lambda t: run_redrive(t.command(ledger_url, n), env(server)), ts)
    for t, c in zip(ts, counts):
        assert c["reconciled"] == len(doubt[t.mode] & before[t.mode]), (t.mode, c)
        assert c["published"] + c["reconciled"] == n - delivered[t.mode], (t.mode, c)
        assert c["failed"] == c["unknown"] == c["possible_duplicates"] == 0, (t.mode, c)
        judge(t.consumed(server.url), message_ids(n), exactly_once=True, possible_duplicates=set())
        assert ledger_summary(ledger_url, t.key, t.sink)["statuses"] == {"delivered": n}, t.mode
    return counts


def test_server_stopped_before_the_run_fails_fast_then_a_rerun_delivers(server, postgres_dsn):
    ts, n = targets(), 300
    server.stop()
    try:
        started = time.monotonic()
        down = each(lambda t: run_redrive(t.command(postgres_dsn, n, retries=1, backoff=0.2), env(server)), ts)
        took = time.monotonic() - started
    finally:
        server.start()
    for t, c in zip(ts, down):
        assert c["failed"] == n and c["published"] == c["unknown"] == 0, (t.mode, c)
        assert f"Error 111 connecting to 127.0.0.1:{server.port}" in c["first_error"], c["first_error"]
        assert ledger_summary(postgres_dsn, t.key, t.sink)["statuses"] == {"failed": n}
    assert took < 30, f"three runs against a stopped server took {took:.0f}s: the refusal must fail them at once"
    up = rerun_delivers_each_message_once(server, postgres_dsn, ts, n)
    assert all(c["published"] == n for c in up)


def test_server_frozen_mid_run_is_used_again_when_it_thaws_then_a_rerun_delivers_each_message_once(
    server, postgres_dsn
):
    """SIGSTOP for 30 s while the three modes deliver: the batch in flight times out (in doubt),
    later ones fail at once while Redis counts as down, and a probe puts it back in use after the
    thaw, within the same run."""
    ts, n = targets(), 3500
    procs = [
        WarmPopen(
            t.command(postgres_dsn, n, rate=100, retries=1, backoff=0.5),
            env={**os.environ, **env(server)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for t in ts
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(t.started(server.url) for t in ts):
            assert time.monotonic() < deadline, "the redrives never started delivering"
            time.sleep(0.1)
        with frozen(server.proc.pid, 30):
            pass
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for t, p, (out, err) in zip(ts, procs, outs):
        assert p.returncode == 0, err[-3000:]
        c = json.loads(out.strip().splitlines()[-1])
        assert c["unknown"] > 0 and c["failed"] > 0 and c["published"] > 0, (t.mode, c)
        assert c["published"] + c["failed"] + c["unknown"] == n, (t.mode, c)
        assert message_ids(n)[-1] in t.consumed(server.url), f"{t.mode}: Redis was not used again after the thaw"
    again = rerun_delivers_each_message_once(server, postgres_dsn, ts, n)
    # The list and stream batch frozen in flight was sent (EVALSHA) and ran at the thaw: found, not
    # re-sent. BullMQ's pipeline first asks SCRIPT EXISTS, so its frozen batch never left: re-sent.
    assert again[1]["reconciled"] > 0 and again[2]["reconciled"] > 0, again


def test_redrive_killed_at_random_points_then_a_rerun_delivers_each_message_once(server, postgres_dsn):
    """Five seeded SIGKILLs per mode while it delivers (paced at 40/s; each 1 to 5 s after the run's
    first delivery, as a process takes 2-10 s to start on a loaded machine), then the re-run."""
    ts, n = targets(), 3000
    each(
        lambda ts_seed: kill_at_random_points(
            ts_seed[0].command(postgres_dsn, n, rate=40),
            seed=ts_seed[1],
            kills=5,
            window_s=(1, 5),
            env=env(server),
            held=lambda: ts_seed[0].held(server.url),
        ),
        [(t, 18 + i) for i, t in enumerate(ts)],
    )
    for t in ts:
        assert in_doubt(postgres_dsn, t), f"{t.mode}: the kills must land mid-delivery"
    rerun_delivers_each_message_once(server, postgres_dsn, ts, n)
