"""What the fault-matrix tests share: running the redrive process (`redrive_process.py`), killing
it at seeded random points, freezing a server process, and judging an independent consumer's count."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import psycopg
import warm_process

PROCESS = Path(__file__).with_name("redrive_process.py")


def redrive_command(sink: dict, ledger_url: str, messages: int, **options) -> list[str]:
    cmd = [
        sys.executable,
        str(PROCESS),
        "--sink",
        json.dumps(sink),
        "--ledger",
        ledger_url,
        "--messages",
        str(messages),
    ]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not None and value is not False:
            cmd += [flag, str(value)]
    return cmd


def run_redrive(cmd: list[str], env: dict | None = None, timeout: float = 300) -> dict:
    """Runs the redrive process to its end; returns its counts (fails the test on a crash)."""
    done = warm_process.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"redrive process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def kill_at_random_points(
    cmd: list[str], seed: int, kills: int, window_s: tuple[float, float], env=None, held=None
) -> list[float]:
    """Starts the redrive process `kills` times, each SIGKILLed after a delay drawn (seeded) from
    `window_s`; returns the delays. The delay counts from the process's start, or, given `held` (how
    many messages the target holds), from the run's first delivery (what it holds grew): start-up
    takes 2 to 10 s on a loaded machine. A process that ends before its delay is not a kill point:
    the window must lie inside the run (pace it with `rate`)."""
    rng = random.Random(seed)
    delays = sorted(round(rng.uniform(*window_s), 2) for _ in range(kills))
    for delay in delays:
        before = held() if held is not None else 0
        proc = warm_process.WarmPopen(
            cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if held is not None:
            _wait_until_delivering(proc, held, before)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            continue
        raise AssertionError(f"the redrive process ended before its kill point {delay}s: {proc.stderr.read()[-2000:]}")
    return delays


def _wait_until_delivering(proc: subprocess.Popen, held, before: int, timeout: float = 120) -> None:
    """Polls `held()` until it exceeds `before`; the process must stay alive."""
    deadline = time.monotonic() + timeout
    while held() <= before:
        assert proc.poll() is None, f"the redrive process ended before it delivered: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the redrive process never started delivering"
        time.sleep(0.1)


@contextmanager
def frozen(pid: int, seconds: float):
    """Freezes a server process (SIGSTOP) on entering the block and thaws it `seconds` later from a
    timer thread, so the block can run the redrive while the server hangs: connections stay open,
    nothing answers (a frozen or partitioned broker, not a refused connection)."""
    import threading

    def thaw():
        time.sleep(seconds)
        os.kill(pid, signal.SIGCONT)

    os.kill(pid, signal.SIGSTOP)
    timer = threading.Thread(target=thaw, daemon=True)
    timer.start()
    try:
        yield
    finally:
        timer.join()
        os.kill(pid, signal.SIGCONT)


def ledger_summary(ledger_url: str, pipeline: str, sink: str) -> dict:
    """The ledger's rows of a pipeline and sink per status, and the ids marked possible duplicates."""
    with psycopg.connect(ledger_url) as con:
        statuses = dict(
            con.execute(
                "SELECT status, count(*) FROM redrive_ledger WHERE pipeline = %s AND sink = %s GROUP BY status",
                (pipeline, sink),
            ).fetchall()
        )
        dups = {
            r[0]
            for r in con.execute(
                "SELECT message_id FROM redrive_ledger WHERE pipeline = %s AND sink = %s AND possible_duplicate",
                (pipeline, sink),
            ).fetchall()
        }
    return {"statuses": statuses, "possible_duplicates": dups}


def judge(consumed_ids: list[str], expected_ids: list[str], exactly_once: bool, possible_duplicates: set[str]) -> None:
    """The consumer's count: every expected message at least once; exactly once where the sink can
    tell, else every duplicate among the ids the ledger marked as possible duplicates."""
    seen = Counter(consumed_ids)
    missing = [m for m in expected_ids if m not in seen]
    assert not missing, f"{len(missing)} messages never arrived, e.g. {missing[:5]}"
    extra = sorted(set(seen) - set(expected_ids))
    assert not extra, f"{len(extra)} unexpected messages arrived, e.g. {extra[:5]}"
    dups = {m: n for m, n in seen.items() if n > 1}
    if exactly_once:
        assert not dups, f"{len(dups)} messages arrived more than once, e.g. {list(dups.items())[:5]}"
    else:
        unreported = sorted(set(dups) - possible_duplicates)
        assert not unreported, (
            f"{len(unreported)} duplicates the ledger does not mark as possible duplicates, e.g. {unreported[:5]}"
        )
