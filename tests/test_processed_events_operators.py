"""What the runbook's operators do around a processed-events replay, against the real PostgreSQL
and RabbitMQ: select the events of one entity by a payload field (the seed's
`payload->>'contribution_id'`), watch the consumers' queue depth before and after, and purge a bad
replay's messages from the queue before the consumers drain them (then undo it). Messages are
counted by an independent pika consumer, not by our audit."""

# ruff: noqa: F811 - the fixtures imported from test_processed_events are test arguments here

import uuid
from datetime import timedelta

import pika
import pytest
from test_processed_events import (  # fixtures and helpers only (no test functions: pytest would collect them twice)
    insert,
    launch,
    location,  # noqa: F401 - fixture
    now,
    queue_depth,
    rabbit,  # noqa: F401 - fixture
    rabbit_url,  # noqa: F401 - fixture
    statuses,
    table,  # noqa: F401 - fixture
)

from replay_defs.processed_events import engine as pe

A = "123e4567-e89b-12d3-a456-426614174000"
INJECTION = "x' OR 'x'='x"


def contribution_events() -> list[dict]:
    at = now() - timedelta(hours=1)
    return [
        {"type": "contribution.submitted", "id": "a-err", "status": "error", "at": at, "payload": {"contribution_id": A, "type": "labor"}},
        {"type": "contribution.approved", "id": "a-err2", "status": "error", "at": at, "payload": {"contribution_id": A, "type": "capital"}},
        {"type": "contribution.submitted", "id": "a-done", "status": "processed", "at": at, "payload": {"contribution_id": A, "type": "labor"}},
        {"type": "contribution.submitted", "id": "b-err", "status": "error", "at": at, "payload": {"contribution_id": "b", "type": "labor"}},
        {"type": "contribution.submitted", "id": "quote", "status": "error", "at": at, "payload": {"contribution_id": INJECTION}},
    ]  # fmt: skip


def take_all(url: str, queue: str) -> list[tuple[str, bool, dict]]:
    """Every ready message (message id, redelivered, headers), in queue order, by an independent
    pika consumer on its own connection (acked: the queue is empty afterwards)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        got = []
        while (m := ch.basic_get(queue, auto_ack=True))[0] is not None:
            method, props, _ = m
            got.append((props.message_id, method.redelivered, props.headers or {}))
        return got
    finally:
        conn.close()


def publish_live(rabbit, message_id: str) -> None:
    """A message the service itself published (no replay headers), straight to the queue, confirmed
    (so the queue holds it when this returns)."""
    ch = rabbit["channel"].connection.channel()
    ch.confirm_delivery()
    ch.basic_publish("", rabbit["queue"], b"{}", pika.BasicProperties(message_id=message_id), mandatory=True)
    ch.close()


def failure_message(result) -> str:
    """The step's error and its causes (Dagster wraps an op's exception in its own)."""
    messages = []
    for event in result.all_events:
        error = event.step_failure_data.error if event.event_type_value == "STEP_FAILURE" else None
        while error is not None:
            messages.append(error.message)
            error = error.cause
    return " ".join(messages)


def run_log(instance, run_id: str) -> str:
    return "\n".join(e.user_message for e in instance.all_logs(run_id))


# ---- selection by a payload field --------------------------------------------------------------


def test_payload_fields_select_one_contributions_events_and_are_anded(location, table, rabbit, postgres_dsn):
    defs, instance = location
    insert(postgres_dsn, table, contribution_events())
    common = {"table": table, "exchange": rabbit["exchange"], "reason": "INC-9 contribution A"}
    # replay-failed narrowed by two fields, AND-ed: only A's failed capital event
    result, md = launch(
        defs,
        instance,
        "processed_events_replay_failed",
        {**common, "payload": {"contribution_id": A, "type": "capital"}},
    )
    assert (
        result.success
        and md["published"] == 1
        and md["selection"]["payload"] == {"contribution_id": A, "type": "capital"}
    )
    assert [m[0] for m in take_all(rabbit["url"], rabbit["queue"])] == ["a-err2"]
    assert pe.audit_row(postgres_dsn, result.run_id)["selection"]["payload"] == {
        "contribution_id": A,
        "type": "capital",
    }

    # its own selection, dry run first: the plan shows what the seed's query would list for A
    result, md = launch(
        defs,
        instance,
        "processed_events_replay_payload",
        {**common, "payload": {"contribution_id": A}, "dry_run": True},
    )
    assert result.success and md["status"] == "dry_run"
    assert md["selection"] == {"kind": "payload", "payload": {"contribution_id": A}}
    assert md["selected"] == 3 and md["selected_by_status"] == {"error": 1, "pending": 1, "processed": 1}
    assert md["would_change"] == 1 and "changed" not in md and queue_depth(rabbit) == 0
    result, md = launch(
        defs, instance, "processed_events_replay_payload", {**common, "payload": {"contribution_id": A}}
    )
    assert result.success and (md["published"], md["skipped_pending"], md["skipped_processed"]) == (1, 1, 1)
    assert [m[0] for m in take_all(rabbit["url"], rabbit["queue"])] == ["a-err"]
    assert statuses(postgres_dsn, table) == {
        "a-err": "pending", "a-err2": "pending", "a-done": "processed", "b-err": "error", "quote": "error"
    }  # fmt: skip
    assert pe.audit_row(postgres_dsn, result.run_id)["selection"] == {
        "kind": "payload",
        "payload": {"contribution_id": A},
    }


def test_payload_values_are_parameters_and_field_names_are_checked(location, table, rabbit, postgres_dsn):
    defs, instance = location
    insert(postgres_dsn, table, contribution_events())
    common = {"table": table, "exchange": rabbit["exchange"], "dry_run": True}
    # a value that would widen the query if it were pasted into the SQL matches only its own row
    result, md = launch(
        defs, instance, "processed_events_replay_payload", {**common, "payload": {"contribution_id": INJECTION}}
    )
    assert result.success and md["selected"] == 1
    for payload, error in [
        ({"contribution_id') OR true --": "x"}, "is not a payload field name"),
        ({}, "needs at least one field=value"),
    ]:
        result, _ = launch(defs, instance, "processed_events_replay_payload", {**common, "payload": payload})
        assert not result.success and error in failure_message(result)
    result, _ = launch(
        defs,
        instance,
        "processed_events_replay_range",
        {**common, "event_type": "x", "start": "2025-01-01", "end": "2025-01-02", "payload": {"a b": "1"}},
    )
    assert not result.success and "is not a payload field name" in failure_message(result)


# ---- queue depth ------------------------------------------------------------------------------


def failed(n: int, prefix: str, event_type: str = "contribution.submitted") -> list[dict]:
    at = now() - timedelta(hours=1)
    return [{"type": event_type, "id": f"{prefix}-{i}", "status": "error", "retries": 1, "at": at} for i in range(n)]


def test_watched_queue_depth_before_and_after_is_in_metadata_log_and_audit(location, table, rabbit, postgres_dsn):
    defs, instance = location
    insert(postgres_dsn, table, failed(3, "evt"))
    publish_live(rabbit, "live-1")
    publish_live(rabbit, "live-2")
    config = {"table": table, "exchange": rabbit["exchange"], "reason": "r", "watch_queues": [rabbit["queue"]]}
    result, md = launch(defs, instance, "processed_events_replay_failed", config)
    q = rabbit["queue"]
    assert result.success and md["published"] == 3
    assert (md["queue_depth_before"], md["queue_depth_after"]) == ({q: 2}, {q: 5})
    audit = pe.audit_row(postgres_dsn, result.run_id)
    assert (audit["queue_depth_before"], audit["queue_depth_after"]) == ({q: 2}, {q: 5})
    assert f"queue depth before: {{'{q}': 2}}, after: {{'{q}': 5}}" in run_log(instance, result.run_id)
    assert queue_depth(rabbit) == 5  # the independent count agrees


def test_a_missing_watched_queue_fails_before_anything_is_published(location, table, rabbit, postgres_dsn):
    defs, instance = location
    insert(postgres_dsn, table, failed(3, "evt"))
    missing = f"no-such-queue-{uuid.uuid4().hex[:6]}"
    config = {"table": table, "exchange": rabbit["exchange"], "reason": "r", "watch_queues": [rabbit["queue"], missing]}
    result, _ = launch(defs, instance, "processed_events_replay_failed", config)
    assert not result.success and f"RabbitMQ has no queue '{missing}'" in failure_message(result)
    assert queue_depth(rabbit) == 0 and set(statuses(postgres_dsn, table).values()) == {"error"}
    assert pe.audit_row(postgres_dsn, result.run_id) is None


# ---- purge ------------------------------------------------------------------------------------


def test_purge_takes_only_the_replays_messages_and_then_undo_restores_the_table(location, table, rabbit, postgres_dsn):
    """The runbook: a bad replay (run 1) is purged from the queue, then undone. A message of
    another replay (run 2) and the service's own messages survive, in their order, redelivered."""
    defs, instance = location
    insert(postgres_dsn, table, failed(3, "bad", "allocation.calculated") + failed(2, "good", "payment.initiated"))
    common = {"table": table, "exchange": rabbit["exchange"], "reason": "r"}
    range_ = {"start": (now() - timedelta(days=1)).date().isoformat(), "end": now().date().isoformat()}
    publish_live(rabbit, "live-1")
    bad, _ = launch(
        defs, instance, "processed_events_replay_range", {**common, **range_, "event_type": "allocation.calculated"}
    )
    publish_live(rabbit, "live-2")
    good, _ = launch(
        defs, instance, "processed_events_replay_range", {**common, **range_, "event_type": "payment.initiated"}
    )
    publish_live(rabbit, "live-3")
    assert bad.success and good.success and queue_depth(rabbit) == 8
    purge = {"replay_run_id": bad.run_id, "queue": rabbit["queue"], "reason": "bad handler"}

    refused, _ = launch(defs, instance, "processed_events_purge", purge)  # no confirmation
    assert not refused.success and f"confirm: {bad.run_id}" in failure_message(refused) and queue_depth(rabbit) == 8
    wrong, _ = launch(defs, instance, "processed_events_purge", {**purge, "confirm": good.run_id})
    assert not wrong.success and queue_depth(rabbit) == 8

    result, md = launch(defs, instance, "processed_events_purge", {**purge, "confirm": bad.run_id})
    q = rabbit["queue"]
    assert result.success and (md["purged"], md["kept"]) == (3, 5)
    assert (md["queue_depth_before"], md["queue_depth_after"]) == ({q: 8}, {q: 5})
    audit = pe.audit_row(postgres_dsn, result.run_id)
    assert (audit["action"], audit["status"], audit["purged"], audit["kept"]) == ("purge", "succeeded", 3, 5)
    assert audit["selection"] == {"purge_of": bad.run_id, "queue": q} and audit["reason"] == "bad handler"

    left = take_all(rabbit["url"], q)
    assert [m[0] for m in left] == ["live-1", "live-2", "good-0", "good-1", "live-3"]  # order kept
    assert all(redelivered for _, redelivered, _ in left)  # nack-requeue marks them redelivered
    assert {h.get("replay_run_id") for _, _, h in left} == {None, good.run_id}

    # the table still says the bad replay's rows are pending: undo puts them back
    assert {k: v for k, v in statuses(postgres_dsn, table).items() if k.startswith("bad")} == dict.fromkeys(
        ["bad-0", "bad-1", "bad-2"], "pending"
    )
    undo, _ = launch(
        defs, instance, "processed_events_undo", {"replay_run_id": bad.run_id, "table": table, "reason": "r"}
    )
    assert undo.success
    assert statuses(postgres_dsn, table) == {
        **dict.fromkeys(["bad-0", "bad-1", "bad-2"], "error"),
        "good-0": "pending",
        "good-1": "pending",
    }


def test_purge_refuses_an_unknown_replay_or_a_missing_queue(location, table, rabbit, postgres_dsn):
    defs, instance = location
    publish_live(rabbit, "live-1")
    unknown = f"run-{uuid.uuid4().hex[:6]}"
    result, _ = launch(
        defs,
        instance,
        "processed_events_purge",
        {"replay_run_id": unknown, "queue": rabbit["queue"], "confirm": unknown, "reason": "r"},
    )
    assert not result.success and f"no replay '{unknown}'" in failure_message(result)
    insert(postgres_dsn, table, failed(1, "evt"))
    replay, _ = launch(
        defs,
        instance,
        "processed_events_replay_one",
        {"event_id": "evt-0", "table": table, "exchange": rabbit["exchange"], "reason": "r"},
    )
    result, _ = launch(
        defs,
        instance,
        "processed_events_purge",
        {"replay_run_id": replay.run_id, "queue": "no-such-queue-x", "confirm": replay.run_id, "reason": "r"},
    )
    assert not result.success and "RabbitMQ has no queue 'no-such-queue-x'" in failure_message(result)
    assert queue_depth(rabbit) == 2


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_payload_watch_queue_and_purge(
    tmp_path, table, rabbit, postgres_dsn, monkeypatch, capsys, fresh_definitions
):
    from replay_defs.cli import main

    insert(postgres_dsn, table, contribution_events())
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVENT_REPLAY_POSTGRES_URL", postgres_dsn)
    monkeypatch.setenv("EVENT_REPLAY_RABBITMQ_URL", rabbit["url"])
    q = rabbit["queue"]
    base = ["--table", table, "--exchange", rabbit["exchange"]]
    with pytest.raises(SystemExit) as bad:
        main(["processed-events", "replay-payload", "--payload", "contribution_id", *base, "--dry-run"])
    assert bad.value.code == 2 and "expected FIELD=VALUE" in capsys.readouterr().err

    main(
        [
            "processed-events",
            "replay-payload",
            "--payload",
            f"contribution_id={A}",
            *base,
            "--dry-run",
            "--watch-queue",
            q,
        ]
    )
    out = capsys.readouterr().out
    assert f'"payload": {{"contribution_id": "{A}"}}' in out and "selected=3 " in out
    assert f'queue depth before={{"{q}": 0}}' in out and queue_depth(rabbit) == 0

    cli = ["processed-events", "replay-failed", "--payload", f"contribution_id={A}", "--payload", "type=labor", *base]
    main([*cli, "--watch-queue", q, "--reason", "INC-9"])
    out = capsys.readouterr().out
    assert "published=1 " in out and f'queue depth before={{"{q}": 0}} after={{"{q}": 1}}' in out
    run_id = out.split("run_id ")[1].split(":")[0]

    with pytest.raises(SystemExit) as refused:
        main(["processed-events", "purge", run_id, "--queue", q, "--reason", "bad"])
    assert refused.value.code == 1 and "add --yes" in capsys.readouterr().err and queue_depth(rabbit) == 1
    main(["processed-events", "purge", run_id, "--queue", q, "--reason", "bad", "--yes"])
    out = capsys.readouterr().out
    assert "purged=1 kept=0" in out and queue_depth(rabbit) == 0
    with pytest.raises(SystemExit) as helped:
        main(["processed-events", "purge", "--help"])
    assert helped.value.code == 0 and "terminate the run" in capsys.readouterr().out.replace("\n", " ")
