"""`./dev bench dagster` is wired into ./dev (the full benchmark takes minutes: run by hand)."""

import subprocess

from conftest import PROJECT_ROOT


def test_dagster_bench_is_reachable_through_dev():
    done = subprocess.run(
        [str(PROJECT_ROOT / "dev"), "bench", "dagster", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Dagster overhead benchmark" in done.stdout
    assert "--days" in done.stdout and "--events" in done.stdout
