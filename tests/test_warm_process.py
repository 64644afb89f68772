"""`WarmPopen` (tests/warm_process.py) behaves as `subprocess.Popen` does for what the suite uses:
the child is a separate process with the given argv, environment, working directory, pipes and
session; its exit status, a signal included, comes back; a setup failure raises in the caller."""

import json
import os
import signal
import subprocess
import sys

import pytest
import warm_process

SCRIPT = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "x": os.environ.get("X"), "path0": sys.path[0],
                  "name": __name__, "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0)}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.stdin.read() or 0))
"""


def test_a_script_runs_as_main_with_its_argv_env_cwd_and_exit_code(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    done = warm_process.run(
        [sys.executable, str(script), "a", "b"], input="3", capture_output=True, text=True, cwd="/", env={"X": "1"}
    )
    seen = json.loads(done.stdout)
    assert done.returncode == 3 and done.stderr == "to stderr\n"
    assert seen["argv"] == [str(script), "a", "b"] and seen["cwd"] == "/" and seen["x"] == "1"
    assert seen["name"] == "__main__" and seen["path0"] == str(tmp_path)
    assert seen["pid"] != os.getpid() and seen["ppid"] != os.getpid(), "a process of its own (the server's child)"


def test_python_c_and_a_console_script_run_too():
    done = warm_process.run([sys.executable, "-c", SCRIPT, "z"], capture_output=True, text=True)
    assert done.returncode == 0 and '"argv": ["-c", "z"]' in done.stdout and '"path0": ""' in done.stdout
    help_text = warm_process.run(
        [str(os.path.join(os.path.dirname(sys.executable), "event-replay")), "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "usage: event-replay" in help_text.stdout


def test_a_new_session_and_sigkill_as_with_popen():
    proc = warm_process.WarmPopen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout.readline() == "up\n"
    assert os.getsid(proc.pid) == proc.pid, "its own session, as start_new_session=True gives"
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def test_a_working_directory_that_does_not_exist_raises_in_the_caller_and_the_server_goes_on():
    with pytest.raises(OSError, match="FileNotFoundError"):
        warm_process.run([sys.executable, "-c", "pass"], cwd="/nonexistent/dir")
    assert warm_process.run([sys.executable, "-c", "raise SystemExit(5)"]).returncode == 5
