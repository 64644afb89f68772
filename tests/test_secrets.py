"""Passwords never leave the process (issue 16): against the real PostgreSQL, RabbitMQ and Redis,
a password holding `@`, `:` and `/` (URL-encoded in the URL, as it must be) is masked in what a
failed connect reports — the exception, the processed-events audit row, the Dagster run storage and
the CLI's output — while the useful part of the message stays. The CLI takes URLs from files, not
arguments."""

import re
import secrets
import uuid
from urllib.parse import quote

import dagster as dg
import psycopg
import pytest
from psycopg import sql
from services import RedisServer, rabbitmq_port

from replay_defs.core import connect
from replay_defs.core.redact import redact
from replay_defs.processed_events import engine as pe
from replay_defs.sinks.base import Batch
from replay_defs.sinks.redis import RedisSink


def password() -> str:
    # fresh per test: the registry is process-wide, so no test leans on another's registration
    return f"Pw@rd:{secrets.token_hex(3)}/x"


def leaks(text: str, pw: str) -> list[str]:
    """The forms of `pw` found in `text`: raw, URL-encoded, and each piece around `@`, `:`, `/`."""
    forms = {pw, quote(pw, safe=""), *(p for p in pw.replace(":", "@").replace("/", "@").split("@") if len(p) >= 6)}
    return [f for f in forms if f in text]


def server_url(dsn: str, pw: str, database: str, scheme: str = "postgresql://") -> str:
    """`dsn`'s server with user postgres and `pw`, on `database`."""
    hostport = dsn.split("@", 1)[1].rsplit("/", 1)[0]
    return f"{scheme}postgres:{quote(pw, safe='')}@{hostport}/{database}"


@pytest.fixture
def table(postgres_dsn):
    name = f"pe_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        pe.create_processed_events_table(conn, name)
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (event_type, event_id, idempotency_key, payload, status, retry_count, processed_at)"
                " VALUES ('contribution.submitted', 'evt-0', 'idem-0', '{{}}', 'error', 1, now())"
            ).format(sql.Identifier(name))
        )
    yield name
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def run_cli(argv, capsys) -> tuple[int, str]:
    from replay_defs.cli import main

    code, message = 0, ""
    try:
        main(argv)
    except SystemExit as exc:  # a str code is what the interpreter would print on stderr
        code, message = (exc.code, "") if isinstance(exc.code, int) else (1, str(exc.code))
    got = capsys.readouterr()
    return code, got.out + got.err + message


def test_failed_postgres_connect_masks_the_password(postgres_dsn):
    """Wrong database on the real server; and a mistyped scheme, which psycopg echoes whole."""
    pw = password()
    with pytest.raises(psycopg.OperationalError) as wrong_db:
        connect.postgres(server_url(postgres_dsn, pw, f"no_such_db_{uuid.uuid4().hex[:6]}"), connect_timeout=5)
    assert "does not exist" in str(wrong_db.value) and not leaks(str(wrong_db.value), pw)
    for scheme in ("postgresql:/", "postgresq://"):
        with pytest.raises(psycopg.ProgrammingError) as mistyped:
            connect.postgres(server_url(postgres_dsn, pw, "db", scheme), connect_timeout=5)
        text = str(mistyped.value)
        assert "connection info string" in text and "@127.0.0.1" in text and "***" in text, text
        assert not leaks(text, pw), text


def test_libpq_conninfo_password_is_masked(postgres_dsn):
    pw = password()
    conninfo = f"host=127.0.0.1 port=5432 user=postgres password='{pw}' dbname=no_such_db_{uuid.uuid4().hex[:6]}"
    with pytest.raises(psycopg.OperationalError) as failed:
        connect.postgres(conninfo, connect_timeout=5)
    assert "does not exist" in str(failed.value)
    # registered by value: masked wherever it shows, also outside the conninfo
    text = redact(f"tried {conninfo}; the password was {pw} (encoded {quote(pw, safe='')})")
    assert not leaks(text, pw) and "host=127.0.0.1" in text and "password=***" in text, text
    assert redact("password=hunter2x dbname=x") == "password=*** dbname=x", "unregistered: the pattern still masks it"


def test_processed_events_replay_with_a_mistyped_amqp_url_masks_the_password(
    table, postgres_dsn, tmp_path, monkeypatch, capsys, caplog, fresh_definitions
):
    """`amqp:/guest:PW@host` makes pika connect to localhost with vhost "guest:PW@host:5672" (the
    password URL-decoded): the broker's "vhost ... not found" reaches the run's storage and the
    CLI — masked. The replay checks the broker before it selects a row, so it audits nothing."""
    pw = password()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVENT_REPLAY_POSTGRES_URL", postgres_dsn)
    monkeypatch.setenv("EVENT_REPLAY_RABBITMQ_URL", f"amqp:/guest:{quote(pw, safe='')}@127.0.0.1:{rabbitmq_port()}/%2F")
    code, out = run_cli(
        ["processed-events", "replay-one", "evt-0", "--table", table, "--reason", "INC-16", "--rate-limit", "0"], capsys
    )
    assert code == 1 and "FAILURE" in out
    # The user may show as *** too: "guest" is a password of the machine's RabbitMQ URL, which other
    # tests of this process register.
    assert re.search(r"vhost (guest|\*\*\*):\*\*\*@127\.0\.0\.1", out) and "not found" in out, out
    assert not leaks(out, pw), out
    run_id = out.split("run_id ")[1].split(":")[0]
    assert "set EVENT_REPLAY_RABBITMQ_URL" in out, out
    assert pe.audit_row(postgres_dsn, run_id) is None
    stored = "\n".join(str(e) for e in dg.DagsterInstance.get().all_logs(run_id))
    assert "not found" in stored and not leaks(stored, pw)
    pika_logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pika"))
    assert "not found" in pika_logs and not leaks(pika_logs, pw), "pika logs the failure itself: masked too"
    with psycopg.connect(postgres_dsn) as conn:  # nothing was published: the row is as it was
        assert conn.execute(sql.SQL("SELECT status FROM {}").format(sql.Identifier(table))).fetchone()[0] == "error"


def test_processed_events_replay_against_a_missing_database_masks_the_password(
    postgres_dsn, tmp_path, monkeypatch, capsys, fresh_definitions
):
    pw = password()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVENT_REPLAY_POSTGRES_URL", server_url(postgres_dsn, pw, f"no_such_db_{uuid.uuid4().hex[:6]}"))
    monkeypatch.setenv("EVENT_REPLAY_RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:{rabbitmq_port()}/%2F")
    code, out = run_cli(["processed-events", "replay-one", "evt-0", "--reason", "INC-16"], capsys)
    assert code == 1 and "does not exist" in out and not leaks(out, pw), out
    run_id = out.split("run_id ")[1].split(":")[0]
    stored = "\n".join(str(e) for e in dg.DagsterInstance.get().all_logs(run_id))
    assert "does not exist" in stored and not leaks(stored, pw)


def test_redis_auth_failure_masks_the_password():
    server = RedisServer(password=f"right-{secrets.token_hex(4)}").start()
    try:
        pw = password()  # the wrong one, as configured
        sink = RedisSink(f"redis://:{quote(pw, safe='')}@127.0.0.1:{server.port}/0", "q", mode="list")
        try:
            errors = sink.deliver("p", "2025-01-01", Batch(["m1"], [b'{"id":"m1"}'], ["t"]))
        finally:
            sink.close()
    finally:
        server.stop()
    assert errors[0] is not None and "AuthenticationError" in errors[0] and f"127.0.0.1:{server.port}" in errors[0], (
        errors
    )
    assert not leaks(errors[0], pw), errors


def test_cli_reads_urls_from_files_and_refuses_them_as_arguments(clickhouse_http, tmp_path, monkeypatch, capsys):
    """The URL comes from the file (the error names that server, password masked); the old flag is
    refused with what to use instead, without echoing the value."""
    pw = password()
    url_file = tmp_path / "clickhouse.url"
    url_file.write_text(clickhouse_http.url(with_password=False).replace("@", f":{quote(pw, safe='')}@") + "\n")
    monkeypatch.setenv("CLICKHOUSE_URL", "")  # restored after the test: the CLI sets it from the file
    from replay_defs.core.clickhouse import ClickHouseError

    with pytest.raises(ClickHouseError) as refused_login:  # a wrong password: the server refuses it
        run_cli(
            ["projections", "generate", "--clickhouse-url-file", str(url_file), "--events", "10", "--days", "1"], capsys
        )
    text = str(refused_login.value)
    assert f"127.0.0.1:{clickhouse_http.port}" in text and "***" in text and not leaks(text, pw), text

    code, out = run_cli(["projections", "generate", "--clickhouse-url-file", str(tmp_path / "missing.url")], capsys)
    assert code == 1 and "--clickhouse-url-file: cannot read" in out

    for flag, env in (
        ("--redis-url", "EVENT_REPLAY_REDIS_URL"),
        ("--postgres-url", "EVENT_REPLAY_POSTGRES_URL"),
        ("--clickhouse-url", "CLICKHOUSE_URL"),
    ):
        code, out = run_cli(
            [
                "projections",
                "replay",
                "--projection",
                "aggregate_state",
                "--tenant-id",
                "t",
                "--since",
                "2025-06-01",
                flag,
                f"redis://:{pw}@127.0.0.1:6379/0",
            ],
            capsys,
        )
        assert code == 2 and f"{flag} is no longer accepted" in out and env in out and f"{flag}-file PATH" in out, out
        assert not leaks(out, pw), out
    code, out = run_cli(["projections", "replay", "--help"], capsys)
    assert code == 0 and "--redis-url-file" in out and "--redis-url" not in out.replace("--redis-url-file", "")
