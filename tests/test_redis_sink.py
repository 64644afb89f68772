"""Redrive into Redis: BullMQ jobs read back by a real BullMQ Worker, plain lists and streams."""

import dataclasses
import json
import threading
import time
import uuid

import dagster as dg
import duckdb
import pytest
import redis
from conftest import check_verdicts
from services import RedisServer, bullmq_consume

from replay_defs.core.lake import Lake
from replay_defs.pipeline.committed import committed_parquet
from replay_defs.pipeline.spec import RedriveSpec
from replay_defs.pipelines import TELEMETRY
from replay_defs.sinks.base import Batch, Unknown
from replay_defs.sinks.redis import RedisSink, RedisSinkSpec

DAY = "2025-11-25"


def spec_for(sink: RedisSinkSpec, unit: str = "event"):
    return dataclasses.replace(
        TELEMETRY,
        name="telemetry_redis",
        parsed_prefix="telemetry_redis_flat",
        redrive=RedriveSpec(unit=unit, sink=sink, key_field="device_id" if unit == "event" else None),
    )


def _run(spec, instance, config=None, day=DAY):
    from replay_defs.definitions import build_definitions

    job = build_definitions([spec]).resolve_job_def("telemetry_redis_replay")
    run_config = {"ops": {"telemetry_redis__redrive": {"config": config}}} if config else {}
    return job.execute_in_process(instance=instance, partition_key=day, run_config=run_config, raise_on_error=False)


def _md(result):
    (mat,) = result.asset_materializations_for_node("telemetry_redis__redrive")
    return {k: v.value for k, v in mat.metadata.items()}


def _parsed_events(env, spec, day=DAY) -> dict[str, dict]:
    """The day's events as committed (the day's directories also hold earlier versions' files)."""
    lake = Lake(env["lake"])
    files = [lake.storage.path(f) for f in committed_parquet(lake, spec, day)]
    rows = duckdb.execute("SELECT event_id, type, device_id, seq FROM read_parquet($f)", {"f": files}).fetchall()
    return {r[0]: {"type": r[1], "device_id": r[2], "seq": r[3]} for r in rows}


@pytest.fixture
def queue():
    return f"replay-test-{uuid.uuid4().hex[:8]}"


def test_bullmq_worker_gets_one_job_per_event(env, instance, redis_url, queue, monkeypatch):
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
    spec = spec_for(RedisSinkSpec(queue, mode="bullmq"))
    first = _run(spec, instance)
    assert first.success
    md = _md(first)
    events = _parsed_events(env, spec)
    assert md["published"] == md["selected"] == len(events) > 1000 and md["unit"] == "event"
    assert check_verdicts(first)[("deliveries_reconcile", DAY)] is True

    jobs = bullmq_consume(redis_url, queue)
    assert sorted(j[0] for j in jobs) == sorted(events), "the worker must see exactly the day's events, once each"
    for job_id, name, data in jobs[:200]:
        want = events[job_id]
        assert name == want["type"] and data["device_id"] == want["device_id"] and data["seq"] == want["seq"]
        assert data["ts"].endswith("Z") and data["event_id"] == job_id

    again = _run(spec, instance)
    assert again.success and _md(again)["published"] == 0 and _md(again)["skipped_already_delivered"] == len(events)
    forced = _run(spec, instance, {"force": True, "type": "lock"})
    assert forced.success
    n_lock = sum(1 for e in events.values() if e["type"] == "lock")
    assert _md(forced)["published"] == n_lock
    more = bullmq_consume(redis_url, queue)
    assert len(more) == n_lock and all(j[0].endswith(forced.run_id) for j in more), "a forced re-send is a new job"


@pytest.mark.parametrize("mode", ["list", "stream"])
def test_list_and_stream_modes_append_each_message_once(env, instance, redis_url, queue, monkeypatch, mode):
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
    spec = spec_for(RedisSinkSpec(queue, mode=mode), unit="raw_file")
    r = redis.Redis.from_url(redis_url)
    try:
        first = _run(spec, instance)
        md = _md(first)
        assert first.success and md["published"] == md["selected"] > 0
        if mode == "list":
            bodies = [json.loads(b) for b in r.lrange(queue, 0, -1)]
        else:
            entries = r.xrange(queue)
            bodies = [json.loads(fields[b"body"]) for _, fields in entries]
            assert all(fields[b"id"].decode() == json.loads(fields[b"body"])["id"] for _, fields in entries)
        assert len(bodies) == md["published"] == len({b["key"] for b in bodies})
        assert all(b["kind"] == "redrive_raw_file" for b in bodies)
        assert _md(_run(spec, instance))["published"] == 0
        assert (r.llen(queue) if mode == "list" else r.xlen(queue)) == len(bodies), "a re-run must not append again"
    finally:
        r.delete(queue, *r.keys(f"{queue}:replay-seen:*"))
        r.close()


def test_a_batch_sent_twice_is_appended_once(redis_url, queue):
    """A reply lost after the server applied a batch makes the redrive send it again: harmless."""
    sink = RedisSink(redis_url, queue, mode="list")
    r = redis.Redis.from_url(redis_url)
    try:
        batch = Batch.of([(f"m{i}", {"i": i}, "t") for i in range(5000)])
        assert sink.deliver("p", DAY, batch) == [None] * 5000
        assert sink.deliver("p", DAY, batch.slice(100, 5000)) == [None] * 4900
        assert r.llen(queue) == 5000
        assert sink.deliver("p", DAY, batch.slice(0, 10), resend=True) == [None] * 10
        assert r.llen(queue) == 5010, "a forced re-send appends again"
    finally:
        sink.close()
        r.delete(queue, *r.keys(f"{queue}:replay-seen:*"))
        r.close()


def test_wrong_key_type_fails_each_message_with_the_error(redis_url, queue):
    r = redis.Redis.from_url(redis_url)
    r.set(queue, "not a list")
    sink = RedisSink(redis_url, queue, mode="list")
    try:
        errors = sink.deliver("p", DAY, Batch.of([("a", {}, None), ("b", {}, None)]))
        assert all(e and "WRONGTYPE" in e for e in errors)
    finally:
        sink.close()
        r.delete(queue, *r.keys(f"{queue}:replay-seen:*"))
        r.close()


def test_outcomes_refused_error_reply_and_what_redis_holds(queue):
    """No server: failed at once, not in doubt. A WRONGTYPE reply: failed, and once the key is
    fixed a retry appends (the script remembers only what it appended). `held` names what the
    day's seen set and the BullMQ queue hold, nothing else."""
    server = RedisServer()
    batch = Batch.of([(f"m{i}", {"i": i}, "t") for i in range(5)])
    sink, jobs = RedisSink(server.url, queue, mode="list", timeout_s=2), RedisSink(server.url, queue, timeout_s=2)
    try:
        started = time.monotonic()
        for errors in (sink.deliver("p", DAY, batch), jobs.deliver("p", DAY, batch)):
            assert all(e and "Error 111 connecting" in e and not isinstance(e, Unknown) for e in errors), errors
        assert time.monotonic() - started < 2
        server.start()
        r = redis.Redis.from_url(server.url)
        r.set(queue, "not a list")
        assert all("WRONGTYPE" in e and not isinstance(e, Unknown) for e in sink.deliver("p", DAY, batch))
        r.delete(queue)
        assert sink.deliver("p", DAY, batch) == [None] * 5 and r.llen(queue) == 5
        assert sink.held("p", DAY, ["m0", "m4", "x"], 0) == {"m0", "m4"}
        assert sink.held("p", "2025-11-26", ["m0"], 0) == set(), "another day's seen set"
        assert jobs.deliver("p", DAY, batch.slice(0, 3)) == [None] * 3
        assert jobs.held("p", DAY, batch.ids, 0) == {"m0", "m1", "m2"}
        r.close()
    finally:
        sink.close()
        jobs.close()
        server.stop()


def test_redis_restart_mid_redrive_ends_with_every_event_delivered_once(env, instance, queue, monkeypatch):
    """Stop the server while the redrive runs (it writes an append-only file, as a production
    Redis does), start it again: the run fails with the rest counted as failed (or in doubt: the batch the stop cut off), the re-run
    settles those in doubt, sends
    the rest, and the BullMQ worker sees each event exactly once. The password never shows."""
    server = RedisServer(password="s3cret-pw", durable=True).start()
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", server.url)
    spec = spec_for(RedisSinkSpec(queue, mode="bullmq"))
    events = None
    try:
        result = {}
        config = {"rate_limit": 4000, "batch_size": 500, "retries": 1}
        t = threading.Thread(target=lambda: result.update(run=_run(spec, instance, config)))
        t.start()
        probe = redis.Redis.from_url(server.url, retry=None)
        deadline = time.time() + 60
        while probe.llen(f"bull:{queue}:wait") < 2000:
            assert time.time() < deadline, "the redrive never started delivering"
            time.sleep(0.05)
        probe.close()
        server.stop()
        time.sleep(4)  # longer than the redrive's retry backoff: those batches fail
        server.start()
        t.join(120)
        down = result["run"]
        md = _md(down)
        events = _parsed_events(env, spec)
        assert not down.success and 0 < md["published"] < len(events) and md["failed"] > 0
        assert md["published"] + md["failed"] + md["unknown"] == md["selected"] == len(events)
        logs = "\n".join(str(e) for e in instance.all_logs(down.run_id))
        assert "ConnectionError" in logs and "s3cret-pw" not in logs, "the error is shown, the password never"
        dead = (
            env["lake"] / "_replay/telemetry_redis/redrive/dead_letter" / f"day={DAY}" / f"{down.run_id}.jsonl"
        ).read_text()
        assert "s3cret-pw" not in dead

        up = _run(spec, instance)
        settled = _md(up)["reconciled"]  # in doubt, and found in Redis: recorded, not sent again
        assert up.success and _md(up)["published"] + settled == md["failed"] + md["unknown"]
        assert _md(up)["skipped_already_delivered"] == md["published"] + settled
        jobs = bullmq_consume(server.url, queue)
        assert sorted(j[0] for j in jobs) == sorted(events)
    finally:
        server.stop(keep_data=False)


def test_cli_redrive_to_bullmq_with_dry_run_then_for_real(env, redis_url, queue, monkeypatch, tmp_path):
    """A code location whose spec names a Redis sink, materialized with `dagster asset materialize`
    and run config, as CI would: the dry run sends nothing, the real run reaches the worker."""
    from test_cli import cli, home_instance, show

    location = tmp_path / "redis_location.py"
    location.write_text(
        "import dataclasses\n"
        "from replay_defs.definitions import build_definitions\n"
        "from replay_defs.pipelines import TELEMETRY\n"
        "from replay_defs.pipeline.spec import RedriveSpec\n"
        "from replay_defs.sinks.redis import RedisSinkSpec\n"
        f"SPEC = dataclasses.replace(TELEMETRY, name='telemetry_redis', parsed_prefix='telemetry_redis_flat', "
        f"redrive=RedriveSpec(unit='event', sink=RedisSinkSpec({queue!r})))\n"
        "defs = build_definitions([SPEC])\n"
    )
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
    assets = ",".join(f"telemetry_redis/{a}" for a in ("raw_events", "parsed_events", "projections", "redrive"))

    def materialize(config: dict, select: str = assets):
        run_config = json.dumps({"ops": {"telemetry_redis__redrive": {"config": config}}})
        return cli(
            "dagster",
            "asset",
            "materialize",
            "-f",
            str(location),
            "--select",
            select,
            "--partition",
            DAY,
            "--config-json",
            run_config,
        )

    dry = materialize({"dry_run": True})
    assert dry.returncode == 0, show(dry)
    r = redis.Redis.from_url(redis_url)
    assert r.exists(f"bull:{queue}:id") == 0 and r.llen(f"bull:{queue}:wait") == 0, "a dry run must send nothing"
    real = materialize({"rate_limit": 50_000}, select="telemetry_redis/redrive")  # parsed already: redrive alone
    assert real.returncode == 0, show(real)
    instance = home_instance()
    (record,) = instance.fetch_materializations(dg.AssetKey(["telemetry_redis", "redrive"]), limit=1).records
    md = {k: v.value for k, v in record.asset_materialization.metadata.items()}
    assert md["published"] == md["selected"] > 1000 and md["dry_run"] is False
    jobs = bullmq_consume(redis_url, queue)
    assert len(jobs) == md["published"] == len({j[0] for j in jobs})
    r.close()
