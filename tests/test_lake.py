"""Tests for `replay_defs.core.lake` (and its `storage`): a day's outputs as Delta Lake tables, on
a local directory and on S3 (moto, in its own process: deltalake holds the GIL while it waits
on S3, so an in-process moto would never answer).

What a test reads back, it reads like an outsider where it can: `DeltaTable(...)` on the table's
URI, or the object store itself (boto3 / the file system), never only through the lake's state.
Crashes are real: a writer subprocess is SIGKILLed at random points while the test reads the day.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import warm_process
from deltalake import DeltaTable, write_deltalake
from services import MotoProcess

from replay_defs.core.lake import DAY, DamagedVersion, DayTable, Lake, check_partition, check_slot
from replay_defs.core.storage import S3Settings, Storage, check_rel

REPO = Path(__file__).resolve().parents[1]
OWNER = "telemetry/parsed_events"
DAY_ = "2025-11-24"  # the day under test (DAY is the partition column's name)
OTHER_DAY = "2025-11-25"
TYPES = ("lock", "bridge", "video_doorbell")
FLAT = DayTable("flat", pa.schema([("id", pa.string())]), ("type", DAY))  # the primary table
QUARANTINE = DayTable("quarantine/telemetry", pa.schema([("line", pa.string())]))
TABLES = [FLAT, QUARANTINE]


# --------------------------------------------------------------------------------------------
# helpers: what a build of a day stages, and how an outsider reads it back


def day_files(tag: str, day: str = DAY_, types=TYPES, quarantine: bool = True) -> dict[str, dict[str, list]]:
    """The files one build of `day` stages ({staged path: columns}): per type one or two Parquet
    files of rows `<tag>|<type>|<n>`, and a quarantine file of lines `<tag>|q<n>`."""
    files = {}
    for t in types:
        files[f"flat/type={t}/day={day}/part-0.parquet"] = {"id": [f"{tag}|{t}|{i}" for i in range(3)]}
        if t == "lock":
            files[f"flat/type={t}/day={day}/part-1.parquet"] = {"id": [f"{tag}|{t}|{i}" for i in range(3, 5)]}
    if quarantine:
        files[f"quarantine/telemetry/day={day}/quarantine.parquet"] = {"line": [f"{tag}|q{i}" for i in range(2)]}
    return files


def rows_of(files: dict[str, dict[str, list]], table: DayTable) -> list[str]:
    """The rows a build's files put in `table`, sorted."""
    return sorted(
        v for rel, cols in files.items() if rel.startswith(table.rel + "/") for v in next(iter(cols.values()))
    )


def stage(lake: Lake, files: dict[str, dict[str, list]], day: str = DAY_) -> Path:
    """Write a build's files into a fresh staging directory, as the day pipeline does."""
    staged = lake.new_staging(OWNER, day)
    for rel, cols in files.items():
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), staged / rel)
    return staged


def publish(lake: Lake, tag: str, day: str = DAY_, files=None, **kw):
    files = day_files(tag, day) if files is None else files
    return lake.publish(OWNER, day, stage(lake, files, day), TABLES, {"tag": tag}, run_id=f"run-{tag}", **kw)


@dataclass
class Backend:
    """Where a test's lake lives, and how to reach its bytes without the lake."""

    name: str
    root: str  # a local directory or s3://bucket/lake
    s3: S3Settings | None = None
    moto: MotoProcess | None = None

    def lake(self, **kw) -> Lake:
        return Lake(self.root, s3=self.s3, **kw)

    @property
    def bucket(self) -> str:
        return self.root.removeprefix("s3://").split("/")[0]

    def key(self, rel: str) -> str:
        return f"{self.root.removeprefix('s3://').split('/', 1)[1]}/{rel}"

    def delta_options(self) -> dict[str, str]:
        if self.s3 is None:
            return {}
        return {
            "AWS_ENDPOINT_URL": self.s3.endpoint_url,
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        }

    def delta(self, table: DayTable) -> DeltaTable:
        return DeltaTable(f"{self.root}/{table.rel}", storage_options=self.delta_options())

    def read(self, rel: str) -> bytes:
        if self.s3 is None:
            return Path(self.root, rel).read_bytes()
        return self.moto.client("s3").get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()

    def write(self, rel: str, data: bytes) -> None:
        """Put bytes at a lake path behind the lake's back."""
        if self.s3 is None:
            Path(self.root, rel).parent.mkdir(parents=True, exist_ok=True)
            Path(self.root, rel).write_bytes(data)
        else:
            self.moto.client("s3").put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)

    def delete(self, rel: str) -> None:
        if self.s3 is None:
            Path(self.root, rel).unlink()
        else:
            self.moto.client("s3").delete_object(Bucket=self.bucket, Key=self.key(rel))


def outsider_rows(backend: Backend, table: DayTable, day: str = DAY_) -> list[str]:
    """The day's rows of `table` as any Delta reader sees them (the table's current version)."""
    t = backend.delta(table).to_pyarrow_table()
    col = table.schema.names[0]
    return sorted(v for v, d in zip(t[col].to_pylist(), t[DAY].to_pylist()) if str(d) == day)


def versions(backend: Backend) -> dict[str, int]:
    return {t.rel: backend.delta(t).version() for t in TABLES}


def data_files(lake: Lake, table: DayTable) -> set[str]:
    """Every data file stored under a table's directory (its Delta log aside), lake-relative."""
    sel = pafs.FileSelector(lake.storage.path(table.rel), recursive=True, allow_not_found=True)
    base = lake.storage.base + "/"
    return {
        i.path.removeprefix(base)
        for i in lake.storage.fs.get_file_info(sel)
        if i.type == pafs.FileType.File and "/_delta_log/" not in i.path
    }


# --------------------------------------------------------------------------------------------
# backends: a local directory, and S3 on one moto process per module with a bucket per test


@pytest.fixture(scope="module")
def moto():
    server = MotoProcess().start()
    yield server
    server.stop()


def s3_settings(moto: MotoProcess) -> S3Settings:
    return S3Settings(endpoint_url=moto.endpoint, region="us-east-1", access_key_id="test", secret_access_key="test")


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path, monkeypatch) -> Backend:
    monkeypatch.setenv("EVENT_REPLAY_STAGING_DIR", str(tmp_path / "staging"))  # an S3 lake stages locally
    if request.param == "local":
        return Backend("local", str(tmp_path / "lake"))
    moto = request.getfixturevalue("moto")
    bucket = f"lake-{uuid.uuid4().hex[:16]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    return Backend("s3", f"s3://{bucket}/lake", s3_settings(moto), moto)


@pytest.fixture
def lake(backend) -> Lake:
    return backend.lake()


# --------------------------------------------------------------------------------------------
# publishing a day


def test_publish_into_an_empty_lake_records_every_file_with_its_hash(backend, lake):
    files = day_files("A")
    state = publish(lake, "A")

    assert outsider_rows(backend, FLAT) == rows_of(files, FLAT)
    assert outsider_rows(backend, QUARANTINE) == rows_of(files, QUARANTINE)
    assert state.stats == {"tag": "A"} and state.run_id == "run-A"
    assert len(state.files) == len(files)
    for rel, e in state.entries.items():
        data = backend.read(rel)  # the committed bytes, read straight from the store
        assert e["size"] == len(data)
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        assert e["rows"] == pq.read_metadata(pa.BufferReader(data)).num_rows
        assert rel.startswith(e["table"] + "/")
    # The state is the primary table's newest commit, and records the versions of both tables.
    assert lake.state(OWNER, DAY_, FLAT).entries == state.entries
    assert state.tables == versions(backend) and state.version == versions(backend)[FLAT.rel]
    assert lake.stale_files(OWNER, DAY_, TABLES) == []
    assert lake.recover(OWNER, DAY_) is False  # the publish left no staging behind


def test_replacing_a_day_is_one_commit_per_table_and_leaves_other_days_untouched(backend, lake):
    publish(lake, "A")
    publish(lake, "A", OTHER_DAY)
    before = versions(backend)

    new = day_files("BB", types=("lock", "bridge"))  # video_doorbell has no rows in the new build
    state = publish(lake, "BB", files=new)

    assert versions(backend) == {rel: v + 1 for rel, v in before.items()}
    assert outsider_rows(backend, FLAT) == rows_of(new, FLAT)
    assert outsider_rows(backend, QUARANTINE) == rows_of(new, QUARANTINE)
    other = day_files("A", OTHER_DAY)
    assert outsider_rows(backend, FLAT, OTHER_DAY) == rows_of(other, FLAT)
    assert outsider_rows(backend, QUARANTINE, OTHER_DAY) == rows_of(other, QUARANTINE)
    # The primary commits last: its recorded state names the quarantine version holding the day.
    recorded = lake.state(OWNER, DAY_, FLAT)
    assert recorded.entries == state.entries
    assert recorded.tables == {QUARANTINE.rel: before[QUARANTINE.rel] + 1, FLAT.rel: before[FLAT.rel] + 1}
    assert lake.stale_files(OWNER, DAY_, TABLES) == []
    assert lake.stale_files(OWNER, OTHER_DAY, TABLES) == []


def test_a_surgical_rebuild_replaces_only_that_types_files_of_the_day(backend, lake):
    publish(lake, "A")
    publish(lake, "A", OTHER_DAY)
    before, before_versions = lake.state(OWNER, DAY_, FLAT), versions(backend)

    fix = day_files("FIX", types=("lock",), quarantine=False)
    state = publish(lake, "FIX", files=fix, only={"type": "lock"})

    # One commit, in the table split by type; the quarantine (not split by type) is left alone.
    assert versions(backend) == {**before_versions, FLAT.rel: before_versions[FLAT.rel] + 1}

    a = day_files("A")
    want = sorted(rows_of(fix, FLAT) + [r for r in rows_of(a, FLAT) if "|lock|" not in r])
    assert outsider_rows(backend, FLAT) == want
    assert outsider_rows(backend, QUARANTINE) == rows_of(a, QUARANTINE)
    assert outsider_rows(backend, FLAT, OTHER_DAY) == rows_of(day_files("A", OTHER_DAY), FLAT)
    # The other types' files stay the committed ones (same paths, same hashes).
    kept = {f: e for f, e in before.entries.items() if "/type=lock/" not in f}
    assert {f: e for f, e in state.entries.items() if "/type=lock/" not in f} == kept
    assert lake.stale_files(OWNER, DAY_, TABLES) == []


def test_publish_refuses_files_it_cannot_place_before_moving_any(backend, lake):
    publish(lake, "A")
    before = versions(backend)
    cases = {
        "staged under another day": (day_files("X", OTHER_DAY), None),
        "a type outside `only`": (day_files("X", types=("lock", "bridge"), quarantine=False), {"type": "lock"}),
        "a table `only` does not split": (day_files("X", types=("lock",)), {"type": "lock"}),
        "no type directory": ({f"flat/day={DAY_}/part-0.parquet": {"id": ["x"]}}, None),
    }
    for case, (files, only) in cases.items():
        staged = stage(lake, files)
        with pytest.raises(ValueError):
            lake.publish(OWNER, DAY_, staged, TABLES, {}, only=only)
        assert len(list(staged.rglob("*.parquet"))) == len(files), case  # nothing moved into the lake
    assert versions(backend) == before
    assert outsider_rows(backend, FLAT) == rows_of(day_files("A"), FLAT)
    assert outsider_rows(backend, FLAT, OTHER_DAY) == []
    for t in TABLES:
        assert data_files(lake, t) == set(lake.live_files(t, DAY_))


def test_a_build_that_died_while_staging_leaves_the_day_untouched(backend, lake):
    publish(lake, "A")
    before = versions(backend)
    staged = stage(lake, day_files("BB"))
    (staged / "flat" / "half-written.parquet.tmp").write_bytes(b"partial")

    assert versions(backend) == before
    assert outsider_rows(backend, FLAT) == rows_of(day_files("A"), FLAT)
    assert lake.stale_files(OWNER, DAY_, TABLES) == []
    assert lake.recover(OWNER, DAY_) is True
    assert not staged.exists()
    assert lake.recover(OWNER, DAY_) is False


def test_a_day_and_its_bookkeeping_names_are_checked(lake):
    for bad in ("../x", "2025-13-01"):
        with pytest.raises(ValueError):
            lake.state(OWNER, bad, FLAT)
        with pytest.raises(ValueError):
            lake.new_staging(OWNER, bad)
        with pytest.raises(ValueError):
            lake.publish(OWNER, bad, Path("/nonexistent"), TABLES, {})
    for owner in ("../etc", "telemetry", "a/b/c", "telemetry/../x"):
        with pytest.raises(ValueError):
            lake.read_json(owner, "x.json")


# --------------------------------------------------------------------------------------------
# the recorded state against the lake: stale_files and damaged_files


def append_as_another_writer(backend, event_id: str) -> None:
    """One lock row of DAY_ appended to the events table with deltalake itself, not the lake."""
    row = pa.table({"id": [event_id], "type": ["lock"], DAY: pa.array([date.fromisoformat(DAY_)])})
    write_deltalake(
        f"{backend.root}/{FLAT.rel}",
        row,
        mode="append",
        partition_by=["type", DAY],
        storage_options=backend.delta_options(),
    )


def test_the_recorded_hashes_catch_every_change_behind_the_lakes_back(backend, lake):
    state = publish(lake, "A")
    publish(lake, "A", OTHER_DAY)
    assert lake.stale_files(OWNER, DAY_, TABLES) == []
    lock0, lock1 = [f for f in state.files_of(FLAT.rel) if "/type=lock/" in f]
    quarantine = state.files_of(QUARANTINE.rel)[0]

    # A file another writer commits to the day; other bytes at the same size; a deleted file.
    append_as_another_writer(backend, "intruder")
    intruder = next(f for f in lake.live_files(FLAT, DAY_) if f not in state.entries)
    assert "intruder" in outsider_rows(backend, FLAT)
    data = backend.read(lock0)
    backend.write(lock0, bytes(b ^ 0xFF for b in data[:8]) + data[8:])
    backend.delete(quarantine)

    assert lake.stale_files(OWNER, DAY_, TABLES) == sorted(
        [f"changed content: {lock0}", f"missing: {quarantine}", f"unexpected: {intruder}"]
    )
    assert lake.damaged_files(state, [lock0, lock1, quarantine]) == sorted(
        [f"changed content: {lock0}", f"missing: {quarantine}"]
    )
    assert lake.stale_files(OWNER, OTHER_DAY, TABLES) == []  # another day's files are not this day's


def test_stale_files_names_a_file_another_writer_removed_from_the_table(backend, lake):
    state = publish(lake, "A")
    backend.delta(FLAT).delete("type = 'bridge'")
    bridge = [f for f in state.files_of(FLAT.rel) if "/type=bridge/" in f]
    assert lake.stale_files(OWNER, DAY_, TABLES) == sorted(f"not in the table: {f}" for f in bridge)
    assert lake.damaged_files(state, bridge) == []  # the bytes themselves are still the committed ones


def test_stale_files_of_a_day_without_a_state(backend, lake):
    assert lake.stale_files(OWNER, DAY_, TABLES) == []
    publish(lake, "A", OTHER_DAY)  # creates the tables
    append_as_another_writer(backend, "x")
    (only,) = lake.live_files(FLAT, DAY_)
    assert lake.stale_files(OWNER, DAY_, TABLES) == [f"unexpected: {only}"]
    assert lake.damaged_files(None, ["flat/x.parquet"]) == ["missing: flat/x.parquet"]


def test_reading_the_committed_files(lake):
    state = publish(lake, "A")
    files = state.files_of(FLAT.rel)
    assert sorted(lake.dataset(files).to_table()["id"].to_pylist()) == rows_of(day_files("A"), FLAT)
    assert lake.sql(files, "SELECT count(*) FROM files WHERE id LIKE 'A|lock|%'") == [(5,)]
    assert lake.sql([], "SELECT 1") == []


# --------------------------------------------------------------------------------------------
# rollback


def test_rollback_restores_the_previous_build_in_one_commit(backend, lake):
    a = publish(lake, "A")
    publish(lake, "BB", files=day_files("BB", types=("lock",)))
    before = versions(backend)

    rolled = lake.rollback(OWNER, DAY_, TABLES, run_id="rollback-1")

    assert versions(backend) == {rel: v + 1 for rel, v in before.items()}
    assert outsider_rows(backend, FLAT) == rows_of(day_files("A"), FLAT)
    assert outsider_rows(backend, QUARANTINE) == rows_of(day_files("A"), QUARANTINE)
    cur = lake.state(OWNER, DAY_, FLAT)
    assert cur.entries == a.entries  # the same files, re-committed: no bytes copied
    assert cur.built_version == a.version == rolled.built_version
    assert cur.stats == {"tag": "A", "rolled_back_to": a.version} and cur.run_id == "rollback-1"
    assert lake.stale_files(OWNER, DAY_, TABLES) == []


def test_a_rollback_after_a_rollback_does_not_bring_back_the_newer_build(backend, lake):
    publish(lake, "A")
    publish(lake, "BB")
    publish(lake, "CCC")  # bad
    lake.rollback(OWNER, DAY_, TABLES)
    assert outsider_rows(backend, FLAT) == rows_of(day_files("BB"), FLAT)
    lake.rollback(OWNER, DAY_, TABLES)  # further back, not forth to CCC
    assert outsider_rows(backend, FLAT) == rows_of(day_files("A"), FLAT)
    with pytest.raises(LookupError, match=f"{OWNER} {DAY_}: no earlier version is kept to roll back to"):
        lake.rollback(OWNER, DAY_, TABLES)
    assert outsider_rows(backend, FLAT) == rows_of(day_files("A"), FLAT)


def test_rollback_to_a_newer_version_undoes_a_rollback(backend, lake):
    publish(lake, "A")
    bb = publish(lake, "BB")
    lake.rollback(OWNER, DAY_, TABLES)
    assert lake.kept_versions(OWNER, DAY_, FLAT)[-1] == bb.version

    again = lake.rollback(OWNER, DAY_, TABLES, to=bb.version)

    assert again.built_version == bb.version
    assert outsider_rows(backend, FLAT) == rows_of(day_files("BB"), FLAT)
    assert outsider_rows(backend, QUARANTINE) == rows_of(day_files("BB"), QUARANTINE)
    assert lake.stale_files(OWNER, DAY_, TABLES) == []


def test_rollback_to_the_live_version_or_one_never_built_is_refused(backend, lake):
    a = publish(lake, "A")
    bb = publish(lake, "BB")
    with pytest.raises(LookupError, match=f"version {bb.version} is already the live version"):
        lake.rollback(OWNER, DAY_, TABLES, to=bb.version)
    lake.rollback(OWNER, DAY_, TABLES)
    # After the rollback the live build is A's, whatever the number of the rollback's own commit.
    with pytest.raises(LookupError, match=f"version {a.version} is already the live version"):
        lake.rollback(OWNER, DAY_, TABLES, to=a.version)
    for to in (99, 0):
        with pytest.raises(LookupError, match=f"version {to} is not kept"):
            lake.rollback(OWNER, DAY_, TABLES, to=to)
    assert outsider_rows(backend, FLAT) == rows_of(day_files("A"), FLAT)


def test_rollback_without_an_earlier_build_is_refused(backend, lake):
    with pytest.raises(LookupError, match="no earlier version is kept to roll back to"):
        lake.rollback(OWNER, DAY_, TABLES)
    publish(lake, "A")
    before = versions(backend)
    with pytest.raises(LookupError, match="no earlier version is kept to roll back to"):
        lake.rollback(OWNER, DAY_, TABLES)
    assert versions(backend) == before


def test_rollback_refuses_a_damaged_kept_version(backend, lake):
    a = publish(lake, "A")
    publish(lake, "BB")
    before = versions(backend)
    victim = a.files_of(FLAT.rel)[0]

    backend.write(victim, b"x" * a.entries[victim]["size"])  # same size, other bytes
    with pytest.raises(DamagedVersion, match=f"kept version {a.version} is damaged.*changed content: {victim}"):
        lake.rollback(OWNER, DAY_, TABLES)
    # A version with a file gone is no longer kept (as if vacuumed): refused as well.
    backend.delete(victim)
    assert lake.kept_versions(OWNER, DAY_, FLAT) == [before[FLAT.rel]]
    with pytest.raises(LookupError, match=f"version {a.version} is not kept"):
        lake.rollback(OWNER, DAY_, TABLES, to=a.version)
    assert versions(backend) == before
    assert outsider_rows(backend, FLAT) == rows_of(day_files("BB"), FLAT)


def test_publishing_after_a_rollback_is_a_new_build(backend, lake):
    a = publish(lake, "A")
    bb = publish(lake, "BB")
    lake.rollback(OWNER, DAY_, TABLES)
    ccc = publish(lake, "CCC")
    assert ccc.version > bb.version and ccc.built_version == ccc.version
    assert outsider_rows(backend, FLAT) == rows_of(day_files("CCC"), FLAT)
    assert lake.kept_versions(OWNER, DAY_, FLAT) == [a.version, bb.version, ccc.version]
    assert lake.kept_state(OWNER, DAY_, FLAT, bb.version).stats == {"tag": "BB"}


# --------------------------------------------------------------------------------------------
# retention


def test_vacuum_removes_old_builds_but_never_the_live_files(backend, lake):
    a = publish(lake, "A")
    bb = publish(lake, "BB")
    lake.rollback(OWNER, DAY_, TABLES)  # A is live again, BB is a kept build
    assert lake.kept_versions(OWNER, DAY_, FLAT) == [a.version, bb.version]
    rels = [t.rel for t in TABLES]

    planned = lake.vacuum(rels, retention_hours=0, dry_run=True)
    assert planned == {FLAT.rel: len(bb.files_of(FLAT.rel)), QUARANTINE.rel: 1}
    assert lake.kept_versions(OWNER, DAY_, FLAT) == [a.version, bb.version]  # a dry run deletes nothing

    assert lake.vacuum(rels, retention_hours=0, dry_run=False) == planned
    assert lake.kept_versions(OWNER, DAY_, FLAT) == [a.version]
    assert outsider_rows(backend, FLAT) == rows_of(day_files("A"), FLAT)
    assert lake.stale_files(OWNER, DAY_, TABLES) == []
    with pytest.raises(LookupError, match=f"version {bb.version} is not kept"):
        lake.rollback(OWNER, DAY_, TABLES, to=bb.version)


def test_vacuum_refuses_to_delete_a_file_the_live_state_still_reads(backend, lake):
    """A crash between a build's quarantine commit and its events commit leaves the quarantine
    table ahead of the day's state: the state's quarantine file is no longer in the table, and a
    vacuum past the retention would delete what the live state reads."""
    a = publish(lake, "A")
    (read_by_a,) = a.files_of(QUARANTINE.rel)
    newer = pa.table({"line": ["from a build that never committed its events"], DAY: [date.fromisoformat(DAY_)]})
    write_deltalake(
        f"{backend.root}/{QUARANTINE.rel}",
        newer,
        mode="overwrite",
        predicate=f"{DAY} = '{DAY_}'",
        storage_options=backend.delta_options(),
    )
    with pytest.raises(ValueError, match=f"still reads .*{read_by_a}"):
        lake.vacuum([t.rel for t in TABLES], retention_hours=0, dry_run=False)
    assert lake.damaged_files(lake.state(OWNER, DAY_, FLAT), [read_by_a]) == []  # nothing was deleted
    publish(lake, "B")  # rebuilding the day makes the vacuum safe again
    assert lake.vacuum([t.rel for t in TABLES], retention_hours=0, dry_run=False)


def test_retention_hours_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="retention_hours"):
        Lake(tmp_path / "lake", retention_hours=-1)


# --------------------------------------------------------------------------------------------
# crash safety and concurrency: writers in their own processes

WRITER = r"""
import json, os, sys, time
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from replay_defs.core.lake import DayTable, Lake
from replay_defs.core.storage import S3Settings

job = json.loads(sys.argv[1])
lake = Lake(job["root"], s3=S3Settings(**job["s3"]) if job["s3"] else None)
tables = [DayTable(rel, pa.schema([(c, pa.string()) for c in cols]), tuple(parts)) for rel, cols, parts in job["tables"]]
staged = lake.new_staging(job["owner"], job["day"])
for rel, cols in job["files"].items():
    (staged / rel).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), staged / rel)
if job["barrier"]:  # hold the first commit until the other writer is about to commit as well
    import deltalake
    real, held = deltalake.DeltaTable.create_write_transaction, []
    def held_commit(self, *a, **kw):
        if not held:
            held.append(Path(job["barrier"], str(os.getpid())).touch())
            deadline = time.monotonic() + 20
            while len(os.listdir(job["barrier"])) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
        return real(self, *a, **kw)
    deltalake.DeltaTable.create_write_transaction = held_commit
import deltalake  # loaded before `go`: the publish is all that runs after it
print("staged", flush=True)
sys.stdin.readline()
lake.publish(job["owner"], job["day"], staged, tables, {"tag": job["tag"]}, run_id=job["tag"])
print("published", flush=True)
"""


class Writer:
    """A process that stages a build of `day` (rows tagged `tag`) and publishes it on `go()`.
    With `barrier` (a directory shared by two writers), its first commit waits for the other's."""

    def __init__(self, backend: Backend, tag: str, day: str = DAY_, barrier: Path | None = None):
        job = {
            "root": backend.root,
            "s3": backend.s3.__dict__ if backend.s3 else None,
            "owner": OWNER,
            "day": day,
            "tag": tag,
            "tables": [(t.rel, t.schema.names, t.partition_by) for t in TABLES],
            "files": day_files(tag, day),
            "barrier": str(barrier) if barrier else None,
        }
        self.tag = tag
        self.proc = warm_process.WarmPopen(
            [sys.executable, "-c", WRITER, json.dumps(job)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def go(self) -> None:
        """Wait until the build is staged, then let it publish."""
        line = self.proc.stdout.readline()
        assert line == "staged\n", (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, err

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate()


def day_tag(lake: Lake) -> str:
    """The tag of the build the day's state holds, after checking every committed row is that
    build's: the day as a reader of the lake sees it, one snapshot across both tables."""
    state = lake.state(OWNER, DAY_, FLAT)
    got = {t: sorted(lake.dataset(state.files_of(t.rel)).to_table()[t.schema.names[0]].to_pylist()) for t in TABLES}
    tag = got[FLAT][0].split("|")[0]
    want = day_files(tag)
    assert got == {t: rows_of(want, t) for t in TABLES}, f"a mix of builds: {got}"
    return tag


class Reader(threading.Thread):
    """Reads the day over and over, through the state and as an outsider, until stopped;
    collects what each read saw and every error."""

    def __init__(self, backend: Backend, lake: Lake):
        super().__init__(daemon=True)
        self.backend, self.lake = backend, lake
        self.stop, self.seen, self.errors = threading.Event(), [], []

    def run(self):
        while not self.stop.is_set():
            try:
                tag = day_tag(self.lake)
                outside = outsider_rows(self.backend, FLAT)
                tags = {r.split("|")[0] for r in outside}
                assert len(tags) == 1 and outside == rows_of(day_files(next(iter(tags))), FLAT), outside
                self.seen.append((tag, tags.pop()))
            except Exception as e:  # an error is a failure too: the test reports it
                self.errors.append(repr(e))
            time.sleep(0.01)


def test_a_killed_publisher_leaves_the_old_or_the_new_day_and_a_rerun_is_clean(backend, lake):
    publish(lake, "other", OTHER_DAY)
    # The first build, by a writer process too: it measures how long a publish takes.
    first = Writer(backend, "old")
    first.go()
    t0 = time.monotonic()
    assert first.proc.stdout.readline() == "published\n", first.proc.stderr.read()
    window = 1.3 * (time.monotonic() - t0)
    assert first.finish()[0] == 0

    rng = random.Random(20251124)
    reader = Reader(backend, lake)
    reader.start()
    outcomes = []
    try:
        writers = [Writer(backend, "new0")]
        for k in range(10):
            if k < 9:  # the next one starts up while this one runs
                writers.append(Writer(backend, f"new{k + 1}"))
            before = day_tag(lake)
            writers[k].go()
            time.sleep(rng.uniform(0, window))
            writers[k].kill()
            after = day_tag(lake)
            assert after in (before, f"new{k}"), (k, before, after)
            # An outsider sees the same build in the primary table (the quarantine may be ahead).
            assert outsider_rows(backend, FLAT) == rows_of(day_files(after), FLAT), k
            outcomes.append("old" if after == before else "new")
    finally:
        reader.stop.set()
        reader.join()
        for w in writers:
            w.kill()
    assert not reader.errors, reader.errors[:3]
    assert len(reader.seen) >= 10
    # The day only moves forward: no read sees a build older than one an earlier read saw.
    order = {"old": -1, **{f"new{k}": k for k in range(10)}}
    for how in (0, 1):  # through the state, as an outsider
        seen = [order[s[how]] for s in reader.seen]
        assert seen == sorted(seen), seen
    assert "old" in outcomes, f"no kill landed before a commit: {outcomes}"

    # A re-run publishes cleanly over whatever the kills left.
    assert lake.recover(OWNER, DAY_) is True  # the killed runs' staging
    publish(lake, "rerun")
    assert outsider_rows(backend, FLAT) == rows_of(day_files("rerun"), FLAT)
    assert day_tag(lake) == "rerun"
    assert lake.stale_files(OWNER, DAY_, TABLES) == []

    # Vacuum removes every file no live version holds: the killed runs' orphans and old builds.
    lake.vacuum([t.rel for t in TABLES], retention_hours=0, dry_run=False)
    for t in TABLES:
        live = set(lake.live_files(t, DAY_)) | set(lake.live_files(t, OTHER_DAY))
        assert data_files(lake, t) == live
    assert day_tag(lake) == "rerun"
    assert outsider_rows(backend, FLAT, OTHER_DAY) == rows_of(day_files("other", OTHER_DAY), FLAT)
    assert lake.stale_files(OWNER, DAY_, TABLES) == []


def run_two_writers(backend: Backend, tmp_path: Path, days: tuple[str, str], barrier: bool):
    """Two writer processes publishing at once (with `barrier`, each holds its first commit until
    the other is about to commit too). Returns their (exit code, stderr)."""
    gate = tmp_path / f"barrier-{uuid.uuid4().hex[:8]}"
    gate.mkdir()
    writers = [Writer(backend, f"w{i}", day, gate if barrier else None) for i, day in enumerate(days)]
    for w in writers:
        w.go()
    return [w.finish() for w in writers]


def test_two_writers_of_different_days_both_commit(backend, lake, tmp_path):
    publish(lake, "A")
    publish(lake, "A", OTHER_DAY)
    results = run_two_writers(backend, tmp_path, (DAY_, OTHER_DAY), barrier=True)
    assert [rc for rc, _ in results] == [0, 0], [err[-500:] for _, err in results]
    assert outsider_rows(backend, FLAT) == rows_of(day_files("w0"), FLAT)
    assert outsider_rows(backend, FLAT, OTHER_DAY) == rows_of(day_files("w1", OTHER_DAY), FLAT)
    for day in (DAY_, OTHER_DAY):
        assert lake.stale_files(OWNER, day, TABLES) == []


@pytest.mark.parametrize("first_build", [False, True], ids=["rebuild", "first-build"])
def test_two_writers_of_the_same_day_one_wins(backend, lake, tmp_path, first_build):
    publish(lake, "A", OTHER_DAY)  # the tables exist
    if not first_build:
        publish(lake, "A")
    # A local lake serialises writers of a day with a file lock: both commit, one after the
    # other. On S3 they race (held at the barrier) and the one that commits second fails.
    racing = backend.name == "s3"
    results = run_two_writers(backend, tmp_path, (DAY_, DAY_), barrier=racing)

    codes = sorted(rc for rc, _ in results)
    if racing:
        assert codes[0] == 0 and codes[1] != 0, results
        assert "DayConflict" in next(err for rc, err in results if rc)
    else:
        assert codes == [0, 0], results
    tag = day_tag(lake)  # exactly one build's rows, in both tables
    assert tag in ("w0", "w1")
    assert outsider_rows(backend, FLAT) == rows_of(day_files(tag), FLAT)
    assert outsider_rows(backend, QUARANTINE) == rows_of(day_files(tag), QUARANTINE)
    assert lake.stale_files(OWNER, DAY_, TABLES) == []
    # The loser re-runs and succeeds.
    publish(lake, "again")
    assert day_tag(lake) == "again"
    assert lake.stale_files(OWNER, DAY_, TABLES) == []


# --------------------------------------------------------------------------------------------
# raw files


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


RAW = {
    # (file, listed in the window 2025-11-24 05:30 .. 2025-12-02 03:00 with suffix .jsonl.gz)
    "year=2025/month=11/day=24/hour=04/early.jsonl.gz": False,  # before the window's first hour
    "year=2025/month=11/day=24/hour=05/a.jsonl.gz": True,  # the first hour counts whole
    "year=2025/month=11/day=24/hour=5/plain-hour.jsonl.gz": True,
    "year=2025/month=11/day=24/hour=05/.hidden.jsonl.gz": False,
    "year=2025/month=11/day=24/hour=05/_temporary.jsonl.gz": False,
    "year=2025/month=11/day=24/hour=05/notes.txt": False,  # another suffix
    "year=2025/month=11/day=24/hour=24/bad-hour.jsonl.gz": False,
    "year=2025/month=11/day=24/hour=xx/bad-hour.jsonl.gz": False,
    "year=2025/month=11/day=24/minute=05/not-an-hour.jsonl.gz": False,
    "year=2025/month=11/day=30/hour=23/b.jsonl.gz": True,
    "year=2025/month=12/day=2/hour=2/plain-day.jsonl.gz": True,  # the last hour before the end
    "year=2025/month=12/day=02/hour=03/at-the-end.jsonl.gz": False,  # the end is excluded
    "year=2025/month=12/day=03/hour=00/after.jsonl.gz": False,
    "year=2026/month=1/day=4/hour=3/plain-month.jsonl.gz": False,
}


def test_list_raw_reads_the_hour_directories_of_the_window(backend, lake):
    for rel in RAW:
        backend.write(f"raw/t/{rel}", rel.encode())  # the lake itself writes no `.hidden` names
    refs = lake.list_raw("raw/t", utc(2025, 11, 24, 5, 30), utc(2025, 12, 2, 3), (".jsonl.gz",))

    want = sorted(f"raw/t/{rel}" for rel, listed in RAW.items() if listed)
    assert sorted(r.rel_path for r in refs) == want
    by_path = {r.rel_path: r for r in refs}
    assert by_path[f"raw/t/{next(iter(k for k in RAW if 'plain-hour' in k))}"].arrival == utc(2025, 11, 24, 5)
    assert by_path["raw/t/year=2025/month=12/day=2/hour=2/plain-day.jsonl.gz"].arrival == utc(2025, 12, 2, 2)
    assert [r.arrival for r in refs] == sorted(r.arrival for r in refs)
    for r in refs:
        assert r.size == len(r.rel_path.removeprefix("raw/t/").encode())
        assert lake.rel_from_uri(r.uri) == r.rel_path
        assert backend.read(r.rel_path) == r.rel_path.removeprefix("raw/t/").encode()


def test_list_raw_accepts_plain_and_zero_padded_months_and_days(lake):
    for rel in ("year=2026/month=1/day=4/hour=3/a.gz", "year=2026/month=01/day=04/hour=07/b.gz"):
        lake.storage.write_bytes(f"raw/t/{rel}", b"x")
    refs = lake.list_raw("raw/t", utc(2026, 1, 4), utc(2026, 1, 5), (".gz",))
    assert [(r.rel_path.rsplit("/", 1)[1], r.arrival) for r in refs] == [
        ("a.gz", utc(2026, 1, 4, 3)),
        ("b.gz", utc(2026, 1, 4, 7)),
    ]
    assert lake.list_raw("raw/missing", utc(2026, 1, 4), utc(2026, 1, 5), (".gz",)) == []
    with pytest.raises(ValueError):
        lake.list_raw("raw/../t", utc(2026, 1, 4), utc(2026, 1, 5), (".gz",))


def test_bucket_key_names_the_object_a_redrive_message_points_at(backend, lake):
    rel = "raw/t/year=2025/month=11/day=24/hour=05/a.jsonl.gz"
    lake.storage.write_bytes(rel, b"payload")
    bucket, key = lake.storage.bucket_key(rel)
    if backend.name == "s3":
        assert (bucket, key) == (backend.bucket, f"lake/{rel}")
        assert backend.moto.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read() == b"payload"
    else:
        assert (bucket, key) == (Path(backend.root).name, rel)
        assert Path(backend.root, key).read_bytes() == b"payload"


# --------------------------------------------------------------------------------------------
# bookkeeping files


def test_bookkeeping_json_round_trips_in_the_lake(backend, lake):
    assert lake.read_json(OWNER, "cursor.json") is None
    assert lake.read_jsonl(OWNER, "dead.jsonl") == []
    rel = lake.write_json(OWNER, "cursor.json", {"b": 1, "a": [1, 2]})
    assert rel == f"_replay/{OWNER}/cursor.json"
    lake.write_json(OWNER, "cursor.json", {"b": 2})  # replaced whole
    assert lake.read_json(OWNER, "cursor.json") == {"b": 2}
    assert json.loads(backend.read(rel)) == {"b": 2}

    lake.append_jsonl(OWNER, "dead.jsonl", [{"id": 1}, {"id": 2}])
    rel = lake.append_jsonl(OWNER, "dead.jsonl", [{"id": 3}])
    assert lake.read_jsonl(OWNER, "dead.jsonl") == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert [json.loads(line) for line in backend.read(rel).splitlines()] == [{"id": 1}, {"id": 2}, {"id": 3}]
    for name in ("../x.json", "a/../../x.json", ".hidden.json"):
        with pytest.raises(ValueError):
            lake.write_json(OWNER, name, {})


# --------------------------------------------------------------------------------------------
# names and paths


def test_storage_refuses_credentials_in_the_url():
    with pytest.raises(ValueError, match="must not hold credentials") as e:
        Storage("s3://AKIAKEY:sEcReT@bucket/lake")
    assert "sEcReT" not in str(e.value) and "AKIAKEY" not in str(e.value)
    with pytest.raises(ValueError, match="names no bucket"):
        Storage("s3:///lake")


def test_storage_refuses_paths_out_of_the_lake(backend, lake):
    for rel in ("../x", "raw/../../x", "/etc/passwd", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            lake.storage.write_bytes(rel, b"x")
        with pytest.raises(ValueError):
            lake.storage.read_bytes(rel)
    assert not Path(backend.root).parent.joinpath("x").exists()


@pytest.mark.parametrize(
    "bad",
    ["../x", "2025-13-01", "2025-1-1", "", "2025-02-30", "2025-11-24/..", "../../etc", "2025-11-24\n", " 2025-11-24"],
)
def test_check_partition_rejects_non_dates(bad):
    with pytest.raises(ValueError):
        check_partition(bad)


def test_check_partition_accepts_real_days():
    assert check_partition("2025-11-24") == "2025-11-24"
    assert check_partition("2024-02-29") == "2024-02-29"


@pytest.mark.parametrize(
    "bad",
    [
        "..",
        "../x",
        "a/..",
        "a/../b",
        "flat/type=lock/..",
        "/etc/passwd",
        "a//b",
        "",
        ".",
        "./a",
        "a/.hidden",
        "a b",
        "a\\..\\b",
        f"flat/type=lock/day={DAY_}\n",  # `$` also matches before a final newline
    ],
)
def test_check_rel_rejects_unsafe_paths(bad):
    with pytest.raises(ValueError):
        check_rel(bad)
    with pytest.raises(ValueError):
        check_slot(bad)


def test_check_rel_accepts_hive_style_paths():
    assert check_rel(f"flat/type=video_doorbell/day={DAY_}") == f"flat/type=video_doorbell/day={DAY_}"
    assert check_rel("raw/t/year=2025/month=11/x-1+2%3.gz") == "raw/t/year=2025/month=11/x-1+2%3.gz"


def test_rel_from_uri_rejects_uris_outside_a_local_lake(tmp_path):
    lake = Lake(tmp_path / "lake")
    sibling = Lake(tmp_path / "lake2")
    for uri in [
        sibling.uri("raw/a.gz"),  # shares the prefix "…/lake"
        "file://" + (tmp_path / "lakefile").as_posix(),
        "file://" + tmp_path.as_posix() + "/",
        lake.uri(""),  # the root itself, without a relative part
        "file:///etc/passwd",
        "s3://bucket" + (tmp_path / "lake" / "raw" / "a.gz").as_posix(),
        (tmp_path / "lake" / "raw" / "a.gz").as_posix(),
    ]:
        with pytest.raises(ValueError):
            lake.rel_from_uri(uri)


def test_rel_from_uri_rejects_uris_outside_an_s3_lake():
    lake = Lake("s3://bucket/lake", s3=S3Settings(endpoint_url="http://127.0.0.1:9", region="us-east-1"))
    for uri in ["s3://bucket/lake2/raw/a.gz", "s3://other/lake/raw/a.gz", "s3://bucket/raw/a.gz", "s3://bucket/lake/"]:
        with pytest.raises(ValueError):
            lake.rel_from_uri(uri)
    assert lake.rel_from_uri("s3://bucket/lake/raw/a%20b.gz") == "raw/a b.gz"


@pytest.mark.parametrize(
    "tail",
    ["../x", "raw/../../x", "raw/%2E%2E/%2E%2E/x", "%2e%2e/lake2/x", "raw/..", "..", "/etc/passwd", "%2Fetc%2Fpasswd"],
)
def test_rel_from_uri_rejects_dot_dot_and_absolute_tails(lake, tail):
    with pytest.raises(ValueError):
        lake.rel_from_uri(lake.uri("") + "/" + tail)


@pytest.mark.parametrize(
    "rel",
    [
        "raw/json_telemetry/year=2025/month=11/day=24/hour=00/telemetry-firehose-2025-11-24-00-000.gz",
        "raw/with space/a=b=c/file name with spaces.jsonl.gz",
        "raw/odd%chars/#hash?query&x=1+2/ümlaut.gz",
        "flat/type=video_doorbell/day=2025-11-24/part-0000-0000.parquet",
    ],
)
def test_uri_round_trips(lake, tmp_path, rel):
    for lk in (lake, Lake(tmp_path / "a lake=with signs")):
        uri = lk.uri(rel)
        assert " " not in uri and "#" not in uri and "?" not in uri
        assert lk.rel_from_uri(uri) == rel
    assert "year=2025" in lake.uri("raw/year=2025/x.gz")  # hive-style `=` stays readable


def test_recover_keeps_the_staging_of_another_live_run_and_drops_a_dead_ones(tmp_path):
    """An S3 lake has no day lock on the machine: a run's recover must not delete the staging of
    another run of the same day still working here (nor of another lake)."""
    import subprocess

    lake = Lake(tmp_path / "lake")
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        root = lake.new_staging(OWNER, DAY_).parent
        theirs, gone = root / f"{live.pid}-a", root / f"{dead.pid}-b"
        theirs.mkdir()
        gone.mkdir()
        assert lake.recover(OWNER, DAY_)
        assert theirs.is_dir() and not gone.exists()
        assert [p.name for p in root.iterdir()] == [theirs.name]  # our own earlier staging went too
    finally:
        live.kill()
