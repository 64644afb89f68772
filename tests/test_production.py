"""The production deployment as documented in deploy/: a code server, `dagster-webserver` and
`dagster-daemon` on a PostgreSQL instance (deploy/dagster.yaml, deploy/workspace.yaml). A
partition-range backfill is launched through the webserver's GraphQL API exactly as the UI's
"Materialize" dialog does (`launchPartitionBackfill`); the daemon runs it; the per-day check results
are read back through the API. It runs on the embedded lake directory and on the production
settings for several machines (the lake on S3, the ledger and projections in Postgres).
(`dagster dev`, the embedded way to run the same, is exercised by the browser and sensor-daemon tests.)"""

import os
import shutil
import signal
import subprocess
import urllib.request

import psycopg
import pytest
from conftest import PROJECT_ROOT
from services import MotoProcess, daemon_env, free_port, graphql, scratch_database, upload_raw
from ui_backfills import CHECKS, PARTITION_STATUSES, launch, wait_backfill, wait_for

BIN = PROJECT_ROOT / ".venv/bin"
DAYS = ["2025-11-24", "2025-11-25"]
ASSETS = ["raw_events", "parsed_events", "projections", "redrive"]


@pytest.fixture(params=["local-lake", "s3-lake"])
def lake_kind(request, env, monkeypatch, postgres_dsn):
    """The embedded lake directory, or the production settings for several machines: the lake on
    S3 (moto, in its own process) with the ledger and the projections in Postgres."""
    if request.param == "local-lake":
        yield request.param
        return
    moto = MotoProcess().start()
    try:
        moto.lake_env(monkeypatch, "prod-lake")
        upload_raw(moto, env["lake"], "prod-lake")
        with scratch_database(postgres_dsn) as ledger, scratch_database(postgres_dsn) as store:
            monkeypatch.setenv("EVENT_REPLAY_LEDGER_URL", ledger)
            monkeypatch.setenv("EVENT_REPLAY_STORE_URL", store)
            yield request.param
    finally:
        moto.stop()


def test_backfill_through_the_webserver_on_postgres(lake_kind, env, tmp_path, postgres_dsn, monkeypatch):
    home = tmp_path / "prod_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "deploy/dagster.yaml", home / "dagster.yaml")
    code_port, web_port = free_port(), free_port()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    # The scheme deploy/README.md asks for: psycopg2, which dagster-postgres is built on.
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_dsn.replace("postgresql://", "postgresql+psycopg2://"))
    monkeypatch.setenv("EVENT_REPLAY_CODE_SERVER_HOST", "127.0.0.1")
    monkeypatch.setenv("EVENT_REPLAY_CODE_SERVER_PORT", str(code_port))
    workspace = str(PROJECT_ROOT / "deploy/workspace.yaml")
    commands = {
        "code-server": [
            BIN / "dagster",
            "code-server",
            "start",
            "-m",
            "replay_defs.definitions",
            "-h",
            "127.0.0.1",
            "-p",
            str(code_port),
        ],
        "webserver": [
            BIN / "dagster-webserver",
            "-w",
            workspace,
            "-h",
            "127.0.0.1",
            "-p",
            str(web_port),
            "--db-pool-max-overflow",
            "10",
        ],
        "daemon": [BIN / "dagster-daemon", "run", "-w", workspace],
    }
    procs = {}

    def alive() -> None:
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited: " + (tmp_path / f"{name}.log").read_text()[-3000:]

    try:
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=PROJECT_ROOT,
                env=daemon_env(),
                start_new_session=True,
                stdout=open(tmp_path / f"{name}.log", "w"),
                stderr=subprocess.STDOUT,
            )
            if name == "code-server":  # the others load the location from it
                wait_for(lambda: _answers(code_port), alive, "code server")
        wait_for(lambda: _web_up(web_port), alive, "webserver")
        web = f"http://127.0.0.1:{web_port}"

        backfill_id = launch(
            web,
            {
                "partitionNames": DAYS,
                "assetSelection": [{"path": ["telemetry", a]} for a in ASSETS],
                "title": "production e2e",
            },
        )
        wait_backfill(web, backfill_id, alive, lambda: (tmp_path / "daemon.log").read_text()[-3000:])

        checks = {
            "parsed_events": ["no_duplicate_event_ids", "raw_lines_accounted_for", "no_stale_files"],
            "projections": ["totals_match_parsed"],
            "redrive": ["deliveries_reconcile"],
        }
        for asset, names in checks.items():
            for name in names:
                for day in DAYS:
                    got = graphql(web, CHECKS, {"key": {"path": ["telemetry", asset]}, "name": name, "partition": day})[
                        "assetCheckExecutions"
                    ]
                    assert got and got[0]["status"] == "SUCCEEDED" and got[0]["partition"] == day, (
                        asset,
                        name,
                        day,
                        got,
                    )
                # The check's Partitions tab in the UI: the backfilled days count as passed.
                got = graphql(web, PARTITION_STATUSES, {"key": {"path": ["telemetry", asset]}, "name": name})
                ranges = got["assetNodeOrError"]["assetCheckOrError"]["partitionStatuses"]["ranges"]
                assert {
                    (r["startKey"], r["endKey"], r["status"]) for r in ranges if r["status"] != "SUCCEEDED"
                } == set(), (asset, name, ranges)
                covered = {r["startKey"] for r in ranges} | {r["endKey"] for r in ranges}
                assert DAYS[0] >= min(covered) and DAYS[-1] <= max(covered), (asset, name, ranges)
        # Days map one to one (partitions/): the backfill built exactly the days picked, no neighbour.
        for day in ("2025-11-23", "2025-11-26"):
            got = graphql(
                web,
                CHECKS,
                {"key": {"path": ["telemetry", "parsed_events"]}, "name": "raw_lines_accounted_for", "partition": day},
            )
            assert got["assetCheckExecutions"] == [], (day, got)
    finally:
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    with psycopg.connect(postgres_dsn) as con:  # the runs really are in PostgreSQL
        assert con.execute("SELECT count(*) FROM runs WHERE status = 'SUCCESS'").fetchone()[0] >= 1


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _web_up(port: int) -> bool:
    urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
    return True
