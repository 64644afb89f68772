"""`event-replay status` and a run's metadata show each sink's delivered / failed / in doubt /
possible duplicates for a day, across runs — read from the ledger, compared here with what the
sink holds (LRANGE), not with the ledger."""

import json
import re
import sys
import uuid
from pathlib import Path

import redis
import warm_process
from conftest import run_day
from services import RedisServer

DAY = "2025-11-25"
ROOT = Path(__file__).resolve().parents[1]


def _status() -> dict[str, list[str]]:
    """`status telemetry DAY`: the day's line and the lines of its other sinks, split in columns."""
    proc = warm_process.run(
        [str(Path(sys.executable).with_name("event-replay")), "status", "telemetry", DAY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(DAY) or "| redis:" in line]
    assert lines, proc.stdout
    return {"day": lines[0].split(), "others": [line.split() for line in lines[1:]]}


def _deliveries(cols: list[str]) -> tuple[int, ...]:
    """deliv. fail doubt dups: columns 9-12 of a day's line, the first four of another sink's."""
    at = 9 if re.fullmatch(r"\d{4}-\d{2}-\d{2}", cols[0]) else 0
    return tuple(int(c.replace(",", "")) for c in cols[at : at + 4])


def _redrive_md(result) -> dict:
    (mat,) = result.asset_materializations_for_node("telemetry__redrive")
    return {k: v.value for k, v in mat.metadata.items()}


def test_status_shows_failures_then_deliveries_per_sink_across_runs(env, instance, monkeypatch):
    from replay_defs.definitions import build_definitions

    key, other = f"status-{uuid.uuid4().hex[:8]}", f"status-other-{uuid.uuid4().hex[:8]}"
    server = RedisServer()  # not started: its port refuses connections, as a Redis that is down
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", server.url)
    monkeypatch.setenv("EVENT_REPLAY_SINK__TELEMETRY", f"redis:{key}?mode=list")
    defs = build_definitions()
    redrive_config = lambda **c: {"ops": {"telemetry__redrive": {"config": {"retries": 0, **c}}}}  # noqa: E731
    down = run_day(defs, instance, DAY, run_config=redrive_config())
    md = _redrive_md(down)
    assert not down.success and md["failed"] == md["selected"] > 0 and md["published"] == 0
    assert (md["unknown"], md["reconciled"], md["possible_duplicates"]) == (0, 0, 0), "nothing was ever sent"
    assert _deliveries(_status()["day"]) == (0, md["selected"], 0, 0)

    server.start()
    try:
        up = run_day(defs, instance, DAY, run_config=redrive_config())
        assert up.success and _redrive_md(up)["published"] == md["selected"]
        r = redis.Redis.from_url(server.url)
        held = {json.loads(m)["source_ref"] for m in r.lrange(key, 0, -1)}
        assert len(held) == r.llen(key) == md["selected"], "the list holds each message once"
        assert _deliveries(_status()["day"]) == (len(held), 0, 0, 0)

        # another destination of the same kind: a second line for its sink, the first unchanged
        elsewhere = run_day(defs, instance, DAY, run_config=redrive_config(destination=other, limit=3))
        assert elsewhere.success and r.llen(other) == 3
        status = _status()
        assert _deliveries(status["day"]) == (len(held), 0, 0, 0)
        (line,) = status["others"]
        assert re.search(rf"\| redis:list:{other}$", " ".join(line)) and _deliveries(line) == (3, 0, 0, 0)
        r.close()
    finally:
        server.stop()
