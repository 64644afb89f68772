"""The suite's processes stay stoppable: after a job ran in-process, a process a test starts still
stops on SIGTERM, however the suite itself was started (tests/conftest.py says why it might not)."""

import signal
import subprocess
import sys

import dagster as dg
from conftest import PROJECT_ROOT


def test_a_process_started_after_an_in_process_run_stops_on_sigterm():
    @dg.asset
    def one() -> int:
        return 1

    assert dg.materialize([one]).success
    child = subprocess.Popen(["sleep", "60"])
    child.terminate()
    assert child.wait(timeout=10) == -signal.SIGTERM


def test_so_does_it_when_the_suite_is_started_with_sigint_ignored():
    """As a script's background command (`./dev test &`) starts it: the test above, in a pytest
    whose SIGINT is ignored from the start."""
    test = f"{__file__}::test_a_process_started_after_an_in_process_run_stops_on_sigterm"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", test],
        cwd=PROJECT_ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
