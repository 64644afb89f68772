"""The private Redis and PostgreSQL servers the suite falls back on when the machine has none
(exercised directly, since the machine's usually answer), and the fixtures built on them."""

import psycopg
import pytest
import redis
import services
from services import PostgresServer, RedisServer, free_port


def answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1, retry=None)
    try:
        return client.ping()
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def test_private_redis_outage_and_restart():
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()

        server.stop()
        assert not answers(server.url)

        server.start()  # same port: an outage, not a new server
        assert answers(server.url)
        assert redis.Redis.from_url(server.url).get("k") is None  # nothing persisted
    finally:
        server.stop()


def test_private_redis_password_is_required_and_in_url():
    server = RedisServer(password="s3cret/pw").start()
    try:
        assert server.url == f"redis://:s3cret%2Fpw@127.0.0.1:{server.port}/0"
        assert answers(server.url)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=None).ping()  # no retries: they back off for ~4 s
    finally:
        server.stop()


def test_private_postgres():
    server = PostgresServer().start()
    try:
        assert server.port != 5432
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
            conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
            assert conn.execute("SELECT name FROM t ORDER BY id").fetchall() == [("a",), ("b",)]
        server.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn, connect_timeout=2)
    finally:
        server.stop()


def test_fixtures_connect(redis_url, postgres_dsn):
    client = redis.Redis.from_url(redis_url)
    try:
        client.set("event-replay-test:services", "ok", ex=60)
        assert client.get("event-replay-test:services") == b"ok"
    finally:
        client.delete("event-replay-test:services")
        client.close()

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0].startswith("event_replay_test_")
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_helpers_fall_back_to_private_servers(monkeypatch):
    """With nothing on the machine's ports, the helpers start private servers and stop them."""
    monkeypatch.setattr(services, "MACHINE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setattr(services, "MACHINE_POSTGRES_DSN", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")

    with services.redis_url() as url:
        assert url != services.MACHINE_REDIS_URL and answers(url)
    assert not answers(url)

    with services.postgres_dsn() as server, services.scratch_database(server) as dsn:
        assert server != services.MACHINE_POSTGRES_DSN
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0].startswith("event_replay_test_")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server, connect_timeout=2)
