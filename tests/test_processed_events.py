"""Processed-events replay against the real PostgreSQL and RabbitMQ: each test has its
own `processed_events` table and its own exchange and queue; a worker thread consumes the queue
and marks events processed as the seed's worker does. The emergency stop is a real `dagster dev`
run terminated through the webserver's GraphQL API, as the UI's "Terminate" button does."""

import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import dagster as dg
import pika
import psycopg
import pytest
from psycopg import sql
from services import TcpProxy, dagster_dev, graphql, rabbitmq_port

from replay_defs.processed_events import engine as pe


def now() -> datetime:
    # Per call, not per import: a module-level time goes stale while earlier tests of the suite run.
    return datetime.now(timezone.utc)


DAY = datetime(2025, 11, 24, tzinfo=timezone.utc)
COLUMNS = "id, event_type, event_id, status, retry_count, error_message, processed_at"


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def table(postgres_dsn):
    name = f"pe_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        pe.create_processed_events_table(conn, name)
    yield name
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def rabbit_url() -> str:
    return f"amqp://guest:guest@127.0.0.1:{rabbitmq_port()}/%2F"


@pytest.fixture
def rabbit(rabbit_url):
    """A fresh topic exchange and a queue bound to every routing key."""
    exchange, queue = f"pe-test-{uuid.uuid4().hex[:8]}", f"pe-test-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(rabbit_url))
    ch = conn.channel()
    ch.exchange_declare(exchange, "topic")
    ch.queue_declare(queue)
    ch.queue_bind(queue, exchange, "#")
    yield {"url": rabbit_url, "exchange": exchange, "queue": queue, "channel": ch}
    ch.queue_delete(queue)
    ch.exchange_delete(exchange)
    conn.close()


@pytest.fixture(scope="module")
def location(tmp_path_factory, postgres_dsn, rabbit_url):
    """The code location's Definitions and a Dagster instance, with the env vars pointing at the
    servers (built once: the resources read the env vars at launch, and each test has its own
    table and exchange)."""
    home = tmp_path_factory.mktemp("pe_dagster_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVENT_REPLAY_POSTGRES_URL", postgres_dsn)
        mp.setenv("EVENT_REPLAY_RABBITMQ_URL", rabbit_url)
        mp.setenv("DAGSTER_HOME", str(home))
        from replay_defs.definitions import build_definitions

        with dg.instance_for_test(temp_dir=str(home)) as instance:
            yield build_definitions(), instance


class Worker:
    """The seed's worker: takes a message, marks its event `processing`, then `processed`."""

    def __init__(self, url: str, dsn: str, table: str, queue: str):
        self.url, self.dsn, self.table, self.queue = url, dsn, table, queue
        self.seen: list[tuple[str, str, dict, dict]] = []  # routing key, message id, headers, body
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Worker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        t = sql.Identifier(self.table)
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        with psycopg.connect(self.dsn, autocommit=True) as db:

            def handle(channel, method, props, body):
                event_id = props.headers["event_id"]
                db.execute(
                    sql.SQL("UPDATE {} SET status = 'processing', processed_at = now() WHERE event_id = %s").format(t),
                    (event_id,),
                )
                db.execute(
                    sql.SQL("UPDATE {} SET status = 'processed', processed_at = now() WHERE event_id = %s").format(t),
                    (event_id,),
                )
                self.seen.append((method.routing_key, props.message_id, props.headers, json.loads(body)))
                channel.basic_ack(method.delivery_tag)

            ch.basic_consume(self.queue, handle)
            while not self._stop.is_set():
                conn.process_data_events(time_limit=0.05)
        conn.close()

    def wait_for(self, n: int, timeout: float = 15) -> list:
        deadline = time.time() + timeout
        while len(self.seen) < n:
            assert time.time() < deadline, f"the worker got {len(self.seen)} of {n} messages"
            time.sleep(0.02)
        time.sleep(0.2)  # nothing more should arrive
        return self.seen


def insert(dsn: str, table: str, rows: list[dict]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for r in rows:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (event_type, event_id, idempotency_key, payload, status, retry_count, error_message, processed_at, created_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(sql.Identifier(table)),
                (
                    r["type"],
                    r["id"],
                    f"idem-{r['id']}",
                    json.dumps(r.get("payload", {"event": r["id"]})),
                    r["status"],
                    r.get("retries", 0),
                    r.get("error"),
                    r.get("at"),
                    r.get("created", r.get("at") or now()),
                ),
            )


def rows(dsn: str, table: str) -> dict[str, tuple]:
    with psycopg.connect(dsn) as conn:
        got = conn.execute(sql.SQL(f"SELECT {COLUMNS} FROM {{}} ORDER BY id").format(sql.Identifier(table))).fetchall()
    return {r[2]: r for r in got}


def statuses(dsn: str, table: str) -> dict[str, str]:
    return {k: v[3] for k, v in rows(dsn, table).items()}


def queue_depth(rabbit) -> int:
    return rabbit["channel"].queue_declare(rabbit["queue"], passive=True).method.message_count


def launch(defs, instance, job: str, config: dict, tags: dict | None = None):
    op = defs.resolve_job_def(job).graph.node_defs[0].name
    result = defs.resolve_job_def(job).execute_in_process(
        instance=instance, run_config={"ops": {op: {"config": config}}}, tags=tags or {}, raise_on_error=False
    )
    outputs = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    md = {k: v.value for k, v in outputs[0].step_output_data.metadata.items()} if outputs else {}
    return result, md


def failed_events(
    n: int, hours_ago: float = 1, prefix: str = "evt", event_type: str = "contribution.submitted"
) -> list[dict]:
    return [
        {
            "type": event_type,
            "id": f"{prefix}-{i}",
            "status": "error",
            "retries": 3,
            "error": "handler bug",
            "at": now() - timedelta(hours=hours_ago),
        }
        for i in range(n)
    ]


# ---- tests ------------------------------------------------------------------------------------


def test_replay_one_event_routes_by_type_and_the_worker_processes_it(location, table, rabbit, postgres_dsn):
    defs, instance = location
    insert(
        postgres_dsn,
        table,
        failed_events(3)
        + [
            {
                "type": "payment.completed",
                "id": "pay-1",
                "status": "error",
                "error": "timeout",
                "at": now() - timedelta(hours=2),
                "payload": {"payment_id": "p1", "amount": 100},
            }
        ],
    )
    before = rows(postgres_dsn, table)
    with Worker(rabbit["url"], postgres_dsn, table, rabbit["queue"]) as worker:
        result, md = launch(
            defs,
            instance,
            "processed_events_replay_one",
            {
                "event_id": "pay-1",
                "table": table,
                "exchange": rabbit["exchange"],
                "reason": "INC-1 payment handler fixed",
            },
            tags={"event_replay/requested_by": "alice@habitat.eth"},
        )
        assert result.success and md["published"] == 1 and md["selected"] == 1
        ((key, mid, headers, body),) = worker.wait_for(1)
    assert (key, mid, body) == ("payment.completed", "pay-1", {"payment_id": "p1", "amount": 100})
    assert (
        headers["idempotency_key"] == "idem-pay-1"
        and headers["replay_run_id"] == result.run_id
        and headers["replay_forced"] is False
    )
    after = statuses(postgres_dsn, table)
    assert after == {"evt-0": "error", "evt-1": "error", "evt-2": "error", "pay-1": "processed"}
    audit = pe.audit_row(postgres_dsn, result.run_id)
    missing, _ = launch(
        defs,
        instance,
        "processed_events_replay_one",
        {"event_id": "nope", "table": table, "exchange": rabbit["exchange"], "reason": "r"},
    )
    assert not missing.success and pe.audit_row(postgres_dsn, missing.run_id) is None
    assert (audit["requested_by"], audit["reason"], audit["status"], audit["published"]) == (
        "alice@habitat.eth",
        "INC-1 payment handler fixed",
        "succeeded",
        1,
    )
    assert audit["selection"] == {"kind": "one", "event_id": "pay-1"} and audit["snapshot"] == md["snapshot"]
    with psycopg.connect(postgres_dsn) as conn:
        snap = conn.execute(
            "SELECT event_id, status, retry_count, error_message, processed_at FROM event_replay_snapshot WHERE run_id = %s",
            (result.run_id,),
        ).fetchall()
    old = before["pay-1"]
    assert snap == [("pay-1", "error", 0, "timeout", old[6])]


def test_failed_events_in_a_window_are_replayed_and_nothing_else(location, table, rabbit, postgres_dsn):
    defs, instance = location
    insert(
        postgres_dsn,
        table,
        failed_events(25)
        + failed_events(4, hours_ago=72, prefix="old")
        + [
            {"type": "period.closed", "id": "ok-1", "status": "processed", "at": now() - timedelta(hours=1)},
            {"type": "period.closed", "id": "wait-1", "status": "pending", "at": None},
        ],
    )
    with Worker(rabbit["url"], postgres_dsn, table, rabbit["queue"]) as worker:
        result, md = launch(
            defs,
            instance,
            "processed_events_replay_failed",
            {
                "hours": 24,
                "table": table,
                "exchange": rabbit["exchange"],
                "batch_size": 10,
                "rate_limit": 0,
                "reason": "replay failed",
                "requested_by": "ops",
            },
        )
        assert result.success and (md["selected"], md["published"], md["failed"]) == (25, 25, 0)
        seen = worker.wait_for(25)
    assert sorted(mid for _, mid, _, _ in seen) == sorted(f"evt-{i}" for i in range(25))
    after = statuses(postgres_dsn, table)
    assert {k for k, v in after.items() if v == "processed"} == {f"evt-{i}" for i in range(25)} | {"ok-1"}
    assert {k: v for k, v in after.items() if not k.startswith("evt-")} == {
        **{f"old-{i}": "error" for i in range(4)},
        "ok-1": "processed",
        "wait-1": "pending",
    }


def test_processed_events_need_force_which_the_audit_flags(location, table, rabbit, postgres_dsn):
    """A type in a date range (end day inclusive): the error rows go, processed ones only with force."""
    defs, instance = location
    t = "allocation.calculated"
    insert(
        postgres_dsn,
        table,
        [
            {"type": t, "id": "a-err", "status": "error", "at": DAY + timedelta(hours=3)},
            {
                "type": t,
                "id": "a-done",
                "status": "processed",
                "at": DAY + timedelta(days=1, hours=23),
            },  # the last day, late
            {"type": t, "id": "a-late", "status": "error", "at": DAY + timedelta(days=2, hours=1)},  # after the range
            {
                "type": "allocation.distributed",
                "id": "b-err",
                "status": "error",
                "at": DAY + timedelta(hours=3),
            },  # other type
        ],
    )
    config = {
        "event_type": t,
        "start": "2025-11-24",
        "end": "2025-11-25",
        "table": table,
        "exchange": rabbit["exchange"],
        "reason": "recalc",
    }
    first, md = launch(defs, instance, "processed_events_replay_range", config)
    assert first.success and (md["selected"], md["published"], md["skipped_processed"], md["forced"]) == (
        2,
        1,
        1,
        False,
    )
    assert drain(rabbit) == [("a-err", False)]
    # a-err, replayed, is pending now with processed_at cleared (the seed's reset): out of the range.
    forced, md = launch(defs, instance, "processed_events_replay_range", {**config, "force": True})
    assert forced.success and (md["selected"], md["published"], md["forced_count"], md["forced"]) == (1, 1, 1, True)
    assert drain(rabbit) == [("a-done", True)]
    audit = pe.audit_row(postgres_dsn, forced.run_id)
    assert (audit["force"], audit["forced"], audit["forced_count"], audit["skipped_processed"]) == (True, True, 1, 0)
    assert not pe.audit_row(postgres_dsn, first.run_id)["forced"]
    assert statuses(postgres_dsn, table) == {
        "a-err": "pending",
        "a-done": "pending",
        "a-late": "error",
        "b-err": "error",
    }


def drain(rabbit) -> list[tuple[str, bool]]:
    got = []
    while (m := rabbit["channel"].basic_get(rabbit["queue"], auto_ack=True))[0] is not None:
        got.append((m[1].message_id, m[1].headers["replay_forced"]))
    return got


def test_undo_restores_the_snapshot(location, table, rabbit, postgres_dsn):
    defs, instance = location
    insert(
        postgres_dsn,
        table,
        failed_events(6)
        + [{"type": "period.opened", "id": "ok", "status": "processed", "at": now() - timedelta(hours=1)}],
    )
    before = rows(postgres_dsn, table)
    with Worker(rabbit["url"], postgres_dsn, table, rabbit["queue"]) as worker:
        replay, md = launch(
            defs,
            instance,
            "processed_events_replay_failed",
            {"table": table, "exchange": rabbit["exchange"], "reason": "r", "rate_limit": 0, "batch_size": 4},
        )
        worker.wait_for(6)
    assert replay.success and md["published"] == 6
    assert set(statuses(postgres_dsn, table).values()) == {"processed"}
    undone, umd = launch(
        defs,
        instance,
        "processed_events_undo",
        {"replay_run_id": replay.run_id, "table": table, "reason": "wrong window"},
    )
    assert undone.success and umd["changed"] == 6
    assert rows(postgres_dsn, table) == before
    assert pe.audit_row(postgres_dsn, replay.run_id)["undone_by"] == undone.run_id
    twice, _ = launch(
        defs, instance, "processed_events_undo", {"replay_run_id": replay.run_id, "table": table, "reason": "again"}
    )
    assert not twice.success and rows(postgres_dsn, table) == before
    again, _ = launch(
        defs,
        instance,
        "processed_events_undo",
        {"replay_run_id": undone.run_id, "table": table, "reason": "undo the undo"},
    )
    assert again.success and set(statuses(postgres_dsn, table).values()) == {"processed"}


def test_stuck_processing_is_reset(location, table, rabbit, postgres_dsn):
    defs, instance = location
    insert(
        postgres_dsn,
        table,
        [
            {
                "type": "contribution.approved",
                "id": "stuck-1",
                "status": "processing",
                "at": now() - timedelta(minutes=30),
            },
            {
                "type": "contribution.approved",
                "id": "stuck-2",
                "status": "processing",
                "at": now() - timedelta(minutes=6),
            },
            {"type": "contribution.approved", "id": "busy", "status": "processing", "at": now() - timedelta(minutes=1)},
            {"type": "contribution.approved", "id": "err", "status": "error", "at": now() - timedelta(minutes=30)},
        ],
    )
    with Worker(rabbit["url"], postgres_dsn, table, rabbit["queue"]) as worker:
        result, md = launch(
            defs,
            instance,
            "processed_events_reset_stuck",
            {"older_than_minutes": 5, "table": table, "exchange": rabbit["exchange"], "reason": "worker crashed"},
        )
        assert result.success and md["published"] == 2
        assert sorted(m for _, m, _, _ in worker.wait_for(2)) == ["stuck-1", "stuck-2"]
    assert statuses(postgres_dsn, table) == {
        "stuck-1": "processed",
        "stuck-2": "processed",
        "busy": "processing",
        "err": "error",
    }
    insert(
        postgres_dsn,
        table,
        [
            {
                "type": "contribution.approved",
                "id": "stuck-3",
                "status": "processing",
                "at": now() - timedelta(minutes=30),
            }
        ],
    )
    to_error, md = launch(
        defs,
        instance,
        "processed_events_reset_stuck",
        {"older_than_minutes": 5, "to_status": "error", "table": table, "exchange": rabbit["exchange"], "reason": "r"},
    )
    assert to_error.success and (md["changed"], md["published"]) == (1, 0) and queue_depth(rabbit) == 0
    row = rows(postgres_dsn, table)["stuck-3"]
    assert (
        row[3] == "error"
        and to_error.run_id in row[5]
        and abs((row[6] - datetime.now(timezone.utc)).total_seconds()) < 60
    )
    # processed_at is when it was marked failed: a replay-failed window finds it.
    again, md = launch(
        defs,
        instance,
        "processed_events_replay_failed",
        {"hours": 1, "dry_run": True, "table": table, "exchange": rabbit["exchange"]},
    )
    assert again.success and md["selected_by_status"] == {"error": 2}  # with "err"


def test_dry_run_changes_nothing(location, table, rabbit, postgres_dsn):
    defs, instance = location
    insert(
        postgres_dsn,
        table,
        failed_events(5)
        + [{"type": "payment.initiated", "id": "done", "status": "processed", "at": now() - timedelta(hours=1)}],
    )
    before = rows(postgres_dsn, table)
    for job, config in [
        ("processed_events_replay_failed", {}),
        (
            "processed_events_replay_range",
            {
                "event_type": "contribution.submitted",
                "start": (now() - timedelta(days=1)).date().isoformat(),
                "end": now().date().isoformat(),
                "force": True,
            },
        ),
    ]:
        result, md = launch(
            defs, instance, job, {**config, "dry_run": True, "table": table, "exchange": rabbit["exchange"]}
        )
        assert result.success and md["status"] == "dry_run" and md["published"] == 0 and md["would_change"] == 5
        assert "changed" not in md  # a dry run changes nothing and does not say it did
        assert md["selected_by_status"] == {"error": 5}
        assert pe.audit_row(postgres_dsn, result.run_id) is None
    assert rows(postgres_dsn, table) == before and queue_depth(rabbit) == 0


def test_unroutable_messages_fail_the_run_and_leave_rows_unchanged(location, table, rabbit, postgres_dsn):
    defs, instance = location
    rabbit["channel"].queue_unbind(rabbit["queue"], rabbit["exchange"], "#")
    insert(postgres_dsn, table, failed_events(3))
    before = rows(postgres_dsn, table)
    result, _ = launch(
        defs,
        instance,
        "processed_events_replay_failed",
        {"table": table, "exchange": rabbit["exchange"], "reason": "r"},
    )
    assert not result.success and rows(postgres_dsn, table) == before
    audit = pe.audit_row(postgres_dsn, result.run_id)
    assert (audit["status"], audit["failed"], audit["published"]) == ("failed", 3, 0)


LONG_TYPE = "contribution." + "x" * 287  # 300 bytes: over AMQP's 255-byte short string (the routing key)


def dead_letters(dsn: str, run_id: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"SELECT event_id, reason, length(event_type) FROM {pe.DEAD_LETTER_TABLE} WHERE run_id = %s ORDER BY event_pk",
            (run_id,),
        ).fetchall()


def test_an_event_type_over_255_bytes_fails_its_row_alone_and_the_replay_goes_on(location, table, rabbit, postgres_dsn):
    """The 300-byte routing key used to raise ShortStringTooLong, taken for a lost connection: the
    run stopped there, and every re-run again. Now that row alone is refused, counted and
    dead-lettered; the rows after it (in its batch and the next ones) are published and consumed."""
    defs, instance = location
    insert(
        postgres_dsn,
        table,
        failed_events(2, prefix="before")
        + failed_events(1, prefix="long", event_type=LONG_TYPE)
        + failed_events(5, prefix="after"),
    )
    config = {"table": table, "exchange": rabbit["exchange"], "reason": "INC-9", "rate_limit": 0, "batch_size": 3}
    with Worker(rabbit["url"], postgres_dsn, table, rabbit["queue"]) as worker:
        result, _ = launch(defs, instance, "processed_events_replay_failed", config)
        seen = worker.wait_for(7)
    assert sorted(mid for _, mid, _, _ in seen) == sorted(
        [f"before-{i}" for i in range(2)] + [f"after-{i}" for i in range(5)]
    )
    assert not result.success, "a refused row makes the run fail, after it went on to the end"
    audit = pe.audit_row(postgres_dsn, result.run_id)
    assert (
        audit["status"],
        audit["selected"],
        audit["published"],
        audit["failed"],
        audit["refused"],
        audit["not_reached"],
    ) == ("failed", 8, 7, 1, 1, 0)
    assert audit["refused_by_reason"] == {"routing_key_too_long": 1}
    assert dead_letters(postgres_dsn, result.run_id) == [("long-0", "routing_key_too_long", len(LONG_TYPE))]
    after = statuses(postgres_dsn, table)
    assert after.pop("long-0") == "error" and set(after.values()) == {"processed"}, "the refused row is left as it was"

    # A re-run (the same window: the long row is still failed) does not stop at it either.
    insert(postgres_dsn, table, failed_events(3, prefix="later"))
    with Worker(rabbit["url"], postgres_dsn, table, rabbit["queue"]) as worker:
        again, _ = launch(defs, instance, "processed_events_replay_failed", config)
        assert sorted(mid for _, mid, _, _ in worker.wait_for(3)) == ["later-0", "later-1", "later-2"]
    audit = pe.audit_row(postgres_dsn, again.run_id)
    assert (audit["published"], audit["refused"], audit["failed"], audit["not_reached"]) == (3, 1, 1, 0)
    assert dead_letters(postgres_dsn, again.run_id) == [("long-0", "routing_key_too_long", len(LONG_TYPE))]


def test_a_payload_over_max_message_bytes_is_refused_alone(table, rabbit, postgres_dsn):
    from replay_defs.sinks.rabbitmq import RabbitMQSink

    insert(
        postgres_dsn,
        table,
        failed_events(2, prefix="small")
        + [
            {
                "type": "contribution.submitted",
                "id": "big",
                "status": "error",
                "at": now() - timedelta(hours=1),
                "payload": {"blob": "y" * 5000},
            }
        ]
        + failed_events(2, prefix="tail"),
    )
    ex = RabbitMQSink(rabbit["url"], rabbit["exchange"], max_message_bytes=4096)
    try:
        report = pe.replay(
            postgres_dsn,
            pe.EventSelection.failed(),
            f"big-{uuid.uuid4().hex}",
            table=table,
            exchange=ex,
            exchange_name=rabbit["exchange"],
            rate_limit=0,
            reason="size",
        )
    finally:
        ex.close()
    assert (report.status, report.published, report.refused, report.refused_by_reason) == (
        "failed",
        4,
        1,
        {"body_too_large": 1},
    )
    assert sorted(m for m, _ in drain(rabbit)) == ["small-0", "small-1", "tail-0", "tail-1"]
    assert statuses(postgres_dsn, table)["big"] == "error"
    assert [r[:2] for r in dead_letters(postgres_dsn, report.run_id)] == [("big", "body_too_large")]


def test_a_lost_connection_still_stops_the_replay(table, rabbit, postgres_dsn):
    """Only a message's own shape is survivable: a connection cut mid-replay stops the run, the
    confirmed rows are committed, the rest are not reached and left unchanged."""
    from replay_defs.sinks.rabbitmq import RabbitMQSink

    insert(postgres_dsn, table, failed_events(10))
    proxy = TcpProxy(rabbitmq_port()).start()
    ex = RabbitMQSink(f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", rabbit["exchange"])
    run_id = f"cut-{uuid.uuid4().hex}"

    def cut(_report) -> None:  # called after every publish (progress_every_s=0)
        if queue_depth(rabbit) >= 3:
            proxy.stop()

    try:
        with pytest.raises(ConnectionError, match="connection lost"):
            pe.replay(
                postgres_dsn,
                pe.EventSelection.failed(),
                run_id,
                table=table,
                exchange=ex,
                exchange_name=rabbit["exchange"],
                rate_limit=0,
                batch_size=100,
                reason="cut",
                progress=cut,
                progress_every_s=0,
            )
    finally:
        ex.close()
        proxy.stop()
    audit = pe.audit_row(postgres_dsn, run_id)
    assert audit["status"] == "failed" and audit["refused"] == 0 and audit["failed"] == 1
    assert 0 < audit["published"] < 10 and audit["not_reached"] == 10 - audit["published"] - 1
    assert sum(s == "pending" for s in statuses(postgres_dsn, table).values()) == audit["published"]
    assert dead_letters(postgres_dsn, run_id) == [], (
        "a connection loss is no dead letter: the row is simply retried next time"
    )


def test_concurrent_replays_serve_each_event_once(table, rabbit, postgres_dsn):
    """Two replays of the same window at once: SKIP LOCKED hands each row to one of them."""
    insert(postgres_dsn, table, failed_events(60))
    from replay_defs.sinks.rabbitmq import RabbitMQSink

    reports = {}

    def run(name: str) -> None:
        ex = RabbitMQSink(rabbit["url"], rabbit["exchange"])
        try:
            reports[name] = pe.replay(
                postgres_dsn,
                pe.EventSelection.failed(),
                f"{name}-{uuid.uuid4().hex}",
                table=table,
                exchange=ex,
                exchange_name=rabbit["exchange"],
                batch_size=5,
                rate_limit=60,
                reason="race",
            )
        finally:
            ex.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert reports["a"].published + reports["b"].published == 60 and min(r.published for r in reports.values()) > 0
    ids = []
    while (m := rabbit["channel"].basic_get(rabbit["queue"], auto_ack=True))[0] is not None:
        ids.append(m[1].message_id)
    assert sorted(ids) == sorted(f"evt-{i}" for i in range(60))
    assert set(statuses(postgres_dsn, table).values()) == {"pending"}


LAUNCH = """
mutation($p: ExecutionParams!) {
  launchRun(executionParams: $p) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
TERMINATE = "mutation($id: String!) { terminateRun(runId: $id) { __typename ... on TerminateRunFailure { message } ... on PythonError { message } } }"
RUN = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"


def test_emergency_stop_by_terminating_the_run_in_dagster_dev(tmp_path, table, rabbit, postgres_dsn, monkeypatch):
    """Launch a replay of 200 failed events at 20/s from the webserver, terminate it after a few
    published: publishing stops within seconds, the published rows (and only they) are pending,
    exactly as many messages are in the queue, and the audit row says so."""
    insert(postgres_dsn, table, failed_events(200))
    home = tmp_path / "home"
    home.mkdir()
    # dagster dev's queued runs, dequeued every second (default 5) to keep the test short.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nrun_queue:\n  dequeue_interval_seconds: 1\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("EVENT_REPLAY_POSTGRES_URL", postgres_dsn)
    monkeypatch.setenv("EVENT_REPLAY_RABBITMQ_URL", rabbit["url"])
    log = tmp_path / "dagster-dev.log"
    with dagster_dev(log, graceful=False) as base:  # everything is read from the webserver before it goes
        config = {
            "table": table,
            "exchange": rabbit["exchange"],
            "rate_limit": 20,
            "batch_size": 50,
            "reason": "stop drill",
        }
        params = {
            "selector": {
                "repositoryLocationName": "event-replay",
                "repositoryName": "__repository__",
                "jobName": "processed_events_replay_failed",
            },
            "runConfigData": {"ops": {"replay_failed_events": {"config": config}}},
            "executionMetadata": {"tags": [{"key": "event_replay/requested_by", "value": "oncall"}]},
        }
        launched = graphql(base, LAUNCH, {"p": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        deadline = time.time() + 60
        while queue_depth(rabbit) < 10:
            assert time.time() < deadline, "the replay never started publishing: " + log.read_text()[-3000:]
            time.sleep(0.1)
        stopped_at = time.time()
        assert graphql(base, TERMINATE, {"id": run_id})["terminateRun"]["__typename"] == "TerminateRunSuccess"
        while graphql(base, RUN, {"id": run_id})["runOrError"]["status"] not in ("CANCELED", "FAILURE", "SUCCESS"):
            assert time.time() - stopped_at < 30, "the run did not stop"
            time.sleep(0.2)
        assert graphql(base, RUN, {"id": run_id})["runOrError"]["status"] == "CANCELED"
        assert time.time() - stopped_at < 10
        depth = queue_depth(rabbit)
        time.sleep(0.5)  # 10 publishes at 20/s
        assert queue_depth(rabbit) == depth, "publishing went on after the stop"
    audit = pe.audit_row(postgres_dsn, run_id)
    assert audit["status"] == "stopped" and audit["requested_by"] == "oncall"
    assert audit["published"] == depth < 200, (audit, depth)
    st = statuses(postgres_dsn, table)
    assert sum(s == "pending" for s in st.values()) == depth and sum(s == "error" for s in st.values()) == 200 - depth
    assert audit["not_reached"] == 200 - depth
    with psycopg.connect(
        postgres_dsn
    ) as conn:  # the snapshot holds exactly the changed rows: undo puts back just those
        snapped = {
            r[0] for r in conn.execute("SELECT event_id FROM event_replay_snapshot WHERE run_id = %s", (run_id,))
        }
    assert snapped == {k for k, s in st.items() if s == "pending"}
    published = set()
    while (m := rabbit["channel"].basic_get(rabbit["queue"], auto_ack=True))[0] is not None:
        published.add(m[1].message_id)
    assert published == {k for k, s in st.items() if s == "pending"}


def test_cli_replays_one_event(tmp_path, table, rabbit, postgres_dsn, monkeypatch, capsys, fresh_definitions):
    """`event-replay processed-events ...` (its `main`, in this process: the entry point's import
    time is not worth a subprocess here), on the instance in $DAGSTER_HOME."""
    from replay_defs.cli import main

    insert(postgres_dsn, table, failed_events(2))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVENT_REPLAY_POSTGRES_URL", postgres_dsn)
    monkeypatch.setenv("EVENT_REPLAY_RABBITMQ_URL", rabbit["url"])
    cli = ["processed-events", "replay-one", "evt-1", "--table", table, "--exchange", rabbit["exchange"]]
    with pytest.raises(SystemExit) as refused:  # no reason given
        main(cli)
    assert refused.value.code == 1 and "needs a reason" in capsys.readouterr().err
    assert queue_depth(rabbit) == 0 and statuses(postgres_dsn, table) == {"evt-0": "error", "evt-1": "error"}
    main([*cli, "--reason", "INC-7", "--requested-by", "bob"])
    out = capsys.readouterr().out
    assert "SUCCESS" in out and "published=1 " in out and "undo: event-replay processed-events undo" in out
    assert statuses(postgres_dsn, table) == {"evt-0": "error", "evt-1": "pending"} and queue_depth(rabbit) == 1
    run_id = out.split("run_id ")[1].split(":")[0]
    assert pe.audit_row(postgres_dsn, run_id)["requested_by"] == "bob"
    assert dg.DagsterInstance.get().get_run_by_id(run_id).job_name == "processed_events_replay_one"
    with pytest.raises(SystemExit) as helped:
        main(["processed-events", "replay-failed", "--help"])
    assert helped.value.code == 0 and "--since" in capsys.readouterr().out
