"""Ingestion refill: keys from access-log CSVs, raw S3 access logs and listings become
BullMQ jobs that a real BullMQ Worker consumes exactly once per distinct key."""

import dataclasses
import os
import uuid
from datetime import date, datetime, timezone
from urllib.parse import quote

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import warm_process
from conftest import PROJECT_ROOT, check_verdicts
from services import Moto, RedisServer, bullmq_consume

from assets.refill import keys_accounted_for, keys_state, no_duplicate_keys
from replay_defs.core.lake import Lake
from replay_defs.core.naming import refill_quarantine_table
from replay_defs.ingestion_refill.access_logs import (
    CLASSIFY,
    ROOTS_ENV,
    OutsideRefillRoots,
    clean_key_pattern,
    collect_keys,
    job_batches,
)
from replay_defs.ingestion_refill.spec import refill_tables
from replay_defs.pipeline.spec import RedriveSpec
from replay_defs.pipelines import INGESTION_REFILL
from replay_defs.sinks.redis import RedisSinkSpec

DAY, NEXT_DAY = "2025-03-02", "2025-03-03"
TYPES = ("trace", "observation", "score")
# Rows the validation must refuse, with the reason each gets.
BAD_ROWS = {
    "p9/../../etc/passwd.json": "path_traversal",
    "/p9/trace/b/e.json": "path_traversal",
    "p9/trace/%2e%2e/e.json": "path_traversal",
    "p9/span/b/e.json": "unknown_type",
    "p9/trace/b": "bad_key_shape",
    "p9/trace/b/e.txt": "bad_key_shape",
    "": "missing_key",
}


@pytest.fixture(autouse=True)
def refill_roots(tmp_path, monkeypatch):
    """The tests' files are in their temp dir: that is the refill root (the lake is under it too)."""
    monkeypatch.setenv(ROOTS_ENV, str(tmp_path))


def good_keys(n_per_type: int = 40) -> list[str]:
    return [f"proj-{p}/{t}/body-{i}/evt-{p}-{t}-{i}.json" for p in (1, 2) for t in TYPES for i in range(n_per_type)]


def write_csv(path, keys: list[str], repeat_every: int = 3) -> None:
    """The seed's export: "operation","key"; every third key listed twice, GETs mixed in, bad rows,
    and two lines the CSV reader cannot split."""
    lines = ['"operation","key"']
    for i, key in enumerate(keys):
        lines.append(f'"REST.PUT.OBJECT","{key}"')
        lines.append(f'"REST.GET.OBJECT","{key}"')
        if i % repeat_every == 0:
            lines.append(f'"REST.PUT.OBJECT","{key}"')
    lines += [f'"REST.PUT.OBJECT","{k}"' for k in BAD_ROWS]
    lines += ['"REST.PUT.OBJECT","p9/trace/b/x.json","extra column"', '"REST.PUT.OBJECT","p9/trace/b/unterminated.json']
    path.write_text("\n".join(lines) + "\n")


def refill_spec(queue: str):
    return dataclasses.replace(
        INGESTION_REFILL, redrive=RedriveSpec(unit="event", sink=RedisSinkSpec(queue, job_name="ingestion-job"))
    )


def run_refill(spec, instance, start, end, source, location, delivery=None):
    from replay_defs.definitions import build_definitions

    job = build_definitions(pipelines=(), refills=(spec,)).resolve_job_def(f"{spec.name}_replay")
    config = {
        "ops": {
            f"{spec.name}__event_keys": {"config": {"source": source, "location": location}},
            f"{spec.name}__redrive": {"config": delivery or {}},
        }
    }
    return job.execute_in_process(
        instance=instance,
        run_config=config,
        raise_on_error=False,
        tags={"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end},
    )


def day_verdicts(result) -> dict:
    """The per-day check verdicts (a ranged run also logs a summary per check)."""
    return {k: v for k, v in check_verdicts(result).items() if k[1] is not None}


def committed_quarantine(env, spec, day=DAY) -> str:
    """The path of the day's one committed quarantine file."""
    lake = Lake(env["lake"])
    (rel,) = keys_state(lake, spec, day).files_of(refill_quarantine_table(spec))
    return lake.storage.path(rel)


def metadata(result, spec, asset, day=DAY) -> dict:
    mats = [m for m in result.asset_materializations_for_node(f"{spec.name}__{asset}") if m.partition == day]
    assert len(mats) == 1, mats
    return {k: v.value for k, v in mats[0].metadata.items()}


def test_csv_refill_gives_a_bullmq_worker_one_job_per_distinct_key(env, instance, redis_url, tmp_path, monkeypatch):
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
    spec = refill_spec(f"ingestion-test-{uuid.uuid4().hex[:8]}")
    keys = good_keys()
    csv_path = tmp_path / "events.csv"
    write_csv(csv_path, keys)

    plan = run_refill(spec, instance, DAY, DAY, "csv", str(csv_path), {"dry_run": True})
    assert plan.success
    md = metadata(plan, spec, "event_keys")
    repeats = len(range(0, len(keys), 3))
    assert (md["keys"], md["duplicates"], md["put_rows"]) == (len(keys), repeats, len(keys) + repeats + len(BAD_ROWS))
    assert md["malformed_rows"] == 2 and md["quarantined"] == len(BAD_ROWS) + 2
    assert (
        md["quarantined_path_traversal"] == 3
        and md["quarantined_unknown_type"] == 1
        and md["quarantined_bad_key_shape"] == 2
    )
    assert md["quarantined_missing_key"] == 1 and md["quarantined_malformed_csv_row"] == 2
    assert "| proj-2 | score | 40 |" in md["keys_by_project_and_type"]
    assert metadata(plan, spec, "redrive")["would_publish"] == len(keys)
    assert bullmq_consume(redis_url, spec.redrive.sink.key, idle_s=0.5) == [], "a dry run enqueues nothing"
    assert all(day_verdicts(plan).values()) and len(day_verdicts(plan)) == 3

    quarantine = dict(
        duckdb.execute("SELECT raw, reason FROM read_parquet($f)", {"f": committed_quarantine(env, spec)}).fetchall()
    )
    for raw, reason in BAD_ROWS.items():
        assert quarantine[raw or None] == reason
    assert sum(r.startswith("malformed_csv_row") for r in quarantine.values()) == 2

    first = run_refill(spec, instance, DAY, DAY, "csv", str(csv_path), {"limit": 7, "batch_size": 5})
    assert first.success and metadata(first, spec, "redrive")["published"] == 7
    rest = run_refill(spec, instance, DAY, DAY, "csv", str(csv_path), {"rate_limit": 1000, "batch_size": 50})
    assert rest.success
    md = metadata(rest, spec, "redrive")
    assert (md["published"], md["skipped_already_delivered"]) == (len(keys) - 7, 7)
    assert all(day_verdicts(rest).values()) and len(day_verdicts(rest)) == 3

    jobs = bullmq_consume(redis_url, spec.redrive.sink.key)
    assert sorted(j[0] for j in jobs) == sorted(keys), "exactly one job per distinct key"
    job_id, name, data = next(j for j in jobs if j[0] == "proj-2/observation/body-3/evt-2-observation-3.json")
    assert name == "ingestion-job"
    assert data["id"] == "evt-2-observation-3" and data["name"] == "ingestion-job" and data["timestamp"].endswith("Z")
    assert data["payload"] == {
        "data": {"type": "observation-create", "eventBodyId": "body-3", "fileKey": "evt-2-observation-3"},
        "authCheck": {"validKey": True, "scope": {"projectId": "proj-2", "accessLevel": "project"}},
    }

    again = run_refill(spec, instance, DAY, DAY, "csv", str(csv_path))
    assert again.success and metadata(again, spec, "redrive")["published"] == 0
    assert bullmq_consume(redis_url, spec.redrive.sink.key, idle_s=0.5) == [], "a second refill enqueues nothing"


def test_keys_another_writer_commits_to_the_day_fail_no_duplicate_keys(env, instance, tmp_path):
    """The check reads the day's keys as the Delta table holds them now: a file another writer
    appended with keys the day already has is seen; the accounting reads the committed state."""
    from deltalake import write_deltalake

    spec = refill_spec("unused")
    csv_path = tmp_path / "events.csv"
    write_csv(csv_path, good_keys(5))
    assert run_refill(spec, instance, DAY, DAY, "csv", str(csv_path), {"dry_run": True}).success
    lake = Lake(env["lake"])
    assert no_duplicate_keys(lake, spec, DAY).passed

    table = refill_tables(spec)[0]
    (committed,) = keys_state(lake, spec, DAY).files_of(table.rel)
    again = pq.read_table(lake.storage.path(committed)).slice(0, 3)
    again = again.append_column("day", pa.array([date.fromisoformat(DAY)] * 3, pa.date32()))
    write_deltalake(lake.storage.table_uri(table.rel), again.cast(table.full_schema()), mode="append")
    assert len(lake.live_files(table, DAY)) == 2

    verdict = no_duplicate_keys(lake, spec, DAY)
    assert not verdict.passed and verdict.description == "3 keys listed twice"
    assert keys_accounted_for(lake, spec, DAY).passed


def access_log_line(when: datetime, operation: str, key: str) -> str:
    """One record in AWS's S3 server access log format."""
    stamp = when.strftime("%d/%b/%Y:%H:%M:%S +0000")
    return (
        f"79a59df900b949e55d96a1e698fbacedfd6e09d98eacf8f8d5218e7cd47ef2be langfuse-events [{stamp}] 192.0.2.3 "
        f'arn:aws:iam::123456789012:user/ingest 3E57427F3EXAMPLE {operation} {key} "PUT /{key} HTTP/1.1" 200 - - 512 '
        f'10 9 "-" "aws-sdk-js/3.0" - Ry0rMW9h4+YI= SigV4 ECDHE-RSA-AES128-GCM-SHA256 AuthHeader langfuse-events.s3.amazonaws.com TLSv1.2 - -'
    )


def test_raw_access_logs_in_s3_split_by_record_day(env, instance, redis_url, monkeypatch):
    moto = Moto().start()
    try:
        monkeypatch.setenv("EVENT_REPLAY_S3_ENDPOINT", moto.endpoint)
        monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
        for var, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(var, value)
        s3 = moto.client("s3")
        s3.create_bucket(Bucket="access-logs")
        day1 = [f"p1/trace/b{i}/e{i}.json" for i in range(5)] + ['p1/score/b with space/e"1.json']
        day2 = [f"p2/observation/b{i}/e{i}.json" for i in range(4)]
        t1, t2 = datetime(2025, 3, 2, 23, 59, tzinfo=timezone.utc), datetime(2025, 3, 3, 0, 1, tzinfo=timezone.utc)
        encode = lambda k: quote(quote(k))  # noqa: E731 (the log writes a REST key URL-encoded twice)
        # Logs are named by delivery time: the file of 2025-03-03 holds the last records of 03-02.
        s3.put_object(
            Bucket="access-logs",
            Key="logs/2025-03-02-23-00-00-AAAA",
            Body="\n".join(
                [access_log_line(t1, "REST.PUT.OBJECT", encode(k)) for k in day1[:3]]
                + [access_log_line(t1, "REST.GET.OBJECT", day1[0])]
            ).encode(),
        )
        s3.put_object(
            Bucket="access-logs",
            Key="logs/2025-03-03-00-05-00-BBBB",
            Body="\n".join(
                [access_log_line(t1, "REST.PUT.OBJECT", encode(k)) for k in day1[3:]]
                + [access_log_line(t2, "REST.PUT.OBJECT", k) for k in day2 + day2[:1]]
                + ["this is not an access log line"]
            ).encode(),
        )
        s3.put_object(
            Bucket="access-logs",
            Key="logs/2025-03-09-00-00-00-CCCC",
            Body=access_log_line(t2, "REST.PUT.OBJECT", "p3/trace/x/y.json").encode(),
        )
        spec = refill_spec(f"ingestion-test-{uuid.uuid4().hex[:8]}")

        result = run_refill(spec, instance, DAY, NEXT_DAY, "access_logs", "s3://access-logs/logs/")
        assert result.success
        first, second = metadata(result, spec, "event_keys", DAY), metadata(result, spec, "event_keys", NEXT_DAY)
        assert (first["keys"], first["malformed_rows"], second["keys"], second["duplicates"]) == (
            len(day1),
            1,
            len(day2),
            1,
        )
        assert metadata(result, spec, "redrive", DAY)["published"] + metadata(result, spec, "redrive", NEXT_DAY)[
            "published"
        ] == len(day1 + day2)
        assert all(day_verdicts(result).values()) and len(day_verdicts(result)) == 6
        assert sorted(j[0] for j in bullmq_consume(redis_url, spec.redrive.sink.key)) == sorted(day1 + day2)
    finally:
        moto.stop()


def test_listing_takes_the_objects_modified_on_the_day(tmp_path):
    moto = Moto().start()
    try:
        s3 = moto.client("s3")
        s3.create_bucket(Bucket="events")
        keys = ["p1/trace/b1/e1.json", "p1/score/b2/e2.json", "p1/span/b3/e3.json"]
        for key in keys:
            s3.put_object(Bucket="events", Key=key, Body=b"{}")
        today = datetime.now(timezone.utc).date().isoformat()
        found = collect_keys(
            "listing",
            "s3://events/p1/",
            [today],
            TYPES,
            lambda d: tmp_path / "keys",
            lambda d: tmp_path / "q",
            tmp_path / "work",
            s3=s3,
        )
        assert (found.days[today].keys, found.days[today].quarantined_by_reason) == (2, {"unknown_type": 1})
        stored = duckdb.execute(
            "SELECT key FROM read_parquet($f) ORDER BY key", {"f": str(tmp_path / "keys/keys.parquet")}
        ).fetchall()
        assert [k for (k,) in stored] == ["p1/score/b2/e2.json", "p1/trace/b1/e1.json"]
        empty = collect_keys(
            "listing",
            "s3://events/p1/",
            ["2025-03-02"],
            TYPES,
            lambda d: tmp_path / "k2",
            lambda d: tmp_path / "q2",
            tmp_path / "work",
            s3=s3,
        )
        assert empty.days["2025-03-02"].keys == 0 and not (tmp_path / "k2").exists()
    finally:
        moto.stop()


def test_request_times_split_a_csv_by_day_and_bad_input_fails_clearly(tmp_path, env, instance):
    csv_path = tmp_path / "timed.csv"
    csv_path.write_text(
        '"operation","key","requestdatetime"\n'
        '"REST.PUT.OBJECT","p1/trace/b1/e1.json","02/Mar/2025:23:59:59 +0000"\n'
        '"REST.PUT.OBJECT","p1/trace/b2/e2.json","03/Mar/2025:00:59:59 +0100"\n'  # 23:59:59 UTC on the 2nd
        '"REST.PUT.OBJECT","p1/trace/b3/e3.json","03/Mar/2025:00:00:00 +0000"\n'
        '"REST.PUT.OBJECT","p1/trace/b4/e4.json","05/Mar/2025:00:00:00 +0000"\n'
        '"REST.PUT.OBJECT","p1/trace/b5/e5.json","yesterday"\n'
    )
    found = collect_keys(
        "csv",
        str(csv_path),
        [DAY, NEXT_DAY],
        TYPES,
        lambda d: tmp_path / d,
        lambda d: tmp_path / f"q{d}",
        tmp_path / "work",
    )
    assert (found.days[DAY].keys, found.days[NEXT_DAY].keys, found.other_days) == (2, 1, 1)
    assert found.days[DAY].quarantined_by_reason == {"bad_request_time": 1}, (
        "a row with a bad time stays on the first day, quarantined"
    )

    untimed = tmp_path / "events.csv"
    write_csv(untimed, good_keys(2))
    spec = refill_spec("unused")
    result = run_refill(spec, instance, DAY, NEXT_DAY, "csv", str(untimed))
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "run one day at a time" in failure.event_specific_data.error.message

    no_key = tmp_path / "wrong.csv"
    no_key.write_text('"operation","object"\n"REST.PUT.OBJECT","p1/trace/b/e.json"\n')
    with pytest.raises(ValueError, match='expected a header "operation","key"'):
        collect_keys("csv", str(no_key), [DAY], TYPES, lambda d: tmp_path, lambda d: tmp_path, tmp_path / "work")
    with pytest.raises(ValueError, match="does not exist"):
        collect_keys(
            "csv",
            str(tmp_path / "missing.csv"),
            [DAY],
            TYPES,
            lambda d: tmp_path,
            lambda d: tmp_path,
            tmp_path / "work",
        )


def test_cli_refill_prints_per_day_counts(env, tmp_path):
    redis = RedisServer().start()
    try:
        csv_path = tmp_path / "events.csv"
        keys = good_keys(5)
        write_csv(csv_path, keys)

        def refill(*extra):  # noqa: ANN202
            return warm_process.run(
                [
                    str(PROJECT_ROOT / ".venv/bin/event-replay"),
                    "refill",
                    "--location",
                    str(csv_path),
                    "--start",
                    DAY,
                    *extra,
                ],
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=300,
                env={**__import__("os").environ, "EVENT_REPLAY_REDIS_URL": redis.url},
            )

        first = refill("--batch-size", "7")
        assert first.returncode == 0, first.stdout + first.stderr
        row = next(line for line in first.stdout.splitlines() if line.startswith(DAY)).split()
        # day, PUT rows, keys, repeats, quarantined, sent, skipped, "3/3 passed"
        assert (
            row[2:7] == [str(len(keys)), str(len(range(0, len(keys), 3))), str(len(BAD_ROWS) + 2), str(len(keys)), "0"]
            and row[7] == "3/3"
        ), first.stdout
        assert sorted(j[0] for j in bullmq_consume(redis.url, "ingestion-queue")) == sorted(keys)
    finally:
        redis.stop()


def quarantined(path) -> list[tuple[str, str]]:
    return duckdb.execute("SELECT reason, raw FROM read_parquet($f) ORDER BY reason, raw", {"f": str(path)}).fetchall()


def test_an_unterminated_quote_keeps_the_next_row_and_an_oversize_row_has_its_own_sample(
    env, instance, redis_url, tmp_path, monkeypatch
):
    """DuckDB alone took a line with an unterminated quote and the next line as one bad record (the
    next, valid row was lost), and after such a swallow reported the following oversize line with
    another line's sample. Each bad line is quarantined alone, with its own sample; every valid row
    is kept and becomes a BullMQ job."""
    monkeypatch.setenv("EVENT_REPLAY_REDIS_URL", redis_url)
    spec = refill_spec(f"ingestion-test-{uuid.uuid4().hex[:8]}")
    keep = [f"p1/trace/b{i}/e{i}.json" for i in range(6)]
    unterminated = '"REST.PUT.OBJECT","p1/trace/bx/unterminated.json'
    big = '"REST.PUT.OBJECT","p1/trace/b/BIGROW' + "z" * 1_100_000 + '.json"'
    lines = [
        '"operation","key"',
        f'"REST.PUT.OBJECT","{keep[0]}"',
        unterminated,
        f'"REST.PUT.OBJECT","{keep[1]}"',
        f'"REST.PUT.OBJECT","{keep[2]}"',
        big,
        f'"REST.PUT.OBJECT","{keep[3]}"',
        unterminated.replace("bx", "by"),
        f'"REST.PUT.OBJECT","{keep[4]}"',
        big.replace("BIGROW", "BIGTWO"),
        f'"REST.PUT.OBJECT","{keep[5]}"',
    ]
    csv_path = tmp_path / "quirks.csv"
    csv_path.write_text("\n".join(lines) + "\n")

    result = run_refill(spec, instance, DAY, DAY, "csv", str(csv_path))
    assert result.success
    md = metadata(result, spec, "event_keys")
    assert (md["keys"], md["put_rows"], md["malformed_rows"], md["quarantined_malformed_csv_row"]) == (6, 6, 4, 4)
    assert all(day_verdicts(result).values()) and len(day_verdicts(result)) == 3, "rows_accounted_for included"
    assert sorted(j[0] for j in bullmq_consume(redis_url, spec.redrive.sink.key)) == sorted(keep), (
        "the row after each bad line is kept"
    )

    got = quarantined(committed_quarantine(env, spec))
    assert [r for r, _ in got] == ["malformed_csv_row: line size over maximum"] * 2 + [
        "malformed_csv_row: unterminated quote"
    ] * 2
    (r1, s1), (r2, s2), (_, s3), (_, s4) = got
    assert s1.startswith('"REST.PUT.OBJECT","p1/trace/b/BIGROW') and s2.startswith(
        '"REST.PUT.OBJECT","p1/trace/b/BIGTWO'
    ), (s1[:60], s2[:60])
    assert len(s1) == len(s2) == 2000, "a sample, not the whole line"
    assert [s3, s4] == [unterminated, unterminated.replace("bx", "by")], "each line alone, not swallowing the next"


def run_log(instance, result) -> str:
    return "\n".join(
        str(e.message) + " " + str(e.dagster_event.event_specific_data if e.dagster_event else "")
        for e in instance.all_logs(result.run_id)
    )


def test_local_sources_outside_the_refill_roots_are_refused_unread(env, instance, tmp_path, monkeypatch):
    root, outside = tmp_path / "exports", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    monkeypatch.setenv(ROOTS_ENV, f"{root}:{env['lake']}")
    secret = outside / "shadow.csv"
    secret.write_text("root:$6$SECRETHASH:19000:0:99999:7:::\n" + '"REST.PUT.OBJECT","p1/trace/b/e.json"\n')
    (root / "link.csv").symlink_to(secret)
    (root / "logs").mkdir()
    (root / "logs" / f"{DAY}-00-00-00-AAAA").symlink_to(secret)
    spec = refill_spec("unused")

    for source, location, named in [
        ("csv", str(secret), str(secret)),
        ("csv", str(root / "link.csv"), "link.csv"),
        ("access_logs", str(outside), str(outside)),
        ("access_logs", str(root / "logs"), "AAAA"),
    ]:
        result = run_refill(spec, instance, DAY, DAY, source, location)
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure).event_specific_data.error.message
        assert named in failure and ROOTS_ENV in failure and "outside the refill roots" in failure, failure
        assert "SECRETHASH" not in run_log(instance, result) and "root:$6$" not in run_log(instance, result)
    with pytest.raises(OutsideRefillRoots, match="resolves to"):
        collect_keys(
            "csv", str(root / "link.csv"), [DAY], TYPES, lambda d: tmp_path, lambda d: tmp_path, tmp_path / "work"
        )

    # Inside the roots, a bad header is named by a short, labelled sample only.
    long_header = root / "long.csv"
    long_header.write_text("secret-column-" + "s" * 500 + ",x\n")
    with pytest.raises(ValueError, match=r"first line \(sample\): 'secret-column-s+' \.\.\. \(516 chars\)") as bad:
        collect_keys("csv", str(long_header), [DAY], TYPES, lambda d: tmp_path, lambda d: tmp_path, tmp_path / "work")
    assert "s" * 100 not in str(bad.value)


def test_cli_refill_refuses_a_location_outside_the_roots(env, tmp_path, monkeypatch, redis_url):
    """The default roots (EVENT_REPLAY_REFILL_ROOTS unset): the lake root and the current directory;
    /etc/hostname and a file in another temp dir are outside, and nothing of them is printed."""
    monkeypatch.delenv(ROOTS_ENV)
    elsewhere = tmp_path / "elsewhere.csv"
    elsewhere.write_text("TOPSECRET-FIRST-LINE\n")
    hostname = open("/etc/hostname").read().strip()
    for location, content in [("/etc/hostname", hostname), (str(elsewhere), "TOPSECRET-FIRST-LINE")]:
        run = warm_process.run(
            [str(PROJECT_ROOT / ".venv/bin/event-replay"), "refill", "--location", location, "--start", DAY],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "EVENT_REPLAY_REDIS_URL": redis_url},
        )
        assert run.returncode == 1, run.stdout + run.stderr
        assert f"access-log CSV {location!r} is outside the refill roots" in run.stderr and ROOTS_ENV in run.stderr, (
            run.stderr
        )
        if content:
            assert content not in run.stdout + run.stderr, "the file's content must not be echoed"


def test_job_bodies_are_the_json_msgspec_writes(tmp_path):
    """job_batches builds the bodies a column at a time; they are byte for byte what encoding each
    job's dict gives, quotes and non-ASCII parts included, with the batch's timestamp."""
    keys = ['p"1/trace/b o/e"1.json', "projé/score/bödy/ë.json", "p1/observation/b/e.json.json"]
    path = tmp_path / "keys.parquet"
    pq.write_table(pa.table({"key": sorted(keys)}), path)
    when = datetime(2025, 3, 2, 10, 0, 1, 234567, tzinfo=timezone.utc)

    (batch,) = job_batches([str(path)], 10, now=lambda: when)
    assert batch.ids == sorted(keys) and batch.types == [k.split("/")[1] for k in sorted(keys)]
    for key, body in zip(batch.ids, batch.bodies):
        project, type_, body_id, file_name = key.split("/")
        event_id = file_name.removesuffix(".json")
        job = {
            "id": event_id,
            "timestamp": "2025-03-02T10:00:01.234Z",
            "name": "ingestion-job",
            "payload": {
                "data": {"type": f"{type_}-create", "eventBodyId": body_id, "fileKey": event_id},
                "authCheck": {"validKey": True, "scope": {"projectId": project, "accessLevel": "project"}},
            },
        }
        assert body == msgspec.json.encode(job), key


def test_each_refused_row_is_a_quarantine_row_and_keys_are_sorted(tmp_path):
    """Rows are aggregated as they are read: a refused row listed three times at the same time is
    still three quarantine rows, with its time; keys come out sorted, each with its PUT count."""
    csv_path = tmp_path / "repeats.csv"
    bad = '"REST.PUT.OBJECT","p1/span/b/e.json","02/Mar/2025:10:00:00 +0000"\n'
    csv_path.write_text(
        '"operation","key","requestdatetime"\n'
        + bad * 3
        + '"REST.PUT.OBJECT","p2/trace/b/e.json","02/Mar/2025:11:00:00 +0000"\n'
        + '"REST.PUT.OBJECT","p1/trace/b/e.json","02/Mar/2025:12:00:00 +0000"\n'
        + '"REST.PUT.OBJECT","p1/trace/b/e.json","02/Mar/2025:09:00:00 +0000"\n'
        + '"REST.GET.OBJECT","p1/trace/b/e.json","02/Mar/2025:09:00:00 +0000"\n'
    )
    found = collect_keys(
        "csv", str(csv_path), [DAY], TYPES, lambda d: tmp_path / "keys", lambda d: tmp_path / "q", tmp_path / "work"
    )
    day = found.days[DAY]
    assert (found.rows, found.other_operations, day.put_rows, day.keys, day.duplicates) == (7, 1, 6, 2, 1)
    assert day.quarantined_by_reason == {"unknown_type": 3}
    assert day.by_project_type == {"p1/trace": 1, "p2/trace": 1}
    quarantine = duckdb.execute(
        "SELECT reason, raw, request_time FROM read_parquet($f)", {"f": str(tmp_path / "q/quarantine.parquet")}
    ).fetchall()
    assert quarantine == [("unknown_type", "p1/span/b/e.json", datetime(2025, 3, 2, 10, tzinfo=timezone.utc))] * 3
    stored = duckdb.execute(
        "SELECT key, first_put, puts FROM read_parquet($f)", {"f": str(tmp_path / "keys/keys.parquet")}
    ).fetchall()
    assert stored == [
        ("p1/trace/b/e.json", datetime(2025, 3, 2, 9, tzinfo=timezone.utc), 2),
        ("p2/trace/b/e.json", datetime(2025, 3, 2, 11, tzinfo=timezone.utc), 1),
    ]


def test_the_fast_path_accepts_exactly_what_the_rules_accept():
    """CLASSIFY's first branch (one regex, clean_key_pattern) is only a shortcut: with it or without
    it (the rules alone), every key gets the same verdict."""
    types = ["trace", "observation", "a.b-c", "%x", ".hidden"]
    keys = [
        "p/trace/b/e.json",
        "p/a.b-c/b/e.json",
        "p/%x/b/e.json",
        "p/.hidden/b/e.json",
        "p/span/b/e.json",
        'proj é/observation/bödy/e"1.json',
        "p/trace/b/.json",
        "p/trace/b/e.json.json",
        "p/trace/.b/e.json",
        "p/trace/b./e.json",
        "p/trace/b/e.txt",
        "p/trace//e.json",
        "/p/trace/b/e.json",
        "p/trace/b/c/e.json",
        "p/trace/b%20c/e.json",
        "p/trace/b+c/e.json",
        "p/trace/b\\c/e.json",
        "p/trace/b\x01/e.json",
        "p/trace/b\x7f/e.json",
        "p/../b/e.json",
        "p/trace/" + "b" * 1020 + "/e.json",
        "",
        None,
    ]
    sql = f"""SELECT raw_key, http_status, {CLASSIFY} FROM (
        SELECT k AS raw_key, k AS key, s AS http_status, NULL::VARCHAR AS time_text, NULL::TIMESTAMPTZ AS request_time
        FROM unnest($keys) a(k), unnest([NULL, '200', '403']) b(s)) ORDER BY ALL"""

    def verdicts(clean_key):
        return duckdb.execute(sql, {"keys": keys, "types": types, "decode": True, "clean_key": clean_key}).fetchall()

    fast, rules_only = verdicts(clean_key_pattern(tuple(types))), verdicts(None)
    assert fast == rules_only
    accepted = {k for k, s, reason in fast if reason is None and s is None}
    assert accepted == {
        "p/trace/b/e.json",
        "p/a.b-c/b/e.json",
        'proj é/observation/bödy/e"1.json',
        "p/trace/b/e.json.json",
        "p/trace/b./e.json",
        "p/trace/.b/e.json",  # a part may start with a dot (not be `.` or `..`): the rules' path
        "p/.hidden/b/e.json",
    }
