"""The command lines, run as subprocesses from the project root against the `env` fixture's lake,
stores and DAGSTER_HOME (the fixture exports them as env vars, which the subprocesses inherit).
The subprocesses are forked from a warm process (tests/warm_process.py); the README walk
(test_readme_commands.py) starts the same commands from a cold interpreter."""

import gzip
import json
import os
import re
import subprocess
import sys
import zlib
from datetime import date
from pathlib import Path

import dagster as dg
import pytest
import warm_process
from conftest import (
    DEMO_DAYS,
    PROJECT_ROOT,
    RANGE_TAGS,
    commit_stray_file,
    delta_files,
    delta_rows,
    event_counts,
    run_day,
    run_range,
)

from replay_defs.core.lake import Lake
from replay_defs.jsonl_files.demo import TYPES, DemoConfig, generate, read_truth
from replay_defs.pipeline.committed import parsed_state
from replay_defs.pipeline.store import DuckDBStore
from replay_defs.pipelines import TELEMETRY

BIN = Path(sys.executable).parent
PARSED_OWNER = "telemetry/parsed_events"
ASSETS = ("raw_events", "parsed_events", "projections", "redrive")
CHECKS = (
    "no_duplicate_event_ids",
    "raw_lines_accounted_for",
    "no_stale_files",
    "raw_files_current",
    "no_unconsented_shrink",
    "late_events_within_window",
    "totals_match_parsed",
    "projections_match_fold",
    "deliveries_reconcile",
)
# The demo data holds a few events beyond the lateness window on its last day: a warning there.
LATE_WARNING = ("late_events_within_window", "2025-11-26")
# A bad deploy that is let through (the shrink it causes is consented to), to have something to roll back.
BAD_DEPLOY = {
    "ops": {"telemetry__parsed_events": {"config": {"workers": 1, "simulate_parser_bug": True, "allow_shrink": True}}}
}
SERIAL = {"ops": {"telemetry__parsed_events": {"config": {"workers": 1}}}}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return warm_process.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=PROJECT_ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def show(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def home_instance() -> dg.DagsterInstance:
    """The instance the subprocesses used: the one at $DAGSTER_HOME."""
    assert os.environ["DAGSTER_HOME"]
    return dg.DagsterInstance.get()


def check_keys() -> list[dg.AssetCheckKey]:
    parsed, projections, redrive = (dg.AssetKey(["telemetry", a]) for a in ("parsed_events", "projections", "redrive"))
    owner = {"totals_match_parsed": projections, "projections_match_fold": projections, "deliveries_reconcile": redrive}
    return [dg.AssetCheckKey(owner.get(c, parsed), c) for c in CHECKS]


def partition_status(instance) -> dict[tuple[str, str | None], str]:
    """Per (check, day), the status the UI's Partitions tab shows: the latest verdict, counted only
    while it targets the day's latest materialization (Dagster clears it otherwise)."""
    infos = instance.event_log_storage.get_asset_check_partition_info(check_keys(), after_storage_id=None)
    return {
        (i.check_key.name, i.partition_key): i.latest_execution_status.value if i.is_current else "MISSING"
        for i in infos
    }


def run_evaluations(instance, run_id: str) -> list:
    return [
        e.dagster_event.asset_check_evaluation_data
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    ]


def day_state(lake: Lake, day: str):
    return parsed_state(lake, TELEMETRY, day)


def day_states(lake: Lake, day: str) -> list:
    """Every recorded state of the parsed day, newest first."""
    return lake.day_states(PARSED_OWNER, day, TELEMETRY.parsed_prefix)


def live_counts(lake: Lake, day: str) -> tuple[int, int, dict[str, int]]:
    """(rows, distinct event ids, rows per type) of the day as a reader of the Delta table sees it."""
    return event_counts(delta_rows(lake.root, "telemetry_flat", day))


def daily_counts_total(env, day: str) -> int:
    return DuckDBStore(env["duckdb"]).query(
        'SELECT coalesce(sum(events), 0)::BIGINT FROM "telemetry"."daily_counts" WHERE day = $d::DATE', {"d": day}
    )[0][0]


# ---- 1. validate --------------------------------------------------------------------------------


def test_definitions_validate_from_project_root(env):
    proc = cli("dagster", "definitions", "validate")
    assert proc.returncode == 0, show(proc)
    assert "Validation successful for code location event-replay" in proc.stdout + proc.stderr, show(proc)


# ---- 2. ranged materialization through the dagster CLI -------------------------------------------


def test_asset_materialize_partition_range_records_per_day_checks(env):
    select = ",".join(f"telemetry/{a}" for a in ASSETS)
    proc = cli(
        "dagster",
        "asset",
        "materialize",
        "-m",
        "replay_defs.definitions",
        "--select",
        select,
        "--partition-range",
        f"{DEMO_DAYS[0]}...{DEMO_DAYS[-1]}",
    )
    assert proc.returncode == 0, show(proc)

    instance = home_instance()
    try:
        runs = instance.get_runs()
        assert len(runs) == 1, "a partition range is one run"
        run = runs[0]
        assert run.tags[RANGE_TAGS[0]] == DEMO_DAYS[0] and run.tags[RANGE_TAGS[1]] == DEMO_DAYS[-1]
        assert run.status == dg.DagsterRunStatus.SUCCESS

        # Every check evaluated once per day (plus the summary), all passing.
        evals = run_evaluations(instance, run.run_id)
        got = sorted((e.check_name, e.partition or "") for e in evals)
        assert got == sorted((c, p) for c in CHECKS for p in [*DEMO_DAYS, ""])
        assert {(e.check_name, e.partition) for e in evals if not e.passed} == {LATE_WARNING, (LATE_WARNING[0], None)}
        status = partition_status(instance)
        for check in CHECKS:
            for day in DEMO_DAYS:
                assert status[(check, day)] == ("FAILED" if (check, day) == LATE_WARNING else "SUCCEEDED"), (check, day)

        # Each asset has each day materialized, with the day's own numbers.
        for a in ASSETS:
            assert instance.get_materialized_partitions(dg.AssetKey(["telemetry", a])) == set(DEMO_DAYS), a
    finally:
        instance.dispose()
    lake = Lake(env["lake"])
    for day in DEMO_DAYS:
        state = day_state(lake, day)
        assert [s.version for s in day_states(lake, day)] == [state.version]  # the day's first and only build
        assert state.stats["rows_by_type"] == read_truth(env["lake"], day)
        assert daily_counts_total(env, day) == state.stats["parsed"]


# ---- 3. a stale file fails a checks-only CLI run ------------------------------------------------


def test_checks_only_cli_run_fails_on_a_stale_parquet_file(defs, instance, env):
    """Another writer commits a copy of a day's lock events to the parsed table. `dagster asset
    materialize` always runs the selected assets, and re-materializing a day replaces all of its
    files, the stray one too, before its checks run (see test_pipeline's stale test), so that command
    passes. The CLI way to run only the checks against the lake as it is: `dagster job execute`
    of the project's replay job with an op selection of the parsed asset's check step (it runs all
    the checks of parsed_events) and the range tags."""
    assert run_range(defs, instance, DEMO_DAYS[0], DEMO_DAYS[-1]).success
    lake = Lake(env["lake"])
    day = "2025-11-25"
    built = day_state(lake, day)
    stale = commit_stray_file(lake.root, day)

    ops = "telemetry__parsed_events_checks"
    tags = json.dumps({RANGE_TAGS[0]: DEMO_DAYS[0], RANGE_TAGS[1]: DEMO_DAYS[-1]})
    proc = cli(
        "dagster",
        "job",
        "execute",
        "-m",
        "replay_defs.definitions",
        "-j",
        "telemetry_replay",
        "-o",
        ops,
        "--tags",
        tags,
    )
    assert proc.returncode != 0, show(proc)
    # The two failed checks fail their step (it runs all of the asset's checks), and so the run.
    assert "2 blocking asset checks failed" in proc.stdout + proc.stderr, show(proc)
    assert "telemetry/parsed_events: no_duplicate_event_ids,no_stale_files" in proc.stdout + proc.stderr, show(proc)

    # Nothing was re-materialized: the stray file is still live, the day's state the same build.
    assert stale in delta_files(lake.root, "telemetry_flat", day)
    assert day_state(lake, day).version == built.version
    latest = instance.get_runs(limit=1)[0]
    assert latest.status == dg.DagsterRunStatus.FAILURE
    assert list(instance.all_logs(latest.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)) == []
    verdicts = {(e.check_name, e.partition): e.passed for e in run_evaluations(instance, latest.run_id)}
    parsed_checks = {k.name for k in check_keys() if k.asset_key.path[-1] == "parsed_events"}
    assert {c for c, _ in verdicts} == parsed_checks, "the parsed asset's checks ran, and only they"
    assert {(c, d) for c, d in verdicts} == {(c, d) for c in parsed_checks for d in [*DEMO_DAYS, None]}
    assert {
        k: v
        for k, v in verdicts.items()
        if k[0] in ("no_stale_files", "no_duplicate_event_ids", "raw_lines_accounted_for")
    } == {
        **{(c, d): d != day for c in ("no_stale_files", "no_duplicate_event_ids") for d in DEMO_DAYS},
        ("no_stale_files", None): False,
        ("no_duplicate_event_ids", None): False,
        **{("raw_lines_accounted_for", d): True for d in [*DEMO_DAYS, None]},
    }
    # The stray file leaves the raw listing and the versions' counts alone.
    assert all(verdicts[(c, d)] for c in ("raw_files_current", "no_unconsented_shrink") for d in [*DEMO_DAYS, None])
    status = partition_status(instance)
    assert status[("no_stale_files", day)] == status[("no_duplicate_event_ids", day)] == "FAILED"
    assert status[("no_stale_files", DEMO_DAYS[0])] == "SUCCEEDED"


# ---- 4. event-replay status / rollback ----------------------------------------------------------


def test_status_prints_a_row_per_day_with_counts(defs, instance, env):
    assert run_range(defs, instance, DEMO_DAYS[0], DEMO_DAYS[-1]).success
    proc = cli("event-replay", "status", "telemetry", DEMO_DAYS[0], DEMO_DAYS[-1])
    assert proc.returncode == 0, show(proc)
    rows = {
        line.split()[0]: line.split() for line in proc.stdout.splitlines() if re.match(r"^\d{4}-\d{2}-\d{2} ", line)
    }
    assert list(rows) == DEMO_DAYS, proc.stdout
    lake = Lake(env["lake"])
    num = lambda s: int(s.replace(",", ""))  # noqa: E731
    for day, cols in rows.items():
        s = day_state(lake, day).stats
        version, raw, parsed, dupes, quarantined, routed_in, routed_out, proj = map(num, cols[1:9])
        delivered, failed, in_doubt, dups = map(num, cols[9:13])
        assert (version, raw, parsed, dupes, quarantined, routed_in, routed_out) == (
            day_state(lake, day).version,
            s["raw_lines"],
            s["parsed"],
            s["duplicates"],
            s["quarantined"],
            s["routed_in"],
            s["routed_out"],
        ), (day, cols)
        assert proj == parsed == daily_counts_total(env, day)
        # the ledger's figures against what the outbox (the sink) holds in the day's directory
        in_outbox = {
            json.loads(line)["source_ref"]
            for f in (env["outbox"] / "telemetry" / f"day={day}").glob("*.jsonl")
            for line in f.read_text().splitlines()
        }
        assert (delivered, failed, in_doubt, dups) == (len(in_outbox), 0, 0, 0) and delivered > 0, (day, cols)
        warned = (LATE_WARNING[0], day) == LATE_WARNING
        want = f"{len(CHECKS) - warned}/{len(CHECKS)} passed" + (f", WARN: {LATE_WARNING[0]}" if warned else "")
        assert " ".join(cols[13:]) == want


def test_rollback_restores_the_previous_version(defs, instance, env):
    day = "2025-11-25"
    lake = Lake(env["lake"])
    truth = read_truth(env["lake"], day)
    assert run_day(defs, instance, day, run_config=SERIAL).success
    v1 = day_state(lake, day)
    assert v1.stats["rows_by_type"] == truth
    # A bad deploy writes a newer version.
    run_day(defs, instance, day, run_config=BAD_DEPLOY)
    v2 = day_state(lake, day)
    assert v2.version > v1.version and v2.stats["rows_by_type"] != truth
    assert daily_counts_total(env, day) == v2.stats["parsed"]

    proc = cli("event-replay", "rollback", "telemetry", day)
    assert proc.returncode == 0, show(proc)
    state = day_state(lake, day)
    assert f"now holds version {v1.version} (was {v2.version}; table version {state.version})" in proc.stdout, show(
        proc
    )

    # A new commit that restores the first build: its very files, its stats.
    assert state.version > v2.version
    assert state.built_version == v1.version
    assert state.entries == v1.entries, "the restored files are not the first version's files"
    assert state.stats == {**v1.stats, "rolled_back_to": v1.version}
    assert delta_files(lake.root, "telemetry_flat", day) == v1.files_of("telemetry_flat")
    assert delta_rows(lake.root, "telemetry_flat", day).sort_by("event_id") == delta_rows(
        lake.root, "telemetry_flat", day, version=v1.version
    ).sort_by("event_id")
    rows, distinct, by_type = live_counts(lake, day)
    assert by_type == truth and rows == distinct
    # The replaced (bad) version is kept in turn, and projections were re-folded from the first.
    assert lake.kept_versions(PARSED_OWNER, day, TELEMETRY.parsed_prefix) == [v1.version, v2.version]
    assert daily_counts_total(env, day) == v1.stats["parsed"]
    # The rollback is on the asset's record in the instance.
    event = instance.get_latest_materialization_event(dg.AssetKey(["telemetry", "parsed_events"]))
    assert event.asset_materialization.partition == day
    md = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert (md["version"], md["restored_version"], md["rolled_back_from"]) == (state.version, v1.version, v2.version)


def test_rolling_back_twice_goes_back_two_versions(defs, instance, env):
    """Three builds (two earlier ones kept): rollback -> the second, rollback again -> the first,
    never forward to the version that was just rolled back from."""
    day = "2025-11-25"
    lake = Lake(env["lake"])
    built = []
    for config in (SERIAL, BAD_DEPLOY, SERIAL):
        run_day(defs, instance, day, run_config=config)
        built.append(day_state(lake, day).version)
    assert built == sorted(set(built)), built
    assert lake.kept_versions(PARSED_OWNER, day, TELEMETRY.parsed_prefix) == built

    first = cli("event-replay", "rollback", "telemetry", day)
    assert first.returncode == 0, show(first)
    assert day_state(lake, day).built_version == built[1]
    second = cli("event-replay", "rollback", "telemetry", day)
    assert second.returncode == 0, show(second)
    now = day_state(lake, day)
    assert now.built_version == built[0], f"the second rollback went to version {now.built_version}: {second.stdout}"
    assert live_counts(lake, day) == event_counts(delta_rows(lake.root, "telemetry_flat", day, version=built[0]))


def test_rollback_without_an_earlier_version_fails_clearly(defs, instance, env):
    day = DEMO_DAYS[0]
    assert run_day(defs, instance, day, run_config=SERIAL).success
    lake = Lake(env["lake"])
    before = day_state(lake, day)
    proc = cli("event-replay", "rollback", "telemetry", day)
    assert proc.returncode != 0, show(proc)
    assert f"{day}: no earlier version is kept to roll back to" in proc.stderr, show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    after = day_state(lake, day)
    assert after.version == before.version and after.entries == before.entries
    assert [s.version for s in day_states(lake, day)] == [before.version], "the refused rollback committed"


def test_rollback_after_a_stale_file_was_swept_does_not_bring_it_back(defs, instance, env):
    """Another writer commits a stray file to the day's table; the next materialization replaces
    the day's files, the stray one too. Rolling back to the version the stray file was committed
    beside must restore that version's own files, not the stray copy with them."""
    day = "2025-11-25"
    lake = Lake(env["lake"])
    assert run_day(defs, instance, day, run_config=SERIAL).success
    v1 = day_state(lake, day)
    stale = commit_stray_file(lake.root, day)
    assert run_day(defs, instance, day, run_config=SERIAL).success
    assert stale not in delta_files(lake.root, "telemetry_flat", day)

    proc = cli("event-replay", "rollback", "telemetry", day)
    assert proc.returncode == 0, show(proc)
    state = day_state(lake, day)
    assert state.built_version == v1.version
    rows, distinct, _ = live_counts(lake, day)
    live = delta_files(lake.root, "telemetry_flat", day)
    assert stale not in live and stale not in state.files, (
        f"rollback published the stray copy with the first version: {rows - distinct} duplicate rows are live"
    )
    assert rows == distinct == v1.stats["parsed"]
    assert state.entries == v1.entries and live == v1.files_of("telemetry_flat")


def valid_event(ev, line: bytes) -> bool:
    if not isinstance(ev, dict) or ev.get("type") not in TYPES or len(line) >= 1 << 20:
        return False
    if not all(isinstance(ev.get(k), str) for k in ("event_id", "ts", "device_id")) or type(ev.get("seq")) is not int:
        return False
    try:
        ev["event_id"].encode()  # a lone surrogate is not valid Unicode
    except UnicodeEncodeError:
        return False
    return True


# ---- 5. generate --------------------------------------------------------------------------------


def test_generate_writes_hourly_gzip_files_and_truth(tmp_path):
    lake = tmp_path / "gen"
    proc = cli("event-replay", "generate", "--lake", str(lake), "--days", "1", "--events-per-day", "5000")
    assert proc.returncode == 0, show(proc)
    day = "2025-11-24"
    base = lake / "raw" / "json_telemetry" / "year=2025" / "month=11" / "day=24"
    for h in range(24):
        name = base / f"hour={h:02d}" / f"telemetry-firehose-{day}-{h:02d}-000-gen20251124.gz"
        assert name.is_file(), name
    truncated = base / "hour=12" / f"telemetry-firehose-{day}-12-truncated-gen20251124.gz"
    assert truncated.is_file()

    truth = read_truth(lake, day)
    assert truth is not None and set(truth) == set(TYPES)
    per_hour = 5000 // 24
    assert 0.99 * per_hour * 24 <= sum(truth.values()) <= per_hour * 24
    # Same seed, same data: the in-process generator agrees with the CLI's truth.
    again = generate(tmp_path / "again", DemoConfig(start=date(2025, 11, 24), days=1, events_per_day=5000))
    assert dict(again[day]) == truth

    # Every file but the truncated one is valid gzip of JSON lines; the truncated one ends early.
    ids_by_type: dict[str, set] = {t: set() for t in TYPES}
    for path in sorted(lake.rglob("*.gz")):
        if path == truncated:
            try:
                gzip.decompress(path.read_bytes())
                raise AssertionError("the truncated file decompressed completely")
            except (EOFError, OSError, zlib.error):
                continue
        arrival_day = re.search(r"day=(\d+)", str(path)).group(1)
        for line in gzip.decompress(path.read_bytes()).split(b"\n"):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            # Truth counts distinct valid events of the day that arrived by the next day.
            if valid_event(ev, line) and ev["ts"].startswith(day) and arrival_day in ("23", "24", "25"):
                ids_by_type[ev["type"]].add(ev["event_id"])
    assert {t: len(ids) for t, ids in ids_by_type.items()} == truth


@pytest.mark.parametrize(
    "option, says",
    [
        (["--start", "2025-02-30"], "argument --start: '2025-02-30' is not a day (YYYY-MM-DD)"),
        (["--events-per-day", "10"], "argument --events-per-day: 10 is below 24"),
        (["--days", "0"], "argument --days: 0 is below 1"),
    ],
)
def test_generate_refuses_options_that_would_write_nothing_or_crash(tmp_path, option, says):
    proc = cli("event-replay", "generate", "--lake", str(tmp_path / "gen"), *option)
    assert proc.returncode == 2 and says in proc.stderr, show(proc)
    assert not (tmp_path / "gen").exists()


def test_first_commands_at_once_on_a_fresh_home_leave_it_usable(tmp_path):
    """Four commands start together on a DAGSTER_HOME that does not exist yet: the instance's
    SQLite storage is created once (under a lock), so every command and every later one works."""
    import sqlite3

    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "EVENT_REPLAY_LAKE": str(tmp_path / "lake"),
        "EVENT_REPLAY_DUCKDB": str(tmp_path / "state.duckdb"),
    }
    command = [str(BIN / "event-replay"), "status", "telemetry", DEMO_DAYS[0]]
    procs = [
        warm_process.WarmPopen(
            command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outcomes = [(p.wait(180), p.stderr.read()[-2000:]) for p in procs]
    assert all(code == 0 for code, _ in outcomes), outcomes
    with sqlite3.connect(tmp_path / "home" / "schedules" / "schedules.db") as db:
        assert len(db.execute("SELECT * FROM alembic_version").fetchall()) == 1
    later = warm_process.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert later.returncode == 0 and "no check has run" in later.stdout, later.stderr[-2000:]
