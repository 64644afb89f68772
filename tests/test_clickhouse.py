"""The ClickHouse resource on both backends: chDB in-process, and a server over HTTP
(clickhouse-connect against tests/clickhouse_http.py). Same SQL, same results."""

from datetime import datetime, timezone

import pyarrow as pa
import pytest

from replay_defs.core.clickhouse import ClickHouseError
from resources import ClickHouseResource

DDL = """CREATE TABLE events (tenant String, ts DateTime64(3, 'UTC'), id String, n Int64, version UInt64)
ENGINE = ReplacingMergeTree(version) PARTITION BY toDate(ts) ORDER BY (tenant, ts, id)"""


def _data() -> pa.Table:
    ts = [
        datetime(2025, 3, 1, 10, tzinfo=timezone.utc),
        datetime(2025, 3, 1, 11, tzinfo=timezone.utc),
        datetime(2025, 3, 2, 9, tzinfo=timezone.utc),
        datetime(2025, 3, 1, 10, tzinfo=timezone.utc),
    ]
    return pa.table(
        {
            "tenant": ["acme", "o'brien", "acme", "acme"],
            "ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
            "id": ["e1", "e2", "e3", "e1"],
            "n": pa.array([1, 2, 3, 10], pa.int64()),
            "version": pa.array([1, 1, 1, 2], pa.uint64()),  # e1 again, newer
        }
    )


def _roundtrip(res: ClickHouseResource) -> dict:
    res.command(DDL)
    res.insert("events", _data())
    q = "SELECT tenant, ts, id, n FROM events FINAL WHERE tenant = {tenant:String} AND ts >= {since:DateTime64(3, 'UTC')} ORDER BY ts, id"
    return {
        "acme": res.query(q, {"tenant": "acme", "since": datetime(2025, 3, 1, tzinfo=timezone.utc)}),
        "quote": res.query(q, {"tenant": "o'brien", "since": datetime(2025, 3, 1, tzinfo=timezone.utc)}),
        "inject": res.query(q, {"tenant": "acme' OR '1'='1", "since": datetime(2000, 1, 1, tzinfo=timezone.utc)}),
        "count": res.command("SELECT count() FROM events FINAL"),
    }


@pytest.fixture
def backends(chdb_path, clickhouse_http, ch_database):
    http_db = ch_database + "_http"
    embedded = ClickHouseResource(data_path=chdb_path, database=ch_database)
    embedded.command(f"CREATE DATABASE IF NOT EXISTS {http_db}")
    return embedded, ClickHouseResource(url=clickhouse_http.url(), database=http_db)


def test_same_sql_same_results_on_chdb_and_http(backends, clickhouse_http):
    embedded, server = backends
    n_requests = len(clickhouse_http.requests)
    a, b = _roundtrip(embedded), _roundtrip(server)
    for key in ("acme", "quote", "inject"):
        assert a[key].equals(b[key]), key
    assert a["count"] == b["count"] == 3, "ReplacingMergeTree FINAL collapses e1's two versions"
    acme = a["acme"].to_pylist()
    assert [(r["id"], r["n"]) for r in acme] == [("e1", 10), ("e3", 3)], "the latest version of e1 wins"
    assert acme[0]["ts"] == datetime(2025, 3, 1, 10, tzinfo=timezone.utc)
    assert a["quote"].column("id").to_pylist() == ["e2"]
    assert a["inject"].num_rows == 0, "a parameter is a value, never SQL"
    # What clickhouse-connect sent over HTTP: parameters as param_<name>, Arrow both ways.
    sent = clickhouse_http.requests[n_requests:]
    insert = next(r for r in sent if r["sql"].lstrip().upper().startswith("INSERT"))
    assert insert["sql"].rstrip().endswith("FORMAT Arrow") and insert["body"].startswith(b"ARROW1")
    selects = [r for r in sent if "{tenant:String}" in r["sql"]]
    assert len(selects) == 3 and all(r["sql"].rstrip().endswith("FORMAT Arrow") for r in selects)
    assert selects[1]["params"]["tenant"] == "o\\'brien", "sent in ClickHouse's escaped form, unescaped by the engine"


def test_errors_and_logs_never_show_the_password(clickhouse_http, ch_database):
    wrong = ClickHouseResource(url=clickhouse_http.url().replace("ch-secret-pw", "wrong-pw-123"), database=ch_database)
    with pytest.raises(ClickHouseError) as info:
        wrong.get()
    assert "516" in str(info.value) and "wrong-pw-123" not in str(info.value) and "***" in str(info.value)
    good = ClickHouseResource(url=clickhouse_http.url(), database=ch_database)
    with good.open() as ch:
        assert ch.backend == "http" and "ch-secret-pw" not in ch.where
        with pytest.raises(ClickHouseError) as info:
            ch.query("SELECT no_such_column FROM system.one")
    assert "UNKNOWN_IDENTIFIER" in str(info.value) and "ch-secret-pw" not in str(info.value)


def test_embedded_default_keeps_data_in_its_directory(chdb_path, ch_database):
    res = ClickHouseResource(data_path=chdb_path, database=ch_database)
    res.command("CREATE TABLE kv (k String, v Int64) ENGINE = MergeTree ORDER BY k")
    res.insert("kv", pa.table({"k": ["a", "b"], "v": pa.array([1, 2], pa.int64())}))
    with res.open() as ch:  # a new client on the same directory sees the rows
        assert ch.backend == "chdb"
        assert ch.rows("SELECT k, v FROM kv ORDER BY k") == [("a", 1), ("b", 2)]
    tables = res.query("SELECT name FROM system.tables WHERE database = {db:String}", {"db": ch_database})
    assert tables.column("name").to_pylist() == ["kv"]


def test_a_chdb_directory_other_than_the_deployments_is_refused(tmp_path, chdb_path):
    """Where chDB writes is the deployment's setting (EVENT_REPLAY_CHDB), not a run config's."""
    import dagster as dg

    with pytest.raises(dg.Failure, match="EVENT_REPLAY_CHDB"):
        ClickHouseResource(data_path=str(tmp_path / "elsewhere")).get()
    assert not (tmp_path / "elsewhere").exists()
