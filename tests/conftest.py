"""Shared fixtures: real files in a temp lake, a real (temporary, SQLite) Dagster instance, real
Redis and PostgreSQL (the machine's, or private ones started for the session)."""

import os
import shutil
import signal
import sys
import warnings
from datetime import date
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import services
import yaml

from replay_defs.jsonl_files.demo import DemoConfig, generate

warnings.filterwarnings("ignore", module="dagster")

# A job run in-process in the main thread leaves SIGTERM doing what SIGINT does (Dagster's
# interrupt handling maps one to the other when it restores them). Started with SIGINT ignored
# (from a script in the background, `cmd &`), a worker would then ignore SIGTERM too, and so would
# every process it starts after: `terminate()` could not stop them, and a job run in a thread
# waited 30 s for each compute-log `tail -F` it could not stop, then left it behind.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

DEMO_START = date(2025, 11, 24)
DEMO_DAYS = ["2025-11-24", "2025-11-25", "2025-11-26"]
RANGE_TAGS = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


# The suite runs a file per worker at a time (`./dev test`: --dist loadfile). The slowest files
# (minutes each, mostly waiting on brokers, freezes and daemons) start first, so that no worker is
# left with one at the end while the others idle; xdist's own order (most tests first) started
# them last. The rest keep their order.
SLOWEST_FIRST = (
    "test_faults_sqs.py",
    "test_redis_sink.py",
    "test_s3_lake.py",
    "test_crash.py",
    "test_faults_rabbitmq.py",
    "test_readme_commands.py",
    "test_surgical_redrive.py",
    "test_ui_backfills.py",
    "test_verification.py",
    "test_billing_operations.py",
    "test_faults_redis.py",
    "test_rabbitmq_sink.py",
    "test_readme_fixes.py",
    "test_faults_kafka.py",
    "test_sqs_sink.py",
    "test_sensor_daemon.py",
    "test_production.py",
    "test_browser.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def demo_lake_template(tmp_path_factory) -> Path:
    """Three small days of demo telemetry with every fault, generated once per session."""
    root = tmp_path_factory.mktemp("demo-template") / "lake"
    generate(root, DemoConfig(start=DEMO_START, days=3, events_per_day=12_000))
    return root


# A test instance's dagster.yaml. No first-visit newsletter prompt: in the browser tests it can
# cover the element a test clicks.
INSTANCE_YAML = "telemetry:\n  enabled: false\nnux:\n  enabled: false\n"


@pytest.fixture
def env(tmp_path, demo_lake_template, monkeypatch):
    """A fresh copy of the demo lake plus store and outbox paths, exported as the env vars the
    code location reads. Returns a dict of the paths."""
    lake = tmp_path / "lake"
    shutil.copytree(demo_lake_template, lake)
    paths = {
        "lake": lake,
        "duckdb": tmp_path / "state.duckdb",
        "outbox": tmp_path / "outbox",
        "home": tmp_path / "dagster_home",
    }
    paths["home"].mkdir()
    (paths["home"] / "dagster.yaml").write_text(INSTANCE_YAML)
    monkeypatch.setenv("EVENT_REPLAY_LAKE", str(lake))
    monkeypatch.setenv("EVENT_REPLAY_DUCKDB", str(paths["duckdb"]))
    monkeypatch.setenv("EVENT_REPLAY_OUTBOX", str(paths["outbox"]))
    monkeypatch.setenv("DAGSTER_HOME", str(paths["home"]))
    return paths


@pytest.fixture
def defs(env):
    from replay_defs.definitions import build_definitions

    return build_definitions()


@pytest.fixture
def instance(env):
    # instance_for_test rewrites the home's dagster.yaml: its settings go in as overrides.
    with dg.instance_for_test(temp_dir=str(env["home"]), overrides=yaml.safe_load(INSTANCE_YAML)) as inst:
        yield inst


@pytest.fixture(scope="session")
def redis_url():
    """Redis for the session: the machine's when it answers, else a private one stopped at the end."""
    with services.redis_url() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_dsn():
    """A fresh database for the session (on the machine's PostgreSQL, else a private cluster),
    dropped at the end: tests never touch the server's real databases."""
    with services.postgres_dsn() as server, services.scratch_database(server) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory) -> str:
    """chDB admits one data directory per process: every test of the session shares this one,
    each in a database of its own. It is this session's deployment setting (EVENT_REPLAY_CHDB),
    which a ClickHouse resource checks its directory against."""
    path = str(tmp_path_factory.mktemp("chdb") / "data")
    os.environ["EVENT_REPLAY_CHDB"] = path
    return path


@pytest.fixture(scope="session")
def clickhouse_http(chdb_path):
    """ClickHouse's HTTP interface served from the session's chDB (tests/clickhouse_http.py),
    with a password, for the clickhouse-connect path."""
    from clickhouse_http import ChdbHttpServer

    server = ChdbHttpServer(chdb_path, user="replay", password="ch-secret-pw").start()
    yield server
    server.stop()


@pytest.fixture
def ch_database(request, chdb_path) -> str:
    """A fresh database for one test, named after it."""
    import re

    from replay_defs.core.clickhouse import ClickHouse, quote_ident

    name = "t_" + re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:50]
    with ClickHouse(data_path=chdb_path) as ch:
        ch.command(f"DROP DATABASE IF EXISTS {quote_ident(name)}")
        ch.command(f"CREATE DATABASE {quote_ident(name)}")
    return name


@pytest.fixture
def fresh_definitions(monkeypatch):
    """For tests that call the CLI's `main` in process after setting env vars: the CLI uses the
    module-level `defs`, built from the env when first imported, so import it afresh for this test,
    and give later tests back the module they had (or none)."""
    import replay_defs

    monkeypatch.delitem(sys.modules, "replay_defs.definitions", raising=False)
    monkeypatch.delattr(replay_defs, "definitions", raising=False)
    yield
    sys.modules.pop("replay_defs.definitions", None)  # monkeypatch then restores what was there before


def run_range(defs, instance, start, end, run_config=None, selection=None):
    """Materialize the telemetry replay job for a day range in one run (as the CLI range does)."""
    job = defs.resolve_job_def("telemetry_replay")
    return job.execute_in_process(
        instance=instance,
        tags={RANGE_TAGS[0]: start, RANGE_TAGS[1]: end},
        run_config=run_config or {},
        asset_selection=selection,
        raise_on_error=False,
    )


def run_day(defs, instance, day, run_config=None, selection=None):
    job = defs.resolve_job_def("telemetry_replay")
    return job.execute_in_process(
        instance=instance,
        partition_key=day,
        run_config=run_config or {},
        asset_selection=selection,
        raise_on_error=False,
    )


# ---- the lake's Delta tables, read the way any Delta reader reads them (deltalake itself) -------------


def delta_table(lake_root, table: str, version: int | None = None):
    """The lake's Delta table `table` (lake-relative, e.g. "telemetry_flat"), at a table version."""
    from deltalake import DeltaTable

    return DeltaTable(f"{lake_root}/{table}", version=version)


def _day_filters(day: str, partitions: dict[str, str]) -> list[tuple]:
    return [("day", "=", date.fromisoformat(day)), *((k, "=", v) for k, v in partitions.items())]


def delta_rows(lake_root, table: str, day: str, version: int | None = None, **partitions) -> pa.Table:
    """The day's rows as a reader of the table sees them (at `version`); `partitions`: e.g. type="lock"."""
    return delta_table(lake_root, table, version).to_pyarrow_table(filters=_day_filters(day, partitions))


def delta_files(lake_root, table: str, day: str, version: int | None = None) -> list[str]:
    """The day's files in the table's snapshot (at `version`), lake-relative, as its log lists them."""
    adds = pa.table(delta_table(lake_root, table, version).get_add_actions(flatten=True))
    return sorted(
        f"{table}/{p}"
        for p, d in zip(adds["path"].to_pylist(), adds["partition.day"].to_pylist())
        if d == date.fromisoformat(day)
    )


def event_counts(rows: pa.Table) -> tuple[int, int, dict[str, int]]:
    """(rows, distinct event ids, rows per type) of parsed events."""
    by_type = {v["values"]: v["counts"] for v in pc.value_counts(rows["type"]).to_pylist()}
    return rows.num_rows, len(pc.unique(rows["event_id"])), by_type


def commit_stray_file(lake_root, day: str, table: str = "telemetry_flat", event_type: str = "lock") -> str:
    """Another writer (deltalake, not the lake's code) appends a copy of the day's `event_type`
    rows to the table: a file the day's recorded state does not list. Returns its lake path."""
    from deltalake import write_deltalake

    before = set(delta_files(lake_root, table, day))
    rows = delta_rows(lake_root, table, day, type=event_type)
    assert rows.num_rows > 0
    write_deltalake(f"{lake_root}/{table}", rows, mode="append", partition_by=["type", "day"])
    [stray] = set(delta_files(lake_root, table, day)) - before
    return stray


def check_verdicts(result) -> dict[tuple[str, str | None], bool]:
    return {(e.check_name, e.partition): e.passed for e in result.get_asset_check_evaluations()}


PROJECT_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
