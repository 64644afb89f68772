"""Billing reprocessing as operators run it: the output topic from configuration or per launch,
seed 002's alert thresholds as per-day checks, and a launch queued for the daemon.

Real chDB, a real Kafka-protocol broker (Tansu) read back with assign() (never the ledger), a real
Dagster instance, and for the queued launch a real `dagster dev` (webserver + daemon).
"""

import dataclasses
import json
import sys
import time

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_billing
import warm_process
from conftest import PROJECT_ROOT
from services import Tansu, dagster_dev
from test_billing import DAY1, DAY2, NAME, ROWS, _run, _verify

from replay_defs.core.lake import Lake
from replay_defs.core.naming import REDRIVE, owner
from replay_defs.pipeline.committed import committed_quarantine, parsed_state
from replay_defs.pipeline.spec import RateThresholds
from replay_defs.pipeline.store import DuckDBStore

billing, broker = test_billing.billing, test_billing.broker  # its fixtures: raw_events in chDB, a broker
RAW = {"tenant": "acme", "environment": "prod"}
SUCCESS, TRANSFORM, PUBLISH = (
    "success_rate_within_threshold",
    "transformation_error_rate_within_threshold",
    "publish_failure_rate_within_threshold",
)


def _evaluations(result) -> dict[tuple[str, str], tuple[bool, dict, str]]:
    return {
        (e.check_name, e.partition): (e.passed, {k: v.value for k, v in e.metadata.items()}, e.description)
        for e in result.get_asset_check_evaluations()
        if e.partition is not None
    }


def _ids(broker, topic: str) -> list[str]:
    """The event ids on a topic, read by an independent consumer (assign(), from offset 0)."""
    return sorted(json.loads(m.value())["event_id"] for m in broker.read_all(topic, idle_s=1.0))


# ---- the alert thresholds --------------------------------------------------------------------------


def test_a_day_over_the_success_and_transformation_thresholds_fails_its_checks_without_blocking(billing, broker):
    """DAY1: 15 rows found, 5 dropped by rules, 2 not transformable, 8 sent: success 53.3% < 90%,
    transformation errors 13.3% > 5%. DAY2: 3 found, 3 sent: under every threshold. Non-blocking:
    the run succeeds and DAY1's valid events are sent all the same."""
    spec, topic = billing["spec"], billing["topic"]
    with dg.instance_for_test(temp_dir=str(billing["home"])) as instance:
        result = _run(spec, instance, DAY1, DAY2, raw=RAW)
        assert result.success, "the rate checks do not block"
        ev = _evaluations(result)
        passed, md, description = ev[(SUCCESS, DAY1)]
        assert not passed and md["rate_percent"] == round(100 * 8 / 15, 4) and md["threshold_percent"] == 90.0
        assert md["delivered_in_ledger"] == 8 and "under the threshold 90%" in description
        passed, md, description = ev[(TRANSFORM, DAY1)]
        assert not passed and md["rate_percent"] == round(100 * 2 / 15, 4) and md["threshold_percent"] == 5.0
        assert md["transformation_errors"] == 2 and "over the threshold 5%" in description
        passed, md, _ = ev[(PUBLISH, DAY1)]
        assert passed and md["rate_percent"] == 0.0 and md["threshold_percent"] == 1.0
        for check in (SUCCESS, TRANSFORM, PUBLISH):
            assert ev[(check, DAY2)][0], (check, ev[(check, DAY2)])
        assert ev[(SUCCESS, DAY2)][1]["rate_percent"] == 100.0
        assert _ids(broker, topic) == ["e01", "e02", "e03", "e04", "e05", "e06", "e07", "e15", "e20", "e21", "e22"]

        # The thresholds are the spec's: a spec that tolerates more passes the same day.
        lenient = dataclasses.replace(
            spec, rate_thresholds=RateThresholds(min_success_rate=50, max_transformation_error_rate=15)
        )
        verdicts = _verify(lenient, instance, DAY1)
        assert verdicts[SUCCESS][0] and verdicts[TRANSFORM][0], verdicts

        # The quarantine behind the run's back: its transformation errors relabelled as a rule's
        # drops. The count from the files no longer equals what the run recorded.
        lake = Lake(billing["lake"])
        for rel in committed_quarantine(parsed_state(lake, spec, DAY1), spec):
            path = lake.storage.path(rel)
            rows = pq.read_table(path)
            rule = spec.mapping.rules[0].name
            pq.write_table(
                rows.set_column(rows.schema.get_field_index("reason"), "reason", pa.array([rule] * len(rows))), path
            )
        passed, description = _verify(lenient, instance, DAY1)[TRANSFORM]
        assert not passed and "the files/ledger hold 0, the pipeline recorded 2" in description

        # The ledger behind the run's back: one delivered row of DAY2 lost. The count from the
        # ledger no longer equals what the run recorded, and the rate drops under the threshold.
        DuckDBStore(billing["lake"].parent / "state.duckdb").query(
            "DELETE FROM redrive_ids WHERE message_id = 'e20' "
            "AND scope IN (SELECT scope FROM redrive_scopes WHERE pipeline = $p)",
            {"p": NAME},
        )
        passed, description = _verify(spec, instance, DAY2)[SUCCESS]
        assert not passed and "the files/ledger hold 2, the pipeline recorded 3" in description
        assert "66.6667% is under the threshold 90%" in description


def test_a_stopped_broker_pushes_the_publish_failure_rate_over_its_threshold(billing, monkeypatch):
    """Every message of DAY2 refused (the broker is down): 3 of 3 rows, 100% > 1%. The run fails
    (found_accounted_for blocks on any publish failure); the rate check says by how much."""
    stopped = Tansu().start()
    stopped.stop()
    monkeypatch.setenv("EVENT_REPLAY_KAFKA_BOOTSTRAP", stopped.bootstrap)
    spec, lake = billing["spec"], Lake(billing["lake"])
    with dg.instance_for_test(temp_dir=str(billing["home"])) as instance:
        result = _run(spec, instance, DAY2, DAY2, raw=RAW, redrive={"retries": 0})
        assert not result.success
        ev = _evaluations(result)
        passed, md, description = ev[(PUBLISH, DAY2)]
        assert not passed and md["rate_percent"] == 100.0 and md["threshold_percent"] == 1.0
        assert md["publish_failures"] == 3 and "over the threshold 1%" in description
        assert not ev[(SUCCESS, DAY2)][0] and ev[(SUCCESS, DAY2)][1]["rate_percent"] == 0.0
        assert ev[(TRANSFORM, DAY2)][0]

        # The dead-letter file the check counts, removed behind its back: the counts disagree.
        (dead,) = (billing["lake"] / "_replay").rglob(f"dead_letter/day={DAY2}/*.jsonl")
        assert len(dead.read_text().splitlines()) == 3
        dead.unlink()
        passed, description = _verify(spec, instance, DAY2)[PUBLISH]
        assert not passed and "the files/ledger hold 0, the pipeline recorded 3" in description
        assert lake.read_json(owner(spec, REDRIVE), f"last/day={DAY2}.json")["failed"] == 3


def test_thresholds_must_be_percentages():
    with pytest.raises(ValueError, match="min_success_rate 120 must be a percentage"):
        RateThresholds(min_success_rate=120)


# ---- the output topic ------------------------------------------------------------------------------


def test_output_topic_from_the_environment_and_per_launch(billing, broker, monkeypatch, capsys, fresh_definitions):
    """The seed's `output_topic` setting is EVENT_REPLAY_SINK__BILLING_REPROCESSING=kafka:<topic>;
    `--topic` picks another for one launch, and the ledger, kept per topic, does not skip what went
    to the first one."""
    from replay_defs import cli

    configured, other = "billing-configured", "billing-other"
    for t in (configured, other, "prod_events_v4"):
        broker.create_topic(t)
    monkeypatch.setenv("EVENT_REPLAY_SINK__BILLING_REPROCESSING", f"kafka:{configured}")

    def reprocess(*extra, code=0):
        argv = ["billing", "reprocess", "--start", DAY1, "--end", DAY1, "--tenant", "acme", "--environment", "prod"]
        if code:
            with pytest.raises(SystemExit) as exc:
                cli.main([*argv, *extra])
            assert exc.value.code == code
        else:
            cli.main([*argv, *extra])
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    cust_a = ["e01", "e02", "e03", "e04", "e05", "e06", "e07"]  # DAY1's rows of cust-a: all valid
    out = reprocess("--customer", "cust-a")
    assert out["sink"] == f"kafka:{configured}" and out["status"] == "SUCCESS" and out["failed_checks"] == []
    assert out["published"] == 7 and out["found"] == 7
    assert _ids(broker, configured) == cust_a and _ids(broker, "prod_events_v4") == []

    out = reprocess("--customer", "cust-a", "--topic", other)
    assert out["sink"] == f"kafka:{other}" and out["status"] == "SUCCESS" and out["failed_checks"] == []
    assert out["published"] == 7 and out["skipped_already_delivered"] == 0, "not skipped: it went to another topic"
    assert _ids(broker, other) == cust_a and _ids(broker, configured) == cust_a

    out = reprocess("--customer", "cust-a", "--topic", other)
    assert out["published"] == 0 and out["skipped_already_delivered"] == 7 and out["failed_checks"] == []
    assert _ids(broker, other) == cust_a

    # The whole tenant: e15 is new to the topic; the day is under seed 002's thresholds, so the
    # command exits 1 and names the checks with their rates (the run itself succeeded).
    out = reprocess("--topic", other, code=1)
    assert out["status"] == "SUCCESS" and out["published"] == 1 and out["skipped_already_delivered"] == 7
    alerts = {a["check"]: a for a in out["failed_checks"]}
    assert set(alerts) == {SUCCESS, TRANSFORM}
    assert alerts[SUCCESS]["rate_percent"] == round(100 * 8 / 15, 4) and alerts[SUCCESS]["threshold_percent"] == 90.0
    assert _ids(broker, other) == [*cust_a, "e15"] and _ids(broker, configured) == cust_a

    with pytest.raises(SystemExit, match="not a valid Kafka topic name"):
        cli.main(
            ["billing", "reprocess", "--start", DAY1, "--tenant", "acme", "--environment", "prod", "--topic", "a b"]
        )


def test_a_destination_keeps_the_sinks_options_and_is_refused_where_there_is_none():
    from replay_defs.sinks.base import with_destination
    from replay_defs.sinks.kafka import KafkaSinkSpec
    from replay_defs.sinks.outbox import OutboxSinkSpec
    from replay_defs.sinks.rabbitmq import RabbitMQSinkSpec

    moved = with_destination(RabbitMQSinkSpec("events", routing_key="replay.{type}"), "events-2")
    assert moved == RabbitMQSinkSpec("events-2", routing_key="replay.{type}") and moved.name == "rabbitmq:events-2"
    with pytest.raises(ValueError, match="the outbox sink takes no destination"):
        with_destination(OutboxSinkSpec(), "elsewhere")
    with pytest.raises(ValueError, match="not a valid Kafka topic name"):
        with_destination(KafkaSinkSpec("prod_events_v4"), "a b")


# ---- a launch queued for the daemon ------------------------------------------------------------------

INSERT_ROWS = """
import json, sys
from datetime import datetime
import pyarrow as pa
from replay_defs.core.clickhouse import ClickHouse
from replay_defs.pipelines import BILLING_RAW_EVENTS_DDL
rows = json.load(sys.stdin)
types = {"timestamp": pa.timestamp("ms", tz="UTC"), "version": pa.uint64()}
cols = {c: [datetime.fromisoformat(r[c]) if c == "timestamp" else r[c] for r in rows] for c in rows[0]}
with ClickHouse(data_path=sys.argv[1], database="default") as ch:
    ch.command(BILLING_RAW_EVENTS_DDL)
    ch.insert("raw_events", pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in cols.items()}))
"""


def test_submit_returns_at_once_and_the_daemon_runs_it(tmp_path, broker, monkeypatch, capsys):
    """`billing reprocess --submit` prints the run id while the run is still queued; the daemon of
    a real `dagster dev` launches it in a process of its own (which then holds the chDB directory:
    this test process never opens it); `billing status --wait` follows it to its totals."""
    from replay_defs import cli

    chdb = tmp_path / "chdb"
    rows = [{**r, "timestamp": r["timestamp"].isoformat()} for r in ROWS]
    warm_process.run(
        [sys.executable, "-c", INSERT_ROWS, str(chdb)], input=json.dumps(rows), text=True, cwd=PROJECT_ROOT, check=True
    )
    topic = "billing-submitted"
    broker.create_topic(topic)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # the default run queue
    for k, v in {
        "DAGSTER_HOME": home,
        "EVENT_REPLAY_LAKE": tmp_path / "lake",
        "EVENT_REPLAY_DUCKDB": tmp_path / "state.duckdb",
        "EVENT_REPLAY_CHDB": chdb,
        "CLICKHOUSE_DATABASE": "default",
        "EVENT_REPLAY_KAFKA_BOOTSTRAP": broker.bootstrap,
        "EVENT_REPLAY_SINK__BILLING_REPROCESSING": f"kafka:{topic}",
    }.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("CLICKHOUSE_URL", raising=False)

    with dagster_dev(tmp_path / "dagster-dev.log"):
        t0 = time.monotonic()
        cli.main(
            [
                "billing",
                "reprocess",
                "--submit",
                "--start",
                DAY1,
                "--end",
                DAY2,
                "--tenant",
                "acme",
                "--environment",
                "prod",
                "--customer",
                "cust-a",
            ]
        )
        submitted_s = time.monotonic() - t0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["status"] == "QUEUED" and out["sink"] == f"kafka:{topic}", out
        with capsys.disabled():
            print(f"\n--submit returned in {submitted_s:.1f} s")

        cli.main(["billing", "status", out["run_id"], "--wait", "--timeout", "600"])
        done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["run_id"] == out["run_id"] and done["status"] == "SUCCESS", done
    # cust-a: e01..e07 on DAY1, e20 and e21 on DAY2, all valid.
    assert done["found"] == 9 and done["published"] == 9 and done["failed_checks"] == []
    assert done["partitions"] == [DAY1, DAY2] and done["sink"] == f"kafka:{topic}"
    assert _ids(broker, topic) == ["e01", "e02", "e03", "e04", "e05", "e06", "e07", "e20", "e21"]
    with dg.DagsterInstance.get() as instance:
        kinds = {e.dagster_event_type for e in instance.all_logs(out["run_id"]) if e.dagster_event_type}
    assert {dg.DagsterEventType.RUN_ENQUEUED, dg.DagsterEventType.RUN_STARTING} <= kinds, "queued, then launched"
