"""Ingestion refill sources against real components: failed PUTs are not writes, the access-log CSV
and the logs give the same key for an object, AWS's date-partitioned log layout, and a time window
inside a day. Logs and objects live in moto's S3; jobs are counted by a real BullMQ Worker."""

import os
import time
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import duckdb
import pytest
import warm_process
from conftest import PROJECT_ROOT, check_verdicts
from services import Moto, bullmq_consume
from test_ingestion_refill import TYPES, metadata, refill_spec, run_refill

from assets.refill import keys_state
from replay_defs.core.lake import Lake
from replay_defs.core.naming import refill_quarantine_table
from replay_defs.ingestion_refill.access_logs import ROOTS_ENV, collect_keys

DAY, NEXT_DAY, THIRD_DAY = "2025-03-02", "2025-03-03", "2025-03-04"
OWNER = "79a59df900b949e55d96a1e698fbacedfd6e09d98eacf8f8d5218e7cd47ef2be"


@pytest.fixture(scope="module")
def moto():
    server = Moto().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def s3_env(moto, redis_url, tmp_path, monkeypatch):
    for var, value in {
        "EVENT_REPLAY_S3_ENDPOINT": moto.endpoint,
        "EVENT_REPLAY_REDIS_URL": redis_url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        ROOTS_ENV: str(tmp_path),
    }.items():
        monkeypatch.setenv(var, value)


def logged(key: str) -> str:
    """A key as S3's server access log writes it for a REST operation: URL-encoded twice (a key `"`
    is logged `%2522`, tests/fixtures/s3_access_log_records.log)."""
    return quote(quote(key))


def record(when: datetime, key: str, status: int = 200, operation: str = "REST.PUT.OBJECT") -> str:
    """One access log record in AWS's format (a failed request carries its error code)."""
    error = {200: "-", 403: "AccessDenied", 503: "SlowDown"}[status]
    stamp = when.strftime("%d/%b/%Y:%H:%M:%S +0000")
    return (
        f"{OWNER} langfuse-events [{stamp}] 192.0.2.3 arn:aws:iam::123456789012:user/ingest 3E57427F3EXAMPLE "
        f'{operation} {logged(key)} "PUT /{quote(key)} HTTP/1.1" {status} {error} - 512 10 9 "-" "aws-sdk-js/3.0" - '
        "Ry0rMW9h4+YI= SigV4 ECDHE-RSA-AES128-GCM-SHA256 AuthHeader langfuse-events.s3.amazonaws.com TLSv1.2 - -"
    )


def at(day: str, hh: int, mm: int = 0) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hh, minute=mm, tzinfo=timezone.utc)


def new_bucket(moto, name: str):
    s3 = moto.client("s3")
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


def quarantine_rows(env, spec, day=DAY) -> list[tuple[str, str]]:
    lake = Lake(env["lake"])
    files = keys_state(lake, spec, day).files_of(refill_quarantine_table(spec))
    return duckdb.execute(
        "SELECT reason, raw FROM read_parquet($f) ORDER BY ALL", {"f": [lake.storage.path(f) for f in files]}
    ).fetchall()


def verdicts(result) -> dict:
    return {k: v for k, v in check_verdicts(result).items() if k[1] is not None}


def test_failed_puts_are_not_writes(env, instance, redis_url, moto, tmp_path):
    """A PUT answered 403 AccessDenied or 503 SlowDown wrote nothing: no job, quarantined as
    not_written:<status>, and rows_accounted_for still balances. A key that failed first and then
    succeeded is one job. The same from the logs and from an Athena export with httpstatus."""
    s3, bucket = new_bucket(moto, "logs")
    written = [f"p1/trace/b{i}/e{i}.json" for i in range(4)]
    denied, retried = "p1/trace/denied/e.json", "p1/score/retried/e.json"
    lines = [record(at(DAY, 10), k) for k in written] + [
        record(at(DAY, 10, 1), denied, 403),
        record(at(DAY, 10, 2), retried, 503),
        record(at(DAY, 10, 3), retried, 200),
    ]
    # A denied PUT of a key with a quote: S3 logs its Request-URI unescaped (`"PUT /a"b HTTP/1.1"`).
    quoted = 'p1/trace/quo"te/e.json'
    lines.append(record(at(DAY, 10, 4), quoted, 403).replace(f"/{quote(quoted)} ", f"/{quoted} "))
    s3.put_object(Bucket=bucket, Key=f"logs/{DAY}-10-05-00-AAAA", Body="\n".join(lines).encode())
    spec = refill_spec(f"ingestion-test-{uuid.uuid4().hex[:8]}")

    result = run_refill(spec, instance, DAY, DAY, "access_logs", f"s3://{bucket}/logs/")
    assert result.success
    md = metadata(result, spec, "event_keys")
    assert (md["put_rows"], md["keys"], md["malformed_rows"]) == (8, 5, 0)
    assert (md["quarantined_not_written:403"], md["quarantined_not_written:503"]) == (2, 1)
    assert all(verdicts(result).values()) and len(verdicts(result)) == 3, "rows_accounted_for balances"
    assert sorted(j[0] for j in bullmq_consume(redis_url, spec.redrive.sink.key)) == sorted([*written, retried])
    assert [r for r, _ in quarantine_rows(env, spec)] == ["not_written:403"] * 2 + ["not_written:503"]

    # Athena's export of the same records, with the httpstatus column: the same keys, the same refusals.
    export = tmp_path / "export.csv"
    export.write_text(
        '"operation","key","httpstatus"\n'
        + "".join(f'"REST.PUT.OBJECT","{logged(k)}","{s}"\n' for k, s in [(k, 200) for k in written])
        + f'"REST.PUT.OBJECT","{logged(denied)}","403"\n"REST.PUT.OBJECT","{logged(retried)}","503"\n'
        + f'"REST.PUT.OBJECT","{logged(retried)}","200"\n'
    )
    found = collect_keys(
        "csv", str(export), [DAY], TYPES, lambda d: tmp_path / "k", lambda d: tmp_path / "q", tmp_path / "w"
    )
    assert (found.days[DAY].keys, found.days[DAY].quarantined_by_reason) == (
        5,
        {"not_written:403": 1, "not_written:503": 1},
    )


def test_the_csv_and_the_logs_give_the_same_key_as_the_object(env, instance, redis_url, moto, tmp_path):
    """The objects are in S3 under their real keys (a space, a quote, non-ASCII); the logs and
    Athena's export (the log's key field as is) both decode to exactly those keys, so a refill from the
    CSV after one from the logs enqueues nothing new. A key still holding `%` or a `+` after decoding
    could be two objects: quarantined from both, while the listing (exact keys) takes it."""
    s3, events = new_bucket(moto, "events")
    plain = [f"p1/trace/b{i}/e{i}.json" for i in range(3)]
    special = ["p1/trace/body with space/e1.json", 'p1/score/quo"te/e2.json', "p1/observation/Zürich ☃/e3.json"]
    ambiguous = ["p1/trace/a+b/e4.json", "p1/trace/100%25/e5.json"]
    for key in plain + special + ambiguous:
        s3.put_object(Bucket=events, Key=key, Body=b"{}")
    _, logs = new_bucket(moto, "logs")
    s3.put_object(
        Bucket=logs,
        Key=f"logs/{DAY}-12-00-00-AAAA",
        Body="\n".join(record(at(DAY, 11), k) for k in plain + special + ambiguous).encode(),
    )
    export = tmp_path / "events.csv"  # the seed's Athena query: select operation, key
    export.write_text(
        '"operation","key"\n' + "".join(f'"REST.PUT.OBJECT","{logged(k)}"\n' for k in plain + special + ambiguous)
    )
    spec = refill_spec(f"ingestion-test-{uuid.uuid4().hex[:8]}")

    from_logs = run_refill(spec, instance, DAY, DAY, "access_logs", f"s3://{logs}/logs/")
    assert from_logs.success
    assert metadata(from_logs, spec, "event_keys")["quarantined_ambiguous_key_encoding"] == 2
    jobs = sorted(j[0] for j in bullmq_consume(redis_url, spec.redrive.sink.key))
    assert jobs == sorted(plain + special)
    for key in jobs:  # each job's key is an object's: the worker will find it
        s3.head_object(Bucket=events, Key=key)
    assert sorted(raw for _, raw in quarantine_rows(env, spec)) == sorted(logged(k) for k in ambiguous)

    from_csv = run_refill(spec, instance, DAY, DAY, "csv", str(export))
    assert from_csv.success
    md = metadata(from_csv, spec, "redrive")
    assert (md["published"], md["skipped_already_delivered"]) == (0, len(jobs)), "the same keys: no second job"
    assert bullmq_consume(redis_url, spec.redrive.sink.key, idle_s=0.5) == []

    today = datetime.now(timezone.utc).date().isoformat()
    listed = collect_keys(
        "listing",
        f"s3://{events}/p1/",
        [today],
        TYPES,
        lambda d: tmp_path / "k",
        lambda d: tmp_path / "q",
        tmp_path / "w",
        s3=s3,
    )
    stored = duckdb.execute("SELECT key FROM read_parquet($f)", {"f": str(tmp_path / "k" / "keys.parquet")}).fetchall()
    assert listed.days[today].keys == 8 and sorted(k for (k,) in stored) == sorted(plain + special + ambiguous)

    # A key field that does not decode to UTF-8 is refused, not turned into another key.
    bad = tmp_path / "bad.csv"
    bad.write_text('"operation","key"\n"REST.PUT.OBJECT","p1/trace/b%FF/e.json"\n')
    found = collect_keys(
        "csv", str(bad), [DAY], TYPES, lambda d: tmp_path / "k3", lambda d: tmp_path / "q3", tmp_path / "w"
    )
    assert found.days[DAY].quarantined_by_reason == {"bad_key_encoding": 1}


def test_the_date_partitioned_log_layout_and_a_day_without_logs(env, instance, redis_url, moto):
    """AWS's PartitionedPrefix layout `<prefix><account>/<region>/<bucket>/YYYY/MM/DD/<name>` is read
    (filed by event time: a file in the day before can hold the day's first records), next to a
    simple-layout file under the same prefix. A day with no log file is a warning and metadata
    saying what was looked for; a location with none at all fails the run, saying the same."""
    s3, bucket = new_bucket(moto, "logs")
    root = "logs/123456789012/us-east-1/langfuse-events/"
    day1 = [f"p1/trace/b{i}/e{i}.json" for i in range(4)]
    day2 = [f"p2/score/b{i}/e{i}.json" for i in range(3)]
    files = {
        f"{root}2025/03/01/2025-03-01-23-59-59-AAAA": [record(at(DAY, 0, 0), day1[0])],  # first record 00:00 of DAY
        f"{root}2025/03/02/2025-03-02-10-00-00-BBBB": [record(at(DAY, 10), k) for k in day1[1:3]],
        f"{root}2025/03/03/2025-03-03-09-00-00-CCCC": [record(at(NEXT_DAY, 9), k) for k in day2],
        f"logs/{DAY}-23-00-00-DDDD": [record(at(DAY, 22), day1[3])],  # the simple layout, same prefix
        f"{root}2025/03/09/2025-03-09-00-00-00-EEEE": [record(at("2025-03-09", 1), "p9/trace/x/y.json")],
    }
    for key, lines in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body="\n".join(lines).encode())
    spec = refill_spec(f"ingestion-test-{uuid.uuid4().hex[:8]}")

    result = run_refill(spec, instance, DAY, THIRD_DAY, "access_logs", f"s3://{bucket}/logs/")
    assert result.success
    md1, md2, md3 = (metadata(result, spec, "event_keys", d) for d in (DAY, NEXT_DAY, THIRD_DAY))
    assert (md1["keys"], md2["keys"], md3["keys"]) == (4, 3, 0)
    assert (md1["log_files"], md2["log_files"], md3["log_files"]) == (2, 1, 0)
    assert "missing_logs" not in md1
    assert f"s3://{bucket}/{root}2025/03/04/" in md3["missing_logs"], md3["missing_logs"]
    warnings = [e.message for e in instance.all_logs(result.run_id) if e.level == 30]  # logging.WARNING
    assert any(f"{THIRD_DAY}: NO access log file" in w for w in warnings), warnings
    assert sorted(j[0] for j in bullmq_consume(redis_url, spec.redrive.sink.key)) == sorted(day1 + day2)
    assert all(verdicts(result).values())

    # The location may be the partition root itself.
    direct = run_refill(spec, instance, NEXT_DAY, NEXT_DAY, "access_logs", f"s3://{bucket}/{root}", {"dry_run": True})
    assert direct.success and metadata(direct, spec, "event_keys", NEXT_DAY)["keys"] == 3

    nothing = run_refill(spec, instance, "2025-04-01", "2025-04-01", "access_logs", f"s3://{bucket}/logs/")
    assert not nothing.success
    message = next(e for e in nothing.all_events if e.is_step_failure).event_specific_data.error.message
    assert "no S3 access log file for 2025-04-01" in message and f"s3://{bucket}/logs/2025-04-01-" in message, message
    assert f"s3://{bucket}/{root}" in message, "the partition roots it found are named"


def test_a_time_window_clips_the_first_and_last_day(env, instance, redis_url, moto, tmp_path):
    """The seed's window (a few hours, here across midnight): only records in [start, end) count, on
    per-day partitions; the rest of each day is counted as outside_window. The same for logs, for a
    CSV with requestdatetime (one without is refused) and for a listing (LastModified)."""
    s3, bucket = new_bucket(moto, "logs")
    inside = {DAY: ["p1/trace/in/a.json", "p1/trace/in/b.json"], NEXT_DAY: ["p1/trace/in/c.json"]}
    times = {  # key -> request time
        "p1/trace/early/x.json": at(DAY, 21, 59),
        "p1/trace/in/a.json": at(DAY, 22, 0),
        "p1/trace/in/b.json": at(DAY, 23, 59),
        "p1/trace/in/c.json": at(NEXT_DAY, 0, 44),
        "p1/trace/late/y.json": at(NEXT_DAY, 0, 45),  # the end is excluded
        "p1/trace/late/z.json": at(NEXT_DAY, 8, 0),
    }
    for name, day in [(f"{DAY}-23-59-59-AAAA", DAY), (f"{NEXT_DAY}-09-00-00-BBBB", NEXT_DAY)]:
        body = "\n".join(record(t, k) for k, t in times.items() if t.date().isoformat() == day)
        s3.put_object(Bucket=bucket, Key=f"logs/{name}", Body=body.encode())
    spec = refill_spec(f"ingestion-test-{uuid.uuid4().hex[:8]}")
    window = {"window_start": f"{DAY}T22:00:00", "window_end": f"{NEXT_DAY}T00:45:00"}

    from replay_defs.definitions import build_definitions

    job = build_definitions(pipelines=(), refills=(spec,)).resolve_job_def(f"{spec.name}_replay")
    result = job.execute_in_process(
        instance=instance,
        run_config={
            "ops": {
                f"{spec.name}__event_keys": {
                    "config": {"source": "access_logs", "location": f"s3://{bucket}/logs/", **window}
                },
                f"{spec.name}__redrive": {"config": {}},
            }
        },
        raise_on_error=False,
        tags={"dagster/asset_partition_range_start": DAY, "dagster/asset_partition_range_end": NEXT_DAY},
    )
    assert result.success
    md1, md2 = metadata(result, spec, "event_keys", DAY), metadata(result, spec, "event_keys", NEXT_DAY)
    assert (md1["keys"], md1["put_rows"], md1["outside_window"]) == (2, 2, 1)
    assert (md2["keys"], md2["put_rows"], md2["outside_window"]) == (1, 1, 2)
    assert md1["window"] == "[2025-03-02T22:00:00+00:00, 2025-03-03T00:45:00+00:00)"
    assert all(verdicts(result).values()) and len(verdicts(result)) == 6
    assert sorted(j[0] for j in bullmq_consume(redis_url, spec.redrive.sink.key)) == sorted(
        inside[DAY] + inside[NEXT_DAY]
    )

    untimed = tmp_path / "untimed.csv"
    untimed.write_text('"operation","key"\n"REST.PUT.OBJECT","p1/trace/in/a.json"\n')
    with pytest.raises(ValueError, match="no request time, so a time window cannot select them"):
        collect_keys(
            "csv",
            str(untimed),
            [DAY],
            TYPES,
            lambda d: tmp_path / "k",
            lambda d: tmp_path / "q",
            tmp_path / "w",
            window=(at(DAY, 22), at(NEXT_DAY, 0, 45)),
        )

    # A listing: LastModified is the object's write time.
    events = new_bucket(moto, "events")[1]
    s3.put_object(Bucket=events, Key="p1/trace/before/e.json", Body=b"{}")
    time.sleep(1.1)
    s3.put_object(Bucket=events, Key="p1/trace/after/e.json", Body=b"{}")
    modified = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=events)["Contents"]}
    today = modified["p1/trace/after/e.json"].date().isoformat()
    start = modified["p1/trace/after/e.json"]
    listed = collect_keys(
        "listing",
        f"s3://{events}/",
        [today],
        TYPES,
        lambda d: tmp_path / "kl",
        lambda d: tmp_path / "ql",
        tmp_path / "w",
        s3=s3,
        window=(start, start + timedelta(hours=1)),
    )
    assert (listed.days[today].keys, listed.days[today].outside_window) == (1, 1)


def test_cli_times_in_start_and_end_are_a_window(env, redis_url, tmp_path):
    """`refill --start 2025-03-02T22:00:00 --end 2025-03-03T00:45:00` on a CSV with requestdatetime:
    both days run, each clipped; the jobs are the window's keys."""
    times = {
        "p1/trace/early/x.json": at(DAY, 21, 59),
        "p1/trace/in/a.json": at(DAY, 22, 0),
        'p1/trace/in/b "q".json': at(DAY, 23, 59),
        "p1/trace/in/c.json": at(NEXT_DAY, 0, 44),
        "p1/trace/late/y.json": at(NEXT_DAY, 0, 45),
    }
    queue = f"ingestion-cli-{uuid.uuid4().hex[:8]}"
    timed = tmp_path / "timed.csv"
    timed.write_text(
        '"operation","key","requestdatetime"\n'
        + "".join(
            f'"REST.PUT.OBJECT","{logged(k)}","{t.strftime("%d/%b/%Y:%H:%M:%S +0000")}"\n' for k, t in times.items()
        )
    )
    cli = warm_process.run(
        [
            str(PROJECT_ROOT / ".venv/bin/event-replay"),
            "refill",
            "--location",
            str(timed),
            "--start",
            f"{DAY}T22:00:00",
            "--end",
            f"{NEXT_DAY}T00:45:00",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "EVENT_REPLAY_SINK__INGESTION_REFILL": f"redis:{queue}?job_name=ingestion-job"},
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    rows = {line.split()[0]: line.split() for line in cli.stdout.splitlines() if line[:4] == "2025"}
    assert rows[DAY][1:3] == ["2", "2"] and rows[NEXT_DAY][1:3] == ["1", "1"], cli.stdout
    assert rows[DAY][-2:] == rows[NEXT_DAY][-2:] == ["3/3", "passed"], cli.stdout
    assert (
        f"{DAY}: window [2025-03-02T22:00:00+00:00, 2025-03-03T00:45:00+00:00), 1 PUT rows of the day outside it"
        in cli.stdout
    )

    jobs = sorted(j[0] for j in bullmq_consume(redis_url, queue))
    assert jobs == sorted(["p1/trace/in/a.json", 'p1/trace/in/b "q".json', "p1/trace/in/c.json"])


def test_a_local_log_directory_in_the_partitioned_layout(tmp_path):
    """A downloaded copy of partitioned logs (`aws s3 sync`): files are taken by their folder's date,
    a day without a file is warned about with the folder looked for, and only AWS-named files count."""
    root = tmp_path / "logs" / "123456789012" / "eu-west-1" / "langfuse-events"
    keys = {DAY: [f"p1/trace/b{i}/e{i}.json" for i in range(3)], NEXT_DAY: ["p2/score/b/e.json"]}
    for day, day_keys in keys.items():
        folder = root / day.replace("-", "/")
        folder.mkdir(parents=True)
        (folder / f"{day}-08-00-00-AAAA").write_text("\n".join(record(at(day, 7), k) for k in day_keys))
        (folder / "notes.txt").write_text(record(at(day, 7), "p9/trace/not/a-log.json"))  # not a log file's name
    warnings: list[str] = []
    found = collect_keys(
        "access_logs",
        str(tmp_path / "logs"),
        [DAY, NEXT_DAY, THIRD_DAY],
        TYPES,
        lambda d: tmp_path / "k" / d,
        lambda d: tmp_path / "q" / d,
        tmp_path / "w",
        warn=warnings.append,
    )
    assert [found.days[d].keys for d in (DAY, NEXT_DAY, THIRD_DAY)] == [3, 1, 0]
    assert [found.days[d].log_files for d in (DAY, NEXT_DAY, THIRD_DAY)] == [1, 1, 0]
    assert f"{root}/2025/03/04/" in found.days[THIRD_DAY].missing_logs
    assert len(warnings) == 1 and warnings[0].startswith(f"{THIRD_DAY}: NO access log file"), warnings
    with pytest.raises(ValueError, match="no S3 access log file for 2025-05-01"):
        collect_keys(
            "access_logs",
            str(tmp_path / "logs"),
            ["2025-05-01"],
            TYPES,
            lambda d: tmp_path / "k2",
            lambda d: tmp_path / "q2",
            tmp_path / "w",
        )


def test_window_bounds_are_read_in_utc_and_must_overlap_the_days():
    from replay_defs.ingestion_refill.access_logs import time_window
    from replay_defs.ingestion_refill.cli import run_days

    seed = time_window("2025-07-09:00:30:00", "2025-07-09T09:45:00+02:00", ["2025-07-09"])  # Athena's; an offset
    assert seed == (datetime(2025, 7, 9, 0, 30, tzinfo=timezone.utc), datetime(2025, 7, 9, 7, 45, tzinfo=timezone.utc))
    assert time_window(None, None, [DAY]) is None
    assert time_window(f"{DAY}T22:00:00", None, [DAY])[1] == at(NEXT_DAY, 0)
    with pytest.raises(ValueError, match="does not overlap the days of the run"):
        time_window(f"{NEXT_DAY}T01:00:00", f"{NEXT_DAY}T02:00:00", [DAY])
    with pytest.raises(ValueError, match="is not after its start"):
        time_window(f"{DAY}T02:00:00", f"{DAY}T01:00:00", [DAY])
    with pytest.raises(ValueError, match="is not a time"):
        time_window("9am", None, [DAY])
    # The CLI: a bare --end day is included whole; a time --end is excluded (midnight ends the day before).
    assert run_days(DAY, NEXT_DAY) == ([DAY, NEXT_DAY], None)
    assert run_days(f"{DAY}T22:00:00", NEXT_DAY)[0] == [DAY, NEXT_DAY]
    assert run_days(f"{DAY}T22:00:00", f"{NEXT_DAY}T00:00:00") == (
        [DAY],
        ("2025-03-02T22:00:00+00:00", "2025-03-03T00:00:00+00:00"),
    )
    with pytest.raises(SystemExit, match="is not after start"):
        run_days(f"{DAY}T22:00:00", f"{DAY}T21:00:00")
