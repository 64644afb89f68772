"""Seed 004's destructive modes on the Delta lake, end to end (real demo lake, real Dagster
instance, the outbox read back as a consumer would): a parquet-mode redrive takes its file out of
the day before sending its sources; a day + type rebuild replaces that type only; dry runs list
what they would delete or replace."""

import hashlib
import json
from datetime import date
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from conftest import check_verdicts, delta_files, delta_rows, event_counts, run_day

from assets.checks import accounting, duplicate_ids, projection_totals, shrink, stale_files
from replay_defs.core.lake import Lake
from replay_defs.pipeline.committed import parsed_state
from replay_defs.pipelines import TELEMETRY

DAY = "2025-11-25"
PARSED = dg.AssetKey(["telemetry", "parsed_events"])
PROJECTIONS = dg.AssetKey(["telemetry", "projections"])
REDRIVE = dg.AssetKey(["telemetry", "redrive"])
# Small de-duplication buckets: each type of the day is several Parquet files, so taking one out
# leaves others of its type.
BUILD = {"workers": 1, "bucket_rows": 1000}
PARSED_CHECKS = {"no_duplicate_event_ids", "raw_lines_accounted_for", "no_stale_files", "no_unconsented_shrink"}


def parse_config(**config) -> dict:
    return {"ops": {"telemetry__parsed_events": {"config": {**BUILD, **config}}}}


def redrive(defs, instance, **config):
    return run_day(
        defs, instance, DAY, run_config={"ops": {"telemetry__redrive": {"config": config}}}, selection=[REDRIVE]
    )


def md_of(result, asset: str) -> dict:
    [mat] = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key == dg.AssetKey(["telemetry", asset])
    ]
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def run_log(result, instance) -> str:
    return "\n".join(e.user_message for e in instance.all_logs(result.run_id))


def file_hashes(lake_root, table: str) -> dict[str, str]:
    """The day's files in the Delta table now, with the SHA-256 of their bytes."""
    return {f: hashlib.sha256((lake_root / f).read_bytes()).hexdigest() for f in delta_files(lake_root, table, DAY)}


def file_rows(lake_root, rel: str) -> tuple[int, set[str]]:
    [(rows,)] = duckdb.execute("SELECT count(*) FROM read_parquet($f)", {"f": str(lake_root / rel)}).fetchall()
    refs = {
        r[0]
        for r in duckdb.execute(
            "SELECT DISTINCT source_ref FROM read_parquet($f)", {"f": str(lake_root / rel)}
        ).fetchall()
    }
    return rows, refs


@pytest.fixture
def built(defs, instance, env):
    """The day built, projected and redriven whole (the outbox holds every source file once)."""
    result = defs.resolve_job_def("telemetry_replay").execute_in_process(
        instance=instance, partition_key=DAY, run_config=parse_config(), raise_on_error=False
    )
    assert result.success
    return Lake(env["lake"])


def test_parquet_mode_takes_the_file_out_then_re_ingest_brings_its_rows_back_once(defs, instance, env, built):
    lake, root = built, env["lake"]
    before_rows = delta_rows(root, "telemetry_flat", DAY)
    rows_before, distinct_before, by_type_before = event_counts(before_rows)
    before = parsed_state(lake, TELEMETRY, DAY)
    lock_files = [f for f in before.files_of("telemetry_flat") if "/type=lock/" in f]
    assert len(lock_files) > 1, "the test needs a type with several files"
    target = lock_files[0]
    rows, refs = file_rows(root, target)
    others = {f: h for f, h in file_hashes(root, "telemetry_flat").items() if "/type=lock/" not in f}
    batches_before = set(Path(env["outbox"]).rglob("batch-*.jsonl"))

    # Dry run: the file, its type and rows, in the metadata and the run log; nothing changes.
    plan = redrive(defs, instance, mode="parquet", uri=lake.uri(target), dry_run=True)
    assert plan.success
    md = md_of(plan, "redrive")
    assert (md["would_delete_files"], md["would_delete_rows"], md["would_delete_rows_lock"]) == (1, rows, rows)
    assert [r.data for r in md["would_delete"].records] == [{"file": target, "type": "lock", "rows": rows}]
    assert md["selected"] == len(refs) and md["published"] == 0
    assert f"would take out {target} (lock, {rows} rows)" in run_log(plan, instance)
    assert parsed_state(lake, TELEMETRY, DAY).version == before.version
    assert target in delta_files(root, "telemetry_flat", DAY)

    # The real run: the file leaves the day (a new version saying so), then its sources go out again.
    # force: the earlier whole-day redrive delivered them already.
    done = redrive(defs, instance, mode="parquet", uri=target, force=True)
    assert done.success
    md = md_of(done, "redrive")
    assert (md["deleted_file"], md["deleted_rows"], md["published"]) == (target, rows, len(refs))
    parsed_md = md_of(done, "parsed_events")  # the day's change, recorded in Dagster
    assert (parsed_md["deleted_file"], parsed_md["out_for_redrive"]) == (target, rows)
    # What the run put in the outbox (its batch files), read as a consumer reads them.
    new_batches = set(Path(env["outbox"]).rglob("batch-*.jsonl")) - batches_before
    sent = [json.loads(line) for f in sorted(new_batches) for line in f.read_text().splitlines()]
    assert {m["source_ref"] for m in sent} == refs and len(sent) == len(refs)
    state = parsed_state(lake, TELEMETRY, DAY)
    assert state.version == md["parsed_version"] > before.version
    [out] = state.stats["out_for_redrive"]
    assert (out["file"], out["type"], out["rows"], set(out["source_refs"])) == (target, "lock", rows, refs)
    assert target not in delta_files(root, "telemetry_flat", DAY)
    now_rows = delta_rows(root, "telemetry_flat", DAY)
    assert now_rows.num_rows == rows_before - rows
    assert not set(now_rows["event_id"].to_pylist()) & set(
        duckdb.execute("SELECT event_id FROM read_parquet($f)", {"f": str(root / target)}).fetchnumpy()["event_id"]
    )
    # The other types' files are untouched; the rest of lock is the same bytes under new names.
    after = file_hashes(root, "telemetry_flat")
    assert {f: h for f, h in after.items() if "/type=lock/" not in f} == others
    kept_lock = sorted(h for f, h in file_hashes(root, "telemetry_flat").items() if "/type=lock/" in f)
    assert kept_lock == sorted(before.entries[f]["sha256"] for f in lock_files[1:])

    # In between, the checks say what is true: nothing duplicated, the tables are the state, no
    # type lost events (they are out, not gone), the accounting warns that rows are out and how to
    # bring them back, and the projections (which still count them) disagree.
    assert duplicate_ids(lake, TELEMETRY, DAY).passed
    assert stale_files(lake, TELEMETRY, DAY).passed
    assert shrink(lake, TELEMETRY, DAY).passed
    acc = accounting(lake, TELEMETRY, DAY)
    assert not acc.passed and acc.severity == dg.AssetCheckSeverity.WARN
    assert acc.metadata["out_for_redrive"] == rows and acc.metadata["difference"] == 0
    assert target in acc.description and "type lock" in acc.description
    from replay_defs.pipeline.store import DuckDBStore

    totals = projection_totals(lake, DuckDBStore(env["duckdb"]), TELEMETRY, DAY)
    assert not totals.passed and f"{rows} rows are out of the day" in totals.description

    # A retry of the run (e.g. its send failed) sends the recorded sources; nothing more is taken out.
    retry = redrive(defs, instance, mode="parquet", uri=target)
    assert retry.success
    md = md_of(retry, "redrive")
    assert (md["selected"], md["published"], md["skipped_already_delivered"]) == (len(refs), 0, len(refs))
    assert parsed_state(lake, TELEMETRY, DAY).version == state.version

    # The consumer re-ingests the sources: lock of the day is rebuilt. Every event is back once.
    again = run_day(defs, instance, DAY, run_config=parse_config(type="lock"), selection=[PARSED, PROJECTIONS])
    assert again.success
    verdicts = check_verdicts(again)
    assert all(verdicts[(c, DAY)] for c in PARSED_CHECKS), verdicts
    assert verdicts[("totals_match_parsed", DAY)] and verdicts[("projections_match_fold", DAY)], verdicts
    assert event_counts(delta_rows(root, "telemetry_flat", DAY)) == (rows_before, distinct_before, by_type_before)
    assert "out_for_redrive" not in parsed_state(lake, TELEMETRY, DAY).stats


def test_a_re_ingest_that_brings_fewer_rows_back_fails_the_shrink_check(defs, instance, env, built):
    """The rows taken out stay in the shrink baseline: a rebuild of another type does not clear
    them, and a rebuild that does not bring them back is a shrink."""
    lake, root = built, env["lake"]
    by_type_before = event_counts(delta_rows(root, "telemetry_flat", DAY))[2]
    target = next(f for f in parsed_state(lake, TELEMETRY, DAY).files_of("telemetry_flat") if "/type=lock/" in f)
    rows, _ = file_rows(root, target)
    assert redrive(defs, instance, mode="parquet", uri=target).success

    # Another type rebuilt: the lock file stays out and is still accounted for as out.
    other = run_day(defs, instance, DAY, run_config=parse_config(type="bridge"), selection=[PARSED])
    assert other.success
    assert parsed_state(lake, TELEMETRY, DAY).stats["out_for_redrive"][0]["file"] == target
    acc = accounting(lake, TELEMETRY, DAY)
    assert acc.metadata["difference"] == 0 and acc.metadata["out_for_redrive"] == rows

    state = parsed_state(lake, TELEMETRY, DAY)
    assert state.stats["previous"]["rows_by_type"]["lock"] == by_type_before["lock"]

    # A re-ingest whose parser loses lock events (the demo's bad deploy) is a shrink against the
    # counts from before the file was taken out: the blocking check fails the run.
    bad = run_day(
        defs, instance, DAY, run_config=parse_config(type="lock", simulate_parser_bug=True), selection=[PARSED]
    )
    assert not bad.success
    assert check_verdicts(bad)[("no_unconsented_shrink", DAY)] is False
    verdict = shrink(lake, TELEMETRY, DAY)
    assert not verdict.passed and "lock" in verdict.description


def test_a_type_rebuild_replaces_only_that_type(defs, instance, env, built):
    lake, root = built, env["lake"]
    flat, quarantine = file_hashes(root, "telemetry_flat"), file_hashes(root, "quarantine/telemetry")
    rows_before = delta_rows(root, "telemetry_flat", DAY)
    lock_before = {f: h for f, h in flat.items() if "/type=lock/" in f}
    lock_rows = sum(1 for t in rows_before["type"].to_pylist() if t == "lock")
    before = parsed_state(lake, TELEMETRY, DAY)

    # Dry run: lists lock's files with their rows, in the metadata and the run log; changes nothing.
    plan = run_day(defs, instance, DAY, run_config=parse_config(type="lock", dry_run=True), selection=[PARSED])
    assert plan.success
    md = md_of(plan, "parsed_events")
    assert md["would_replace_files"] == len(lock_before) and md["would_replace_rows"] == lock_rows
    assert md["would_replace_rows_lock"] == lock_rows
    assert not [k for k in md if k.startswith("would_replace_rows_") and k != "would_replace_rows_lock"]
    assert {r.data["file"] for r in md["would_replace"].records} == set(lock_before)
    log = run_log(plan, instance)
    assert all(f"would replace {f} (lock, " in log for f in lock_before)
    assert parsed_state(lake, TELEMETRY, DAY).version == before.version

    rebuilt = run_day(defs, instance, DAY, run_config=parse_config(type="lock"), selection=[PARSED, PROJECTIONS])
    assert rebuilt.success
    verdicts = check_verdicts(rebuilt)
    assert all(verdicts[(c, DAY)] for c in PARSED_CHECKS), verdicts
    assert verdicts[("totals_match_parsed", DAY)] and verdicts[("projections_match_fold", DAY)], verdicts

    flat_after = file_hashes(root, "telemetry_flat")
    # The other types: the same files (paths in the Delta log) with the same bytes; so is the quarantine.
    assert {f: h for f, h in flat_after.items() if "/type=lock/" not in f} == {
        f: h for f, h in flat.items() if "/type=lock/" not in f
    }
    assert file_hashes(root, "quarantine/telemetry") == quarantine
    # lock: new files (none of the old ones is in the table), holding the same events.
    lock_after = {f for f in flat_after if "/type=lock/" in f}
    assert lock_after and not lock_after & set(lock_before)
    assert sorted(delta_rows(root, "telemetry_flat", DAY, type="lock")["event_id"].to_pylist()) == sorted(
        e for e, t in zip(rows_before["event_id"].to_pylist(), rows_before["type"].to_pylist()) if t == "lock"
    )
    assert event_counts(delta_rows(root, "telemetry_flat", DAY)) == event_counts(rows_before)
    assert parsed_state(lake, TELEMETRY, DAY).version > before.version


def test_a_type_rebuild_counts_the_other_types_as_committed(defs, instance, env):
    """The other types' files stay, so their counts in the new version are the committed ones, not
    a fresh parse's: here the day was first built by a parser that dates events 8 h off (its other
    types still hold that build's events), then lock is rebuilt with the right one."""
    lake, root = Lake(env["lake"]), env["lake"]
    first = run_day(defs, instance, DAY, run_config=parse_config(simulate_parser_bug=True), selection=[PARSED])
    assert first.success
    buggy = event_counts(delta_rows(root, "telemetry_flat", DAY))[2]

    fixed = run_day(defs, instance, DAY, run_config=parse_config(type="lock"), selection=[PARSED])
    rows, _, by_type = event_counts(delta_rows(root, "telemetry_flat", DAY))
    assert by_type["bridge"] == buggy["bridge"] and by_type["lock"] != buggy["lock"]
    stats = parsed_state(lake, TELEMETRY, DAY).stats
    assert (stats["rows_by_type"], stats["parsed"]) == (by_type, rows)
    assert md_of(fixed, "parsed_events")["parsed"] == rows
    # The day now mixes two parsers' output: the accounting (one parse's routing and quarantine
    # against files of two) does not add up, says so and blocks; a whole-day rebuild is the way out.
    assert not fixed.success
    assert check_verdicts(fixed)[("raw_lines_accounted_for", DAY)] is False
    assert "raw " in accounting(lake, TELEMETRY, DAY).description


@pytest.fixture(scope="module")
def moto():
    from services import MotoProcess

    server = MotoProcess().start()
    yield server
    server.stop()


def test_parquet_mode_on_an_s3_lake(env, moto, monkeypatch, instance):
    """The same take-out with the lake in a bucket (moto): the file leaves the Delta table there
    (read with deltalake directly), the rest of its type is copied within the bucket, and the
    re-ingest brings the rows back once."""
    from deltalake import DeltaTable
    from services import upload_raw

    from replay_defs.definitions import build_definitions
    from replay_defs.pipeline.cli import _lake

    uri = moto.lake_env(monkeypatch, "surgical-lake")
    assert upload_raw(moto, env["lake"], "surgical-lake") > 0
    defs = build_definitions()
    opts = {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    opts.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")

    def outsider():
        table = DeltaTable(f"{uri}/telemetry_flat", storage_options=opts)
        return event_counts(table.to_pyarrow_table(filters=[("day", "=", date.fromisoformat(DAY))]))

    assert run_day(defs, instance, DAY, run_config=parse_config(), selection=[PARSED]).success
    lake = _lake(defs)
    rows_before = outsider()
    target = next(f for f in parsed_state(lake, TELEMETRY, DAY).files_of("telemetry_flat") if "/type=lock/" in f)
    rows = parsed_state(lake, TELEMETRY, DAY).entries[target]["rows"]
    assert redrive(defs, instance, mode="parquet", uri=lake.uri(target)).success
    now = outsider()
    assert now[0] == rows_before[0] - rows and now[0] == now[1]  # the file's rows gone, nothing twice
    assert stale_files(lake, TELEMETRY, DAY).passed and not accounting(lake, TELEMETRY, DAY).passed

    again = run_day(defs, instance, DAY, run_config=parse_config(type="lock"), selection=[PARSED])
    assert again.success and all(check_verdicts(again).values()), check_verdicts(again)
    assert outsider() == rows_before
