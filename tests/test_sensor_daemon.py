"""A dead-letter queue filling up launches the right backfill with no human action: the sensor
runs in a real Dagster daemon (`dagster dev`), its backfill runs, and the checks pass."""

import time
import uuid

import dagster as dg
import redis
from services import dagster_dev, graphql
from test_dead_letter_sensors import fail_jobs, letters

TICKS = """
query {
  repositoriesOrError { ... on RepositoryConnection { nodes { sensors { name sensorState { ticks(limit: 10) { status skipReason } } } } } }
}"""


def _ticks(base: str) -> list[dict]:
    nodes = graphql(base, TICKS)["repositoriesOrError"]["nodes"]
    return [t for n in nodes for s in n["sensors"] for t in s["sensorState"]["ticks"]]


def test_dlq_growth_launches_a_backfill_that_the_daemon_completes(env, tmp_path, redis_url, monkeypatch):
    queue = f"dlq-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
    location = tmp_path / "dlq_location.py"
    location.write_text(
        "import dataclasses\n"
        "from replay_defs.definitions import build_definitions\n"
        "from replay_defs.pipelines import TELEMETRY\n"
        "from replay_defs.pipeline.spec import DeadLettersSpec\n"
        f"defs = build_definitions([dataclasses.replace(TELEMETRY, dead_letters=(DeadLettersSpec('bullmq', {queue!r}, growth=10, interval_s=5, running=True),))])\n"
    )
    r = redis.Redis.from_url(redis_url)
    try:
        with dagster_dev(tmp_path / "dagster-dev.log", "-f", str(location)) as base:
            deadline = time.time() + 120
            # The DLQ sensor's baseline reading (the raw-files sensor ticks too: its ticks do not count).
            while not any(t["status"] == "SKIPPED" and queue in (t["skipReason"] or "") for t in _ticks(base)):
                assert time.time() < deadline, (
                    "the sensor never ticked: " + (tmp_path / "dagster-dev.log").read_text()[-3000:]
                )
                time.sleep(1)

            fail_jobs(redis_url, queue, letters(30))  # the DLQ fills up: 30 failed jobs of 2025-11-25/26

            instance = dg.DagsterInstance.get()
            deadline = time.time() + 300
            backfill = None
            while time.time() < deadline:
                backfills = instance.get_backfills()
                if backfills:
                    (backfill,) = backfills
                    if backfill.status.value != "REQUESTED":
                        break
                time.sleep(2)
            assert backfill is not None, f"no backfill launched; ticks: {_ticks(base)}"
        assert backfill.status.value in ("COMPLETED", "COMPLETED_SUCCESS"), f"backfill ended as {backfill.status}"
        assert backfill.tags["event_replay/trigger"] == f"bullmq:{queue}"
        assert r.zcard(f"bull:{queue}:failed") == 30, "the sensor must not consume the dead letters"
    finally:
        r.delete(*r.keys(f"bull:{queue}:*") or ["-"])
        r.close()

    from replay_defs.definitions import build_definitions
    from replay_defs.pipelines import TELEMETRY

    target = backfill.get_asset_backfill_data(
        build_definitions([TELEMETRY]).get_repository_def().asset_graph
    ).target_subset
    for key in target.asset_keys:
        assert set(target.get_partitions_subset(key).get_partition_keys()) == {"2025-11-25", "2025-11-26"}, key
    keys = [
        dg.AssetCheckKey(dg.AssetKey(["telemetry", "parsed_events"]), n)
        for n in ("no_duplicate_event_ids", "raw_lines_accounted_for", "no_stale_files")
    ]
    keys.append(dg.AssetCheckKey(dg.AssetKey(["telemetry", "redrive"]), "deliveries_reconcile"))
    infos = instance.event_log_storage.get_asset_check_partition_info(keys, after_storage_id=None)
    passed = {(i.check_key.name, i.partition_key) for i in infos if i.latest_execution_status.value == "SUCCEEDED"}
    for key in keys:
        for day in ("2025-11-25", "2025-11-26"):
            assert (key.name, day) in passed, f"{key.name} has no passing verdict for {day}"
