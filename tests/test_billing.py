"""Billing reprocessing: ClickHouse raw_events -> mapping with named rules -> Kafka.

Real chDB (the embedded default), the clickhouse-connect path against tests/clickhouse_http.py,
a real Dagster instance, and a real Kafka-protocol broker (Tansu) read back message by message.
"""

import dataclasses
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RANGE_TAGS, check_verdicts
from services import Tansu

from replay_defs.clickhouse_table.parsing import KeysetReader, TableSelection
from replay_defs.core.clickhouse import ClickHouse
from replay_defs.core.lake import Lake
from replay_defs.pipeline.committed import committed_parquet, committed_quarantine, parsed_state
from replay_defs.pipelines import BILLING, BILLING_RAW_EVENTS_DDL
from replay_defs.sinks.kafka import KafkaSinkSpec

DAY1, DAY2 = "2024-03-04", "2024-03-05"
NAME = BILLING.name


def ts(day: str, hh: int, mm: int = 0, ss: int = 0, ms: int = 0) -> datetime:
    return datetime.fromisoformat(f"{day}T{hh:02}:{mm:02}:{ss:02}").replace(tzinfo=timezone.utc, microsecond=ms * 1000)


def payload(n: int, drop: tuple[str, ...] = (), **extra) -> str:
    p = {
        "id": f"req-{n}",
        "orgId": "org-1",
        "methodName": "chat.completions",
        "providerName": "openai",
        "createdAt": "2024-03-04T10:00:00Z",
        "data": {"modelName": "gpt-4o", "usage": {"inputTokens": n, "outputTokens": 2}},
    }
    p.update(extra)
    for key in drop:
        if key == "data.modelName":
            del p["data"]["modelName"]
        else:
            p.pop(key)
    return json.dumps(p)


def row(id_, customer, when, event="api_request", body=None, tenant="acme", env="prod", version=1):
    return {
        "id": id_,
        "tenant_id": tenant,
        "environment_id": env,
        "external_customer_id": customer,
        "event_name": event,
        "payload": body if body is not None else payload(int(id_[1:])),
        "timestamp": when,
        "version": version,
    }


SAME = ts(DAY1, 10)  # six events share one timestamp: the rest of the key orders them
ROWS = [
    *[row(f"e0{i}", "cust-a", SAME, "llm_call" if i % 2 else "api_request") for i in range(1, 7)],
    row("e07", "cust-a", ts(DAY1, 11), body=payload(7, data={"modelName": "gpt-4o", "usage": {"inputTokens": 1}})),
    row("e10", "cust-b", ts(DAY1, 12), body=payload(10, drop=("orgId",))),
    row("e11", "cust-b", ts(DAY1, 12, 1), body=payload(11, drop=("methodName",))),
    row("e12", "cust-b", ts(DAY1, 12, 2), body=payload(12, drop=("providerName",))),
    row("e13", "cust-b", ts(DAY1, 12, 3), body=payload(13, drop=("data.modelName",))),
    row("e14", "cust-b", ts(DAY1, 12, 4), body=payload(14, drop=("createdAt",))),
    row("e15", "cust-b", ts(DAY1, 12, 5), body=payload(15, drop=("providerName",), serviceName="bedrock")),
    row("e16", "cust-b", ts(DAY1, 13), body='{"id": "req-16", "orgId": '),
    row("e17", "cust-b", ts(DAY1, 13, 1), body="[1, 2]"),
    row("e20", "cust-a", ts(DAY2, 1), "llm_call"),
    row("e21", "cust-a", ts(DAY2, 23, 59, 59, 999)),
    row("e22", "cust-c", ts(DAY2, 5), "llm_call"),
    row("e30", "cust-a", ts(DAY1, 10), tenant="globex"),
    row("e31", "cust-a", ts(DAY1, 10), env="staging"),
]
# e07 again, newer: ReplacingMergeTree(version) keeps this one.
NEWER = [
    row(
        "e07",
        "cust-a",
        ts(DAY1, 11),
        body=payload(7, data={"modelName": "gpt-4o", "usage": {"inputTokens": 999}}),
        version=2,
    )
]
PUBLISHED = {DAY1: {"e01", "e02", "e03", "e04", "e05", "e06", "e07", "e15"}, DAY2: {"e20", "e21", "e22"}}
DROPS = {
    "missing_orgId": 1,
    "missing_methodName": 1,
    "missing_providerName_or_serviceName": 1,
    "missing_data_modelName": 1,
    "missing_id_or_createdAt": 1,
}


def arrow(rows) -> pa.Table:
    cols = [
        "id",
        "tenant_id",
        "environment_id",
        "external_customer_id",
        "event_name",
        "payload",
        "timestamp",
        "version",
    ]
    types = {"timestamp": pa.timestamp("ms", tz="UTC"), "version": pa.uint64()}
    return pa.table({c: pa.array([r[c] for r in rows], types.get(c, pa.string())) for c in cols})


@pytest.fixture(scope="module")
def broker():
    tansu = Tansu().start()
    yield tansu
    tansu.stop()


@pytest.fixture
def billing(tmp_path, monkeypatch, chdb_path, ch_database, broker, request):
    """raw_events in a fresh chDB database (two inserts: two parts, so FINAL has work to do), a
    topic of the test's own, and the env vars the code location reads."""
    with ClickHouse(data_path=chdb_path, database=ch_database) as ch:
        ch.command(BILLING_RAW_EVENTS_DDL)
        ch.insert("raw_events", arrow(ROWS))
        ch.insert("raw_events", arrow(NEWER))
    topic = "billing-" + re.sub(r"[^A-Za-z0-9-]", "-", request.node.name)[:60]
    broker.create_topic(topic)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    for k, v in {
        "EVENT_REPLAY_LAKE": tmp_path / "lake",
        "EVENT_REPLAY_DUCKDB": tmp_path / "state.duckdb",
        "EVENT_REPLAY_OUTBOX": tmp_path / "outbox",
        "DAGSTER_HOME": home,
        "EVENT_REPLAY_CHDB": chdb_path,
        "CLICKHOUSE_DATABASE": ch_database,
        "EVENT_REPLAY_KAFKA_BOOTSTRAP": broker.bootstrap,
        "EVENT_REPLAY_SINK_TIMEOUT_S": "4",
    }.items():
        monkeypatch.setenv(k, str(v))
    spec = dataclasses.replace(BILLING, redrive=dataclasses.replace(BILLING.redrive, sink=KafkaSinkSpec(topic)))
    return {"spec": spec, "topic": topic, "lake": tmp_path / "lake", "home": home, "database": ch_database}


def _run(spec, instance, start, end, raw=None, batch_size=4, redrive=None):
    from replay_defs.definitions import build_definitions

    job = build_definitions([spec]).resolve_job_def(f"{NAME}_replay")
    config = {
        "ops": {
            f"{NAME}__raw_events": {"config": raw or {}},
            f"{NAME}__parsed_events": {"config": {"batch_size": batch_size}},
            f"{NAME}__redrive": {"config": {"batch_size": batch_size, **(redrive or {})}},
        }
    }
    return job.execute_in_process(
        instance=instance, tags={RANGE_TAGS[0]: start, RANGE_TAGS[1]: end}, run_config=config, raise_on_error=False
    )


def _metadata(result, asset: str) -> dict[str, dict]:
    return {
        m.partition: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node(f"{NAME}__{asset}")
    }


def test_two_days_end_to_end_on_chdb(billing, broker):
    spec, topic, lake = billing["spec"], billing["topic"], Lake(billing["lake"])
    with dg.instance_for_test(temp_dir=str(billing["home"])) as instance:
        result = _run(spec, instance, DAY1, DAY2, raw={"tenant": "acme", "environment": "prod"}, batch_size=4)
        assert result.success
        verdicts = check_verdicts(result)
        for check in (
            "no_duplicate_event_ids",
            "raw_lines_accounted_for",
            "no_stale_files",
            "deliveries_reconcile",
            "found_accounted_for",
        ):
            assert verdicts[(check, DAY1)] is True and verdicts[(check, DAY2)] is True, check

        md = _metadata(result, "redrive")
        assert {
            k: md[DAY1][k] for k in ("found", "published", "dropped", "transformation_errors", "publish_failures")
        } == {"found": 15, "published": 8, "dropped": 5, "transformation_errors": 2, "publish_failures": 0}
        assert {r: md[DAY1][f"dropped_{r}"] for r in DROPS} == DROPS
        assert (
            md[DAY1]["transformation_error_malformed_json"] == 1 and md[DAY1]["transformation_error_not_an_object"] == 1
        )
        assert md[DAY1]["success_rate_percent"] == round(100 * 8 / 15, 2) and md[DAY2]["success_rate_percent"] == 100.0
        parsed = _metadata(result, "parsed_events")
        assert parsed[DAY1]["batches"] == 4, "16 stored rows (15 after FINAL) in keyset pages of at most 4"

        messages = broker.read_all(topic, idle_s=1.0)
        bodies = [json.loads(m.value()) for m in messages]
        ids = [b["event_id"] for b in bodies]
        assert sorted(ids) == sorted(PUBLISHED[DAY1] | PUBLISHED[DAY2]), "exactly the valid rows, each once"
        by_id = {b["event_id"]: b for b in bodies}
        assert json.loads(json.dumps(by_id["e07"]["properties"]))["input_tokens"] == 999, (
            "only the latest version of e07"
        )
        assert by_id["e15"]["properties"]["provider"] == "bedrock"
        assert by_id["e21"]["timestamp"] == "2024-03-05T23:59:59.999000Z"
        assert by_id["e01"] == {
            "event_id": "e01",
            "event_name": "llm_call",
            "tenant_id": "acme",
            "environment_id": "prod",
            "external_customer_id": "cust-a",
            "timestamp": "2024-03-04T10:00:00.000000Z",
            "source": "raw_events_reprocessing",
            "properties": {
                "request_id": "req-1",
                "org_id": "org-1",
                "method": "chat.completions",
                "provider": "openai",
                "model": "gpt-4o",
                "input_tokens": 1,
                "output_tokens": 2,
                "created_at": "2024-03-04T10:00:00Z",
            },
        }
        assert all(m.key().decode() == b["external_customer_id"] for m, b in zip(messages, bodies))
        assert all(dict(m.headers())["replay_run_id"].decode() == result.run_id for m in messages)

        # Nothing lost silently: each dropped or failed row is in the quarantine with its reason.
        (qfile,) = committed_quarantine(parsed_state(lake, spec, DAY1), spec)
        q = pq.read_table(lake.storage.path(qfile)).to_pylist()
        reasons = {json.loads(r["sample"])["id"]: r["reason"] for r in q}
        assert reasons == {
            "e10": "missing_orgId",
            "e11": "missing_methodName",
            "e12": "missing_providerName_or_serviceName",
            "e13": "missing_data_modelName",
            "e14": "missing_id_or_createdAt",
            "e16": "malformed_json",
            "e17": "not_an_object",
        }

        # A re-run sends nothing twice: the ledger knows what Kafka has.
        again = _run(spec, instance, DAY1, DAY1, raw={"tenant": "acme", "environment": "prod"}, batch_size=100)
        assert again.success
        md2 = _metadata(again, "redrive")[DAY1]
        assert (
            md2["published"] == 0
            and md2["skipped_already_delivered"] == 8
            and md2["success_rate_percent"] == md[DAY1]["success_rate_percent"]
        )
        assert check_verdicts(again)[("found_accounted_for", DAY1)] is True
        assert len(broker.read_all(topic, idle_s=1.0)) == len(messages)


def test_selection_rejects_unknown_filters_naive_times_and_empty_windows():
    with pytest.raises(ValueError, match="unknown filters"):
        TableSelection.of(BILLING.source, {"tenant_id": "acme"})
    with pytest.raises(ValueError, match="time zone"):
        TableSelection.of(BILLING.source, {}, start="2024-03-04T10:00:00")
    with pytest.raises(ValueError, match="not after"):
        TableSelection.of(BILLING.source, {}, start="2024-03-05T00:00:00Z", end="2024-03-04T00:00:00Z")
    sel = TableSelection.of(BILLING.source, {"tenant": "acme", "customer": ""}, start="2024-03-04T10:00:00+02:00")
    assert (
        sel.filters == {"tenant": "acme"} and sel.window(DAY1)[0] == ts(DAY1, 8) and sel.window(DAY2)[0] == ts(DAY2, 0)
    )
    assert TableSelection.from_json(sel.to_json()) == sel


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_keyset_pages_equal_one_ordered_scan_on_both_backends(billing, chdb_path, clickhouse_http, batch_size):
    src = BILLING.source
    keys = ", ".join(src.order_by)
    reference_sql = (
        f"SELECT {', '.join(src.columns)} FROM raw_events FINAL WHERE toDate(timestamp) = {{d:Date}} ORDER BY {keys}"
    )
    seen = {}
    for label, ch in (
        ("chdb", ClickHouse(data_path=chdb_path, database=billing["database"])),
        ("http", ClickHouse(url=clickhouse_http.url(), database=billing["database"])),
    ):
        with ch:
            reference = ch.query(reference_sql, {"d": DAY1})
            before = len(clickhouse_http.requests)
            reader = KeysetReader(ch, src, DAY1, TableSelection(), batch_size)
            pages = list(reader.batches())
            got = pa.concat_tables(pages)
            assert got.equals(reference), "no row skipped or repeated across equal timestamps"
            assert all(p.num_rows <= batch_size for p in pages) and reader.pages == len(pages) >= -(-17 // batch_size)
            assert reader.count() == reference.num_rows == 17
            assert got.column("id").to_pylist().count("e07") == 1
            seen[label] = got
            if label == "http":
                sql = [
                    r["sql"]
                    for r in clickhouse_http.requests[before:]
                    if "FROM `raw_events`" in r["sql"] and "ORDER BY" in r["sql"]
                ]
                assert len(sql) == reader.queries == 2 * reader.pages + 1 and not any(
                    "OFFSET" in s.upper() for s in sql
                )
                assert all("(`tenant_id` > {k0:String} OR (`tenant_id` = {k0:String} AND" in s for s in sql[2:])
                assert all("FINAL" in s and "<= {u5:String}" in s for s in sql[1::2]), (
                    "pages read with FINAL, bounded above"
                )
    assert seen["chdb"].equals(seen["http"])


def test_cli_reprocess_through_the_http_path_with_filters_and_dry_run(
    billing, broker, clickhouse_http, monkeypatch, capsys, fresh_definitions
):
    """The seed's POST /events/raw/reprocess as `event-replay billing reprocess`, on the code
    location as declared (topic prod_events_v4), reaching ClickHouse only through clickhouse-connect
    over HTTP (the fixture, with a password) and Kafka on the real broker."""
    from replay_defs import cli

    broker.create_topic("prod_events_v4")
    monkeypatch.setenv("CLICKHOUSE_URL", clickhouse_http.url())
    before = len(clickhouse_http.requests)

    def reprocess(*extra):
        cli.main(
            [
                "billing",
                "reprocess",
                "--start",
                f"{DAY1}T10:00:00Z",
                "--end",
                f"{DAY2}T01:00:00Z",
                "--tenant",
                "acme",
                "--environment",
                "prod",
                "--customer",
                "cust-a",
                "--event-name",
                "llm_call",
                "--batch-size",
                "2",
                *extra,
            ]
        )
        out = capsys.readouterr()
        assert "ch-secret-pw" not in out.out + out.err
        return json.loads(out.out.strip().splitlines()[-1])

    dry = reprocess("--dry-run")
    assert (
        dry["status"] == "SUCCESS" and dry["found"] == 3 and dry["published"] == 0 and dry["partitions"] == [DAY1, DAY2]
    )
    assert broker.read_all("prod_events_v4", idle_s=1.0) == []
    out = reprocess()
    assert out["status"] == "SUCCESS" and out["published"] == 3 and out["found"] == 3 and out["run_id"] != dry["run_id"]
    # cust-a's llm_call events in [DAY1 10:00, DAY2 01:00): e01, e03, e05 (tied at 10:00, the start, included);
    # e20 at DAY2 01:00 (the end, excluded) is not.
    ids = sorted(json.loads(m.value())["event_id"] for m in broker.read_all("prod_events_v4", idle_s=1.0))
    assert ids == ["e01", "e03", "e05"]
    sent = clickhouse_http.requests[before:]
    assert any(
        r["params"].get("f_customer") == "cust-a" and r["params"].get("f_event_name") == "llm_call" for r in sent
    )
    assert any(r["sql"].lstrip().startswith("SELECT count() FROM `raw_events` FINAL") for r in sent), (
        "raw_events counted over HTTP"
    )
    run = dg.DagsterInstance.get().get_run_by_id(out["run_id"])
    assert run is not None and run.is_success and run.tags[RANGE_TAGS[0]] == DAY1 and run.tags[RANGE_TAGS[1]] == DAY2


def _verify(spec, instance, day) -> dict[str, tuple[bool, str]]:
    """The pipeline's checks-only job over one day: check -> (passed, description)."""
    from replay_defs.definitions import build_definitions

    result = (
        build_definitions([spec])
        .resolve_job_def(f"{NAME}_verify")
        .execute_in_process(instance=instance, tags={RANGE_TAGS[0]: day, RANGE_TAGS[1]: day}, raise_on_error=False)
    )
    return {e.check_name: (e.passed, e.description) for e in result.get_asset_check_evaluations() if e.partition == day}


def test_billing_checks_catch_a_changed_table_a_tampered_file_a_shrink_and_a_lost_ledger_row(billing):
    """The faults that apply to a table source, each injected into a clean materialized day."""
    from replay_defs.pipeline.store import DuckDBStore

    spec, lake = billing["spec"], Lake(billing["lake"])
    raw = {"tenant": "acme", "environment": "prod"}
    with dg.instance_for_test(temp_dir=str(billing["home"])) as instance:
        assert _run(spec, instance, DAY1, DAY1, raw=raw).success
        clean = _verify(spec, instance, DAY1)
        assert set(clean) == {
            "no_duplicate_event_ids",
            "raw_lines_accounted_for",
            "no_stale_files",
            "raw_rows_current",
            "no_unconsented_shrink",
            "deliveries_reconcile",
            "found_accounted_for",
            # seed 002's alert thresholds (tests/test_billing_operations.py): DAY1 sends 8 of 15 rows
            "transformation_error_rate_within_threshold",
            "success_rate_within_threshold",
            "publish_failure_rate_within_threshold",
        }
        rates = ("transformation_error_rate_within_threshold", "success_rate_within_threshold")
        assert all(passed for name, (passed, _) in clean.items() if name not in rates), clean

        # 1. Rows inserted into the table after the day was built: the day is out of date.
        with ClickHouse(data_path=os.environ["EVENT_REPLAY_CHDB"], database=billing["database"]) as ch:
            ch.insert("raw_events", arrow([row("e40", "cust-d", ts(DAY1, 15)), row("e41", "cust-d", ts(DAY1, 15, 1))]))
        passed, description = _verify(spec, instance, DAY1)["raw_rows_current"]
        assert not passed and "holds 17 rows now, 15 when raw_events counted it" in description

        # 2. A committed Parquet file changed at the same size.
        rel = committed_parquet(lake, spec, DAY1)[0]
        path = Path(lake.storage.path(rel))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x5A
        path.write_bytes(bytes(data))
        passed, description = _verify(spec, instance, DAY1)["no_stale_files"]
        assert not passed and f"changed content: {rel}" in description

        # 3. Rows removed from the table, then the day rebuilt: fewer events needs consent.
        with ClickHouse(data_path=os.environ["EVENT_REPLAY_CHDB"], database=billing["database"]) as ch:
            ch.command("ALTER TABLE raw_events DELETE WHERE id IN ('e01', 'e02', 'e03') SETTINGS mutations_sync = 2")
        shrunk = _run(spec, instance, DAY1, DAY1, raw=raw)
        assert not shrunk.success
        assert check_verdicts(shrunk)[("no_unconsented_shrink", DAY1)] is False
        consented = build_and_run_with_consent(spec, instance, raw)
        assert consented.success and check_verdicts(consented)[("no_unconsented_shrink", DAY1)] is True

        # 4. A ledger row of a delivered message lost after a re-run that sent nothing.
        assert _verify(spec, instance, DAY1)["deliveries_reconcile"][0]
        DuckDBStore(billing["lake"].parent / "state.duckdb").query(
            "DELETE FROM redrive_ids WHERE message_id = 'e04' "
            "AND scope IN (SELECT scope FROM redrive_scopes WHERE pipeline = $p)",
            {"p": NAME},
        )
        passed, description = _verify(spec, instance, DAY1)["deliveries_reconcile"]
        assert not passed and "not delivered according to the ledger" in description and "e04" in description


def test_a_narrower_selection_is_no_shrink_and_the_whole_day_compares_with_the_whole(billing):
    """One customer's slice of a day the tenant's run built before is not a shrink of it (the
    README's billing example); the tenant's next run compares with the tenant's last version, not
    with the slice, so rows lost from the table are still caught."""
    spec, tenant = billing["spec"], {"tenant": "acme", "environment": "prod"}
    with dg.instance_for_test(temp_dir=str(billing["home"])) as instance:
        assert _run(spec, instance, DAY1, DAY1, raw=tenant).success
        narrowed = _run(spec, instance, DAY1, DAY1, raw={**tenant, "customer": "cust-a", "event_name": "llm_call"})
        assert narrowed.success, check_verdicts(narrowed)
        assert check_verdicts(narrowed)[("no_unconsented_shrink", DAY1)] is True
        with ClickHouse(data_path=os.environ["EVENT_REPLAY_CHDB"], database=billing["database"]) as ch:
            ch.command("ALTER TABLE raw_events DELETE WHERE id IN ('e01', 'e02', 'e03') SETTINGS mutations_sync = 2")
        whole = _run(spec, instance, DAY1, DAY1, raw=tenant)
        assert not whole.success
        assert check_verdicts(whole)[("no_unconsented_shrink", DAY1)] is False


def build_and_run_with_consent(spec, instance, raw):
    from replay_defs.definitions import build_definitions

    job = build_definitions([spec]).resolve_job_def(f"{NAME}_replay")
    config = {
        "ops": {
            f"{NAME}__raw_events": {"config": raw},
            f"{NAME}__parsed_events": {"config": {"batch_size": 4, "allow_shrink": True}},
        }
    }
    return job.execute_in_process(
        instance=instance, tags={RANGE_TAGS[0]: DAY1, RANGE_TAGS[1]: DAY1}, run_config=config, raise_on_error=False
    )


def test_a_payload_nested_too_deep_is_a_transformation_error_not_a_crash():
    from replay_defs.clickhouse_table.parsing import Transformer

    deep = '{"id": "req-9", "orgId": "o", "x": ' + "[" * 1000 + "]" * 1000 + "}"
    events, quarantined, dropped, errors = Transformer(BILLING).run(
        arrow([row("e01", "cust-a", SAME), row("e09", "cust-a", SAME, body=deep)]), 1
    )
    assert events.num_rows == 1 and errors == {"nesting_too_deep": 1} and not dropped
    assert [q for q in quarantined if "nesting_too_deep" in q]


def _tricky(n: int, **changes) -> str:
    """A valid payload with `changes` spliced in as raw JSON text (key -> member text, or None to drop)."""
    members = {
        "id": f'"req-{n}"',
        "orgId": '"org-1"',
        "methodName": '"chat.completions"',
        "providerName": '"openai"',
        "createdAt": '"2024-03-04T10:00:00Z"',
        "data": '{"modelName": "gpt-4o", "usage": {"inputTokens": 5, "outputTokens": 2}}',
    }
    members.update(changes)
    return "{" + ", ".join(f'"{k}": {v}' for k, v in members.items() if v is not None) + "}"


# Payloads on which ClickHouse's JSON functions and Python's msgspec could read differently; each
# must get Python's verdict and event, whichever path maps it.
TRICKY = [
    _tricky(1),  # ordinary: mapped by the engine
    _tricky(2, orgId='"a", "orgId": ""'),  # duplicate key: Python keeps the last value (dropped)
    _tricky(3, data='{"modelName": "m1", "modelName": null}'),  # duplicate nested key
    '{"org\\u0049d": "x", ' + _tricky(4, orgId=None)[1:],  # an escaped key spelling orgId
    _tricky(5, data='[{"modelName": "m"}, {"inputTokens": 1}]'),  # an object on a path is an array
    _tricky(6, data='{"modelName": "m", "usage": {"inputTokens": 1.0, "outputTokens": 2}}'),  # 1.0 is no int
    _tricky(7, data='{"modelName": "m", "usage": {"inputTokens": 1e2, "outputTokens": -0}}'),
    _tricky(8, data='{"modelName": "m", "usage": {"inputTokens": 123456789012345678901234567890}}'),
    _tricky(9, data='{"modelName": "m", "usage": {"inputTokens": "774", "outputTokens": true}}'),
    _tricky(10, orgId="null"),
    _tricky(11, orgId='""'),
    _tricky(12, orgId="0", methodName="false"),
    _tricky(13, orgId="{}", methodName="[]"),
    _tricky(14, providerName=None, serviceName='"bedrock"'),
    _tricky(15, providerName='""', serviceName='"bedrock"'),
    _tricky(16, data='"gpt-4o"'),  # an object on a path is a string
    _tricky(17, data="null"),
    _tricky(18, createdAt="1709546400"),
    _tricky(19, OrgId='"x"', orgId=None),  # keys are case-sensitive
    _tricky(20, methodName='"é 😀 \x7f \u2028"'),  # raw unicode, DEL, line separator
    _tricky(21, methodName='"\\u00e9\\ud83d\\ude00\\/"'),  # escapes
    _tricky(22, methodName='"say \\"hi\\"\\n"'),
    _tricky(23, providerName='"123"'),  # a string of digits
    _tricky(24, providerName='"true"', serviceName='"1.5"'),
    "\ufeff" + _tricky(25),  # a byte-order mark: Python refuses it
    " " + _tricky(26) + "\n",
    _tricky(27) + " x",  # trailing garbage
    _tricky(28)[:-1] + ",}",  # trailing comma
    _tricky(29, orgId="NaN"),
    _tricky(30, methodName='"tab\there"'),  # a raw control character
    _tricky(31, orgId='"\\ud800"'),  # a lone surrogate
    _tricky(32, x="[" * 600 + "]" * 600),  # deep, within Python's limit
    _tricky(33, x="[" * 1200 + "]" * 1200),  # deeper than Python's limit
    "[1, 2]",
    '"a string"',
    "42",
    "null",
    "",
    "{}",
    '{"id": "req-40", "orgId": ',
]


@pytest.mark.parametrize("backend", ["chdb", "http"])
def test_the_engine_mapping_gives_pythons_verdicts_and_events_on_tricky_json(
    chdb_path, ch_database, clickhouse_http, backend
):
    """The page query's JSON parsing (EngineMapping) against the Python transformer on the same
    rows: the same events, quarantine records (reason, detail, line) and counts, on both backends;
    the ordinary rows are mapped by the engine, the ones it could read differently by Python."""
    from replay_defs.clickhouse_table.engine_mapping import EngineMapping
    from replay_defs.clickhouse_table.parsing import Transformer

    with ClickHouse(data_path=chdb_path, database=ch_database) as ch:
        ch.command(BILLING_RAW_EVENTS_DDL)
        rows = [row(f"e{i:02}", "cust-a", ts(DAY1, 10, i), body=body) for i, body in enumerate(TRICKY)]
        ch.insert("raw_events", arrow(rows))
    url = clickhouse_http.url() if backend == "http" else ""
    with ClickHouse(url=url, data_path=chdb_path, database=ch_database) as ch:
        reader = KeysetReader(ch, BILLING.source, DAY1, TableSelection(), 16)
        engine = EngineMapping.of(BILLING, reader.types)
        assert engine is not None
        first, here = 1, []
        for page in reader.batches(engine.select, engine.params):
            got = engine.run(page, first)
            want = Transformer(BILLING).run(page.select(list(BILLING.source.columns)), first)
            assert got[0].equals(want[0]), (got[0].to_pylist(), want[0].to_pylist())
            assert got[1:] == want[1:]
            here += engine.mapped_here(page).tolist()
            first += page.num_rows
    assert first - 1 == len(TRICKY)
    by_id = dict(zip((f"e{i:02}" for i in range(len(TRICKY))), here))
    # e07: a number past 64 bits (the engine reads its digits as text, Python as an int: the same
    # JSON); e09/e10: orgId null or "" (dropped by the rule either way); e13-e19: serviceName,
    # non-object `data`, an integer createdAt, case, raw unicode.
    plain = {"e00", "e07", "e09", "e10", "e13", "e14", "e15", "e16", "e17", "e18", "e19"}
    assert {i for i, h in by_id.items() if h} == plain, "ordinary payloads mapped by the engine, no others"


def test_the_engine_mapping_declines_what_only_python_maps():
    from replay_defs.clickhouse_table.engine_mapping import EngineMapping

    types = {"id": "String", "payload": "String"}
    assert EngineMapping.of(BILLING, types) is not None
    assert EngineMapping.of(BILLING, {**types, "payload": "JSON"}) is None
    odd_key = dataclasses.replace(
        BILLING.mapping,
        rules=(*BILLING.mapping.rules, dataclasses.replace(BILLING.mapping.rules[0], name="x", paths=("payload.a-b",))),
    )
    assert EngineMapping.of(dataclasses.replace(BILLING, mapping=odd_key), types) is None
    from_payload = dataclasses.replace(BILLING.mapping, fields={**BILLING.mapping.fields, "event_id": ("payload.id",)})
    assert EngineMapping.of(dataclasses.replace(BILLING, mapping=from_payload), types) is None
