"""What a new user following the README ran into (issue 15): the demo generator replacing other
days' raw files, a billing dry run dialling Kafka, processed-events replays failing late on a
missing exchange or table, the projection replay using a Redis it does not name, the embedded
instance's pools without slots."""

import hashlib
import os
import socket
import subprocess
import threading
import uuid
from datetime import date
from pathlib import Path

import pika
import psycopg
import pytest
import warm_process
from conftest import PROJECT_ROOT
from psycopg import sql
from services import rabbitmq_port

from replay_defs.jsonl_files.demo import RAW_PREFIX, DemoConfig, generate, generate_missing, read_truth

BIN = PROJECT_ROOT / ".venv" / "bin"


def cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return warm_process.run(
        [str(BIN / "event-replay"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def show(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


def clean_env(tmp_path: Path, **settings: str) -> dict:
    """No inherited EVENT_REPLAY_*/DAGSTER_* settings; a private instance and data under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENT_REPLAY_", "DAGSTER_", "CLICKHOUSE_"))}
    env.update(
        DAGSTER_HOME=str(tmp_path / "home"),
        EVENT_REPLAY_LAKE=str(tmp_path / "lake"),
        EVENT_REPLAY_DUCKDB=str(tmp_path / "state.duckdb"),
        EVENT_REPLAY_OUTBOX=str(tmp_path / "outbox"),
        EVENT_REPLAY_CHDB=str(tmp_path / "chdb"),
        **settings,
    )
    return env


# ---- the demo generator never replaces another day's files --------------------------------------


def raw_files(lake: Path) -> dict[str, str]:
    return {
        str(p.relative_to(lake)): hashlib.sha256(p.read_bytes()).hexdigest() for p in (lake / RAW_PREFIX).rglob("*.gz")
    }


def test_a_demo_with_other_options_adds_the_missing_days_and_replaces_nothing(tmp_path):
    lake = tmp_path / "lake"
    first = DemoConfig(start=date(2025, 11, 24), days=3, events_per_day=2_400)
    generate_missing(lake, first)
    before = raw_files(lake)
    truths = {d: read_truth(lake, d) for d in ("2025-11-24", "2025-11-25", "2025-11-26")}
    # An unfinished generation's file (no truth for its first day) belongs to no truth: removed.
    leftover = (
        lake / RAW_PREFIX / "year=2025/month=11/day=25/hour=03/telemetry-firehose-2025-11-25-03-000-gen20251130.gz"
    )
    leftover.write_bytes(b"garbage")

    # The README's "Options" run: five days from the 20th, other sizes; the 24th is there already.
    runs = generate_missing(lake, DemoConfig(start=date(2025, 11, 20), days=5, events_per_day=4_800))

    assert runs == [["2025-11-20", "2025-11-21", "2025-11-22", "2025-11-23"]]
    after = raw_files(lake)
    assert {k: after.get(k) for k in before} == before  # every earlier file still there, byte for byte
    assert {d: read_truth(lake, d) for d in truths} == truths
    new = set(after) - set(before)
    assert new and all(name.endswith("-gen20251120.gz") for name in new)
    # Its arrivals spill into the 24th and 25th (late and very late events), in files of their own.
    assert any("/day=24/" in name for name in new) and any("/day=25/" in name for name in new)
    assert all(read_truth(lake, f"2025-11-2{d}") for d in range(4))
    assert sum(read_truth(lake, "2025-11-20").values()) > sum(truths["2025-11-24"].values())
    assert not leftover.exists() and not (lake / "_demo" / "staging").exists()

    # Generating a day again by hand cannot overwrite it either: the generator refuses.
    with pytest.raises(FileExistsError, match="never replaces a raw file"):
        generate(lake, DemoConfig(start=date(2025, 11, 24), days=1, events_per_day=600))
    assert {k: raw_files(lake)[k] for k in before} == before


# ---- billing: a dry run connects to no Kafka broker ----------------------------------------------


class Listener:
    """A TCP port that counts the connections made to it (a stand-in Kafka bootstrap server)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def test_billing_dry_run_connects_to_no_kafka(tmp_path):
    kafka = Listener()
    env = clean_env(tmp_path, EVENT_REPLAY_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka.port}")
    proc = cli("billing", "generate", "--days", "2", "--rows-per-day", "1000", env=env, cwd=tmp_path)
    assert proc.returncode == 0, show(proc)
    reprocess = ["billing", "reprocess", "--start", "2024-03-04T00:00:00Z", "--end", "2024-03-05"]
    proc = cli(*reprocess, "--tenant", "acme", "--environment", "prod", "--dry-run", env=env, cwd=tmp_path)
    assert proc.returncode == 0, show(proc)
    assert '"dry_run": true, "found": 2000, "published": 0' in proc.stdout, show(proc)
    assert kafka.accepted == 0, show(proc)

    # The listener does see a producer: the sink a real run opens connects to it at once.
    import dagster as dg

    from replay_defs.sinks import open_sink
    from replay_defs.sinks.kafka import KafkaResource, KafkaSinkSpec

    resources = dg.build_resources({"kafka": KafkaResource(bootstrap_servers=f"127.0.0.1:{kafka.port}")})
    with resources as built:
        spec = KafkaSinkSpec("prod_events_v4")
        open_sink(built, spec, dry_run=True).close()
        assert kafka.accepted == 0
        sink = open_sink(built, spec)
        try:
            for _ in range(100):
                if kafka.accepted:
                    break
                threading.Event().wait(0.05)
        finally:
            sink.close()
    assert kafka.accepted > 0


# ---- processed events: what must exist, said before a row is selected -----------------------


@pytest.fixture(scope="module")
def pe_env(tmp_path_factory, postgres_dsn):
    """The CLI's environment: the session's database (with a password in the URL, to see it
    masked; the test servers trust local connections) and RabbitMQ as guest (user and password
    alike: both are masked)."""
    tmp = tmp_path_factory.mktemp("pe")
    url = postgres_dsn.replace("postgresql://postgres@", "postgresql://postgres:pg-secret-4711@")
    assert url != postgres_dsn
    env = clean_env(
        tmp,
        EVENT_REPLAY_POSTGRES_URL=url,
        EVENT_REPLAY_RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{rabbitmq_port()}/%2F",
    )
    return env, tmp


def test_processed_events_say_which_table_and_exchange_are_missing_and_how_to_create_them(pe_env, postgres_dsn):
    env, cwd = pe_env
    table, exchange = f"pe_readme_{uuid.uuid4().hex[:8]}", f"pe-readme-{uuid.uuid4().hex[:8]}"
    replay_one = ["processed-events", "replay-one", "evt-1", "--reason", "INC-42", "--table", table]

    proc = cli(*replay_one, "--exchange", exchange, env=env, cwd=cwd)
    assert proc.returncode == 1, show(proc)
    assert f"table '{table}' does not exist in database" in proc.stderr, show(proc)
    assert f"processed-events create-table --table {table}" in proc.stderr, show(proc)
    assert "postgres:***@" in proc.stderr and "pg-secret-4711" not in proc.stdout + proc.stderr, show(proc)

    proc = cli("processed-events", "create-table", "--table", table, env=env, cwd=cwd)
    assert proc.returncode == 0, show(proc)
    t = sql.Identifier(table)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (event_type, event_id, idempotency_key, status, processed_at) "
                "VALUES ('contribution.submitted', 'evt-1', 'k-1', 'error', now())"
            ).format(t)
        )
    try:
        proc = cli(*replay_one, "--exchange", exchange, env=env, cwd=cwd)
        assert proc.returncode == 1, show(proc)
        assert f"RabbitMQ exchange '{exchange}' does not exist on amqp://***:***@127.0.0.1:" in proc.stderr, show(proc)
        assert f"rabbitmqadmin declare exchange name={exchange} type=topic durable=true" in proc.stderr, show(proc)
        assert "NOT_FOUND" not in proc.stdout + proc.stderr, show(proc)

        # A dry run needs no exchange, and says what a replay would change, not that it changed it.
        proc = cli(*replay_one, "--exchange", exchange, "--dry-run", env=env, cwd=cwd)
        assert proc.returncode == 0, show(proc)
        assert "would_change=1" in proc.stdout and "changed=" not in proc.stdout.replace("would_change=", ""), show(
            proc
        )

        # With the exchange there, the same command replays the row.
        conn = pika.BlockingConnection(pika.URLParameters(env["EVENT_REPLAY_RABBITMQ_URL"]))
        ch = conn.channel()
        ch.exchange_declare(exchange, "topic", durable=True)
        ch.queue_declare(exchange)
        ch.queue_bind(exchange, exchange, "#")
        try:
            proc = cli(*replay_one, "--exchange", exchange, env=env, cwd=cwd)
            assert proc.returncode == 0, show(proc)
            assert "published=1 changed=1" in proc.stdout, show(proc)
            assert ch.queue_declare(exchange, passive=True).method.message_count == 1
        finally:
            ch.queue_delete(exchange)
            ch.exchange_delete(exchange)
            conn.close()
        with psycopg.connect(postgres_dsn) as conn:
            assert conn.execute(sql.SQL("SELECT status FROM {}").format(t)).fetchone()[0] == "pending"
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))


# ---- projection replay: which Redis ---------------------------------------------------------------


def test_projection_replay_names_its_redis_and_fails_at_once_when_it_does_not_answer(tmp_path, redis_url):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    args = ["projections", "replay", "--projection", "aggregate_state", "--tenant-id", "t1", "--since", "2025-06-01"]
    args += ["--until", "2025-06-01"]
    env = clean_env(tmp_path, EVENT_REPLAY_REDIS_URL=f"redis://:redis-secret-42@127.0.0.1:{port}/0")
    proc = cli(*args, env=env, cwd=tmp_path)
    assert proc.returncode != 0, show(proc)
    assert f"Redis for the markers: redis://:***@127.0.0.1:{port}/0 (EVENT_REPLAY_REDIS_URL)" in proc.stderr, show(proc)
    assert f"Redis at redis://:***@127.0.0.1:{port}/0 does not answer" in proc.stderr, show(proc)
    assert "set EVENT_REPLAY_REDIS_URL, or --redis-url-file PATH" in proc.stderr, show(proc)
    assert "redis-secret-42" not in proc.stdout + proc.stderr
    import dagster as dg

    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        assert instance.get_runs() == []  # it stopped before launching a run

    url_file = tmp_path / "redis.url"
    url_file.write_text(redis_url)
    proc = cli(*args, "--redis-url-file", str(url_file), "--dry-run", env=env, cwd=tmp_path)
    assert f"(from {url_file}); a dry run does not use it" in proc.stderr, show(proc)


# ---- the embedded instance's pools have slots -------------------------------------------------------


def test_the_embedded_instance_gives_every_pool_a_limit(tmp_path, monkeypatch):
    import dagster as dg

    from replay_defs.cli_common import ensure_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    ensure_dagster_home()
    with dg.DagsterInstance.get() as instance:
        # What the UI's pool tag reads (GraphQL `concurrencyLimit(pool).limit`): null is the warning.
        info = instance.event_log_storage.get_concurrency_info("event_replay.pipeline.telemetry")
        assert info.limit == 1
        assert instance.get_concurrency_config().pool_config.pool_granularity.value == "run"
