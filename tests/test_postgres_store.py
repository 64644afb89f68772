"""The Postgres projection store (EVENT_REPLAY_STORE_URL): the same folds as the DuckDB file, its
check catches rows edited behind its back, concurrent folds serialize, a pipeline day lands there."""

import multiprocessing
import random
import secrets
import sys
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
import pyarrow as pa
import pytest
import warm_process
from conftest import RANGE_TAGS, check_verdicts, run_day

from replay_defs.core.lake import Lake
from replay_defs.pipeline.committed import parsed_state
from replay_defs.pipeline.postgres_store import PostgresStore
from replay_defs.pipeline.spec import ProjectionSpec
from replay_defs.pipeline.store import DuckDBStore
from replay_defs.pipelines import TELEMETRY

SCHEMA = TELEMETRY.schema  # the fold reads its id field (event_id)
COUNTS = ProjectionSpec(
    name="counts",
    kind="increment",
    key=("type", "device_id"),
    values={"events": "count(*)", "seq_sum": "sum(seq)", "value_sum": "sum(value)", "last_seq": "max(seq)"},
    count_column="events",
)
LATEST = ProjectionSpec(
    name="latest", kind="replace", key=("device_id",), values={"last_type": "type", "last_seq": "seq"}, order_by="ts"
)
LATEST_PAIR = ProjectionSpec(
    name="latest_pair",
    kind="replace",
    key=("type", "device_id"),
    values={"last_seq": "seq", "last_value": "value"},
    order_by="ts",
)
PROJECTIONS = (COUNTS, LATEST, LATEST_PAIR)
DAYS = ["2025-11-24", "2025-11-25", "2025-11-26"]


def events(day: str, seed: int, n: int = 400, devices: int = 30) -> pa.Table:
    """A day of events: few distinct times (ties, decided by event id), some late (of the day
    before: ties across days), ids whose byte order is not a natural-language order ('B' < '_' <
    'a'), a few NULL keys and NULL times."""
    rng = random.Random(seed)
    start = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
    rows = {"event_id": [], "ts": [], "type": [], "device_id": [], "seq": [], "value": []}
    for i in range(n):
        rows["event_id"].append(f"{rng.choice(['B', '_', 'a', 'b', 'a-'])}{rng.randrange(10**6)}-{seed}-{i}")
        late = timedelta(days=1) if rng.random() < 0.2 else timedelta(0)
        rows["ts"].append(None if rng.random() < 0.02 else start - late + timedelta(hours=rng.randrange(4)))
        rows["type"].append(rng.choice(["lock", "bridge", "hub"]))
        rows["device_id"].append(None if rng.random() < 0.03 else f"dev-{rng.randrange(devices)}")
        rows["seq"].append(rng.randrange(10**12))
        rows["value"].append(rng.random() * 1000)
    return pa.table(
        {
            **rows,
            "ts": pa.array(rows["ts"], pa.timestamp("us", tz="UTC")),
            "seq": pa.array(rows["seq"], pa.int64()),
        }
    )


@contextmanager
def database(server_dsn: str, icu_locale: str | None = None):
    """A fresh database on the server, dropped at the end; with a natural-language default collation
    when `icu_locale` is given (what a store must not let decide which row is latest)."""
    name = f"event_replay_store_{secrets.token_hex(6)}"
    locale = f" LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}' TEMPLATE template0" if icu_locale else ""
    with psycopg.connect(server_dsn, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"{locale}')
    try:
        yield f"{server_dsn.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def store_url(postgres_dsn):
    with database(postgres_dsn, icu_locale="en-US") as url:
        yield url


def norm(v):
    """A value as both stores' clients can agree on: HUGEINT sums are ints in DuckDB and NUMERIC in
    Postgres; float sums are compared to 12 significant digits."""
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, float):
        return float(f"{v:.12g}")
    if isinstance(v, datetime):
        return v.astimezone(timezone.utc).isoformat()
    if isinstance(v, date):
        return v.isoformat()
    return v


def rows_of(store, pipeline: str, table: str) -> list[tuple]:
    sql = f'SELECT * FROM "{pipeline}"."{table}"'
    if isinstance(store, DuckDBStore):
        rows = store.query(sql)
    else:
        with psycopg.connect(store._url) as con:
            rows = con.execute(sql).fetchall()
    return sorted((tuple(norm(v) for v in r) for r in rows), key=repr)


def tables_of(store, pipeline: str) -> dict[str, list[tuple]]:
    names = [p.name for p in PROJECTIONS] + [f"{p.name}__by_day" for p in PROJECTIONS if p.kind == "replace"]
    return {n: rows_of(store, pipeline, n) for n in names}


def fold_all(store, pipeline: str, day: str, ev) -> None:
    for p in PROJECTIONS:
        store.fold(pipeline, p, SCHEMA, day, ev)


def mismatches(store, pipeline: str, versions: dict[str, pa.Table | None]) -> dict[str, list[str]]:
    """Every committed day's problems (versions: day -> its current events, None when empty)."""
    days = sorted(versions)
    everything = pa.concat_tables([t for t in versions.values() if t is not None])
    found = {}
    for day in days:
        for p in PROJECTIONS:
            _, problems = store.fold_mismatches(pipeline, p, SCHEMA, day, versions[day], days, everything)
            if problems:
                found[f"{day}/{p.name}"] = problems
    return found


# ---- the same folds, the same rows ---------------------------------------------------------------


def test_duckdb_and_postgres_hold_the_same_rows_through_replays_and_rollbacks(tmp_path, store_url):
    duck, pg = DuckDBStore(tmp_path / "state.duckdb"), PostgresStore(store_url)
    pipeline = "p_" + secrets.token_hex(4)
    v1 = {day: events(day, seed=i) for i, day in enumerate(DAYS)}
    v2 = events(DAYS[1], seed=99, n=300, devices=20)  # a replay: other events, fewer devices
    steps = [
        *[(day, v1[day]) for day in DAYS],
        (DAYS[1], v2),  # replayed with different events
        (DAYS[1], v1[DAYS[1]]),  # rolled back
        (DAYS[2], None),  # the day's events gone
        (DAYS[2], v1[DAYS[2]]),  # and back
        (DAYS[0], v2.slice(0, 50)),  # a day replaced by a few of another's events
    ]
    current: dict = {}
    for day, ev in steps:
        fold_all(duck, pipeline, day, ev)
        fold_all(pg, pipeline, day, ev)
        current[day] = ev
        in_duck, in_pg = tables_of(duck, pipeline), tables_of(pg, pipeline)
        assert in_pg == in_duck, (day, [n for n in in_duck if in_duck[n] != in_pg[n]])
        assert mismatches(pg, pipeline, current) == {}
    assert mismatches(duck, pipeline, current) == {}
    latest = in_pg["latest"]
    assert len(latest) == len({r[0] for r in latest}) > 20 and any(r[0] is None for r in latest)
    assert sum(r[3] for r in in_pg["counts"]) == sum(t.num_rows for t in current.values() if t is not None)
    # Exact: what the replays and rollbacks left equals a fresh fold of the current versions, in another order.
    fresh = "f_" + secrets.token_hex(4)
    for day in reversed(DAYS):
        fold_all(pg, fresh, day, current[day])
    assert tables_of(pg, fresh) == in_pg


def test_the_latest_row_is_decided_by_byte_order_whatever_the_database_collation(store_url):
    """One device's latest events of two days at the same time (a late event): the higher event id
    wins, byte-wise ('a1' > 'B1'), as in DuckDB, although the database's en-US collation sorts 'B1'
    after 'a1'. (Within a day DuckDB decides; across days, the recompute in Postgres.)"""
    pipeline = "p_" + secrets.token_hex(4)
    ts = datetime(2025, 11, 24, 8, tzinfo=timezone.utc)

    def one_event(event_id: str, type_: str) -> pa.Table:
        return pa.table(
            {
                "event_id": [event_id],
                "ts": pa.array([ts], pa.timestamp("us", tz="UTC")),
                "type": [type_],
                "device_id": ["d"],
                "seq": pa.array([1], pa.int64()),
                "value": [0.5],
            }
        )

    store = PostgresStore(store_url)
    with psycopg.connect(store_url) as con:
        assert con.execute("SELECT max(x) FROM (VALUES ('a1'), ('B1')) AS v(x)").fetchone()[0] == "B1"
    for first, second in ((("a1", "lock"), ("B1", "hub")), (("B1", "hub"), ("a1", "lock"))):
        store.fold(pipeline, LATEST, SCHEMA, DAYS[0], one_event(*first))
        store.fold(pipeline, LATEST, SCHEMA, DAYS[1], one_event(*second))
        (row,) = rows_of(store, pipeline, "latest")
        assert row[:2] == ("d", "lock") and row[4] == "a1", row


# ---- the check -----------------------------------------------------------------------------------


def test_fold_mismatches_catches_rows_edited_behind_its_back_in_postgres(store_url):
    pipeline = "p_" + secrets.token_hex(4)
    store = PostgresStore(store_url)
    versions = {day: events(day, seed=i) for i, day in enumerate(DAYS)}
    for day, ev in versions.items():
        fold_all(store, pipeline, day, ev)
    assert mismatches(store, pipeline, versions) == {}
    q = f'"{pipeline}"'
    edits = {
        "an increment row's count": (
            f"UPDATE {q}.counts SET events = events + 1 WHERE day = '{DAYS[1]}' AND device_id = 'dev-3' AND type = 'lock'",
            f"UPDATE {q}.counts SET events = events - 1 WHERE day = '{DAYS[1]}' AND device_id = 'dev-3' AND type = 'lock'",
            {f"{DAYS[1]}/counts"},
        ),
        "a latest row's value": (
            f"UPDATE {q}.latest SET last_seq = last_seq + 1 WHERE device_id = 'dev-5'",
            f"UPDATE {q}.latest SET last_seq = last_seq - 1 WHERE device_id = 'dev-5'",
            None,  # the day the row comes from, and the days whose events touch dev-5
        ),
        "a per-day row": (
            f"UPDATE {q}.latest_pair__by_day SET last_value = last_value * 2 WHERE _day = '{DAYS[0]}' AND device_id = 'dev-7'",
            f"UPDATE {q}.latest_pair__by_day SET last_value = last_value / 2 WHERE _day = '{DAYS[0]}' AND device_id = 'dev-7'",
            {f"{DAYS[0]}/latest_pair"},
        ),
        "a row of no committed day": (
            f"INSERT INTO {q}.latest SELECT 'ghost', last_type, last_seq, _order, _event_id, '2020-01-01' FROM {q}.latest LIMIT 1",
            f"DELETE FROM {q}.latest WHERE device_id = 'ghost'",
            {f"{d}/latest" for d in DAYS},
        ),
        "a deleted increment row": (
            f"CREATE TABLE {q}.kept AS SELECT * FROM {q}.counts WHERE day = '{DAYS[2]}' AND device_id = 'dev-1'; "
            f"DELETE FROM {q}.counts WHERE day = '{DAYS[2]}' AND device_id = 'dev-1'",
            f"INSERT INTO {q}.counts SELECT * FROM {q}.kept; DROP TABLE {q}.kept",
            {f"{DAYS[2]}/counts"},
        ),
    }
    for what, (edit, undo, expected) in edits.items():
        with psycopg.connect(store_url, autocommit=True) as con:
            assert con.execute(edit).rowcount > 0, what
        found = mismatches(store, pipeline, versions)
        if expected is None:  # every day that touches dev-5 sees it
            expected = {f"{d}/latest" for d, ev in versions.items() if "dev-5" in ev.column("device_id").to_pylist()}
        assert set(found) == expected, (what, found)
        with psycopg.connect(store_url, autocommit=True) as con:
            con.execute(undo)
        assert mismatches(store, pipeline, versions) == {}, what


# ---- two machines --------------------------------------------------------------------------------


def _fold_days(url: str, pipeline: str, days: list[str], barrier, versions: int) -> None:
    """A run worker: folds each of its days in one version after another, each fold started together
    with the other worker's fold of the same projection (of another day)."""
    store = PostgresStore(url)
    for version in range(versions):
        for day in days:
            ev = big_day(day, version)
            for p in PROJECTIONS:
                barrier.wait(timeout=120)
                store.fold(pipeline, p, SCHEMA, day, ev)


def big_day(day: str, version: int) -> pa.Table:
    # most devices on every day: each fold recomputes keys the other process's days hold too
    return events(day, seed=int(day.replace("-", "")) * 10 + version, n=10_000, devices=1_000)


def test_two_processes_folding_different_days_at_once_give_the_sequential_result(store_url):
    days, versions = [*DAYS, "2025-11-27"], 3
    concurrent, sequential = "c_" + secrets.token_hex(4), "s_" + secrets.token_hex(4)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [
        ctx.Process(target=_fold_days, args=(store_url, concurrent, mine, barrier, versions))
        for mine in (days[0::2], days[1::2])
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    assert [w.exitcode for w in workers] == [0, 0]
    store = PostgresStore(store_url)
    final = {day: big_day(day, versions - 1) for day in days}
    for day, ev in final.items():
        fold_all(store, sequential, day, ev)
    assert tables_of(store, concurrent) == tables_of(store, sequential)
    assert len(tables_of(store, sequential)["latest"]) > 900
    assert mismatches(store, concurrent, final) == {}


# ---- a pipeline day ------------------------------------------------------------------------------

DAY = "2025-11-25"


def test_a_telemetry_day_lands_in_postgres_and_its_checks_catch_an_edited_row(env, instance, postgres_dsn, monkeypatch):
    from replay_defs.definitions import build_definitions

    with database(postgres_dsn) as url:
        monkeypatch.setenv("EVENT_REPLAY_STORE_URL", url)
        defs = build_definitions()
        result = run_day(defs, instance, DAY)
        assert result.success
        verdicts = check_verdicts(result)
        assert verdicts[("totals_match_parsed", DAY)] and verdicts[("projections_match_fold", DAY)]
        parsed = parsed_state(Lake(env["lake"]), TELEMETRY, DAY).stats["parsed"]
        with psycopg.connect(url, autocommit=True) as con:
            total = con.execute("SELECT sum(events) FROM telemetry.daily_counts WHERE day = %s", (DAY,)).fetchone()[0]
            devices = con.execute("SELECT count(*) FROM telemetry.device_latest").fetchone()[0]
        assert total == parsed > 1000 and devices > 100
        in_duckdb = DuckDBStore(env["duckdb"]).query(
            "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'telemetry'"
        )[0][0]
        assert in_duckdb == 0, "nothing of the projections went to the DuckDB file"
        # `event-replay status` reads the configured store
        status = warm_process.run(
            [str(Path(sys.executable).parent / "event-replay"), "status", "telemetry", DAY, DAY],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert status.returncode == 0, status.stderr[-3000:]
        (line,) = [ln for ln in status.stdout.splitlines() if ln.startswith(DAY)]
        assert int(line.split()[8].replace(",", "")) == parsed, status.stdout

        def verify() -> dict[str, bool]:
            run = defs.resolve_job_def("telemetry_verify").execute_in_process(
                instance=instance, tags={RANGE_TAGS[0]: DAY, RANGE_TAGS[1]: DAY}, raise_on_error=False
            )
            return {e.check_name: e.passed for e in run.get_asset_check_evaluations() if e.partition == DAY}

        assert verify()["projections_match_fold"]
        with psycopg.connect(url, autocommit=True) as con:
            con.execute(
                "UPDATE telemetry.daily_counts SET events = events + 1 WHERE ctid = (SELECT min(ctid) FROM telemetry.daily_counts)"
            )
        after = verify()
        assert not after["totals_match_parsed"] and not after["projections_match_fold"]


# ---- secrets and settings ------------------------------------------------------------------------


def test_a_store_that_cannot_connect_says_so_without_its_password():
    store = PostgresStore("postgresql://replay:Hunter2-store-pw@127.0.0.1:1/nowhere")
    with pytest.raises(RuntimeError) as failed:
        store.increment_total("p", COUNTS, DAYS[0])
    assert "cannot connect to the Postgres projection store" in str(failed.value)
    assert "Hunter2-store-pw" not in str(failed.value) + repr(store)


def test_a_run_config_cannot_point_the_store_at_another_postgres(tmp_path, monkeypatch):
    import dagster as dg

    from resources import StoreResource

    monkeypatch.setenv("EVENT_REPLAY_DUCKDB", str(tmp_path / "state.duckdb"))
    monkeypatch.delenv("EVENT_REPLAY_STORE_URL", raising=False)
    resource = StoreResource(
        path=str(tmp_path / "state.duckdb"), postgres_url="postgresql://x:Other-db-pw@elsewhere/db"
    )
    with pytest.raises(dg.Failure) as refused:
        resource.get()
    assert "EVENT_REPLAY_STORE_URL" in str(refused.value) and "Other-db-pw" not in str(refused.value)
    monkeypatch.setenv("EVENT_REPLAY_STORE_URL", "postgresql://x:Other-db-pw@elsewhere/db")
    assert isinstance(resource.get(), PostgresStore)
    with pytest.raises(dg.Failure):  # the deployment's Postgres, but the run's config asks for the DuckDB file
        StoreResource(path=str(tmp_path / "state.duckdb")).get()
