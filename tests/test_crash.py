"""A crash at any point followed by a re-run leaves exactly the outputs of a clean run.

Every trial materializes telemetry/raw_events, parsed_events and projections for one day with the
real `dagster asset materialize` CLI in a child process (its own session, so SIGKILL to the
process group also takes down the spawned parse workers, as a power cut would), kills it at a
chosen point, re-runs the same command to completion and compares the outputs with a clean run's:
the rows of every live Parquet file of the day (per file: no extra or missing files), the
quarantine rows, the projection rows, the checks, and the absence of staging/journal leftovers.

Kill points:
- by polling the lake: while parse workers write staging files; as soon as the journal appears;
  right after the state is committed (checks and projections are running);
- at fixed fractions (0.4, 0.7) of a clean run's wall time;
- deterministically inside the publish: the child runs the same CLI through a small wrapper that
  counts `replay_defs.core.lake`'s filesystem mutations (rename/replace/remove/rmdir/rmtree) and
  SIGKILLs its own process group before the k-th one (fault injection, nothing else is changed);
- twice: once after the journal is written and again while the re-run is recovering it.
In-process, a raise from the lake's `os.rename` (and the other mutations) at every publish step
inside a real `run_day` materialization is followed by a re-run.

Runs use the code location's in-process executor, so each takes a few seconds; the parse worker
pool is a process pool of its own.

Reference and trials use the same directory, so `source_ref` (a URI under the lake) is
identical and rows compare exactly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import PROJECT_ROOT, run_day
from services import MutationProxy

DAY = "2025-11-25"
OWNER_DIR = Path("_replay/telemetry/parsed_events")
SELECT = "telemetry/raw_events,telemetry/parsed_events,telemetry/projections"
DAGSTER = Path(sys.executable).parent / "dagster"
CLI_ARGS = ["asset", "materialize", "-m", "replay_defs.definitions", "--select", SELECT, "--partition", DAY]
RUN_TIMEOUT = 120
CHECKS = ("no_stale_files", "no_duplicate_event_ids", "raw_lines_accounted_for", "totals_match_parsed")

# The same CLI (dagster._cli.main), with `replay_defs.core.lake`'s view of os/shutil replaced by a
# proxy that logs every mutation and SIGKILLs the whole process group before step KILL_AT.
KILL_WRAPPER = r"""
import os, shutil, signal, sys

import replay_defs.core.lake as lake

sys.path.insert(0, os.environ["REPLAY_TESTS_DIR"])
from services import MutationProxy

KILL_AT = int(os.environ.get("REPLAY_KILL_AT_STEP", "0"))
LOG = os.environ["REPLAY_STEP_LOG"]
_n = 0


def _step(name, args):
    global _n
    _n += 1
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, ("\t".join([str(_n), name, *map(str, args)]) + "\n").encode())
    os.close(fd)
    if _n == KILL_AT:
        os.killpg(os.getpgrp(), signal.SIGKILL)


lake.os = MutationProxy(os, ("rename", "replace", "remove", "rmdir"), _step)
lake.shutil = MutationProxy(shutil, ("rmtree",), _step)

if __name__ == "__main__":  # spawned parse workers import this file as __mp_main__
    from dagster._cli import main

    sys.argv[0] = "dagster"
    sys.exit(main())
"""


# --------------------------------------------------------------------------------------------
# workspace: one lake/store/outbox/home, reset before every run from the demo template


class Workspace:
    def __init__(self, base: Path, template: Path):
        self.base, self.template = base, template
        self.lake = base / "lake"
        self.duckdb = base / "state.duckdb"
        self.outbox = base / "outbox"
        self.home = base / "dagster_home"
        self.logs = base.parent / f"{base.name}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wrapper = base.parent / "kill_wrapper.py"
        self.wrapper.write_text(KILL_WRAPPER)
        self.n_runs = 0
        self.clean_run_seconds = 6.0  # measured by the `reference` fixture

    def reset(self) -> None:
        if self.base.exists():
            shutil.rmtree(self.base)
        self.base.mkdir(parents=True)
        shutil.copytree(self.template, self.lake)
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update(
            EVENT_REPLAY_LAKE=str(self.lake),
            EVENT_REPLAY_DUCKDB=str(self.duckdb),
            EVENT_REPLAY_OUTBOX=str(self.outbox),
            DAGSTER_HOME=str(self.home),
            PYTHONDONTWRITEBYTECODE="1",
            **extra,
        )
        return env

    @property
    def step_log(self) -> Path:
        return self.base / "lake-steps.log"

    def start(self, kill_at_step: int | None = None) -> subprocess.Popen:
        """Start the CLI materialization in its own session (process group)."""
        self.n_runs += 1
        log = open(self.logs / f"run-{self.n_runs:03d}.log", "wb")
        if kill_at_step is None:
            cmd, env = [str(DAGSTER), *CLI_ARGS], self.env()
        else:
            if self.step_log.exists():
                self.step_log.unlink()
            cmd = [sys.executable, str(self.wrapper), *CLI_ARGS]
            env = self.env(
                REPLAY_KILL_AT_STEP=str(kill_at_step),
                REPLAY_STEP_LOG=str(self.step_log),
                REPLAY_TESTS_DIR=str(PROJECT_ROOT / "tests"),
            )
        proc = subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        return proc

    def steps(self) -> list[list[str]]:
        if not self.step_log.exists():
            return []
        return [line.split("\t") for line in self.step_log.read_text().splitlines()]

    def run_to_completion(self) -> None:
        proc = self.start()
        try:
            rc = proc.wait(RUN_TIMEOUT)
        finally:
            kill_group(proc)
        assert rc == 0, f"re-run failed with {rc}; log: {tail(proc.log_path)}"

    # what a crash may leave -------------------------------------------------------------------
    def own(self, *parts) -> Path:
        return self.lake.joinpath(OWNER_DIR, *parts)

    def staging_files(self) -> list[Path]:
        d = self.own("staging", DAY)
        return [p for p in d.rglob("*") if p.is_file()] if d.is_dir() else []

    def journal_files(self) -> list[Path]:
        d = self.own("journal")
        return [p for p in d.iterdir() if p.is_file()] if d.is_dir() else []

    def committed(self) -> bool:
        return self.own("state", f"{DAY}.json").exists()

    def where(self) -> str:
        """Where a killed run stopped, judged from the lake (for messages)."""
        parts = []
        if (self.lake / "_replay/telemetry/raw_events/manifest" / f"day={DAY}.json").exists():
            parts.append("manifest written")
        if self.staging_files():
            parts.append(f"{len(self.staging_files())} staging files")
        if self.journal_files():
            parts.append(f"journal files {[p.name for p in self.journal_files()]}")
        if self.committed():
            parts.append("state committed")
        if self.duckdb.exists():
            parts.append("store exists")
        return ", ".join(parts) or "nothing written yet"


def tail(path, n=40) -> str:
    lines = Path(path).read_text(errors="replace").splitlines()
    keep = [line for line in lines if "Warning" not in line and "return fn(" not in line and "spec = " not in line]
    return "\n".join(keep[-n:])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (CLI and parse workers) and wait until it is gone.

    The group is signalled only while its leader is not yet reaped, so the group id cannot have
    been reused by anyone else's process."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # probe only: is any member (a parse worker) still alive?
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process group {proc.pid} survived SIGKILL")


def kill_when(proc: subprocess.Popen, predicate, timeout: float = RUN_TIMEOUT) -> bool:
    """Poll (every ~1 ms) until predicate() holds, then SIGKILL the group. False if the run
    ended first."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if predicate():
                os.killpg(proc.pid, signal.SIGKILL)  # the last poll() saw the leader alive
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.001)
        raise AssertionError(f"condition not reached in {timeout}s")
    finally:
        kill_group(proc)


# --------------------------------------------------------------------------------------------
# outputs


def parquet_rows(path: Path) -> tuple[str, list[tuple]]:
    table = pq.read_table(path)
    schema = ", ".join(f"{f.name}:{f.type}" for f in table.schema)
    rows = [tuple(r.values()) for r in table.to_pylist()]
    return schema, sorted(rows, key=repr)


def outputs(ws: Workspace) -> dict:
    """Everything a clean run determines for the day: every live file outside the raw input
    (Parquet as its schema and sorted rows, anything else as bytes), and the projection rows."""
    files = {}
    for p in sorted(ws.lake.rglob("*")):
        rel = p.relative_to(ws.lake).as_posix()
        if not p.is_file() or rel.startswith(("_replay/", "raw/", "_demo/")):
            continue
        files[rel] = parquet_rows(p) if p.suffix == ".parquet" else p.read_bytes()
    with duckdb.connect(str(ws.duckdb), read_only=True) as con:
        daily = con.execute(f"SELECT * FROM telemetry.daily_counts WHERE day = '{DAY}' ORDER BY ALL").fetchall()
        latest = con.execute("SELECT * FROM telemetry.device_latest ORDER BY ALL").fetchall()
    return {"files": files, "daily_counts": daily, "device_latest": latest}


def latest_run_verdicts(ws: Workspace) -> tuple[dg.DagsterRunStatus, dict[str, bool]]:
    with dg.DagsterInstance.from_config(str(ws.home)) as instance:
        run = instance.get_runs(limit=1)[0]
        events = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        verdicts = {}
        for e in events:
            ev = e.dagster_event.event_specific_data
            verdicts[ev.check_name] = ev.passed
        return run.status, verdicts


def recheck(ws: Workspace) -> dict[str, tuple[bool, str]]:
    """The checks' own verify functions, re-run against what is on disk now."""
    from assets import checks
    from replay_defs.core.lake import Lake
    from replay_defs.pipeline.store import DuckDBStore
    from replay_defs.pipelines import TELEMETRY

    lake = Lake(ws.lake)
    out = {}
    for name, v in {
        "no_duplicate_event_ids": checks.duplicate_ids(lake, TELEMETRY, DAY),
        "raw_lines_accounted_for": checks.accounting(lake, TELEMETRY, DAY),
        "no_stale_files": checks.stale_files(lake, TELEMETRY, DAY),
        "totals_match_parsed": checks.projection_totals(lake, DuckDBStore(ws.duckdb), TELEMETRY, DAY),
    }.items():
        out[name] = (v.passed, v.description)
    return out


def diff(got: dict, want: dict) -> str:
    lines = []
    gf, wf = got["files"], want["files"]
    if extra := sorted(set(gf) - set(wf)):
        lines.append(f"extra files: {extra}")
    if missing := sorted(set(wf) - set(gf)):
        lines.append(f"missing files: {missing}")
    for rel in sorted(set(gf) & set(wf)):
        if gf[rel] != wf[rel]:
            g, w = gf[rel], wf[rel]
            lines.append(
                f"{rel} differs"
                + (f": {len(g[1])} rows vs {len(w[1])}" if isinstance(g, tuple) and isinstance(w, tuple) else "")
            )
    for k in ("daily_counts", "device_latest"):
        if got[k] != want[k]:
            lines.append(f"{k}: {len(got[k])} rows vs {len(want[k])} in the clean run")
    return "; ".join(lines)


def assert_like_clean_run(ws: Workspace, reference: dict, context: str) -> None:
    got = outputs(ws)
    assert got == reference, f"[{context}] outputs differ from a clean run: {diff(got, reference)}"
    status, verdicts = latest_run_verdicts(ws)
    assert status == dg.DagsterRunStatus.SUCCESS, context
    for check in CHECKS:
        assert verdicts.get(check) is True, f"[{context}] check {check} in the re-run: {verdicts}"
    for check, (passed, description) in recheck(ws).items():
        assert passed, f"[{context}] {check} on disk: {description}"
    leftovers = [p.relative_to(ws.lake).as_posix() for p in ws.staging_files() + ws.journal_files()]
    assert leftovers == [], f"[{context}] staging/journal leftovers after the re-run: {leftovers}"


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def ws(tmp_path_factory, demo_lake_template) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("crash") / "ws", demo_lake_template)


@pytest.fixture(scope="module")
def reference(ws) -> dict:
    """A clean CLI run's outputs (same paths as every trial)."""
    ws.reset()
    t0 = time.monotonic()
    ws.run_to_completion()
    ws.clean_run_seconds = time.monotonic() - t0
    ref = outputs(ws)
    flat = [f for f in ref["files"] if f.startswith("telemetry_flat/")]
    quarantine = [f for f in ref["files"] if f.startswith("quarantine/")]
    assert len(flat) >= 3 and all(f"/day={DAY}/" in f for f in flat), flat
    assert quarantine == [f"quarantine/telemetry/day={DAY}/quarantine.parquet"], quarantine
    assert sum(len(ref["files"][f][1]) for f in flat) > 10_000
    assert sum(r[3] for r in ref["daily_counts"]) == sum(len(ref["files"][f][1]) for f in flat)
    status, verdicts = latest_run_verdicts(ws)
    assert status == dg.DagsterRunStatus.SUCCESS and all(verdicts[c] for c in CHECKS), verdicts
    assert ws.staging_files() == [] and ws.journal_files() == []
    return ref


# --------------------------------------------------------------------------------------------
# SIGKILL at polled points and fixed delays


def _staging_parse_files(ws):
    return any("_work" in p.parts for p in ws.staging_files())


POLLED = {
    # parse workers are writing per-bucket staging files
    "while-parse-workers-write-staging": (_staging_parse_files, True),
    # the journal is committed: the slots are being swapped in. That takes milliseconds, so
    # polling may miss it (the run then completes and the trial is just a clean re-run); the
    # deterministic kills inside the publish are the `publish_step` tests below.
    "when-the-journal-appears": (lambda ws: ws.own("journal", f"{DAY}.json").exists(), False),
    # the new version is committed; checks and projections are running
    "right-after-the-state-is-committed": (lambda ws: ws.committed(), True),
}


@pytest.mark.parametrize("point", list(POLLED))
def test_sigkill_at_a_polled_point_then_rerun_equals_clean_run(ws, reference, point):
    predicate, must_hit = POLLED[point]
    ws.reset()
    proc = ws.start()
    killed = kill_when(proc, lambda: predicate(ws))
    where = ws.where()
    assert killed or not must_hit, f"the run finished before the kill point {point!r}"
    if killed:
        assert proc.returncode == -signal.SIGKILL
    print(f"{point}: killed={killed} ({where})")  # shown with -s / -rP
    ws.run_to_completion()
    assert_like_clean_run(ws, reference, f"{point}: killed={killed} ({where})")


@pytest.mark.parametrize("fraction", [0.4, 0.7])
def test_sigkill_after_a_fixed_delay_then_rerun_equals_clean_run(ws, reference, fraction):
    """The delay is a fraction of the clean reference run's wall time, so the kills spread over
    the run (startup, parsing, publish, checks, projections) on fast and slow machines alike."""
    delay = round(fraction * ws.clean_run_seconds, 2)
    ws.reset()
    proc = ws.start()
    t0 = time.monotonic()
    killed = kill_when(proc, lambda: time.monotonic() - t0 >= delay)
    where = ws.where()
    print(f"after {delay}s: killed={killed} ({where})")  # shown with -s / -rP
    ws.run_to_completion()
    assert_like_clean_run(ws, reference, f"after {delay}s: killed={killed} ({where})")


# --------------------------------------------------------------------------------------------
# SIGKILL at exact steps of the publish (fault injection in the child)

# Steps of a first run, in order: 1 raw manifest replace; parsed_events' publish: 2 journal
# replace, 3-6 each new slot renamed into place (3 types + quarantine), 7 state replace,
# 8 journal remove, 9 staging rmtree.
# (Step 3, right after the journal is committed, starts the double-kill test.)
PUBLISH_KILLS = {
    "before-the-journal-is-committed": (2, "replace", "/journal/"),
    "with-half-of-the-new-slots-swapped-in": (5, "rename", "/staging/"),
}


def start_killed_at(ws: Workspace, step: int, name: str, path_part: str) -> str:
    proc = ws.start(kill_at_step=step)
    try:
        rc = proc.wait(RUN_TIMEOUT)
    finally:
        kill_group(proc)
    steps = ws.steps()
    assert rc == -signal.SIGKILL, (
        f"the run was not killed at step {step} (rc {rc}); steps: {steps}; {tail(proc.log_path)}"
    )
    assert len(steps) == step and steps[-1][1] == name and path_part in steps[-1][2], steps
    return ws.where()


@pytest.mark.parametrize("point", list(PUBLISH_KILLS))
def test_sigkill_at_a_publish_step_then_rerun_equals_clean_run(ws, reference, point):
    step, name, path_part = PUBLISH_KILLS[point]
    ws.reset()
    where = start_killed_at(ws, step, name, path_part)
    if step > 2:
        assert (ws.own("journal", f"{DAY}.json")).exists() and not ws.committed(), where
    ws.run_to_completion()
    assert_like_clean_run(ws, reference, f"{point} ({where})")


def test_sigkill_after_the_journal_and_again_while_recovering_then_rerun_equals_clean_run(ws, reference):
    ws.reset()
    first = start_killed_at(ws, 3, "rename", "/staging/")
    # The re-run writes the manifest (step 1), then recovers the journal: renames from 2 on.
    # Kill it after one slot has been recovered into place.
    second = start_killed_at(ws, 3, "rename", "/staging/")
    assert ws.own("journal", f"{DAY}.json").exists()
    ws.run_to_completion()
    assert_like_clean_run(ws, reference, f"killed after the journal ({first}), then mid-recovery ({second})")


# --------------------------------------------------------------------------------------------
# In-process: a raise at every step of Lake.publish inside a real run_day materialization


class SimulatedCrash(Exception):
    pass


# Publish steps of the first parsed_events run (see PUBLISH_KILLS): journal replace, 4 renames,
# state replace, journal remove, staging rmtree.
PUBLISH_STEPS = {
    1: "replace journal",
    2: "rename slot 1",
    3: "rename slot 2",
    4: "rename slot 3",
    5: "rename slot 4",
    6: "replace state",
    7: "remove journal",
    8: "rmtree staging",
}


IN_PROCESS_STEPS = list(PUBLISH_STEPS)  # every step: in-process runs take ~2 s


@pytest.mark.parametrize(
    "k", IN_PROCESS_STEPS, ids=[f"{k}-{PUBLISH_STEPS[k].replace(' ', '-')}" for k in IN_PROCESS_STEPS]
)
def test_raise_at_a_publish_step_in_run_day_then_rerun_equals_clean_run(ws, reference, monkeypatch, k):
    import replay_defs.core.lake as lake_mod
    from replay_defs.definitions import build_definitions

    ws.reset()
    for var, value in ws.env().items():
        if var.startswith(("EVENT_REPLAY_", "DAGSTER_HOME")):
            monkeypatch.setenv(var, value)
    defs = build_definitions()
    selection = [dg.AssetKey(["telemetry", n]) for n in ("raw_events", "parsed_events", "projections")]
    # One parse process (no spawned pool) keeps these runs short; the reference used the default
    # pool, so equality also shows the outputs do not depend on the worker count.
    config = {"ops": {"telemetry__parsed_events": {"config": {"workers": 1}}}}
    seen: list[tuple] = []
    in_publish = []

    def counter(name, args):
        if name == "replace" and str(args[1]).endswith(f"/journal/{DAY}.json"):
            in_publish.append(True)
        if in_publish:
            seen.append((name, *map(str, args)))
            if len(seen) == k:
                raise SimulatedCrash(f"crash at publish step {k}: {name}")

    with dg.instance_for_test(temp_dir=str(ws.home)) as instance:
        with monkeypatch.context() as m:
            m.setattr(lake_mod, "os", MutationProxy(os, ("rename", "replace", "remove", "rmdir"), counter))
            m.setattr(lake_mod, "shutil", MutationProxy(shutil, ("rmtree",), counter))
            crashed = run_day(defs, instance, DAY, run_config=config, selection=selection)
        assert not crashed.success and len(seen) == k, (k, seen)
        expected = PUBLISH_STEPS[k].split()[0]
        assert seen[-1][0] == expected, seen
        where = ws.where()

        rerun = run_day(defs, instance, DAY, run_config=config, selection=selection)
        assert rerun.success
        verdicts = {e.check_name: e.passed for e in rerun.get_asset_check_evaluations()}
        assert all(verdicts[c] for c in CHECKS), verdicts
    got = outputs(ws)
    assert got == reference, f"[raise at {PUBLISH_STEPS[k]} ({where})] {diff(got, reference)}"
    leftovers = [p.relative_to(ws.lake).as_posix() for p in ws.staging_files() + ws.journal_files()]
    assert leftovers == [], f"[raise at {PUBLISH_STEPS[k]} ({where})] staging/journal leftovers: {leftovers}"
