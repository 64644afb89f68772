"""Pipelines of the user's own, without editing the project: nested field paths, declarations in a
YAML file (`examples/pipelines.yaml`, the README's) or a Python module, and sinks chosen by the
environment. Real JSONL files, a real Definitions and Dagster instance, the real outbox and Redis."""

import dataclasses
import gzip
import json
import uuid
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import redis
from conftest import PROJECT_ROOT, check_verdicts

from replay_defs.jsonl_files.parsing import EventDecoder
from replay_defs.pipeline.declared import DeclarationError, load_yaml, serve
from replay_defs.pipeline.spec import ClickHouseSourceSpec, EventSchema, Field
from replay_defs.pipeline.store import DuckDBStore
from replay_defs.pipelines import BILLING, PIPELINES, REFILLS, TELEMETRY
from replay_defs.sinks.outbox import OutboxSink
from replay_defs.sinks.redis import RedisSinkSpec

EXAMPLE = PROJECT_ROOT / "examples" / "pipelines.yaml"
DAY = "2025-11-24"
T = f"{DAY}T10:15:00.250Z"


# ---- raw files of the example's `orders` pipeline ----------------------------------------------


def order(i: int) -> dict:
    """A good order event: every value the schema reads sits in a nested object."""
    body = {"kind": ("created", "paid", "refunded")[i % 3], "customer": {"id": f"c-{i % 4}", "tier": "gold"}}
    if i % 2 == 0:
        body["amount"] = i * 1.5
    if i % 5 == 0:
        body["items"] = [{"sku": f"s{i}", "qty": 1}]
    return {"envelope": {"id": f"o-{i}", "event_time": f"{DAY}T10:{i:02d}:00Z", "source": "checkout"}, "body": body}


def line(obj) -> bytes:
    return json.dumps(obj).encode()


ENVELOPE = {"id": "bad", "event_time": T}
# Bad lines, each with the reason it is quarantined for and a piece of that quarantine row's detail.
BAD_LINES = [
    (
        {"envelope": {"id": "no-time"}, "body": {"kind": "paid", "customer": {"id": "c"}}},
        "missing_field",
        "`event_time` - at `$.envelope`",
    ),
    ({"envelope": ENVELOPE}, "missing_field", "required field `body`"),  # a missing intermediate object
    ({"envelope": ENVELOPE, "body": {"kind": "paid"}}, "missing_field", "`customer` - at `$.body`"),
    ({"envelope": ENVELOPE, "body": "paid"}, "wrong_type", "Expected `object`, got `str` - at `$.body`"),
    (
        {"envelope": ENVELOPE, "body": {"kind": "paid", "customer": ["c-1"]}},
        "wrong_type",
        "Expected `object`, got `array` - at `$.body.customer`",
    ),
    ({"envelope": ENVELOPE, "body": {"kind": "paid", "customer": {"id": "c"}, "amount": "12"}}, "wrong_type", "amount"),
    ({"envelope": ENVELOPE, "body": {"kind": "shipped", "customer": {"id": "c"}}}, "unknown_type", "'shipped'"),
    (["not", "an", "object"], "not_an_object", "got `array`"),
]
GOOD = 30  # o-0 .. o-29; o-5 is sent twice (a duplicate)


def write_orders(lake: Path, prefix: str = "raw/orders") -> None:
    """Two raw files of DAY (one gzipped), with a duplicate and every bad line."""
    hour = lake / prefix / "year=2025/month=11/day=24"
    (hour / "hour=10").mkdir(parents=True)
    (hour / "hour=11").mkdir(parents=True)
    first = [line(order(i)) for i in range(20)]
    (hour / "hour=10/part-0.jsonl").write_bytes(b"\n".join(first) + b"\n")
    second = [line(order(i)) for i in range(20, GOOD)] + [line(order(5))] + [line(b[0]) for b in BAD_LINES]
    (hour / "hour=11/part-1.jsonl.gz").write_bytes(gzip.compress(b"\n".join(second) + b"\n"))


def expected_rows() -> dict[str, dict]:
    rows = {}
    for i in range(GOOD):
        o = order(i)
        rows[o["envelope"]["id"]] = {
            "event_time": o["envelope"]["event_time"].replace("Z", "+00:00"),
            "kind": o["body"]["kind"],
            "customer_id": o["body"]["customer"]["id"],
            "amount": o["body"].get("amount"),
            "items": o["body"].get("items"),
        }
    return rows


def parsed_rows(lake: Path, parsed_prefix: str = "orders_flat") -> dict[str, dict]:
    """The parsed day as the lake holds it (Parquet by type)."""
    rows = duckdb.execute(
        "SELECT event_id, strftime(event_time, '%Y-%m-%dT%H:%M:%S+00:00'), kind, customer_id, amount, items "
        "FROM read_parquet($glob)",
        {"glob": str(lake / f"{parsed_prefix}/type=*/day={DAY}/*.parquet")},
    ).fetchall()
    assert len(rows) == len({r[0] for r in rows}), "no event id twice"
    return {
        r[0]: {
            "event_time": r[1],
            "kind": r[2],
            "customer_id": r[3],
            "amount": r[4],
            "items": None if r[5] is None else json.loads(r[5]),
        }
        for r in rows
    }


def quarantine(lake: Path, pipeline: str = "orders") -> list[tuple[str, str, str]]:
    """(reason, detail, sample) of each quarantined line of the day."""
    files = sorted(str(p) for p in lake.glob(f"quarantine/{pipeline}/day={DAY}/*.parquet"))
    return duckdb.execute(
        "SELECT reason, detail, decode(sample) FROM read_parquet($f) ORDER BY source_ref, line_no", {"f": files}
    ).fetchall()


def run_day(defs, instance, pipeline: str = "orders", workers: int = 1):
    config = {"ops": {f"{pipeline}__parsed_events": {"config": {"workers": workers}}}}
    return defs.resolve_job_def(f"{pipeline}_replay").execute_in_process(
        instance=instance, partition_key=DAY, run_config=config, raise_on_error=False
    )


def declare(monkeypatch, ref, sink: str | None = "outbox", **env) -> None:
    monkeypatch.setenv("EVENT_REPLAY_PIPELINES", str(ref))
    if sink:
        monkeypatch.setenv("EVENT_REPLAY_SINK__ORDERS", sink)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# ---- nested field paths in the decoder -------------------------------------------------------------


NESTED = EventSchema(
    fields=(
        Field("event_id", "string", path="envelope.id"),
        Field("ts", "timestamp", path="envelope.event_time"),
        Field("type", "string", path="body.kind"),
        Field("score", "float", required=False, path="extra.metrics.score"),
        Field("note", "string", required=False),
    )
)


def test_nested_paths_decode_and_quarantine_with_reasons():
    env = {"id": "a", "event_time": T}
    lines = [
        line({"envelope": env, "body": {"kind": "k", "other": [1]}, "extra": {"metrics": {"score": 2.5}}, "note": "n"}),
        line({"envelope": {**env, "id": "b"}, "body": {"kind": "k"}}),  # optional object absent: a null value
        line({"envelope": {**env, "id": "c"}, "body": {"kind": "k"}, "extra": None}),
        line({"envelope": {**env, "id": "d"}, "body": {"kind": "k"}, "extra": {"metrics": 3}}),
        line({"envelope": {"id": "e"}, "body": {"kind": "k"}}),
        line({"body": {"kind": "k"}}),
        line({"envelope": 7, "body": {"kind": "k"}}),
        b"[1, 2]",
    ]
    table, bad, _ = EventDecoder(NESTED).decode_batch(1, lines, "ref")
    assert table.select(["event_id", "type", "score", "note"]).to_pylist() == [
        {"event_id": "a", "type": "k", "score": 2.5, "note": "n"},
        {"event_id": "b", "type": "k", "score": None, "note": None},
        {"event_id": "c", "type": "k", "score": None, "note": None},
    ]
    assert [(no, reason, detail) for no, reason, detail, _ in bad] == [
        (4, "wrong_type", "Expected `object | null`, got `int` - at `$.extra.metrics`"),
        (5, "missing_field", "Object missing required field `event_time` - at `$.envelope`"),
        (6, "missing_field", "Object missing required field `envelope`"),
        (7, "wrong_type", "Expected `object`, got `int` - at `$.envelope`"),
        (8, "not_an_object", "Expected `object`, got `array`"),  # the line itself: as before paths existed
    ]


def test_a_neighbours_file_reads_the_nested_event_time():
    """A neighbour's file (`only_day`): events of other days are counted by their nested time."""
    from datetime import date

    lines = [
        line({"envelope": {"id": f"e{i}", "event_time": f"2025-11-2{4 + i % 2}T23:00:00Z"}, "body": {"kind": "k"}})
        for i in range(6)
    ]
    table, bad, other_days = EventDecoder(NESTED).decode_batch(1, lines, "ref", only_day=date(2025, 11, 25))
    assert table.column("event_id").to_pylist() == ["e1", "e3", "e5"] and other_days == 3 and bad == []


def test_a_flat_schema_is_still_one_struct_read_by_attrgetters():
    """The fast path of a top-level schema is unchanged: one Struct, no renames, C-level getters."""
    import operator

    decoder = EventDecoder(TELEMETRY.schema)
    struct = decoder.decoder.type
    assert struct.__struct_fields__ == struct.__struct_encode_fields__, "no rename for a flat schema"
    assert all(type(get) is operator.attrgetter for _, get in decoder._getters)
    nested = EventDecoder(NESTED)
    assert nested.decoder.type.__struct_encode_fields__ != nested.decoder.type.__struct_fields__


@pytest.mark.parametrize(
    "fields, message",
    [
        ([("a", "string", True, "x..y")], "field 'a': path 'x..y' has an empty key"),
        ([("a", "string", True, ".x")], "path '.x' has an empty key"),
        ([("a", "string", True, "a.b.c.d.e.f.g.h.i")], "path 'a.b.c.d.e.f.g.h.i' is more than 8 keys deep"),
        ([("a", "string", True, "x.y"), ("b", "string", True, "x.y")], "fields 'a' and 'b' both read path 'x.y'"),
        ([("a", "json", True, "x"), ("b", "string", True, "x.y")], "field 'a' reads 'x', which field 'b'"),
        ([("a", "string", True, ""), ("a", "int", True, "x.a")], "field names must be unique"),
        ([("x.y", "string", True, "")], "field name 'x.y' is not a safe identifier"),
    ],
)
def test_bad_field_paths_are_refused(fields, message):
    base = (Field("event_id", "string"), Field("ts", "timestamp"), Field("type", "string"))
    with pytest.raises(ValueError) as refused:
        EventSchema(fields=(*base, *(Field(*f) for f in fields)))
    assert message in str(refused.value)


def test_a_path_is_for_jsonl_sources_only():
    nested = (*BILLING.schema.fields[:-1], Field("properties", "json", path="payload.props"))
    with pytest.raises(ValueError, match="a ClickHouse source maps its columns with `mapping`"):
        dataclasses.replace(BILLING, schema=dataclasses.replace(BILLING.schema, fields=nested))
    assert isinstance(BILLING.source, ClickHouseSourceSpec)


# ---- a YAML declaration, end to end ------------------------------------------------------------------


def test_the_example_file_runs_a_day_with_nested_fields(env, instance, monkeypatch, fresh_definitions, capsys):
    """examples/pipelines.yaml as the README shows it, served beside the shipped pipelines; its
    sink (Kafka) switched to the outbox by the environment."""
    write_orders(env["lake"])
    declare(monkeypatch, EXAMPLE, sink="outbox")
    from replay_defs.definitions import build_definitions

    defs = build_definitions()
    assert {"orders_replay", "telemetry_replay", "billing_reprocessing_replay"} <= {j.name for j in defs.jobs}
    result = run_day(defs, instance)
    assert result.success
    verdicts = check_verdicts(result)
    assert verdicts and all(verdicts.values()), verdicts

    assert parsed_rows(env["lake"]) == expected_rows()
    q = quarantine(env["lake"])
    assert [reason for reason, _, _ in q] == [reason for _, reason, _ in BAD_LINES]
    for (reason, detail, sample), (bad, want_reason, want_detail) in zip(q, BAD_LINES):
        assert want_detail in detail and json.loads(sample) == bad, (reason, detail)
    (parsed,) = result.asset_materializations_for_node("orders__parsed_events")
    md = {k: v.value for k, v in parsed.metadata.items()}
    assert md["parsed"] == GOOD and md["duplicates"] == 1 and md["quarantined"] == len(BAD_LINES)
    assert md["quarantined_missing_field"] == 3 and md["quarantined_wrong_type"] == 3

    # The redrive's messages carry the flat columns, keyed by customer (the example's key_field).
    messages = list(OutboxSink(env["outbox"]).read("orders"))
    assert sorted(m["event_id"] for m in messages) == sorted(expected_rows())
    sample = next(m for m in messages if m["event_id"] == "o-10")
    assert sample["customer_id"] == "c-2" and sample["amount"] == 15.0 and sample["items"] == [{"sku": "s10", "qty": 1}]
    # The increment projection folded the day: count and sum per kind.
    folded = DuckDBStore(env["duckdb"]).query('SELECT kind, events, revenue FROM "orders"."daily_orders" ORDER BY kind')
    rows = expected_rows().values()
    assert folded == [
        (k, sum(r["kind"] == k for r in rows), sum(r["amount"] or 0 for r in rows if r["kind"] == k))
        for k in ("created", "paid", "refunded")
    ]

    # The CLI finds the declared pipeline too.
    from replay_defs.cli import main

    capsys.readouterr()
    main(["verify", "orders", DAY])  # exits 1 if a check fails
    out = capsys.readouterr().out
    assert "checks passed over 1 day(s): 0 warning(s), 0 failed, 0 errored" in out, out
    main(["status", "orders", DAY])
    status = capsys.readouterr().out
    (row,) = [r.split() for r in status.splitlines() if r.startswith(DAY)]
    raw_lines = GOOD + 1 + len(BAD_LINES)
    assert row[2:6] == [str(raw_lines), str(GOOD), "1", str(len(BAD_LINES))], status


def test_the_readme_shows_the_example_file(tmp_path):
    """The README's walk-through declares what examples/pipelines.yaml declares."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("\n## Your own data\n", 1)[1]
    shown = tmp_path / "pipelines.yaml"
    shown.write_text(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert load_yaml(shown) == load_yaml(EXAMPLE)


# ---- a Python declaration -------------------------------------------------------------------------------

MODULE = """
from replay_defs.pipeline.spec import EventSchema, Field, JsonlSourceSpec, PipelineSpec

PIPELINES = (
    PipelineSpec(
        name="{name}",
        start_date="2025-11-01",
        source=JsonlSourceSpec(prefix="raw/orders"),
        schema=EventSchema(
            fields=(
                Field("event_id", "string", path="envelope.id"),
                Field("event_time", "timestamp", path="envelope.event_time"),
                Field("kind", "string", path="body.kind"),
                Field("customer_id", "string", path="body.customer.id"),
            ),
            id_field="event_id",
            time_field="event_time",
            type_field="kind",
            known_types=("created", "paid", "refunded"),
        ),
        parsed_prefix="{name}_flat",
    ),
)
"""


def test_a_python_file_declares_a_pipeline_that_runs_a_day(env, instance, tmp_path, monkeypatch, fresh_definitions):
    """A `.py` file's PIPELINES, parsed by a pool of worker processes (two raw files)."""
    write_orders(env["lake"])
    module = tmp_path / "my_pipelines.py"
    module.write_text(MODULE.format(name="orders_py"))
    declare(monkeypatch, module, sink=None)
    from replay_defs.cli_common import find_spec
    from replay_defs.definitions import build_definitions

    assert find_spec("orders_py").schema.fields[0].path == "envelope.id"
    result = run_day(build_definitions(), instance, "orders_py", workers=2)
    assert result.success
    (parsed,) = [
        m.materialization
        for m in result.get_asset_materialization_events()
        if m.asset_key == dg.AssetKey(["orders_py", "parsed_events"])
    ]
    assert parsed.metadata["parse_processes"].value == 2
    verdicts = check_verdicts(result)
    assert verdicts and all(verdicts.values()), verdicts
    rows = duckdb.execute(
        "SELECT event_id, kind, customer_id FROM read_parquet($g)",
        {"g": str(env["lake"] / f"orders_py_flat/type=*/day={DAY}/*.parquet")},
    ).fetchall()
    # This schema does not read `amount`: the line whose amount is a string is an event here.
    expected = [(i, r["kind"], r["customer_id"]) for i, r in expected_rows().items()] + [("bad", "paid", "c")]
    assert sorted(rows) == sorted(expected)
    # The default redrive: one message per raw file, into the outbox.
    assert len(list(OutboxSink(env["outbox"]).read("orders_py"))) == 2


def test_an_importable_module_declares_pipelines(tmp_path, monkeypatch):
    (tmp_path / "acme_pipelines.py").write_text(MODULE.format(name="acme_orders"))
    monkeypatch.syspath_prepend(str(tmp_path))
    pipelines, refills = serve(PIPELINES, REFILLS, {"EVENT_REPLAY_PIPELINES": "acme_pipelines"})
    assert [p.name for p in pipelines] == ["telemetry", "billing_reprocessing", "acme_orders"]
    assert refills == REFILLS


# ---- the environment: which pipelines, which sinks ----------------------------------------------------------


def test_the_env_sink_override_sends_a_declared_pipeline_to_a_redis_list(
    env, instance, monkeypatch, redis_url, fresh_definitions
):
    """EVENT_REPLAY_SINK__ORDERS turns the example's Kafka redrive into RPUSHes on a Redis list,
    counted on the server with redis-py."""
    write_orders(env["lake"])
    queue = f"orders-{uuid.uuid4().hex[:8]}"
    declare(monkeypatch, EXAMPLE, sink=f"redis:{queue}?mode=list", EVENT_REPLAY_REDIS_URL=redis_url)
    from replay_defs.definitions import build_definitions

    defs = build_definitions()
    assert "redis" in defs.resources
    client = redis.Redis.from_url(redis_url)
    try:
        result = run_day(defs, instance)
        assert result.success
        assert all(check_verdicts(result).values())
        assert client.llen(queue) == GOOD
        bodies = [json.loads(b) for b in client.lrange(queue, 0, -1)]
        assert sorted(b["event_id"] for b in bodies) == sorted(expected_rows())
        assert not list(OutboxSink(env["outbox"]).read("orders")), "nothing went to the outbox"
    finally:
        client.delete(queue, f"{queue}:replay-seen:orders:{DAY}")
        client.close()


def test_the_env_sink_override_applies_to_shipped_pipelines(monkeypatch, fresh_definitions, env):
    monkeypatch.setenv("EVENT_REPLAY_SINK__TELEMETRY", "redis:telemetry-files?mode=stream")
    monkeypatch.setenv("EVENT_REPLAY_SINK__INGESTION_REFILL", "redis:ingest-2?job_name=ingestion-job")
    monkeypatch.setenv("EVENT_REPLAY_SINK__BILLING_REPROCESSING", "rabbitmq:billing?routing_key=replay.{type}")
    from replay_defs.definitions import defs
    from replay_defs.pipelines import served

    pipelines, refills = served()
    telemetry, billing = pipelines
    assert telemetry == dataclasses.replace(
        TELEMETRY, redrive=dataclasses.replace(TELEMETRY.redrive, sink=RedisSinkSpec("telemetry-files", mode="stream"))
    )
    assert billing.redrive.sink.name == "rabbitmq:billing" and billing.redrive.sink.routing_key == "replay.{type}"
    assert billing.redrive.key_field == BILLING.redrive.key_field
    assert refills[0].redrive.sink == RedisSinkSpec("ingest-2", job_name="ingestion-job")
    assert "kafka" not in defs.resources, "no spec names Kafka any more"


def test_the_shipped_set_can_be_left_out(monkeypatch, tmp_path):
    def names(**env):
        pipelines, refills = serve(PIPELINES, REFILLS, {"EVENT_REPLAY_PIPELINES": str(EXAMPLE), **env})
        return [s.name for s in (*pipelines, *refills)]

    assert names() == ["telemetry", "billing_reprocessing", "orders", "ingestion_refill"]
    assert names(EVENT_REPLAY_SHIPPED_PIPELINES="none") == ["orders"]
    assert names(EVENT_REPLAY_SHIPPED_PIPELINES="telemetry, ingestion_refill") == [
        "telemetry",
        "orders",
        "ingestion_refill",
    ]
    # A declared pipeline may take a shipped one's name only once that one is left out.
    clash = tmp_path / "pipelines.yaml"
    clash.write_text(EXAMPLE.read_text().replace("name: orders", "name: telemetry"))
    with pytest.raises(DeclarationError, match="declares 'telemetry', the name of a shipped pipeline"):
        serve(PIPELINES, REFILLS, {"EVENT_REPLAY_PIPELINES": str(clash)})
    pipelines, _ = serve(
        PIPELINES,
        REFILLS,
        {"EVENT_REPLAY_PIPELINES": str(clash), "EVENT_REPLAY_SHIPPED_PIPELINES": "billing_reprocessing"},
    )
    assert [p.name for p in pipelines] == ["billing_reprocessing", "telemetry"]
    assert pipelines[1].parsed_prefix == "orders_flat"


# ---- bad declarations: clear errors at load time -------------------------------------------------------------

YAML_MISTAKES = {
    "a type that is not one": (
        "{name: kind, type: string, path: body.kind}",
        "{name: kind, type: integer, path: body.kind}",
        "pipelines.yaml: pipeline 'orders': schema.fields[2].type: 'integer' is not one of string, int, float, bool, "
        "timestamp, json",
    ),
    "an unknown key": (
        "{name: kind, type: string, path: body.kind}",
        "{name: kind, type: string, pth: body.kind}",
        "pipelines.yaml: pipeline 'orders': schema.fields[2]: unknown key 'pth' (the keys are name, type, required, path)",
    ),
    "an empty path key": (
        "path: body.kind}",
        "path: body..kind}",
        "pipelines.yaml: pipeline 'orders': schema.fields[2]: field 'kind': path 'body..kind' has an empty key",
    ),
    "a path too deep": (
        "path: body.kind}",
        "path: a.b.c.d.e.f.g.h.i}",
        "pipelines.yaml: pipeline 'orders': schema.fields[2]: field 'kind': path 'a.b.c.d.e.f.g.h.i' is more than 8 keys",
    ),
    "a missing key": (
        "    parsed_prefix: orders_flat\n",
        "",
        "pipelines.yaml: pipeline 'orders': missing key 'parsed_prefix'",
    ),
    "a bad duration": (
        "late: 6h",
        "late: 6 hours",
        "pipelines.yaml: pipeline 'orders': lateness.late: expected a duration such as 90s, 30m, 3h, 1d or 1h30m, "
        "got '6 hours' (str)",
    ),
    "an unknown sink": (
        "kind: kafka, topic",
        "kind: kafak, topic",
        "pipelines.yaml: pipeline 'orders': redrive.sink.kind: 'kafak' is not one of ",
    ),
    "a bad topic": (
        "topic: orders-replayed",
        "topic: 'orders replayed'",
        "pipelines.yaml: pipeline 'orders': redrive.sink: 'orders replayed' is not a valid Kafka topic name",
    ),
    "a bad sink in text": (
        "sink: {kind: kafka, topic: orders-replayed}",
        "sink: 'redis:orders?mode=lst'",
        "pipelines.yaml: pipeline 'orders': redrive.sink: 'redis:orders?mode=lst': mode: 'lst' is not one of bullmq, "
        "list, stream",
    ),
    "an unknown source kind": (
        "kind: jsonl",
        "kind: csv",
        "pipelines.yaml: pipeline 'orders': source.kind: 'csv' is not one of jsonl, clickhouse",
    ),
    "a projection of an unknown field": (
        "key: [customer_id]",
        "key: [customer]",
        "pipelines.yaml: pipeline 'orders': projection 'customer_latest' uses unknown fields ['customer']",
    ),
    "a time field of the wrong type": (
        "time_field: event_time",
        "time_field: kind",
        "pipelines.yaml: pipeline 'orders': schema: time_field 'kind' must be a required timestamp field",
    ),
    "a string for a number": (
        "shrink_tolerance: 0.01",
        "shrink_tolerance: high",
        "pipelines.yaml: pipeline 'orders': shrink_tolerance: expected a number, got 'high' (str)",
    ),
    "a number for a string": (
        "prefix: raw/orders",
        "prefix: 42",
        "pipelines.yaml: pipeline 'orders': source.prefix: expected a string, got 42 (int)",
    ),
    "a key given twice": (
        "    shrink_tolerance: 0.01",
        "    shrink_tolerance: 0.01\n    shrink_tolerance: 0.5",
        "pipelines.yaml: not valid YAML: duplicate key 'shrink_tolerance'",
    ),
    "broken YAML": ("known_types: [created, paid, refunded]", "known_types: [created, paid", "not valid YAML"),
    "no pipelines list": ("pipelines:\n", "pipeline:\n", "the file must hold one key, `pipelines:`"),
}


@pytest.mark.parametrize("mistake", YAML_MISTAKES)
def test_a_bad_yaml_declaration_says_where(mistake, tmp_path):
    good, bad, message = YAML_MISTAKES[mistake]
    text = EXAMPLE.read_text()
    assert good in text
    path = tmp_path / "pipelines.yaml"
    path.write_text(text.replace(good, bad, 1))
    with pytest.raises(DeclarationError) as refused:
        load_yaml(path)
    assert message in str(refused.value)


def test_the_same_pipeline_twice_in_a_file(tmp_path):
    text = EXAMPLE.read_text()
    path = tmp_path / "pipelines.yaml"
    path.write_text(text + text.split("pipelines:\n", 1)[1])
    with pytest.raises(DeclarationError, match="pipelines.yaml: pipeline 'orders' is declared twice"):
        load_yaml(path)


ENV_MISTAKES = {
    "a sink kind that is not one": (
        {"EVENT_REPLAY_SINK__TELEMETRY": "kafak:t"},
        "EVENT_REPLAY_SINK__TELEMETRY='kafak:t': sink kind 'kafak' is not one of ",
    ),
    "no destination": (
        {"EVENT_REPLAY_SINK__TELEMETRY": "kafka"},
        "EVENT_REPLAY_SINK__TELEMETRY='kafka': the kafka sink needs its topic: kafka:<topic>",
    ),
    "a destination the outbox does not take": (
        {"EVENT_REPLAY_SINK__TELEMETRY": "outbox:x"},
        "the outbox sink takes no destination",
    ),
    "an unknown option": (
        {"EVENT_REPLAY_SINK__TELEMETRY": "redis:q?mod=list"},
        "'mod=list' is not an option of the redis sink (options: mode, prefix, seen_ttl_s, job_name)",
    ),
    "a bad option value": (
        {"EVENT_REPLAY_SINK__TELEMETRY": "sqs:q?max_visible=many"},
        "EVENT_REPLAY_SINK__TELEMETRY='sqs:q?max_visible=many': max_visible: expected a number, got 'many'",
    ),
    "a bad queue name": ({"EVENT_REPLAY_SINK__TELEMETRY": "sqs:a/b"}, "'a/b' is not a valid SQS queue name"),
    "a pipeline that is not served": (
        {"EVENT_REPLAY_SINK__TELEMETRI": "outbox"},
        "EVENT_REPLAY_SINK__TELEMETRI names no pipeline; the pipelines are telemetry, billing_reprocessing, "
        "ingestion_refill",
    ),
    "a shipped set that is not one": (
        {"EVENT_REPLAY_SHIPPED_PIPELINES": "telemetry,orders"},
        "EVENT_REPLAY_SHIPPED_PIPELINES='telemetry,orders': use all, none or names of shipped pipelines",
    ),
    "a file of another kind": (
        {"EVENT_REPLAY_PIPELINES": "pipelines.toml"},
        "cannot import pipelines.toml (No module named 'pipelines'): name a .yaml/.yml file, a .py file",
    ),
    "not a name": ({"EVENT_REPLAY_PIPELINES": "my pipelines"}, "name a .yaml/.yml file, a .py file or an importable"),
    "a missing file": ({"EVENT_REPLAY_PIPELINES": "/nonexistent/p.yaml"}, "cannot read /nonexistent/p.yaml"),
    "a module that is not there": (
        {"EVENT_REPLAY_PIPELINES": "no_such_module_here"},
        "EVENT_REPLAY_PIPELINES: cannot import no_such_module_here (No module named 'no_such_module_here')",
    ),
    "a module without PIPELINES": ({"EVENT_REPLAY_PIPELINES": "json"}, "json defines no PIPELINES"),
}


@pytest.mark.parametrize("mistake", ENV_MISTAKES)
def test_a_bad_environment_setting_is_a_clear_error(mistake):
    env, message = ENV_MISTAKES[mistake]
    with pytest.raises(DeclarationError) as refused:
        serve(PIPELINES, REFILLS, env)
    assert message in str(refused.value)


def test_a_module_spec_that_fails_its_own_check_names_the_module(tmp_path):
    bad = tmp_path / "bad_pipelines.py"
    bad.write_text(MODULE.format(name="orders").replace('path="body.kind"', 'path="body..kind"'))
    with pytest.raises(DeclarationError, match=r"bad_pipelines.py: field 'kind': path 'body..kind' has an empty key"):
        serve(PIPELINES, REFILLS, {"EVENT_REPLAY_PIPELINES": str(bad)})
    wrong = tmp_path / "wrong_pipelines.py"
    wrong.write_text("PIPELINES = ('orders',)\n")
    with pytest.raises(DeclarationError, match="PIPELINES holds 'orders', not a PipelineSpec"):
        serve(PIPELINES, REFILLS, {"EVENT_REPLAY_PIPELINES": str(wrong)})


def test_a_bad_setting_stops_the_code_location_and_the_cli(env, monkeypatch, fresh_definitions, capsys):
    import importlib

    monkeypatch.setenv("EVENT_REPLAY_SINK__ORDERS", "kafka:orders-replayed")  # no pipeline `orders` is served
    with pytest.raises(DeclarationError, match="EVENT_REPLAY_SINK__ORDERS names no pipeline"):
        importlib.import_module("replay_defs.definitions")  # what Dagster does to load the code location
    from replay_defs.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["status", "telemetry", DAY])
    assert str(stopped.value.code).startswith("event-replay: EVENT_REPLAY_SINK__ORDERS names no pipeline")
