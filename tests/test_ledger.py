"""The redrive ledger on Postgres (real backends) and DuckDB (embedded default)."""

import dataclasses
import time
from contextlib import ExitStack

import psycopg
import pytest
from conftest import check_verdicts, run_day

from replay_defs.core.ledger import COLUMNS, DuckDBLedger, PostgresLedger, open_ledger
from replay_defs.pipeline.spec import RedriveSpec
from replay_defs.pipeline.store import DuckDBStore
from replay_defs.pipelines import TELEMETRY
from replay_defs.sinks.outbox import OutboxSinkSpec

DAY = "2025-11-25"
EVENTS = dataclasses.replace(TELEMETRY, redrive=RedriveSpec(unit="event", sink=OutboxSinkSpec()))


@pytest.fixture(params=["duckdb", "postgres"])
def ledger(request, tmp_path, postgres_dsn):
    url = postgres_dsn if request.param == "postgres" else None
    with open_ledger(url, DuckDBStore(tmp_path / "l.duckdb")) as led:
        assert isinstance(led, PostgresLedger if url else DuckDBLedger)
        if url:  # the machine's database: its ledger from earlier tests emptied
            led.con.execute("TRUNCATE redrive_ids, redrive_sends, redrive_scopes")
        yield led


def test_ledger_records_attempts_status_errors_and_runs(ledger):
    ids = [f"e{i}" for i in range(25_000)]
    ledger.record("p", "kafka:t", DAY, ids, "sending", "run-1")
    assert set(ledger.in_doubt("p", "kafka:t", ids)) == set(ids), "an intent leaves every id in doubt"
    ledger.record("p", "kafka:t", DAY, ids[:20_000], "delivered", "run-1")
    ledger.record("p", "kafka:t", DAY, ids[20_000:24_000], "failed", "run-1", error="broker down")
    ledger.record("p", "kafka:t", DAY, ids[24_000:], "unknown", "run-1", error="unknown: timed out")
    assert ledger.delivered("p", "kafka:t", ids) == set(ids[:20_000])
    assert ledger.delivered("p", "sqs:q", ids) == set(), "each sink has its own ledger"
    doubt = ledger.in_doubt("p", "kafka:t", ids)
    assert set(doubt) == set(ids[24_000:]) and ledger.in_doubt("p", "sqs:q", ids) == {}
    assert ledger.summary("p", DAY) == {
        "kafka:t": {"delivered": 20_000, "failed": 4_000, "unknown": 1_000, "sending": 0, "possible_duplicates": 0}
    }
    ledger.record("p", "kafka:t", DAY, ids[20_000:], "sending", "run-2")
    ledger.record("p", "kafka:t", DAY, ids[20_000:], "delivered", "run-2", possible_duplicate=True)
    assert ledger.count("p", "kafka:t", DAY) == 25_000
    assert ledger.count("p", "kafka:t", DAY, run_id="run-2") == 5_000
    rows = {r["message_id"]: r for r in ledger.rows("p", "kafka:t", DAY)}
    assert rows["e0"]["attempts"] == 1 and rows["e0"]["run_id"] == "run-1" and rows["e0"]["status"] == "delivered"
    retried = rows["e24999"]
    assert retried["attempts"] == 2 and retried["run_id"] == "run-2" and retried["last_error"] is None
    assert rows["e20000"]["sent_at"] > rows["e0"]["sent_at"], "an outcome keeps the time of the send it settles"
    assert retried["sent_at"] == rows["e0"]["sent_at"], "sent again while in doubt: the first send's time stays"
    assert ledger.summary("p", DAY)["kafka:t"]["possible_duplicates"] == 5_000


def test_a_claim_records_intents_only_when_no_id_is_in_the_ledger(ledger):
    fresh, more = [f"c{i}" for i in range(10_000)], [f"d{i}" for i in range(100)]
    assert ledger.claim("p", "kafka:t", DAY, fresh, "run-1"), "none of them was there: claimed"
    assert set(ledger.in_doubt("p", "kafka:t", fresh)) == set(fresh), "a claim is an intent: in doubt"
    ledger.record("p", "kafka:t", DAY, fresh[:5], "delivered", "run-1")
    assert not ledger.claim("p", "kafka:t", DAY, [*more, fresh[7]], "run-2"), "one id was there: refused"
    assert ledger.in_doubt("p", "kafka:t", more) == {} and ledger.delivered("p", "kafka:t", more) == set()
    rows = {r["message_id"]: r for r in ledger.rows("p", "kafka:t", DAY)}
    assert len(rows) == 10_000, "a refused claim writes nothing"
    assert rows["c7"]["status"] == "sending" and rows["c7"]["attempts"] == 1 and rows["c7"]["run_id"] == "run-1"
    assert rows["c0"]["status"] == "delivered" and rows["c0"]["sent_at"] is not None
    assert ledger.claim("p", "sqs:q", DAY, fresh, "run-1"), "each sink has its own ledger"


def test_an_outcome_that_settles_a_whole_intent_is_one_row(ledger):
    """The ledger keeps a row per send: a chunk's intent and an outcome for all of it write one send
    row, whatever the chunk's size; an outcome for part of it moves those ids to a send of their own."""
    ids = [f"s{i}" for i in range(10_000)]
    assert ledger.claim("p", "kafka:t", DAY, ids, "run-1")
    ledger.record("p", "kafka:t", DAY, list(ids), "delivered", "run-1")  # an equal list, as the sinks give
    sends = ledger.con.execute("SELECT status, attempts FROM redrive_sends").fetchall()
    assert sends == [("delivered", 1)]
    assert ledger.delivered("p", "kafka:t", ids) == set(ids)

    more = [f"m{i}" for i in range(100)]
    ledger.record("p", "kafka:t", DAY, more, "sending", "run-1")
    ledger.record("p", "kafka:t", DAY, more[:60], "delivered", "run-1")
    ledger.record("p", "kafka:t", DAY, more[60:], "failed", "run-1", error="too large")
    (n,) = ledger.con.execute("SELECT count(*) FROM redrive_sends").fetchone()
    assert n == 4, "the intent of `more`, then a send for each part of its outcome"
    rows = {r["message_id"]: r for r in ledger.rows("p", "kafka:t", DAY)}
    assert rows["m0"]["status"] == "delivered" and rows["m99"]["status"] == "failed"
    assert rows["m99"]["last_error"] == "too large" and rows["m99"]["sent_at"] == rows["m0"]["sent_at"]


def test_an_outcome_for_ids_of_an_intent_partly_settled_before_reaches_every_id(ledger):
    """Once part of an intent's ids got an outcome of their own, a later outcome naming exactly the
    intent's ids must reach all of them, not only those still under the intent's send row."""
    ids = ["a", "b", "c"]
    assert ledger.claim("p", "kafka:t", DAY, ids, "run-1")
    ledger.record("p", "kafka:t", DAY, ["a"], "failed", "run-1", error="refused")
    ledger.record("p", "kafka:t", DAY, list(ids), "delivered", "run-1")
    assert ledger.delivered("p", "kafka:t", ids) == set(ids)

    retried = ["x", "y"]  # every message refused, then sent again: a second intent for the same ids
    assert ledger.claim("p", "kafka:t", DAY, retried, "run-1")
    ledger.record("p", "kafka:t", DAY, list(retried), "sending", "run-1")
    ledger.record("p", "kafka:t", DAY, list(retried), "delivered", "run-1")
    assert ledger.delivered("p", "kafka:t", retried) == set(retried)
    assert {r["attempts"] for r in ledger.rows("p", "kafka:t", DAY) if r["message_id"] in retried} == {2}


OLD_ROWS = [  # (pipeline, sink, message_id, day, status, attempts, last_error, run_id, sent_at)
    ("p", "kafka:t", "o1", DAY, "delivered", 1, None, "run-0", 1_700_000_000.0),
    ("p", "kafka:t", "o2", DAY, "unknown", 2, "timed out", "run-0", 1_700_000_001.0),
    ("p", "sqs:q", "o1", "2025-11-24", "failed", 1, "refused", "run-9", None),
]


def _old_ledger(con, mark: str) -> list[tuple]:
    """The table as releases before sends had rows created it, with OLD_ROWS; its rows."""
    con.execute(
        "CREATE TABLE redrive_ledger (pipeline TEXT NOT NULL, sink TEXT NOT NULL, message_id TEXT NOT NULL, "
        "day TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL, last_error TEXT, run_id TEXT, "
        "updated_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp, PRIMARY KEY (pipeline, sink, message_id))"
    )
    con.execute("ALTER TABLE redrive_ledger ADD COLUMN sent_at TIMESTAMPTZ")  # added by a later release
    for row in OLD_ROWS:
        con.execute(
            "INSERT INTO redrive_ledger (pipeline, sink, message_id, day, status, attempts, last_error, run_id, "
            f"sent_at) VALUES ({', '.join([mark] * 8)}, to_timestamp({mark}))",
            list(row),
        )
    return con.execute(f"SELECT {COLUMNS.replace(', possible_duplicate', '')} FROM redrive_ledger").fetchall()


@pytest.mark.parametrize("backend", ["duckdb", "postgres"])
def test_a_ledger_of_one_row_per_id_is_carried_over_when_opened(backend, tmp_path, postgres_dsn):
    """A ledger written before sends had rows of their own: opening it moves every row over
    unchanged (a column a later release added too), and the ledger goes on from there."""
    from services import scratch_database

    with ExitStack() as stack:
        if backend == "postgres":
            url, store = stack.enter_context(scratch_database(postgres_dsn)), None
            with psycopg.connect(url, autocommit=True) as con:
                before = _old_ledger(con, "%s")
        else:
            url, store = None, DuckDBStore(tmp_path / "l.duckdb")
            with store.connect() as con:
                before = _old_ledger(con, "?")
        with open_ledger(url, store) as ledger:
            after = ledger.con.execute(f"SELECT {COLUMNS} FROM redrive_ledger").fetchall()
            assert sorted(after) == sorted((*r, False) for r in before) and len(after) == 3
            assert ledger.delivered("p", "kafka:t", ["o1", "o2"]) == {"o1"}
            assert set(ledger.in_doubt("p", "kafka:t", ["o1", "o2"])) == {"o2"}
            ledger.record("p", "kafka:t", DAY, ["o2", "n1"], "sending", "run-1")
            ledger.record("p", "kafka:t", DAY, ["o2", "n1"], "delivered", "run-1")
            ledger.record("p", "new:sink", DAY, ["n1"], "delivered", "run-1")  # a scope after the carried ones
            rows = {r["message_id"]: r for r in ledger.rows("p", "kafka:t", DAY)}
            assert rows["o2"]["attempts"] == 3 and rows["o2"]["status"] == "delivered" and rows["n1"]["attempts"] == 1
            assert rows["o2"]["sent_at"].timestamp() == 1_700_000_001.0, (
                "sent again while in doubt: the first time stays"
            )
        with open_ledger(url, store) as ledger:  # opened again: nothing to carry over, nothing lost
            assert ledger.count("p", "kafka:t", DAY) == 3 and ledger.summary("p", "2025-11-24")["sqs:q"]["failed"] == 1
            assert ledger.delivered("p", "new:sink", ["n1"]) == {"n1"}


def test_postgres_outcomes_are_written_while_a_lookup_runs(postgres_dsn):
    """A redrive records outcomes on a thread while it looks the next batch up: on Postgres each has
    its connection, so a write does not wait for the lookup (psycopg serializes a shared one)."""
    import threading

    ids = [f"w{i}" for i in range(1_000)]
    with open_ledger(postgres_dsn, None) as ledger:
        lookup = threading.Thread(target=lambda: ledger.con.execute("SELECT pg_sleep(5)"))
        lookup.start()
        time.sleep(0.5)  # the lookup's connection is busy
        ledger.record("p", "kafka:w", DAY, ids, "delivered", "run-1")
        assert lookup.is_alive(), "the write waited for the lookup's connection"
        lookup.join()
        assert ledger.delivered("p", "kafka:w", ids) == set(ids), "what one connection wrote, the other reads"


def test_two_workers_claiming_the_same_ids_on_postgres_one_wins(postgres_dsn):
    """Run workers on several machines share the Postgres ledger: two claiming the same ids of a
    pipeline and sink neither of them has used yet (both creating its scope) at the same moment get
    one scope, exactly one of them the claim, and every id once."""
    import threading

    from services import scratch_database

    ids = [f"c{i}" for i in range(20_000)]
    with scratch_database(postgres_dsn) as dsn, ExitStack() as stack:
        workers = [stack.enter_context(open_ledger(dsn, None)) for _ in range(2)]
        start, claimed = threading.Barrier(2), []

        def work(ledger, run_id):
            start.wait()
            claimed.append((run_id, ledger.claim("p", "kafka:shared", DAY, ids, run_id)))

        threads = [threading.Thread(target=work, args=(w, f"run-{i}")) for i, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(ok for _, ok in claimed) == [False, True], claimed
        (winner,) = [run for run, ok in claimed if ok]
        rows = workers[0].rows("p", "kafka:shared", DAY)
        assert len(rows) == len(ids) and {r["run_id"] for r in rows} == {winner}
        assert workers[0]._scopes == workers[1]._scopes, "one scope for the pipeline and sink"
        loser = workers[1 - int(winner[-1])]
        assert set(loser.in_doubt("p", "kafka:shared", ids)) == set(ids), "the loser sees the winner's intents"


def test_pipeline_uses_the_postgres_ledger_when_configured(env, instance, postgres_dsn, monkeypatch):
    monkeypatch.setenv("EVENT_REPLAY_LEDGER_URL", postgres_dsn)
    from replay_defs.definitions import build_definitions

    defs = build_definitions([EVENTS])
    first = run_day(defs, instance, DAY)
    assert first.success and check_verdicts(first)[("deliveries_reconcile", DAY)] is True
    with psycopg.connect(postgres_dsn) as con:
        n, runs = con.execute(
            "SELECT count(*), array_agg(DISTINCT run_id) FROM redrive_ledger WHERE pipeline = 'telemetry' AND day = %s AND status = 'delivered'",
            (DAY,),
        ).fetchone()
    (mat,) = first.asset_materializations_for_node("telemetry__redrive")
    assert n == mat.metadata["published"].value > 1000 and runs == [first.run_id]
    again = run_day(defs, instance, DAY)
    (mat2,) = again.asset_materializations_for_node("telemetry__redrive")
    assert (
        again.success
        and mat2.metadata["published"].value == 0
        and mat2.metadata["skipped_already_delivered"].value == n
    )


def test_unreachable_postgres_ledger_fails_with_the_password_masked(env, instance, monkeypatch):
    monkeypatch.setenv("EVENT_REPLAY_LEDGER_URL", "postgresql://replay:hunter2@127.0.0.1:1/ledger")
    from replay_defs.definitions import build_definitions

    result = run_day(build_definitions([EVENTS]), instance, DAY)
    assert not result.success
    logs = "\n".join(str(e) for e in instance.all_logs(result.run_id))
    assert "cannot connect to the Postgres ledger" in logs and "hunter2" not in logs
