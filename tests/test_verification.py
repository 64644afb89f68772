"""Every check against the fault it exists for. A clean three-day range is materialized once; each
test restores it, tampers with the data behind the checks' back (bytes changed at the same size,
rows doubled, a raw file arriving late, a projection row edited, a delivered message removed, a
day shrunk) and watches the check fail, `event-replay verify` exit 1 and, where a rebuild meets the
fault, the materialization fail too. Nothing of the project is mocked: real files, DuckDB, the
outbox and a real (SQLite) Dagster instance. The day's versions are the Delta table versions of
its commits, so the tests name them by what each build published, never by number."""

import contextlib
import gzip
import io
import json
import os
import shutil
import subprocess
from datetime import date
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import warm_process
from conftest import DEMO_DAYS, PROJECT_ROOT, RANGE_TAGS

from replay_defs.core.lake import Lake
from replay_defs.pipeline.committed import committed_parquet, committed_quarantine, parsed_state, parsed_tables
from replay_defs.pipeline.store import DuckDBStore
from replay_defs.pipelines import TELEMETRY

DAY = "2025-11-25"
LATE_WARNING = ("late_events_within_window", "2025-11-26")  # the demo data's very late events
PARSED, PROJECTIONS, REDRIVE = (dg.AssetKey(["telemetry", a]) for a in ("parsed_events", "projections", "redrive"))
BAD_DEPLOY = {"simulate_parser_bug": True, "allow_shrink": True}


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_lake_template):
    """The three demo days materialized once in `work/`, and a pristine copy of the result. The
    copy is restored to the same path, so the lake's file URIs stay valid."""
    base = tmp_path_factory.mktemp("verification")
    work = base / "work"
    shutil.copytree(demo_lake_template, work / "lake")
    (work / "home").mkdir()
    (work / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with pytest.MonkeyPatch.context() as mp:
        for name, path in {
            "EVENT_REPLAY_LAKE": "lake",
            "EVENT_REPLAY_DUCKDB": "state.duckdb",
            "EVENT_REPLAY_OUTBOX": "outbox",
            "DAGSTER_HOME": "home",
        }.items():
            mp.setenv(name, str(work / path))
        from replay_defs.definitions import build_definitions

        defs = build_definitions()
        instance = dg.DagsterInstance.get()
        result = defs.resolve_job_def("telemetry_replay").execute_in_process(
            instance=instance, tags={RANGE_TAGS[0]: DEMO_DAYS[0], RANGE_TAGS[1]: DEMO_DAYS[-1]}, raise_on_error=False
        )
        assert result.success
        instance.dispose()
        shutil.copytree(work, base / "pristine")
        yield {"work": work, "pristine": base / "pristine", "defs": defs}


@pytest.fixture
def ws(built, fresh_definitions):
    """A clean materialized workspace for one test (the CLI's definitions imported afresh for it)."""
    shutil.rmtree(built["work"])
    shutil.copytree(built["pristine"], built["work"])
    instance = dg.DagsterInstance.get()
    yield Workspace(built["work"], built["defs"], instance)
    instance.dispose()


class Workspace:
    def __init__(self, root: Path, defs, instance):
        self.root, self.defs, self.instance = root, defs, instance
        self.lake = Lake(root / "lake")
        self.store = DuckDBStore(root / "state.duckdb")

    def run(self, day: str, selection: list[dg.AssetKey] | None = None, parse: dict | None = None):
        config = (
            {"ops": {"telemetry__parsed_events": {"config": {"workers": 1, **(parse or {})}}}}
            if selection in (None, [PARSED])
            else {}
        )
        return self.defs.resolve_job_def("telemetry_replay").execute_in_process(
            instance=self.instance,
            partition_key=day,
            asset_selection=selection,
            run_config=config,
            raise_on_error=False,
        )

    def cli(self, *args: str) -> tuple[int, str]:
        """`event-replay ARGS` in this process: (exit code, stdout + the exit message)."""
        from replay_defs.cli import main

        out = io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
                if not isinstance(exc.code, int):
                    out.write(str(exc.code))
        return code, out.getvalue()

    def verify(
        self, start: str = DEMO_DAYS[0], end: str = DEMO_DAYS[-1]
    ) -> tuple[int, dict[tuple[str, str], tuple[str, str]]]:
        """`event-replay verify`: exit code and (check, day) -> (verdict, description)."""
        code, out = self.cli("verify", "telemetry", start, end)
        verdicts = {}
        for line in out.splitlines():
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[0][:4].isdigit() and len(parts[0]) == 10:
                verdicts[(parts[2], parts[0])] = (parts[1].lower(), parts[3] if len(parts) > 3 else "")
        return code, verdicts

    def state(self, day: str):
        return parsed_state(self.lake, TELEMETRY, day)

    def version(self, day: str = DAY) -> int:
        """The Delta version the day's live files were built as (a rollback restores an older one)."""
        return self.state(day).built_version

    def committed(self, day: str) -> list[str]:
        return committed_parquet(self.lake, TELEMETRY, day)

    def file(self, rel: str) -> Path:
        """A lake file on disk (the lake is a local directory here)."""
        return Path(self.lake.storage.path(rel))


def failing(verdicts: dict) -> set[tuple[str, str]]:
    return {k for k, (v, _) in verdicts.items() if v != "passed" and k != LATE_WARNING}


def dagster_materialize(select: str, day: str) -> subprocess.CompletedProcess:
    """The CI way: `dagster asset materialize` in a subprocess, against $DAGSTER_HOME."""
    return warm_process.run(
        [
            str(PROJECT_ROOT / ".venv/bin/dagster"),
            "asset",
            "materialize",
            "-m",
            "replay_defs.definitions",
            "--select",
            select,
            "--partition",
            day,
        ],
        cwd=PROJECT_ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def gz_events(*events: dict) -> bytes:
    return gzip.compress(b"".join(json.dumps(e).encode() + b"\n" for e in events))


def event(event_id: str, ts: str, device: str = "dev-late-1", type_: str = "lock") -> dict:
    return {"event_id": event_id, "ts": ts, "type": type_, "device_id": device, "seq": 1, "payload": {"late": True}}


def from_scratch_device_latest(ws: Workspace) -> list[tuple]:
    """device_latest as a fold of every committed day's Parquet, computed here independently."""
    files = [str(ws.file(f)) for d in DEMO_DAYS if ws.state(d) for f in ws.committed(d)]
    return duckdb.execute(
        "SELECT device_id, type, seq, event_id FROM (SELECT *, row_number() OVER (PARTITION BY device_id ORDER BY ts DESC, event_id DESC) AS n "
        "FROM read_parquet($f)) WHERE n = 1 ORDER BY device_id",
        {"f": files},
    ).fetchall()


def device_latest(ws: Workspace) -> list[tuple]:
    return ws.store.query(
        'SELECT device_id, last_type, last_seq, _event_id FROM "telemetry"."device_latest" ORDER BY device_id'
    )


# ---- a clean range ------------------------------------------------------------------------------


def test_a_clean_range_raises_no_false_alarm(ws):
    code, verdicts = ws.verify()
    assert code == 0, verdicts
    assert failing(verdicts) == set()
    assert len(verdicts) == 9 * 3  # every check, every day
    # The one non-pass is the demo data's real late events, a warning that points at the setting.
    verdict, description = verdicts[LATE_WARNING]
    assert verdict == "warn" and "Lateness(early=..., late=...)" in description
    assert int(description.split()[0]) > 0
    assert device_latest(ws) == from_scratch_device_latest(ws)


# ---- integrity by content -----------------------------------------------------------------------


def test_a_same_size_change_in_a_committed_file_fails_stale_files_and_the_fold_refuses_it(ws):
    target = ws.file(ws.committed(DAY)[0])
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x5A  # one byte changed, same size
    target.write_bytes(bytes(data))

    code, verdicts = ws.verify()
    assert code == 1
    verdict, description = verdicts[("no_stale_files", DAY)]
    assert verdict == "failed" and f"changed content: {ws.committed(DAY)[0]}" in description
    # Other days fail nothing of their own; only their replace-projection check, which folds every
    # committed day and so reads the damaged file, cannot conclude.
    assert {c for (c, d) in failing(verdicts) if d != DAY} <= {"projections_match_fold"}

    # The CI rebuild of the projections meets the damaged file: it refuses to fold it, exit 1.
    proc = dagster_materialize("telemetry/projections", DAY)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no longer hold the committed bytes" in proc.stdout + proc.stderr


def test_rollback_refuses_a_kept_version_with_a_damaged_file(ws):
    first = ws.version()
    damaged = ws.committed(DAY)[0]
    path = ws.file(damaged)
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))  # same size, other bytes
    assert ws.run(DAY).success  # a new version with new files; the first one's stay in the table, one damaged
    rebuilt = ws.state(DAY).version

    code, out = ws.cli("rollback", "telemetry", DAY)
    assert code == 1
    assert "rollback refused" in out and f"kept version {first} is damaged" in out
    assert f"changed content: {damaged}" in out
    assert ws.state(DAY).version == rebuilt, "nothing was committed"
    assert ws.verify(DAY, DAY)[0] == 0


def test_a_plain_rollback_skips_a_version_that_failed_its_shrink_check(ws):
    first = ws.version()
    bad = ws.run(DAY, parse={"simulate_parser_bug": True})  # rejected: it lost events without consent
    assert not bad.success
    rejected = ws.version()
    assert ws.run(DAY).success  # fixed
    assert first < rejected < ws.version()
    code, out = ws.cli("rollback", "telemetry", DAY)
    assert code == 0, out
    assert f"skipping version {rejected}: it lost events without consent" in out
    assert ws.version() == first
    assert device_latest(ws) == from_scratch_device_latest(ws)
    code, out = ws.cli("rollback", "telemetry", DAY, "--to", str(first))
    assert code == 1 and f"version {first} is already the live version" in out


def test_doubled_rows_are_refused_by_the_projection_step_and_fail_the_checks(ws):
    rel = ws.committed(DAY)[0]
    table = pq.read_table(ws.file(rel))
    pq.write_table(pa.concat_tables([table, table]), ws.file(rel))
    totals_before = ws.store.query(
        'SELECT sum(events) FROM "telemetry"."daily_counts" WHERE day = $d::DATE', {"d": DAY}
    )

    refold = ws.run(DAY, selection=[PROJECTIONS])
    assert not refold.success
    failure = next(e for e in refold.all_events if e.is_step_failure)
    assert "refusing to read" in failure.event_specific_data.error.to_string()
    assert (
        ws.store.query('SELECT sum(events) FROM "telemetry"."daily_counts" WHERE day = $d::DATE', {"d": DAY})
        == totals_before
    )
    sent_before = sorted((ws.root / "outbox").rglob("*.jsonl"))
    redrive = ws.run(DAY, selection=[REDRIVE])  # the redrive reads the same files: it refuses too
    assert not redrive.success and sorted((ws.root / "outbox").rglob("*.jsonl")) == sent_before

    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1
    assert {c for c, _ in failing(verdicts)} >= {"no_duplicate_event_ids", "no_stale_files", "raw_lines_accounted_for"}
    assert f"{table.num_rows} duplicate rows" in verdicts[("no_duplicate_event_ids", DAY)][1]


def test_a_file_another_writer_commits_or_a_committed_file_deleted_fails_the_checks_naming_it(ws):
    # Another writer appends rows the day already holds to the Delta table: a reader of the table
    # sees them twice. The day's recorded state does not list the file.
    from deltalake import DeltaTable, write_deltalake

    table = parsed_tables(TELEMETRY)[0]
    uri = ws.lake.storage.table_uri(table.rel)
    rows = pq.read_table(ws.file(ws.committed(DAY)[0])).slice(0, 5)
    rows = rows.append_column("day", pa.array([date.fromisoformat(DAY)] * rows.num_rows, pa.date32()))
    before = set(ws.lake.live_files(table, DAY))
    write_deltalake(uri, rows.select(table.full_schema().names).cast(table.full_schema()), mode="append")
    (extra,) = set(ws.lake.live_files(table, DAY)) - before
    assert DeltaTable(uri).version() > ws.state(DAY).version and extra not in ws.state(DAY).entries

    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1
    # Only the checks that look at the table itself see it: the others read the committed state.
    assert failing(verdicts) == {("no_duplicate_event_ids", DAY), ("no_stale_files", DAY)}
    assert "5 duplicate rows" in verdicts[("no_duplicate_event_ids", DAY)][1]
    assert f"unexpected: {extra}" in verdicts[("no_stale_files", DAY)][1]

    # A committed file deleted from the store (the table's log still lists it).
    deleted = ws.committed(DAY)[-1]
    ws.file(deleted).unlink()
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1 and f"missing: {deleted}" in verdicts[("no_stale_files", DAY)][1]
    refold = ws.run(DAY, selection=[PROJECTIONS])
    assert not refold.success
    failure = next(e for e in refold.all_events if e.is_step_failure).event_specific_data.error.to_string()
    assert "refusing to read" in failure and f"missing: {deleted}" in failure

    # Rebuilding the day replaces all its files in the table, the stray one too: clean again.
    assert ws.run(DAY).success
    assert extra not in ws.lake.live_files(table, DAY)
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 0, verdicts


# ---- projections --------------------------------------------------------------------------------


def test_an_edited_increment_row_fails_totals_against_the_recorded_parsed_count(ws):
    ws.store.query(
        'UPDATE "telemetry"."daily_counts" SET events = events + 3 WHERE rowid = '
        '(SELECT min(rowid) FROM "telemetry"."daily_counts" WHERE day = $d::DATE)',
        {"d": DAY},
    )
    code, verdicts = ws.verify()
    assert code == 1 and failing(verdicts) == {("totals_match_parsed", DAY), ("projections_match_fold", DAY)}
    parsed = ws.state(DAY).stats["parsed"]
    assert f"sums to {parsed + 3}, parsed_events recorded {parsed}" in verdicts[("totals_match_parsed", DAY)][1]


def test_increment_rows_moved_between_keys_fail_the_fold_comparison_though_the_total_holds(ws):
    rows = 'SELECT rowid FROM "telemetry"."daily_counts" WHERE day = $d::DATE AND events > 7 ORDER BY rowid LIMIT 2'
    first, second = (r[0] for r in ws.store.query(rows, {"d": DAY}))
    ws.store.query('UPDATE "telemetry"."daily_counts" SET events = events + 7 WHERE rowid = $r', {"r": first})
    ws.store.query('UPDATE "telemetry"."daily_counts" SET events = events - 7 WHERE rowid = $r', {"r": second})
    ws.store.query(
        'INSERT INTO "telemetry"."daily_counts" SELECT day, \'ghost\', device_id, 0, 0 FROM "telemetry"."daily_counts" '
        "WHERE rowid = $r",
        {"r": first},
    )
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1 and failing(verdicts) == {("projections_match_fold", DAY)}
    assert "daily_counts: 3 of" in verdicts[("projections_match_fold", DAY)][1]


def test_an_edited_replace_row_fails_the_fold_comparison(ws):
    device = ws.store.query(
        'SELECT device_id FROM "telemetry"."device_latest" WHERE _day = $d::DATE LIMIT 1', {"d": DAY}
    )[0][0]
    ws.store.query('UPDATE "telemetry"."device_latest" SET last_seq = last_seq + 1 WHERE device_id = $k', {"k": device})
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1 and failing(verdicts) == {("projections_match_fold", DAY)}
    assert device in verdicts[("projections_match_fold", DAY)][1]


def test_a_dropped_or_padded_replace_projection_fails_the_fold_comparison(ws):
    ws.store.query(
        "INSERT INTO \"telemetry\".\"device_latest\" SELECT 'phantom', last_type, last_seq, _order, _event_id, DATE '2025-11-10' "
        'FROM "telemetry"."device_latest" LIMIT 1'
    )
    code, verdicts = ws.verify()
    assert code == 1 and {c for c, _ in failing(verdicts)} == {"projections_match_fold"}
    assert "device_latest: 1 rows come from no committed day" in verdicts[("projections_match_fold", DAY)][1]
    ws.store.query('DROP TABLE "telemetry"."device_latest"')
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1 and "device_latest: the table does not exist" in verdicts[("projections_match_fold", DAY)][1]


def test_replace_projection_equals_a_fold_of_the_committed_days_through_replays_and_rollbacks(ws):
    assert device_latest(ws) == from_scratch_device_latest(ws)
    # A bad deploy (consented to, so it is folded) shifts events +8 h: they would win as "latest".
    bad = ws.run(DAY, parse=BAD_DEPLOY)
    assert bad.success
    bad_version = ws.version()
    bad_fold = from_scratch_device_latest(ws)
    assert device_latest(ws) == bad_fold
    fixed = ws.run(DAY)
    assert fixed.success
    fixed_version = ws.version()
    assert device_latest(ws) == from_scratch_device_latest(ws) != bad_fold, "the bad version's rows survived the replay"
    # Roll back to the bad version, then forward again to the fixed one: exact each time.
    for to in (bad_version, fixed_version):
        code, out = ws.cli("rollback", "telemetry", DAY, "--to", str(to))
        assert code == 0, out
        assert "running every check" in out and "FAILED" not in out
        assert ws.version() == to
        assert device_latest(ws) == from_scratch_device_latest(ws)
    assert device_latest(ws) != bad_fold


# ---- the raw side is current --------------------------------------------------------------------


def test_a_raw_file_arriving_after_the_build_makes_the_day_out_of_date(ws):
    late = ws.file("raw/json_telemetry/year=2025/month=11/day=25/hour=05/arrived-later.gz")
    late.write_bytes(gz_events(*(event(f"late-{i}", "2025-11-25T05:10:00Z", device=f"dev-late-{i}") for i in range(3))))

    code, verdicts = ws.verify()
    assert code == 1 and failing(verdicts) == {("raw_files_current", DAY)}
    assert (
        "raw_events: arrived after the build: raw/json_telemetry/year=2025/month=11/day=25/hour=05/arrived-later.gz"
        in verdicts[("raw_files_current", DAY)][1]
    )

    # Re-materializing parsed_events alone lists the raw files again and takes the events in.
    parsed_before = ws.state(DAY).stats["parsed"]
    assert ws.run(DAY, selection=[PARSED]).success
    # The projections' and redrive's verdicts predate that build: `status` calls them stale.
    code, out = ws.cli("status", "telemetry", DAY)
    assert code == 0 and "stale: deliveries_reconcile, projections_match_fold, totals_match_parsed" in out, out
    state = ws.state(DAY)
    assert state.stats["parsed"] == parsed_before + 3
    assert "raw/json_telemetry/year=2025/month=11/day=25/hour=05/arrived-later.gz" in state.stats["sources"]
    assert ws.run(DAY, selection=[PROJECTIONS, REDRIVE]).success  # the new file is redriven too
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 0, verdicts


def test_the_raw_files_sensor_rechecks_a_day_whose_raw_files_changed_once(ws):
    """The UI shows the day out of date without anyone running `verify`: the sensor launches the
    day's checks once per change, and the failed check lands on that day's partition."""
    sensor = ws.defs.resolve_sensor_def("telemetry__raw_files_changed")

    def tick(cursor=None):
        ctx = dg.build_sensor_context(
            instance=ws.instance, cursor=cursor, definitions=ws.defs, resources={"lake": ws.defs.resources["lake"]}
        )
        return sensor(ctx)

    quiet = tick()
    assert not quiet.run_requests and quiet.skip_reason.skip_message == "every built day is current"
    ws.file("raw/json_telemetry/year=2025/month=11/day=25/hour=09/arrived-later.gz").write_bytes(
        gz_events(event("late-9", "2025-11-25T09:00:00Z"))
    )
    fired = tick(quiet.cursor)
    (request,) = fired.run_requests
    assert request.tags == {RANGE_TAGS[0]: DAY, RANGE_TAGS[1]: DAY} and request.job_name in (None, "telemetry_verify")
    again = tick(fired.cursor)
    assert not again.run_requests and "already reported" in again.skip_reason.skip_message

    # What the daemon would launch: the checks-only job with the request's tags.
    run = ws.defs.resolve_job_def("telemetry_verify").execute_in_process(
        instance=ws.instance, tags=request.tags, raise_on_error=False
    )
    assert not run.success
    key = dg.AssetCheckKey(PARSED, "raw_files_current")
    (info,) = ws.instance.event_log_storage.get_asset_check_partition_info([key], partition_keys=[DAY])
    assert info.latest_execution_status.value == "FAILED" and info.is_current  # what the check's Partitions tab shows


def test_a_raw_file_rewritten_at_the_same_size_and_mtime_is_caught_by_its_hash(ws):
    manifest = ws.lake.read_json("telemetry/raw_events", f"manifest/day={DAY}.json")
    rel = next(f["rel_path"] for f in manifest["files"] if not f["error"])
    path = ws.file(rel)
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[4] ^= 0xFF  # other bytes (the gzip header's timestamp), same size
    path.write_bytes(bytes(data))
    os.utime(
        path, ns=(stat.st_atime_ns, stat.st_mtime_ns)
    )  # and the old mtime, as `cp -p` or `rsync -t` would leave it
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1 and failing(verdicts) == {("raw_files_current", DAY)}
    assert f"same size and mtime, other bytes): {rel}" in verdicts[("raw_files_current", DAY)][1]


def test_a_raw_file_arriving_in_the_lateness_window_makes_the_day_out_of_date(ws):
    # Arrived on the 26th at 01:xx (in the 25th's late window) with an event of the 25th.
    neighbour = ws.file("raw/json_telemetry/year=2025/month=11/day=26/hour=01/straggler.gz")
    neighbour.write_bytes(gz_events(event("straggler-1", "2025-11-25T23:30:00Z")))
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1 and failing(verdicts) == {("raw_files_current", DAY)}
    assert (
        "parsed_events: arrived after the build: raw/json_telemetry/year=2025/month=11/day=26/hour=01/straggler.gz"
        in verdicts[("raw_files_current", DAY)][1]
    )


# ---- deliveries ---------------------------------------------------------------------------------


def test_a_delivered_message_removed_from_the_outbox_fails_deliveries(ws):
    batch = sorted((ws.root / "outbox" / "telemetry" / f"day={DAY}").glob("batch-*.jsonl"))[0]
    removed = [json.loads(line)["key"] for line in batch.read_text().splitlines()]
    batch.unlink()
    code, verdicts = ws.verify()
    # The batch held the day's raw-file messages; a file also holding events of the 26th was sent
    # once, under the 25th, so the 26th can miss it too.
    assert code == 1 and ("deliveries_reconcile", DAY) in failing(verdicts) <= {
        ("deliveries_reconcile", d) for d in DEMO_DAYS
    }
    assert "messages are not in the outbox sink" in verdicts[("deliveries_reconcile", DAY)][1]
    assert removed


def test_a_partial_or_dry_redrive_after_a_loss_does_not_hide_it(ws):
    for batch in (ws.root / "outbox" / "telemetry" / f"day={DAY}").glob("batch-*.jsonl"):
        batch.unlink()  # the sink lost the day
    for config in ({"limit": 1}, {"dry_run": True}):
        run = ws.defs.resolve_job_def("telemetry_replay").execute_in_process(
            instance=ws.instance,
            partition_key=DAY,
            asset_selection=[REDRIVE],
            run_config={"ops": {"telemetry__redrive": {"config": config}}},
            raise_on_error=False,
        )
        assert not run.success, config  # the day was delivered whole once: the whole day is reconciled
        code, verdicts = ws.verify(DAY, DAY)
        assert code == 1 and "messages are not in the outbox sink" in verdicts[("deliveries_reconcile", DAY)][1], config


def test_a_ledger_row_deleted_after_a_run_that_sent_nothing_fails_deliveries(ws):
    again = ws.run(DAY, selection=[REDRIVE])
    assert again.success
    assert ws.lake.read_json("telemetry/redrive", f"last/day={DAY}.json")["published"] == 0  # nothing new to send
    ws.store.query(
        "DELETE FROM redrive_ids WHERE message_id = (SELECT min(message_id) FROM redrive_ledger WHERE day = $d)",
        {"d": DAY},
    )
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1 and failing(verdicts) == {("deliveries_reconcile", DAY)}
    assert "not delivered according to the ledger" in verdicts[("deliveries_reconcile", DAY)][1]


def test_a_delivered_message_turned_in_doubt_behind_the_checks_back_fails_deliveries(ws):
    """A ledger row edited from delivered to `unknown` (what a crash mid-send leaves): the day is no
    longer wholly delivered, and the check says so; set back, it passes again."""
    assert ws.run(DAY, selection=[REDRIVE]).success
    # One id moved to a copy of its send, in doubt (the ledger keeps a row per send and one per id).
    one = "(SELECT min(message_id) FROM redrive_ledger WHERE day = $d AND status = 'delivered')"
    (moved,) = ws.store.query(
        "INSERT INTO redrive_sends SELECT nextval('redrive_send_ids'), scope, day, 'unknown', attempts, last_error, "
        f"run_id, updated_at, sent_at, possible_duplicate FROM redrive_sends WHERE send_id = "
        f"(SELECT send_id FROM redrive_ids WHERE message_id = {one}) RETURNING send_id",
        {"d": DAY},
    )[0]
    ws.store.query(f"UPDATE redrive_ids SET send_id = $s WHERE message_id = {one}", {"d": DAY, "s": moved})
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1 and failing(verdicts) == {("deliveries_reconcile", DAY)}
    assert "not delivered according to the ledger" in verdicts[("deliveries_reconcile", DAY)][1]
    ws.store.query("UPDATE redrive_sends SET status = 'delivered' WHERE day = $d AND status = 'unknown'", {"d": DAY})
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 0, verdicts


# ---- shrinkage and late events ------------------------------------------------------------------


def test_a_day_that_shrinks_needs_consent(ws):
    first = ws.version()
    manifest = ws.lake.read_json("telemetry/raw_events", f"manifest/day={DAY}.json")
    biggest = max((f for f in manifest["files"] if not f["error"]), key=lambda f: f["lines"])
    ws.file(biggest["rel_path"]).unlink()  # the upstream lost an hour of the day

    proc = dagster_materialize("telemetry/parsed_events", DAY)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no_unconsented_shrink" in proc.stdout + proc.stderr
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1 and ("no_unconsented_shrink", DAY) in failing(verdicts)
    assert f"holds fewer events than version {first}" in verdicts[("no_unconsented_shrink", DAY)][1]

    # Retrying the same rejected build compares it with the first version again, not with itself.
    rejected = ws.state(DAY).version
    assert dagster_materialize("telemetry/parsed_events", DAY).returncode == 1
    assert ws.state(DAY).version > rejected and ws.state(DAY).stats["previous"]["version"] == first

    # Another hour lost, and this time the operator consents: the shrink passes, on the record.
    manifest = ws.lake.read_json("telemetry/raw_events", f"manifest/day={DAY}.json")
    ws.file(max((f for f in manifest["files"] if not f["error"]), key=lambda f: f["lines"])["rel_path"]).unlink()
    consented = ws.run(DAY, selection=[PARSED], parse={"allow_shrink": True})
    assert consented.success
    md = next(m for m in consented.asset_materializations_for_node("telemetry__parsed_events"))
    # Compared with the first version: the rejected ones shrank without consent, so they are no baseline.
    assert md.metadata["allow_shrink"].value is True and md.metadata["shrink_baseline_version"].value == first
    assert ws.state(DAY).stats["allow_shrink"] is True
    evaluation = next(e for e in consented.get_asset_check_evaluations() if e.check_name == "no_unconsented_shrink")
    assert evaluation.passed and "shrink allowed by the run" in evaluation.description


def test_events_beyond_the_lateness_window_warn_without_blocking(ws):
    # A file of the 25th holding an event stamped three days earlier: outside every window.
    ws.file("raw/json_telemetry/year=2025/month=11/day=25/hour=07/very-late.gz").write_bytes(
        gz_events(event("very-late-1", "2025-11-22T07:00:00Z"), event("very-late-2", "2025-11-22T07:01:00Z"))
    )
    result = ws.run(DAY, parse={"allow_shrink": False})
    assert result.success, "a warning does not block"
    warning = next(e for e in result.get_asset_check_evaluations() if e.check_name == "late_events_within_window")
    assert not warning.passed and warning.severity == dg.AssetCheckSeverity.WARN
    assert warning.metadata["outside_lateness_window"].value >= 2
    assert "widen `lateness=Lateness(early=..., late=...)` in the telemetry PipelineSpec" in warning.description


# ---- errored checks -----------------------------------------------------------------------------


def test_a_check_that_raises_is_shown_as_errored_by_verify_and_status(ws):
    (quarantine,) = (ws.file(f) for f in committed_quarantine(ws.state(DAY), TELEMETRY))
    quarantine.write_bytes(b"\0" * quarantine.stat().st_size)  # unreadable, same size
    code, verdicts = ws.verify(DAY, DAY)
    assert code == 1
    assert verdicts[("raw_lines_accounted_for", DAY)][0] == "errored"
    code, out = ws.cli("status", "telemetry", DAY)
    assert code == 0
    assert "ERRORED: " in out and "raw_lines_accounted_for" in out.split("ERRORED: ")[1]
