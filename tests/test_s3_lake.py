"""The telemetry pipeline with its lake on S3 (moto's server): raw files read from the bucket,
parsed days as Delta tables there, redrive messages naming the real bucket and key, and two
backfills running at once against the same S3 lake and a Postgres ledger."""

import json
import os
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import pytest
import warm_process
from conftest import DEMO_DAYS, PROJECT_ROOT, RANGE_TAGS, check_verdicts, run_range
from services import MotoProcess, scratch_database, upload_raw

from replay_defs.jsonl_files.demo import read_truth

BUCKET_PREFIX = "lake"


@pytest.fixture(scope="module")
def moto():
    server = MotoProcess().start()
    yield server
    server.stop()


@pytest.fixture
def s3_lake(env, moto, monkeypatch, request):
    bucket = f"lake-{abs(hash(request.node.name)) % 10**8}"
    uri = moto.lake_env(monkeypatch, bucket, BUCKET_PREFIX)
    assert upload_raw(moto, env["lake"], bucket) > 0
    return {"uri": uri, "bucket": bucket, "truth": env["lake"]}


def outsider_rows(moto, uri: str, table: str, day: str):
    """The day's rows of a Delta table, read with deltalake directly (not through the project)."""
    from deltalake import DeltaTable

    opts = {
        "AWS_ENDPOINT_URL": moto.endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    return DeltaTable(f"{uri}/{table}", storage_options=opts).to_pyarrow_table(
        filters=[("day", "=", date.fromisoformat(day))]
    )


def test_a_backfill_on_an_s3_lake_reads_raw_from_the_bucket_and_commits_delta_tables_there(
    s3_lake, env, defs, instance, moto
):
    result = run_range(defs, instance, DEMO_DAYS[0], DEMO_DAYS[-1])
    assert result.success
    verdicts = check_verdicts(result)
    # The demo's last day has events past its lateness window: that check only warns.
    failed = {k for k, v in verdicts.items() if not v and k[0] != "late_events_within_window"}
    assert verdicts and not failed, failed
    for day in DEMO_DAYS:
        rows = outsider_rows(moto, s3_lake["uri"], "telemetry_flat", day)
        by_type = {}
        for t in rows.column("type").to_pylist():
            by_type[t] = by_type.get(t, 0) + 1
        assert by_type == read_truth(s3_lake["truth"], day), day
    # Nothing of the lake was written to local disk: its tables are in the bucket.
    keys = [
        o["Key"]
        for p in moto.client("s3").get_paginator("list_objects_v2").paginate(Bucket=s3_lake["bucket"])
        for o in p.get("Contents", [])
    ]
    assert any(k.startswith(f"{BUCKET_PREFIX}/telemetry_flat/_delta_log/") for k in keys)
    assert any(k.startswith(f"{BUCKET_PREFIX}/quarantine/telemetry/_delta_log/") for k in keys)
    assert not (Path(os.environ["EVENT_REPLAY_LAKE"].replace("s3://", "/")).exists())


def test_redrive_messages_name_the_real_bucket_and_key(s3_lake, env, defs, instance, moto):
    from replay_defs.sinks.outbox import OutboxSink

    assert run_range(defs, instance, DEMO_DAYS[0], DEMO_DAYS[0]).success
    bodies = list(OutboxSink(env["outbox"]).read("telemetry"))
    assert bodies
    s3 = moto.client("s3")
    for body in bodies:
        assert body["kind"] == "redrive_raw_file"
        assert body["bucket"] == s3_lake["bucket"]
        assert body["key"].startswith(f"{BUCKET_PREFIX}/raw/")
        s3.head_object(Bucket=body["bucket"], Key=body["key"])  # the object the message names exists


def test_a_changed_committed_file_on_s3_fails_the_blocking_check(s3_lake, env, defs, instance, moto):
    from assets.checks import stale_files
    from replay_defs.pipeline.committed import DayNotReady, committed_parquet, verified_parquet
    from replay_defs.pipelines import TELEMETRY

    day = DEMO_DAYS[0]
    assert run_range(defs, instance, day, day).success
    from replay_defs.pipeline.cli import _lake

    lake = _lake(defs)
    assert stale_files(lake, TELEMETRY, day).passed
    victim = committed_parquet(lake, TELEMETRY, day)[0]
    s3, key = moto.client("s3"), f"{BUCKET_PREFIX}/{victim}"
    data = bytearray(s3.get_object(Bucket=s3_lake["bucket"], Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    s3.put_object(Bucket=s3_lake["bucket"], Key=key, Body=bytes(data))
    verdict = stale_files(lake, TELEMETRY, day)
    assert not verdict.passed and f"changed content: {victim}" in verdict.description
    with pytest.raises(DayNotReady, match="no longer hold the committed bytes"):
        verified_parquet(lake, TELEMETRY, day)


RUNNER = textwrap.dedent(
    """
    import json, sys, dagster as dg
    from replay_defs.definitions import build_definitions
    start, end, home = sys.argv[1:4]
    defs = build_definitions()
    with dg.instance_for_test(temp_dir=home) as inst:
        r = defs.resolve_job_def("telemetry_replay").execute_in_process(
            instance=inst,
            tags={"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end},
            raise_on_error=False,
        )
        materialized = sorted({str(m.partition) for m in r.get_asset_materialization_events()})
        failed = sorted(e.check_name for e in r.get_asset_check_evaluations() if not e.passed)
        print(json.dumps({"materialized": materialized, "failed_checks": failed}))
    """
)


def test_two_workers_on_different_days_produce_what_one_does(env, moto, s3_lake, postgres_dsn, tmp_path, monkeypatch):
    """Two backfill processes (as two run workers on two machines would) share the S3 lake, the
    Postgres ledger and the Postgres projections; each day ends as a single run leaves it, every
    check of every day passing in the process that built it."""
    with scratch_database(postgres_dsn) as ledger_url, scratch_database(postgres_dsn) as store_url:
        child_env = {
            **os.environ,
            "EVENT_REPLAY_LEDGER_URL": ledger_url,
            "EVENT_REPLAY_STORE_URL": store_url,
            "PYTHONPATH": str(PROJECT_ROOT),
        }
        procs = []
        for i, (start, end) in enumerate([(DEMO_DAYS[0], DEMO_DAYS[1]), (DEMO_DAYS[2], DEMO_DAYS[2])]):
            home = tmp_path / f"worker{i}"
            home.mkdir()
            procs.append(
                warm_process.WarmPopen(
                    [sys.executable, "-c", RUNNER, start, end, str(home)],
                    env=child_env,
                    cwd=PROJECT_ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outs = [p.communicate(timeout=600) for p in procs]
        reports = []
        for out, err in outs:
            assert out.strip(), err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
        assert reports[0]["materialized"] == DEMO_DAYS[:2] and reports[1]["materialized"] == DEMO_DAYS[2:]
        # A worker's replace-projection fold check may read the store while the other worker has
        # committed a day it has not folded yet (docs/architecture.md, Scale-out); the demo's last day
        # warns of late events; nothing else may fail.
        assert {c for r in reports for c in r["failed_checks"]} <= {
            "projections_match_fold",
            "late_events_within_window",
        }, reports
        # Once both are done, every check of every day passes, run here against the shared state.
        monkeypatch.setenv("EVENT_REPLAY_LEDGER_URL", ledger_url)
        monkeypatch.setenv("EVENT_REPLAY_STORE_URL", store_url)
        from replay_defs.definitions import build_definitions

        verify = build_definitions().resolve_job_def("telemetry_verify")
        home = tmp_path / "verifier"
        home.mkdir()
        import dagster as dg

        with dg.instance_for_test(temp_dir=str(home)) as inst:
            result = verify.execute_in_process(
                instance=inst,
                tags={RANGE_TAGS[0]: DEMO_DAYS[0], RANGE_TAGS[1]: DEMO_DAYS[-1]},
                raise_on_error=False,
            )
        verdicts = check_verdicts(result)
        failed = {k: v for k, v in verdicts.items() if not v and k[0] != "late_events_within_window"}
        assert verdicts and not failed, failed
    for day in DEMO_DAYS:
        rows = outsider_rows(moto, s3_lake["uri"], "telemetry_flat", day)
        ids = rows.column("event_id").to_pylist()
        assert len(ids) == len(set(ids)) == sum(read_truth(s3_lake["truth"], day).values()), day


def test_a_type_rebuild_replaces_only_that_types_files(s3_lake, env, defs, instance, moto):
    from replay_defs.pipeline.cli import _lake
    from replay_defs.pipeline.committed import parsed_state
    from replay_defs.pipelines import TELEMETRY

    day = DEMO_DAYS[1]
    assert run_range(defs, instance, day, day).success
    lake = _lake(defs)
    before = parsed_state(lake, TELEMETRY, day)
    config = {"ops": {"telemetry__parsed_events": {"config": {"type": "lock"}}}}
    result = run_range(defs, instance, day, day, run_config=config)
    assert result.success
    after = parsed_state(lake, TELEMETRY, day)
    assert after.version > before.version

    def files(state, t):
        return {f for f in state.files_of(TELEMETRY.parsed_prefix) if f"/type={t}/" in f}

    assert files(after, "lock") and files(after, "lock").isdisjoint(files(before, "lock"))
    for t in ("bridge", "video_doorbell"):
        assert files(after, t) == files(before, t), t  # untouched: the same committed files
    rows = outsider_rows(moto, s3_lake["uri"], "telemetry_flat", day)
    by_type = {}
    for t in rows.column("type").to_pylist():
        by_type[t] = by_type.get(t, 0) + 1
    assert by_type == read_truth(s3_lake["truth"], day)
    assert all(check_verdicts(result).values())
