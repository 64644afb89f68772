"""The telemetry replay pipeline end to end: real demo lake files, a real (temporary SQLite)
Dagster instance, the real DuckDB store and outbox. Nothing of the project is mocked."""

import dataclasses
import hashlib
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import (
    DEMO_DAYS,
    check_verdicts,
    commit_stray_file,
    delta_files,
    delta_rows,
    event_counts,
    run_day,
    run_range,
)

from replay_defs.core.lake import Lake
from replay_defs.jsonl_files.demo import TYPES, read_truth
from replay_defs.pipeline.committed import parsed_state
from replay_defs.pipeline.store import DuckDBStore
from replay_defs.pipelines import TELEMETRY
from replay_defs.sinks.outbox import OutboxSink

PARSED_OWNER = "telemetry/parsed_events"
ASSETS = ("raw_events", "parsed_events", "projections", "redrive")
CHECKS = {
    "no_duplicate_event_ids": "parsed_events",
    "raw_lines_accounted_for": "parsed_events",
    "no_stale_files": "parsed_events",
    "raw_files_current": "parsed_events",
    "no_unconsented_shrink": "parsed_events",
    "late_events_within_window": "parsed_events",
    "totals_match_parsed": "projections",
    "projections_match_fold": "projections",
    "deliveries_reconcile": "redrive",
}
# The demo generator puts a few events beyond the default lateness window into the last day's raw
# files: the non-blocking late-window check warns there, and only there.
LATE_WARNING = ("late_events_within_window", "2025-11-26")
# Every kind of bad line (and the truncated gzip) the demo generator injects into each day.
INJECTED_REASONS = {
    "malformed_json",  # truncated JSON and the NUL byte line
    "wrong_type",
    "missing_field",
    "invalid_utf8",
    "invalid_unicode",  # lone surrogate
    "not_an_object",
    "empty_line",
    "unknown_type",
    "oversize_line",
    "truncated_gzip",
}
REDRIVE = dg.AssetKey(["telemetry", "redrive"])
PARSED = dg.AssetKey(["telemetry", "parsed_events"])
RAW = dg.AssetKey(["telemetry", "raw_events"])


# ---- helpers -----------------------------------------------------------------------------------


def materializations(result, asset: str, pipeline: str = "telemetry") -> dict[str, dict]:
    """partition -> metadata (MetadataValue objects) of the run's materializations of one asset."""
    out = {}
    for ev in result.get_asset_materialization_events():
        mat = ev.materialization
        if mat.asset_key == dg.AssetKey([pipeline, asset]):
            assert mat.partition not in out, f"{asset}[{mat.partition}] materialized twice in one run"
            out[mat.partition] = dict(mat.metadata)
    return out


def values(md: dict) -> dict:
    return {k: getattr(v, "value", v) for k, v in md.items()}


def evaluations(result) -> list:
    return list(result.get_asset_check_evaluations())


def step_failure_messages(result) -> list[str]:
    return [e.step_failure_data.error.to_string() for e in result.all_events if e.event_type_value == "STEP_FAILURE"]


def day_state(lake: Lake, day: str, spec=TELEMETRY):
    """The parsed day's committed state."""
    return parsed_state(lake, spec, day)


def live_counts(lake: Lake, day: str, prefix: str = "telemetry_flat", version: int | None = None):
    """(rows, distinct event ids, rows per type) of the day as a reader of the Delta table sees it
    (at a table version)."""
    return event_counts(delta_rows(lake.root, prefix, day, version))


def quarantine_by_reason(lake: Lake, day: str, pipeline: str = "telemetry") -> dict[str, int]:
    rows = delta_rows(lake.root, f"quarantine/{pipeline}", day)
    return {r["reason"]: r["lines_sum"] for r in rows.group_by("reason").aggregate([("lines", "sum")]).to_pylist()}


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def inode(path) -> int:
    return Path(path).stat().st_ino


def daily_counts(env, day: str) -> tuple[int, int]:
    """(rows, sum of events) of the increment projection telemetry.daily_counts for one day."""
    return DuckDBStore(env["duckdb"]).query(
        'SELECT count(*), coalesce(sum(events), 0)::BIGINT FROM "telemetry"."daily_counts" WHERE day = $d::DATE',
        {"d": day},
    )[0]


def outbox_messages(env, pipeline: str = "telemetry") -> list[dict]:
    return list(OutboxSink(env["outbox"]).read(pipeline))


# Most single-day runs parse with one in-process worker: the same parse code without a process
# pool's start-up cost. The ranged runs, the single-partition test and the `dagster` CLI runs keep
# the default (a worker pool, one process per core).
SERIAL = {"workers": 1}


def day_run(defs, instance, day, parse=None, redrive=None, job="telemetry_replay"):
    """The full replay job for one day, with parsed_events and redrive config."""
    pipeline = job.removesuffix("_replay")
    ops = {f"{pipeline}__parsed_events": {"config": {**SERIAL, **(parse or {})}}}
    if redrive:
        ops[f"{pipeline}__redrive"] = {"config": redrive}
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance, partition_key=day, run_config={"ops": ops}, raise_on_error=False
    )


def redrive_config(**config) -> dict:
    return {"ops": {"telemetry__redrive": {"config": config}}}


def redrive_only(defs, instance, day, **config):
    """Run only the redrive asset (and its check) for one day with the given redrive config."""
    return run_day(defs, instance, day, run_config=redrive_config(**config), selection=[REDRIVE])


def redrive_md(result, day) -> dict:
    return values(materializations(result, "redrive")[day])


def manifest(lake: Lake, day: str) -> dict:
    return lake.read_json("telemetry/raw_events", f"manifest/day={day}.json")


def checks_only_job(job, asset: str, checks: list[str]):
    """The job cut down to some checks of an asset: no asset step, and of the checks' step
    (it runs all the checks of the asset) only the named checks."""
    keys = {dg.AssetCheckKey(dg.AssetKey(["telemetry", asset]), c) for c in checks}
    assert keys <= set(job.asset_layer.asset_graph.asset_check_keys), f"{sorted(keys)} not among the job's checks"
    return job.get_subset(asset_selection=set(), asset_check_selection=keys)


# ---- 1. ranged run ------------------------------------------------------------------------------


def test_range_run_per_day_checks_metadata_truth_quarantine_and_projections(defs, instance, env):
    result = run_range(defs, instance, DEMO_DAYS[0], DEMO_DAYS[-1])
    assert result.success
    lake = Lake(env["lake"])

    # One run covered all three days.
    assert len(instance.get_runs()) == 1

    # Every check: a passing evaluation per day, plus a passing summary (partition None).
    evals = evaluations(result)
    for check, asset in CHECKS.items():
        mine = [e for e in evals if e.check_name == check]
        assert {e.asset_key for e in mine} == {dg.AssetKey(["telemetry", asset])}
        per_day = {e.partition: e.passed for e in mine if e.partition is not None}
        assert per_day == {d: (check, d) != LATE_WARNING for d in DEMO_DAYS}, (check, per_day)
        summaries = [e for e in mine if e.partition is None]
        warned = check == LATE_WARNING[0]
        assert len(summaries) == 1 and summaries[0].passed != warned, check
        assert summaries[0].severity == (dg.AssetCheckSeverity.WARN if warned else dg.AssetCheckSeverity.ERROR)
        assert summaries[0].metadata["days_checked"].value == 3
        assert summaries[0].metadata["days_failed"].value == int(warned)

    # A materialization per partition for every asset.
    mats = {a: materializations(result, a) for a in ASSETS}
    for a in ASSETS:
        assert set(mats[a]) == set(DEMO_DAYS), a
        assert set(instance.get_materialized_partitions(dg.AssetKey(["telemetry", a]))) == set(DEMO_DAYS), a

    # parsed_events: numeric per-day metadata that is the day's own number (equal to the day's lake
    # state, not a total), and that differs between days where the data does.
    parsed_md = mats["parsed_events"]
    numeric_keys = (
        "parsed",
        "raw_lines",
        "duplicates",
        "quarantined",
        "quarantined_truncated_gzip",
        "duration_s",
        "events_per_s",
        "dagster/row_count",
    )
    for day in DEMO_DAYS:
        md = parsed_md[day]
        for key in numeric_keys:
            assert key in md, (day, key)
            assert isinstance(md[key], (dg.IntMetadataValue, dg.FloatMetadataValue)), (day, key, type(md[key]))
        v = values(md)
        stats = day_state(lake, day).stats
        q = quarantine_by_reason(lake, day)
        rows, distinct, _ = live_counts(lake, day)
        assert v["parsed"] == v["dagster/row_count"] == stats["parsed"] == rows == distinct
        assert v["raw_lines"] == stats["raw_lines"] == manifest(lake, day)["totals"]["lines"]
        assert v["duplicates"] == stats["duplicates"] > 0
        assert v["quarantined"] == stats["quarantined"] == sum(q.values())
        assert v["quarantined_truncated_gzip"] == q["truncated_gzip"] > 0
        assert v["duration_s"] == stats["duration_s"] > 0
        assert v["events_per_s"] == stats["events_per_s"] > 0
        assert v["parse_processes"] == 1  # a demo day is small: parsed in the run's own process
        # The day's first and only build: its version is the table version that committed it.
        assert [s.version for s in lake.day_states(PARSED_OWNER, day, TELEMETRY.parsed_prefix)] == [v["version"]]
    # The demo days differ in these counts, so must their metadata. (Timings are per day too, as
    # checked against each day's state above, but two days may take the same milliseconds.)
    for key in ("parsed", "raw_lines", "duplicates", "dagster/row_count"):
        per_day = [parsed_md[d][key].value for d in DEMO_DAYS]
        assert len(set(per_day)) == len(DEMO_DAYS), f"{key} is the same for different days: {per_day}"
    quarantined = [parsed_md[d]["quarantined"].value for d in DEMO_DAYS]
    assert len(set(quarantined)) > 1, quarantined

    # raw_events: per-day numbers from the day's manifest.
    for day in DEMO_DAYS:
        v = values(mats["raw_events"][day])
        totals = manifest(lake, day)["totals"]
        assert isinstance(mats["raw_events"][day]["lines"], dg.IntMetadataValue)
        assert (v["files"], v["lines"], v["bytes"], v["unreadable_files"]) == (
            totals["files"],
            totals["lines"],
            totals["bytes"],
            1,
        )
    assert len({values(mats["raw_events"][d])["lines"] for d in DEMO_DAYS}) == 3

    # Parsed rows per type equal the generator's ground truth, every day.
    for day in DEMO_DAYS:
        truth = read_truth(env["lake"], day)
        _, _, by_type = live_counts(lake, day)
        assert by_type == truth, day
        assert day_state(lake, day).stats["rows_by_type"] == truth
        assert {k: values(parsed_md[day])[f"rows_type_{k}"] for k in TYPES} == truth

    # Quarantine holds at least every reason the generator injects (each day), and the very late
    # events that fall outside the lateness window somewhere in the range.
    seen = set()
    for day in DEMO_DAYS:
        reasons = quarantine_by_reason(lake, day)
        assert INJECTED_REASONS <= set(reasons), (day, INJECTED_REASONS - set(reasons))
        # The truncated file's readable lines, counted independently by raw_events, are quarantined.
        unreadable = [f for f in manifest(lake, day)["files"] if f["error"]]
        assert [f["error"]["reason"] for f in unreadable] == ["truncated_gzip"]
        assert reasons["truncated_gzip"] == unreadable[0]["lines"]
        seen |= set(reasons)
    assert "outside_lateness_window" in seen

    # Projection totals equal parsed rows, per day.
    for day in DEMO_DAYS:
        rows, total = daily_counts(env, day)
        assert rows > 0
        assert total == day_state(lake, day).stats["parsed"]
        assert values(mats["projections"][day])["daily_counts_events"] == total


# ---- 2. single partition ------------------------------------------------------------------------


def test_single_partition_run_reports_checks_for_that_day(defs, instance, env):
    day = "2025-11-25"
    result = run_day(defs, instance, day)
    assert result.success
    evals = evaluations(result)
    assert {(e.check_name, e.partition) for e in evals} == {(c, day) for c in CHECKS}
    assert all(e.passed for e in evals)
    # Each says what it took (the dagster bench adds these up): a time, not a placeholder.
    took = [e.metadata["check_seconds"].value for e in evals]
    assert all(0 <= t < 60 for t in took) and sum(took) > 0
    for a in ASSETS:
        assert set(materializations(result, a)) == {day}, a
    lake = Lake(env["lake"])
    assert [d for d in DEMO_DAYS if day_state(lake, d)] == [day]
    _, _, by_type = live_counts(lake, day)
    assert by_type == read_truth(env["lake"], day)
    # Per-partition check status is visible in the instance, too.
    graph = defs.resolve_asset_graph()
    keys = [k for k in graph.asset_check_keys if k.asset_key.path[0] == "telemetry"]
    assert len(keys) == len(CHECKS)
    infos = instance.event_log_storage.get_asset_check_partition_info(keys, after_storage_id=None)
    status = {(i.check_key.name, i.partition_key): i.latest_execution_status.value for i in infos}
    assert status == {(c, day): "SUCCEEDED" for c in CHECKS}


# ---- 3. re-materializing replaces ---------------------------------------------------------------


def test_rematerializing_a_day_replaces_outputs_without_double_counting(defs, instance, env):
    day = "2025-11-25"
    lake = Lake(env["lake"])
    first = day_run(defs, instance, day)
    assert first.success
    v1 = day_state(lake, day)
    root = Path(lake.root)
    v1_inodes = {f: inode(root / f) for f in v1.files}
    counts_before = daily_counts(env, day)
    latest_before = DuckDBStore(env["duckdb"]).query('SELECT count(*) FROM "telemetry"."device_latest"')[0][0]
    sent_first = redrive_md(first, day)["published"]
    assert sent_first > 0
    outbox_before = outbox_messages(env)
    assert len(outbox_before) == sent_first

    second = day_run(defs, instance, day)
    assert second.success
    assert check_verdicts(second) == {(c, day): True for c in CHECKS}
    v2 = day_state(lake, day)
    assert v2.version > v1.version
    assert v2.built_version == v2.version
    assert values(materializations(second, "parsed_events")[day])["version"] == v2.version

    # The old files are no longer live: the table's files for the day are the new version's, each
    # a new file (a new inode). The prior version's files are kept, the same files with the same
    # bytes, still readable at the table version that committed them (for a rollback).
    assert lake.kept_versions(PARSED_OWNER, day, TELEMETRY.parsed_prefix) == [v1.version, v2.version]
    for f in v2.files:
        assert (root / f).is_file(), f
        assert inode(root / f) not in v1_inodes.values(), f"{f} is still a file of the first version"
    for f, ino in v1_inodes.items():
        assert inode(root / f) == ino, f
        assert sha256(root / f) == v1.entries[f]["sha256"], f
    assert delta_files(root, "telemetry_flat", day) == v2.files_of("telemetry_flat")
    assert delta_files(root, "telemetry_flat", day, version=v1.version) == v1.files_of("telemetry_flat")
    assert live_counts(lake, day, version=v1.version) == live_counts(lake, day)

    # No duplicate rows anywhere in the day as a reader sees it; still equal to truth.
    rows, distinct, by_type = live_counts(lake, day)
    assert rows == distinct == v2.stats["parsed"] == v1.stats["parsed"]
    assert by_type == read_truth(env["lake"], day)

    # Projections were replaced, not added to.
    assert daily_counts(env, day) == counts_before
    assert daily_counts(env, day)[1] == rows
    assert DuckDBStore(env["duckdb"]).query('SELECT count(*) FROM "telemetry"."device_latest"')[0][0] == latest_before

    # The redrive re-run sent nothing (ledger) and reconciles.
    md = redrive_md(second, day)
    assert md["published"] == 0
    assert md["skipped_already_delivered"] == md["selected"] == sent_first
    assert outbox_messages(env) == outbox_before


# ---- 4. stale files -----------------------------------------------------------------------------


def test_stale_parquet_fails_blocking_checks_and_rematerializing_sweeps_it(defs, instance, env):
    """Another writer commits a copy of the day's lock events to the parsed table behind the
    pipeline's back: every Delta reader now sees them twice. Runs only the parsed asset's checks
    against the current lake, by selecting three of them in the real replay job (the asset steps
    are not in that run, so nothing is re-written). (tests/test_cli.py does the same for a ranged
    run through the `dagster` CLI.)"""
    day = "2025-11-25"
    assert day_run(defs, instance, day).success
    lake = Lake(env["lake"])
    built = day_state(lake, day)
    stale = commit_stray_file(lake.root, day)
    stale_rows = pq.read_metadata(Path(lake.root, stale)).num_rows

    job = defs.resolve_job_def("telemetry_replay")
    check_names = ["no_stale_files", "no_duplicate_event_ids", "raw_lines_accounted_for"]
    verify = checks_only_job(job, "parsed_events", check_names)
    checks_only = verify.execute_in_process(instance=instance, partition_key=day, raise_on_error=False)
    # Only the checks ran: no asset was materialized, the lake state is untouched.
    assert checks_only.get_asset_materialization_events() == []
    assert day_state(lake, day).version == built.version
    assert stale in delta_files(lake.root, "telemetry_flat", day)
    assert not checks_only.success
    assert check_verdicts(checks_only) == {
        ("no_stale_files", day): False,
        ("no_duplicate_event_ids", day): False,
        # The committed files still account for every line: only the readers' view is corrupt.
        ("raw_lines_accounted_for", day): True,
    }
    by_key = {e.check_name: e for e in evaluations(checks_only)}
    assert by_key["no_stale_files"].description == f"unexpected: {stale}"
    dupes = by_key["no_duplicate_event_ids"].metadata["duplicate_rows"].value
    assert dupes == stale_rows > 0
    # Blocking: the two failed checks failed their step (the asset's checks run in one), which failed the run.
    failures = step_failure_messages(checks_only)
    assert len(failures) == 1 and "DagsterAssetCheckFailedError" in failures[0], failures
    assert "2 blocking asset checks failed" in failures[0]
    assert "no_stale_files" in failures[0] and "no_duplicate_event_ids" in failures[0], failures[0]

    # Re-materializing the day replaces all of the day's files, the stray one too, and passes.
    healed = day_run(defs, instance, day)
    assert healed.success
    assert check_verdicts(healed) == {(c, day): True for c in CHECKS}
    assert stale not in delta_files(lake.root, "telemetry_flat", day)
    # It is in no recorded version: a rollback must not bring it back.
    assert not [s.version for s in lake.day_states(PARSED_OWNER, day, TELEMETRY.parsed_prefix) if stale in s.entries]
    rows, distinct, by_type = live_counts(lake, day)
    assert rows == distinct and by_type == read_truth(env["lake"], day)

    # And the checks-only run now passes.
    again = verify.execute_in_process(instance=instance, partition_key=day, raise_on_error=False)
    assert again.success
    assert check_verdicts(again) == {(c, day): True for c in check_names}


# ---- 5. parser bug, then replay -----------------------------------------------------------------


def test_parser_bug_day_is_replayed_back_to_truth(defs, instance, env):
    day = "2025-11-25"
    lake = Lake(env["lake"])
    truth = read_truth(env["lake"], day)
    assert day_run(defs, instance, day).success
    v1 = day_state(lake, day)
    assert v1.stats["rows_by_type"] == truth

    bad = day_run(defs, instance, day, parse={"simulate_parser_bug": True})
    v2 = day_state(lake, day)
    assert materializations(bad, "parsed_events")[day]["version"].value == v2.version > v1.version
    _, _, bad_rows = live_counts(lake, day)
    assert bad_rows != truth
    assert day_state(lake, day).stats["rows_by_type"] == bad_rows
    # The bad deploy lost events of every type against version 1: the blocking shrink check caught
    # it, so the bad version was never folded into the projections nor redriven.
    assert not bad.success
    assert check_verdicts(bad)[("no_unconsented_shrink", day)] is False
    assert "projections" not in {m.materialization.asset_key.path[-1] for m in bad.get_asset_materialization_events()}

    fixed = day_run(defs, instance, day)
    assert fixed.success
    assert check_verdicts(fixed) == {(c, day): True for c in CHECKS}
    state = day_state(lake, day)
    assert state.version > v2.version and state.built_version == state.version
    rows, distinct, by_type = live_counts(lake, day)
    assert by_type == truth and rows == distinct
    assert state.stats["rows_by_type"] == truth
    assert daily_counts(env, day)[1] == rows
    # Both earlier versions are kept (within the retention), the wrong one with its wrong rows and stats.
    assert lake.kept_versions(PARSED_OWNER, day, TELEMETRY.parsed_prefix) == [v1.version, v2.version, state.version]
    assert lake.kept_state(PARSED_OWNER, day, TELEMETRY.parsed_prefix, v2.version).stats["rows_by_type"] == bad_rows
    assert live_counts(lake, day, version=v2.version)[2] == bad_rows
    assert live_counts(lake, day, version=v1.version)[2] == truth


# ---- 6. redrive modes ---------------------------------------------------------------------------


def test_redrive_dry_run_limit_type_rerun_and_force(defs, instance, env):
    day = "2025-11-25"
    lake = Lake(env["lake"])

    # dry run (in the full pipeline run): plans, sends nothing, and the check passes.
    planned = day_run(defs, instance, day, redrive={"dry_run": True})
    assert planned.success
    assert check_verdicts(planned)[("deliveries_reconcile", day)] is True
    md = redrive_md(planned, day)
    assert md["dry_run"] is True and md["published"] == 0
    assert md["would_publish"] == md["selected"] > 0
    assert outbox_messages(env) == []
    all_refs = md["selected"]

    # limit N: exactly N messages.
    limited = redrive_only(defs, instance, day, limit=3)
    assert limited.success
    md = redrive_md(limited, day)
    assert (md["selected"], md["published"]) == (3, 3)
    limited_ids = {m["id"] for m in outbox_messages(env)}
    assert len(limited_ids) == 3

    # type=lock: only refs of lock events.
    lock_refs = set(delta_rows(lake.root, "telemetry_flat", day, type="lock")["source_ref"].to_pylist())
    typed = redrive_only(defs, instance, day, type="lock")
    assert typed.success
    md = redrive_md(typed, day)
    assert md["selected"] == len(lock_refs)
    assert md["selected_type_lock"] == md["selected"]
    assert not [k for k in md if k.startswith("selected_type_") and k != "selected_type_lock"]
    assert md["published"] + md["skipped_already_delivered"] == md["selected"]
    new = [m for m in outbox_messages(env) if m["id"] not in limited_ids]
    assert len(new) == md["published"] > 0
    assert {m["source_ref"] for m in new} <= lock_refs

    # Whole day: what is left; then a re-run sends nothing and says why.
    rest = redrive_only(defs, instance, day)
    assert rest.success
    md = redrive_md(rest, day)
    assert md["selected"] == all_refs
    assert len({m["id"] for m in outbox_messages(env)}) == all_refs
    rerun = redrive_only(defs, instance, day)
    assert rerun.success
    assert check_verdicts(rerun) == {("deliveries_reconcile", day): True}
    md = redrive_md(rerun, day)
    assert md["published"] == 0 and md["skipped_already_delivered"] == all_refs
    assert len(outbox_messages(env)) == all_refs

    # force: sends them all again, and the ledger agrees.
    forced = redrive_only(defs, instance, day, force=True)
    assert forced.success
    assert check_verdicts(forced) == {("deliveries_reconcile", day): True}
    md = redrive_md(forced, day)
    assert md["published"] == all_refs and md["skipped_already_delivered"] == 0
    attempts = DuckDBStore(env["duckdb"]).query(
        "SELECT min(attempts), count(*) FROM redrive_ledger WHERE pipeline = 'telemetry' AND day = $d", {"d": day}
    )[0]
    assert attempts == (2, all_refs)


def test_redrive_file_prefix_and_parquet_modes(defs, instance, env):
    day = "2025-11-25"
    lake = Lake(env["lake"])
    assert day_run(defs, instance, day, redrive={"dry_run": True}).success
    files = manifest(lake, day)["files"]
    target = files[5]

    # file: exactly that one message, with the telemetry redrive's body.
    one = redrive_only(defs, instance, day, mode="file", uri=target["uri"])
    assert one.success
    md = redrive_md(one, day)
    assert (md["mode"], md["selected"], md["published"]) == ("file", 1, 1)
    [msg] = outbox_messages(env)
    assert msg["kind"] == "redrive_raw_file"
    assert msg["bucket"] == env["lake"].name
    assert msg["key"] == target["rel_path"]
    assert (env["lake"] / msg["key"]).is_file()

    # file of another day: the run fails with a clear message and sends nothing.
    other = next(p for p in sorted(env["lake"].glob("raw/json_telemetry/year=2025/month=11/day=24/hour=*/*.gz")))
    wrong = redrive_only(defs, instance, day, mode="file", uri=lake.uri(other.relative_to(env["lake"]).as_posix()))
    assert not wrong.success
    failures = step_failure_messages(wrong)
    assert failures and any(f"is not a raw file of partition {day}" in f for f in failures), failures
    assert len(outbox_messages(env)) == 1

    # prefix: the day's raw files under an hour prefix (hour 12 holds the truncated file too).
    prefix = "raw/json_telemetry/year=2025/month=11/day=25/hour=12"
    under = [f for f in files if f["rel_path"].startswith(prefix + "/")]
    assert len(under) == 2
    by_prefix = redrive_only(defs, instance, day, mode="prefix", prefix=prefix)
    assert by_prefix.success
    md = redrive_md(by_prefix, day)
    assert (md["selected"], md["published"]) == (2, 2)
    assert {m["key"] for m in outbox_messages(env)} == {target["rel_path"], *(f["rel_path"] for f in under)}

    # parquet: the source refs of one committed Parquet file, with a dry run to count them.
    pq_file = next(f for f in day_state(lake, day).files if f.startswith("telemetry_flat/type=video_doorbell/"))
    refs = {
        r[0]
        for r in duckdb.execute(
            "SELECT DISTINCT source_ref FROM read_parquet($f)", {"f": [str(env["lake"] / pq_file)]}
        ).fetchall()
    }
    planned = redrive_only(defs, instance, day, mode="parquet", uri=pq_file, dry_run=True)
    assert planned.success
    md = redrive_md(planned, day)
    assert md["selected"] == len(refs) > 0
    assert md["selected_type_video_doorbell"] == len(refs)
    assert len(outbox_messages(env)) == 3


def test_forced_file_redrive_keeps_earlier_outbox_deliveries(defs, instance, env):
    """A forced one-file redrive must add a message to the outbox, not delete earlier ones."""
    day = DEMO_DAYS[0]
    first = day_run(defs, instance, day)
    assert first.success
    delivered = outbox_messages(env)
    assert len(delivered) == redrive_md(first, day)["published"] > 1
    # The day's first raw file is also the first message of the day's batch.
    first_ref = min(m["source_ref"] for m in delivered)
    assert first_ref in {f["uri"] for f in manifest(Lake(env["lake"]), day)["files"]}

    again = redrive_only(defs, instance, day, mode="file", uri=first_ref, force=True)
    assert again.success
    assert redrive_md(again, day)["published"] == 1
    after = outbox_messages(env)
    missing = {m["id"] for m in delivered} - {m["id"] for m in after}
    assert not missing, (
        f"{len(missing)} earlier deliveries vanished from the outbox; it now holds {len(after)} message(s)"
    )
    assert len(after) == len(delivered) + 1


def test_forced_range_redrive_reconciles_every_day(defs, instance, env):
    """force=true over a range re-sends every raw file once: a file holding events of two days
    is sent by the first day and counted as already delivered by the second; the deliveries check
    must still pass."""
    result = run_range(defs, instance, DEMO_DAYS[0], DEMO_DAYS[-1], run_config=redrive_config(force=True))
    mats = materializations(result, "redrive")
    for day in DEMO_DAYS:
        md = values(mats[day])
        assert md["published"] > 0
        assert md["published"] + md["skipped_already_delivered"] == md["selected"]
    sent = [m["key"] for m in OutboxSink(env["outbox"]).read("telemetry")]
    assert len(sent) == len(set(sent)), "a raw file was sent twice in one run"
    failed = {k for e in evaluations(result) if not e.passed for k in [(e.check_name, e.partition)]}
    assert failed == {LATE_WARNING, (LATE_WARNING[0], None)}  # only the non-blocking late-window warning
    assert result.success


# ---- 7. a second pipeline -----------------------------------------------------------------------


EU = dataclasses.replace(TELEMETRY, name="telemetry_eu", parsed_prefix="telemetry_eu_flat")


@pytest.fixture
def two_defs(env):
    from replay_defs.definitions import build_definitions

    return build_definitions([TELEMETRY, EU])


def test_second_pipeline_is_one_spec_away(two_defs, instance, env):
    graph = two_defs.resolve_asset_graph()
    for name in ("telemetry", "telemetry_eu"):
        job = two_defs.resolve_job_def(f"{name}_replay")
        assert job.name == f"{name}_replay"
        keys = {k for k in graph.get_all_asset_keys() if graph.get(k).group_name == name}
        assert keys == {dg.AssetKey([name, a]) for a in ASSETS}
        checks = {(k.asset_key.path[0], k.name) for k in graph.asset_check_keys if k.asset_key.path[0] == name}
        assert checks == {(name, c) for c in CHECKS}

    day = "2025-11-25"
    result = day_run(two_defs, instance, day, job="telemetry_eu_replay")
    assert result.success
    assert check_verdicts(result) == {(c, day): True for c in CHECKS}
    assert {m.materialization.asset_key for m in result.get_asset_materialization_events()} == {
        dg.AssetKey(["telemetry_eu", a]) for a in ASSETS
    }
    lake = Lake(env["lake"])
    state = day_state(lake, day, EU)
    # The day's first and only build, in the second pipeline's own tables.
    assert [s.version for s in lake.day_states("telemetry_eu/parsed_events", day, EU.parsed_prefix)] == [state.version]
    assert all(f.startswith(("telemetry_eu_flat/", "quarantine/telemetry_eu/")) for f in state.files)
    _, _, by_type = live_counts(lake, day, prefix="telemetry_eu_flat")
    assert by_type == read_truth(env["lake"], day)
    # The first pipeline's outputs are untouched.
    assert day_state(lake, day) is None
    assert not (env["lake"] / "telemetry_flat").exists()
    assert not (env["lake"] / "quarantine" / "telemetry").exists()
    assert (
        len(outbox_messages(env, "telemetry_eu"))
        == values(materializations(result, "redrive", "telemetry_eu")[day])["published"]
        > 0
    )
    assert (
        DuckDBStore(env["duckdb"]).query(
            'SELECT sum(events)::BIGINT FROM "telemetry_eu"."daily_counts" WHERE day = $d::DATE', {"d": day}
        )[0][0]
        == state.stats["parsed"]
    )


def test_second_pipeline_redrive_is_independent_of_the_first_pipelines_ledger(two_defs, instance, env):
    """Each pipeline delivers to its own outbox (`<outbox>/<pipeline>/`). The first pipeline having
    delivered a raw file must neither stop the second from delivering it to its own sink, nor make
    the second pipeline's forced redrive fail its deliveries check."""
    day = "2025-11-25"
    assert day_run(two_defs, instance, day).success
    assert len(outbox_messages(env, "telemetry")) > 0
    second = day_run(two_defs, instance, day, job="telemetry_eu_replay")
    assert second.success
    unforced = values(materializations(second, "redrive", "telemetry_eu")[day])
    forced = two_defs.resolve_job_def("telemetry_eu_replay").execute_in_process(
        instance=instance,
        partition_key=day,
        raise_on_error=False,
        asset_selection=[dg.AssetKey(["telemetry_eu", "redrive"])],
        run_config={"ops": {"telemetry_eu__redrive": {"config": {"force": True}}}},
    )
    forced_md = values(materializations(forced, "redrive", "telemetry_eu")[day])
    assert forced_md["published"] == forced_md["selected"] == unforced["selected"] > 0

    problems = []
    if unforced["published"] != unforced["selected"]:
        problems.append(
            f"telemetry_eu's first redrive sent {unforced['published']} of {unforced['selected']} "
            f"(skipped_already_delivered={unforced['skipped_already_delivered']}): the ledger counted telemetry's deliveries"
        )
    failed = {(e.check_name, e.partition): e.description for e in evaluations(forced) if not e.passed}
    if failed or not forced.success:
        problems.append(f"forced telemetry_eu redrive failed its check: {failed}")
    assert not problems, problems


# ---- 8. partition mapping -----------------------------------------------------------------------


def test_days_map_one_to_one_so_a_backfill_builds_the_days_picked(defs):
    """parsed_events[D] reads the neighbours' raw files itself (lateness window); in the graph it
    depends on raw_events[D] alone, so no backfill reaches beyond the days chosen (partitions/)."""
    graph = defs.resolve_asset_graph()
    assert RAW in graph.get(PARSED).parent_keys
    up = graph.get_parent_partition_keys_for_child("2025-11-25", RAW, PARSED)
    assert list(up.partitions_subset.get_partition_keys()) == ["2025-11-25"]
    # Downstream of parsed, days map one to one.
    for child in (dg.AssetKey(["telemetry", "projections"]), REDRIVE):
        up = graph.get_parent_partition_keys_for_child("2025-11-25", PARSED, child)
        assert list(up.partitions_subset.get_partition_keys()) == ["2025-11-25"]
    job = defs.resolve_job_def("telemetry_replay")
    assert job.partitions_def == dg.DailyPartitionsDefinition(start_date="2025-11-01", timezone="UTC")


def test_redrive_rate_limit_paces_deliveries(defs, instance, env):
    import time

    started = time.monotonic()
    result = run_day(
        defs,
        instance,
        "2025-11-25",
        run_config={"ops": {"telemetry__redrive": {"config": {"rate_limit": 10}}}},
        selection=[dg.AssetKey(["telemetry", a]) for a in ("raw_events", "parsed_events", "redrive")],
    )
    elapsed = time.monotonic() - started
    (mat,) = result.asset_materializations_for_node("telemetry__redrive")
    sent = mat.metadata["published"].value
    assert result.success and sent > 20
    # n messages at 10/s cannot take less than (n - 1) / 10 seconds.
    assert elapsed >= (sent - 1) / 10


def test_a_lake_path_holding_quotes_is_data_not_sql(defs, instance, env, monkeypatch):
    """Paths reach SQL only as parameters: a lake under a directory whose name would close a SQL
    string (and open a CSV COPY elsewhere) is just a directory."""
    hostile = env["lake"].parent / "it's' (FORMAT csv) --lake"
    shutil.copytree(env["lake"], hostile)
    monkeypatch.setenv("EVENT_REPLAY_LAKE", str(hostile))
    day = "2025-11-25"
    result = day_run(defs, instance, day)
    assert result.success
    lake = Lake(hostile)
    _, _, by_type = live_counts(lake, day)
    assert by_type == read_truth(hostile, day)
    assert not list(env["lake"].parent.glob("*.csv")) and not list(hostile.rglob("*.csv"))


def test_a_raw_folder_linked_in_from_another_volume_is_read_and_outputs_never_escape_the_lake(
    defs, instance, env, tmp_path
):
    """Symlinks inside the lake are followed for reading (raw data kept elsewhere is linked in),
    never for writing: a parsed prefix that links outside the lake is refused, and nothing is
    written there."""
    day = "2025-11-25"
    raw_day = env["lake"] / "raw/json_telemetry/year=2025/month=11/day=25"
    elsewhere = tmp_path / "other-volume" / "day=25"
    elsewhere.parent.mkdir()
    shutil.move(str(raw_day), elsewhere)
    raw_day.symlink_to(elsewhere, target_is_directory=True)
    result = day_run(defs, instance, day)
    assert result.success
    lake = Lake(env["lake"])
    assert live_counts(lake, day)[2] == read_truth(env["lake"], day)

    outside = tmp_path / "outside-parsed"
    outside.mkdir()
    shutil.rmtree(env["lake"] / "telemetry_flat")
    (env["lake"] / "telemetry_flat").symlink_to(outside, target_is_directory=True)
    again = day_run(defs, instance, day)
    assert not again.success
    assert any("leads outside the lake" in m and "refusing to write there" in m for m in step_failure_messages(again))
    assert list(outside.rglob("*")) == []


def test_a_run_config_cannot_move_where_data_is_written(defs, instance, env, tmp_path):
    """Anyone who can launch a run could otherwise point the lake at any directory."""
    elsewhere = tmp_path / "elsewhere"
    result = defs.resolve_job_def("telemetry_replay").execute_in_process(
        instance=instance,
        partition_key="2025-11-25",
        raise_on_error=False,
        run_config={"resources": {"lake": {"config": {"root": str(elsewhere)}}}},
    )
    assert not result.success
    assert any("EVENT_REPLAY_LAKE" in m and "not a run's" in m for m in step_failure_messages(result))
    assert not elsewhere.exists()
