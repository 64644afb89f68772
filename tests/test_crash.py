"""A crash at any point followed by a re-run leaves exactly the outputs of a clean run.

Every trial materializes telemetry/raw_events, parsed_events and projections for one day with the
real `dagster asset materialize` CLI in a child process (forked from a warm one, tests/warm_process.py;
its own session, so SIGKILL to the process group also takes down the spawned parse workers, as a
power cut would), kills it at a chosen point, re-runs the same command to completion and compares
the outputs with a clean run's:
the day's rows of each Delta table (parsed events, quarantine) as deltalake itself reads them, the
day's live files per table (names without their per-build token: no extra or missing file), the
projection rows, the checks (in the re-run and re-run on disk), and no staging leftovers. Files a
killed run copied but never committed may remain (orphans readers ignore); `Lake.vacuum` with no
retention afterwards leaves in storage exactly the files the tables use, and the day equal.

Kill points:
- by polling: while parse workers write staging files; as soon as the events table has a new
  commit (the day is published, checks and projections are running);
- at a fixed fraction (0.5) of a clean run's wall time;
- deterministically inside the publish: the child runs the same CLI through a small wrapper that
  counts calls to `Storage.put_file` (each file moved or copied into a table) and to deltalake's
  `DeltaTable.create_write_transaction` (each commit) and SIGKILLs its own process group before
  (or right after) the k-th one: before the first file move, midway through the moves, before the
  quarantine commit, between the quarantine and the events commit, right after the events commit
  (the clean reference run goes through the wrapper too, killing nothing, to record the calls).
In-process, an exception raised from those calls at the same points inside a real `run_day`
materialization is followed by a re-run. A subset (one polled point, the kill between the two
commits) runs again with the lake on S3 (moto in its own process).

Runs use the code location's in-process executor, so each takes a few seconds. A day this small
parses in the run's own process; the clean reference and the kill while parse workers write run
with two spawned parse processes (the process group's SIGKILL takes them down too).

Reference and trials of a backend use the same lake root, so `source_ref` (a URI under the lake)
is identical and rows compare exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pytest
from conftest import PROJECT_ROOT, run_day
from services import MotoProcess
from warm_process import WarmPopen

DAY = "2025-11-25"
OWNER = "telemetry/parsed_events"
EVENTS, QUARANTINE = "telemetry_flat", "quarantine/telemetry"
TABLES = (EVENTS, QUARANTINE)
SELECT = "telemetry/raw_events,telemetry/parsed_events,telemetry/projections"
DAGSTER = Path(sys.executable).parent / "dagster"
CLI_ARGS = ["asset", "materialize", "-m", "replay_defs.definitions", "--select", SELECT, "--partition", DAY]
RUN_TIMEOUT = 180
CHECKS = ("no_stale_files", "no_duplicate_event_ids", "raw_lines_accounted_for", "totals_match_parsed")
TOKEN = re.compile(r"-[0-9a-f]{12}(\.parquet)$")  # the per-build token `Lake.publish` adds to a name
BUCKET, PREFIX = "crash-lake", "lake"

# The same CLI (dagster._cli.main), with `Storage.put_file` and `DeltaTable.create_write_transaction`
# counted: each call is logged, and the whole process group is SIGKILLed before call
# REPLAY_KILL_BEFORE_STEP or right after call REPLAY_KILL_AFTER_STEP returns.
KILL_WRAPPER = r"""
import os, signal, sys

KILL_BEFORE = int(os.environ.get("REPLAY_KILL_BEFORE_STEP", "0"))
KILL_AFTER = int(os.environ.get("REPLAY_KILL_AFTER_STEP", "0"))
LOG = os.environ["REPLAY_STEP_LOG"]
_n = 0


def _counted(name, real, describe):
    def call(self, *args, **kwargs):
        global _n
        _n += 1
        n = _n
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{n}\t{name}\t{describe(self, args)}\n".encode())
        os.close(fd)
        if n == KILL_BEFORE:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        out = real(self, *args, **kwargs)
        if n == KILL_AFTER:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        return out

    return call


if __name__ == "__main__":  # spawned parse workers import this file as __mp_main__: not counted
    import deltalake
    from dagster._cli import main

    from replay_defs.core.storage import Storage

    Storage.put_file = _counted("put_file", Storage.put_file, lambda s, a: a[1])
    deltalake.DeltaTable.create_write_transaction = _counted(
        "commit", deltalake.DeltaTable.create_write_transaction, lambda dt, a: dt.table_uri.rstrip("/")
    )
    sys.argv[0] = "dagster"
    sys.exit(main())
"""


# --------------------------------------------------------------------------------------------
# workspace: one lake/store/home per backend, reset before every run from the demo template


class Workspace:
    """The lake is `base/lake` (local) or `s3://BUCKET/PREFIX` on `moto` (S3, staging then in
    `base/staging`)."""

    def __init__(self, base: Path, template: Path, moto: MotoProcess | None = None):
        self.base, self.template, self.moto = base, template, moto
        self.root = f"s3://{BUCKET}/{PREFIX}" if moto else str(base / "lake")
        self.duckdb = base / "state.duckdb"
        self.outbox = base / "outbox"
        self.home = base / "dagster_home"
        self.staging_dir = base / "staging"
        self.logs = base.parent / f"{base.name}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wrapper = base.parent / "kill_wrapper.py"
        self.wrapper.write_text(KILL_WRAPPER)
        self.n_runs = 0
        self.clean_run_seconds = 6.0  # measured by the reference
        self.s3 = moto.client("s3") if moto else None
        if moto:
            self.s3.create_bucket(Bucket=BUCKET)
        # where the parse stages the day (the lake's own layout, spelled out here)
        self.staging = (
            self.staging_dir / "event-replay-staging" / OWNER.replace("/", "__") / DAY
            if moto
            else Path(self.root, "_replay", OWNER, "staging", DAY)
        )

    def reset(self) -> None:
        if self.base.exists():
            shutil.rmtree(self.base)
        self.base.mkdir(parents=True)
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        if not self.moto:
            shutil.copytree(self.template, self.root)
            return
        s3 = self.s3
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})
        for p in sorted((self.template / "raw").rglob("*")):
            if p.is_file():
                s3.upload_file(str(p), BUCKET, f"{PREFIX}/{p.relative_to(self.template).as_posix()}")

    def s3_env(self) -> dict:
        if not self.moto:
            return {}
        return {
            "EVENT_REPLAY_S3_ENDPOINT": self.moto.endpoint,
            "EVENT_REPLAY_STAGING_DIR": str(self.staging_dir),
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update(
            EVENT_REPLAY_LAKE=self.root,
            EVENT_REPLAY_DUCKDB=str(self.duckdb),
            EVENT_REPLAY_OUTBOX=str(self.outbox),
            DAGSTER_HOME=str(self.home),
            PYTHONDONTWRITEBYTECODE="1",
            **self.s3_env(),
            **extra,
        )
        return env

    def lake(self):
        from replay_defs.core.lake import Lake
        from replay_defs.core.storage import S3Settings

        if not self.moto:
            return Lake(self.root)
        return Lake(self.root, S3Settings(self.moto.endpoint, "us-east-1", "test", "test"))

    def delta(self, table: str):
        """The table as deltalake opens it (no project code); None before it exists."""
        from deltalake import DeltaTable

        lake = self.lake()
        uri, opts = lake.storage.table_uri(table), lake.storage.delta_options()
        return DeltaTable(uri, storage_options=opts) if DeltaTable.is_deltatable(uri, storage_options=opts) else None

    # runs ---------------------------------------------------------------------------------------
    @property
    def step_log(self) -> Path:
        return self.base / "publish-steps.log"

    def start(
        self, kill_before: int = 0, kill_after: int = 0, counted: bool = False, workers: int = 0
    ) -> subprocess.Popen:
        """Start the CLI materialization in its own session (process group); `counted` (or a kill
        step) runs it through the wrapper. `workers`: the parse's processes (0: its default, which
        parses a day this small in the run's own process)."""
        self.n_runs += 1
        log = open(self.logs / f"run-{self.n_runs:03d}.log", "wb")
        args = [*CLI_ARGS, "--config-json", json.dumps(parse_workers(workers))] if workers else CLI_ARGS
        if not (counted or kill_before or kill_after):
            cmd, env = [str(DAGSTER), *args], self.env()
        else:
            self.step_log.unlink(missing_ok=True)
            cmd = [sys.executable, str(self.wrapper), *args]
            env = self.env(
                REPLAY_KILL_BEFORE_STEP=str(kill_before),
                REPLAY_KILL_AFTER_STEP=str(kill_after),
                REPLAY_STEP_LOG=str(self.step_log),
            )
        proc = WarmPopen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        return proc

    def steps(self) -> list[tuple[str, str]]:
        """The counted calls of the last wrapped run: (name, table path or table), tokens removed."""
        if not self.step_log.exists():
            return []
        return [step(*line.split("\t")[1:]) for line in self.step_log.read_text().splitlines()]

    def run_to_completion(self, counted: bool = False, workers: int = 0) -> None:
        proc = self.start(counted=counted, workers=workers)
        try:
            rc = proc.wait(RUN_TIMEOUT)
        finally:
            kill_group(proc)
        assert rc == 0, f"run failed with {rc}; log: {tail(proc.log_path)}"

    # what a crash may leave -------------------------------------------------------------------
    def staging_files(self) -> list[str]:
        d = self.staging
        return sorted(p.as_posix() for p in d.rglob("*") if p.is_file()) if d.is_dir() else []

    def has_commit(self, table: str, version: int) -> bool:
        """Whether the table's log holds `version` (a file check, cheap enough to poll)."""
        rel = f"{table}/_delta_log/{version:020d}.json"
        if not self.moto:
            return Path(self.root, rel).exists()
        try:
            self.s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}")
            return True
        except Exception:
            return False

    def where(self) -> str:
        """Where a killed run stopped, judged from the lake (for messages)."""
        parts = []
        if self.lake().exists(f"_replay/telemetry/raw_events/manifest/day={DAY}.json"):
            parts.append("manifest written")
        if n := len(self.staging_files()):
            parts.append(f"{n} staging files")
        for table in TABLES:
            if (dt := self.delta(table)) is not None:
                parts.append(f"{table} at version {dt.version()}")
        if self.duckdb.exists():
            parts.append("store exists")
        return ", ".join(parts) or "nothing written yet"


def parse_workers(n: int) -> dict:
    return {"ops": {"telemetry__parsed_events": {"config": {"workers": n}}}}


def step(name: str, arg: str) -> tuple[str, str]:
    """A counted call as the tests name it: ("put_file", table path without token) or ("commit", table)."""
    if name == "commit":
        return name, next(t for t in TABLES if arg.endswith(f"/{t}"))
    return name, TOKEN.sub(r"\1", arg)


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


def table_outputs(ws: Workspace, table: str) -> dict:
    """The day in `table` as deltalake reads it: schema, sorted rows, live files without tokens."""
    dt = ws.delta(table)
    rows = dt.to_pyarrow_table(filters=[("day", "=", date.fromisoformat(DAY))])
    adds = pa.table(dt.get_add_actions(flatten=True))
    files = sorted(
        TOKEN.sub(r"\1", p)
        for p, d in zip(adds["path"].to_pylist(), adds["partition.day"].to_pylist())
        if str(d) == DAY
    )
    return {
        "schema": ", ".join(f"{f.name}:{f.type}" for f in rows.schema),
        "rows": sorted((tuple(r.values()) for r in rows.to_pylist()), key=repr),
        "files": files,
    }


def outputs(ws: Workspace) -> dict:
    """Everything a clean run determines for the day: each table's rows and files, the projection rows."""
    with duckdb.connect(str(ws.duckdb), read_only=True) as con:
        daily = con.execute(f"SELECT * FROM telemetry.daily_counts WHERE day = '{DAY}' ORDER BY ALL").fetchall()
        latest = con.execute("SELECT * FROM telemetry.device_latest ORDER BY ALL").fetchall()
    return {**{t: table_outputs(ws, t) for t in TABLES}, "daily_counts": daily, "device_latest": latest}


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
    """The checks' own verify functions, re-run against what is in the lake now."""
    from assets import checks
    from replay_defs.pipeline.store import DuckDBStore
    from replay_defs.pipelines import TELEMETRY

    lake = ws.lake()
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
    for t in TABLES:
        g, w = got[t], want[t]
        if g["files"] != w["files"]:
            lines.append(f"{t} files: {g['files']} vs {w['files']} in the clean run")
        if g["schema"] != w["schema"]:
            lines.append(f"{t} schema: {g['schema']} vs {w['schema']}")
        if g["rows"] != w["rows"]:
            lines.append(f"{t}: {len(g['rows'])} rows vs {len(w['rows'])} (or different rows)")
    for k in ("daily_counts", "device_latest"):
        if got[k] != want[k]:
            lines.append(f"{k}: {len(got[k])} rows vs {len(want[k])} in the clean run")
    return "; ".join(lines)


def stored_and_live(ws: Workspace, table: str) -> tuple[set[str], set[str]]:
    """The table's data files in storage, and those its current snapshot uses (table-relative)."""
    import pyarrow.fs as pafs

    storage = ws.lake().storage
    base = storage.path(table)
    sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    stored = {
        i.path[len(base) + 1 :]
        for i in storage.fs.get_file_info(sel)
        if i.type == pafs.FileType.File and not i.path[len(base) + 1 :].startswith("_delta_log/")
    }
    return stored, set(ws.delta(table).get_add_actions(flatten=True).column("path").to_pylist())


def assert_like_clean_run(ws: Workspace, reference: dict, context: str, dagster_run: bool = True) -> int:
    """The re-run left the clean run's outputs; so does a vacuum with no retention afterwards,
    which leaves in storage exactly the files the tables use. Returns how many other files
    (orphans of the killed run, files the re-run replaced) there were before it."""
    got = outputs(ws)
    assert got == reference["outputs"], (
        f"[{context}] outputs differ from a clean run: {diff(got, reference['outputs'])}"
    )
    if dagster_run:
        status, verdicts = latest_run_verdicts(ws)
        assert status == dg.DagsterRunStatus.SUCCESS, context
        for check in CHECKS:
            assert verdicts.get(check) is True, f"[{context}] check {check} in the re-run: {verdicts}"
    for check, (passed, description) in recheck(ws).items():
        assert passed, f"[{context}] {check} on disk: {description}"
    leftovers = ws.staging_files()
    assert leftovers == [], f"[{context}] {len(leftovers)} staging leftovers after the re-run: {leftovers[:3]}"
    unused = 0
    for table in TABLES:
        stored, live = stored_and_live(ws, table)
        assert live <= stored, f"[{context}] {table}: files in use but not stored: {sorted(live - stored)}"
        unused += len(stored - live)
    vacuumed = ws.lake().vacuum(list(TABLES), retention_hours=0, dry_run=False)
    got = outputs(ws)
    assert got == reference["outputs"], f"[{context}] after vacuum {vacuumed}: {diff(got, reference['outputs'])}"
    passed, description = recheck(ws)["no_stale_files"]
    assert passed, f"[{context}] after vacuum {vacuumed}: {description}"
    for table in TABLES:
        stored, live = stored_and_live(ws, table)
        assert stored == live, f"[{context}] {table} after vacuum {vacuumed}: unused files {sorted(stored - live)}"
    return unused


# --------------------------------------------------------------------------------------------
# fixtures


def clean_reference(ws: Workspace) -> dict:
    """A clean CLI run's outputs (same lake root as every trial) and its counted publish steps
    (the run goes through the wrapper, which kills nothing). It parses with two worker processes;
    the re-runs it is compared with parse in the run's own process, so equality also shows the
    outputs do not depend on the worker count."""
    ws.reset()
    t0 = time.monotonic()
    ws.run_to_completion(counted=True, workers=2)
    ws.clean_run_seconds = time.monotonic() - t0
    ref = {"outputs": outputs(ws), "steps": ws.steps()}
    events, quarantine = ref["outputs"][EVENTS], ref["outputs"][QUARANTINE]
    assert len(events["files"]) >= 3 and all(f"/day={DAY}/" in f for f in events["files"]), events["files"]
    assert quarantine["files"] == [f"day={DAY}/quarantine.parquet"], quarantine["files"]
    assert len(events["rows"]) > 10_000 and quarantine["rows"]
    assert sum(r[3] for r in ref["outputs"]["daily_counts"]) == len(events["rows"])
    # The publish: every file moved into its table, then the quarantine commit, the events commit last.
    moved = [f"{EVENTS}/{f}" for f in events["files"]] + [f"{QUARANTINE}/{f}" for f in quarantine["files"]]
    assert ref["steps"] == [("put_file", f) for f in moved] + [("commit", QUARANTINE), ("commit", EVENTS)]
    status, verdicts = latest_run_verdicts(ws)
    assert status == dg.DagsterRunStatus.SUCCESS and all(verdicts[c] for c in CHECKS), verdicts
    assert ws.staging_files() == []
    return ref


@pytest.fixture(scope="module")
def ws(tmp_path_factory, demo_lake_template) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("crash") / "ws", demo_lake_template)


@pytest.fixture(scope="module")
def reference(ws) -> dict:
    return clean_reference(ws)


@pytest.fixture(scope="module")
def s3_ws(tmp_path_factory, demo_lake_template):
    moto = MotoProcess().start()
    try:
        yield Workspace(tmp_path_factory.mktemp("crash-s3") / "ws", demo_lake_template, moto)
    finally:
        moto.stop()


@pytest.fixture(scope="module")
def s3_reference(s3_ws) -> dict:
    return clean_reference(s3_ws)


# --------------------------------------------------------------------------------------------
# SIGKILL at polled points and fixed delays


def _staging_parse_files(ws):
    return any("/_work/" in p for p in ws.staging_files())


POLLED = {
    # parse workers (two processes, started for this point) are writing per-bucket staging files
    "while-parse-workers-write-staging": _staging_parse_files,
    # the events table has the day's commit (version 0 is the empty table): the day is
    # published, checks and projections are running
    "when-the-events-table-has-a-new-commit": lambda ws: ws.has_commit(EVENTS, 1),
}


def polled_trial(ws: Workspace, reference: dict, point: str) -> None:
    ws.reset()
    proc = ws.start(workers=2 if point == "while-parse-workers-write-staging" else 0)
    killed = kill_when(proc, lambda: POLLED[point](ws))
    where = ws.where()
    assert killed, f"the run finished before the kill point {point!r}"
    assert proc.returncode == -signal.SIGKILL
    print(f"{point}: ({where})")  # shown with -s / -rP
    ws.run_to_completion()
    assert_like_clean_run(ws, reference, f"{point} ({where})")


@pytest.mark.parametrize("point", list(POLLED))
def test_sigkill_at_a_polled_point_then_rerun_equals_clean_run(ws, reference, point):
    polled_trial(ws, reference, point)


@pytest.mark.parametrize("fraction", [0.5])
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
# SIGKILL at exact calls of the publish (fault injection in the child)


def publish_kill(steps: list[tuple[str, str]], point: str) -> tuple[str, int]:
    """("before" or "after", the 1-based call) of a kill point, in a first run's counted calls."""
    moves = [i for i, s in enumerate(steps, 1) if s[0] == "put_file"]
    commit = {s[1]: i for i, s in enumerate(steps, 1) if s[0] == "commit"}
    return {
        "before-the-first-file-move": ("before", moves[0]),
        "midway-through-the-moves": ("before", moves[len(moves) // 2]),
        "before-the-quarantine-commit": ("before", commit[QUARANTINE]),
        "between-the-quarantine-and-the-events-commit": ("before", commit[EVENTS]),
        "right-after-the-events-commit": ("after", commit[EVENTS]),
    }[point]


PUBLISH_POINTS = [
    "before-the-first-file-move",
    "midway-through-the-moves",
    "before-the-quarantine-commit",
    "between-the-quarantine-and-the-events-commit",
    "right-after-the-events-commit",
]


def expected_after_kill(ws: Workspace, point: str) -> None:
    """What the killed run left: the day published only once the events table committed."""
    versions = {t: (dt.version() if (dt := ws.delta(t)) else None) for t in TABLES}
    published = ws.lake().state(OWNER, DAY, EVENTS) is not None
    if point == "right-after-the-events-commit":
        assert versions == {EVENTS: 1, QUARANTINE: 1} and published, versions
    elif point == "between-the-quarantine-and-the-events-commit":
        assert versions == {EVENTS: 0, QUARANTINE: 1} and not published, versions
    else:
        assert not published and all(v in (None, 0) for v in versions.values()), versions


def sigkill_publish_trial(ws: Workspace, reference: dict, point: str) -> None:
    when, k = publish_kill(reference["steps"], point)
    ws.reset()
    proc = ws.start(**{f"kill_{when}": k})
    try:
        rc = proc.wait(RUN_TIMEOUT)
    finally:
        kill_group(proc)
    assert rc == -signal.SIGKILL, f"the run was not killed at call {k} (rc {rc}); {tail(proc.log_path)}"
    assert ws.steps() == reference["steps"][:k], ws.steps()
    expected_after_kill(ws, point)
    where = ws.where()
    ws.run_to_completion()
    unused = assert_like_clean_run(ws, reference, f"{point} ({where})")
    # the killed run's files (orphans, or replaced by the re-run) were there until the vacuum
    assert (unused > 0) == (point != "before-the-first-file-move"), (point, unused)


@pytest.mark.parametrize("point", PUBLISH_POINTS)
def test_sigkill_at_a_publish_call_then_rerun_equals_clean_run(ws, reference, point):
    sigkill_publish_trial(ws, reference, point)


# --------------------------------------------------------------------------------------------
# The lake on S3: a polled kill and the kill between the two commits


def test_s3_sigkill_when_the_events_table_has_a_new_commit_then_rerun_equals_clean_run(s3_ws, s3_reference):
    polled_trial(s3_ws, s3_reference, "when-the-events-table-has-a-new-commit")


def test_s3_sigkill_between_the_two_commits_then_rerun_equals_clean_run(s3_ws, s3_reference):
    sigkill_publish_trial(s3_ws, s3_reference, "between-the-quarantine-and-the-events-commit")


# --------------------------------------------------------------------------------------------
# In-process: a raise at the same publish calls inside a real run_day materialization


class SimulatedCrash(Exception):
    pass


@pytest.mark.parametrize("point", PUBLISH_POINTS)
def test_raise_at_a_publish_call_in_run_day_then_rerun_equals_clean_run(ws, reference, monkeypatch, point):
    import deltalake

    from replay_defs.core.storage import Storage
    from replay_defs.definitions import build_definitions

    when, k = publish_kill(reference["steps"], point)
    ws.reset()
    for var, value in ws.env().items():
        if var.startswith(("EVENT_REPLAY_", "DAGSTER_HOME")):
            monkeypatch.setenv(var, value)
    defs = build_definitions()
    selection = [dg.AssetKey(["telemetry", n]) for n in ("raw_events", "parsed_events", "projections")]
    config = parse_workers(1)
    seen: list[tuple[str, str]] = []

    def counted(name, real, describe):
        def call(self, *args, **kwargs):
            seen.append(step(name, describe(self, args)))
            if len(seen) == k and when == "before":
                raise SimulatedCrash(f"{point}: {seen[-1]}")
            out = real(self, *args, **kwargs)
            if len(seen) == k:
                raise SimulatedCrash(f"{point}: {seen[-1]}")
            return out

        return call

    with dg.instance_for_test(temp_dir=str(ws.home)) as instance:
        with monkeypatch.context() as m:
            m.setattr(Storage, "put_file", counted("put_file", Storage.put_file, lambda s, a: str(a[1])))
            m.setattr(
                deltalake.DeltaTable,
                "create_write_transaction",
                counted(
                    "commit", deltalake.DeltaTable.create_write_transaction, lambda dt, a: dt.table_uri.rstrip("/")
                ),
            )
            crashed = run_day(defs, instance, DAY, run_config=config, selection=selection)
        assert not crashed.success and seen == reference["steps"][:k], seen
        expected_after_kill(ws, point)
        where = ws.where()

        rerun = run_day(defs, instance, DAY, run_config=config, selection=selection)
        assert rerun.success
        verdicts = {e.check_name: e.passed for e in rerun.get_asset_check_evaluations()}
        assert all(verdicts[c] for c in CHECKS), verdicts
    unused = assert_like_clean_run(ws, reference, f"raise at {point} ({where})", dagster_run=False)
    assert (unused > 0) == (point != "before-the-first-file-move"), (point, unused)
