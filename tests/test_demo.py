"""The README's first command, `./dev demo`, end to end (smaller, with the same code path)."""

import os
import subprocess

from conftest import PROJECT_ROOT


def test_demo_backfills_prints_counts_and_replays_the_bad_day(tmp_path):
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "EVENT_REPLAY_LAKE": str(tmp_path / "lake"),
        "EVENT_REPLAY_DUCKDB": str(tmp_path / "state.duckdb"),
        "EVENT_REPLAY_OUTBOX": str(tmp_path / "outbox"),
    }
    out = subprocess.run(
        [str(PROJECT_ROOT / ".venv/bin/event-replay"), "demo", "--days", "2", "--events-per-day", "6000"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("2025-11-2")]
    # Two days backfilled, then the middle day twice (bad parser, then the replay).
    assert len(rows) == 4, out.stdout
    for r in (rows[0], rows[1], rows[3]):
        assert "9/9 passed" in r, out.stdout
    assert rows[0].endswith("truth: match") and rows[1].endswith("truth: match")
    # The bad deploy lost events: the blocking shrink check stopped it before projections and redrive.
    assert "MISMATCH" in rows[2] and "FAILED: no_unconsented_shrink" in rows[2], out.stdout
    assert "not run: deliveries_reconcile, projections_match_fold, totals_match_parsed" in rows[2], out.stdout
    # Each build of a day is a new commit of the Delta table: the replay's version is the newest.
    versions = [int(r.split()[1]) for r in rows]
    assert rows[3].endswith("truth: match") and versions[3] > versions[2] > max(versions[:2]), out.stdout
    assert (tmp_path / "home" / "dagster.yaml").exists()
