"""The sink registry (`replay_defs/sinks/`): a sink is one module, and the code location knows sinks
only through the registry.

The "spool" sink below is such a module, written in this test: its spec, its sender (a real one,
appending JSON lines to files in a directory), its Dagster resource with an env setting, and a
dead-letter source. Registered, it is delivered to by a pipeline's redrive and watched by a
dead-letter sensor without a line of the code location changing.
"""

import dataclasses
import importlib
import json
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg
import pytest
from conftest import check_verdicts
from pydantic import Field

import replay_defs.sinks
from replay_defs.pipeline.spec import DeadLettersSpec, RedriveSpec
from replay_defs.pipelines import PIPELINES, REFILLS, TELEMETRY
from replay_defs.sinks import open_sink, sink_type, sink_types
from replay_defs.sinks.base import Batch, SinkType

DAY = "2025-11-25"

# ---- the spool sink: everything a sink module holds -----------------------------------------


@dataclass(frozen=True)
class SpoolSinkSpec:
    """Deliveries appended to `<spool dir>/<channel>.jsonl` (resource `spool`)."""

    channel: str
    kind: Literal["spool"] = "spool"

    @property
    def name(self) -> str:
        return f"spool:{self.channel}"


class SpoolSink:
    def __init__(self, directory: str, channel: str):
        self.path = Path(directory) / f"{channel}.jsonl"
        self.name = f"spool:{channel}"

    def deliver(self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.writelines(body + b"\n" for body in batch.bodies)
        return [None] * len(batch)

    def close(self) -> None:
        pass


class SpoolResource(dg.ConfigurableResource):
    directory: str = Field(description="Spool directory (env EVENT_REPLAY_TEST_SPOOL).")


def peek_spool_dead_letters(source, spool: SpoolResource, peek: bool):
    path = Path(spool.directory) / f"{source.name}.jsonl"
    letters = path.read_text().splitlines() if path.exists() else []
    return len(letters), letters[-source.peek :] if peek else []


SINK = SinkType(
    kind="spool",
    spec=SpoolSinkSpec,
    resource=SpoolResource,
    settings={"directory": ("EVENT_REPLAY_TEST_SPOOL", "data/spool")},
    open=lambda resource, spec: SpoolSink(resource.directory, spec.channel),
    dead_letters={"spool": peek_spool_dead_letters},
)

# ---------------------------------------------------------------------------------------------


@pytest.fixture
def spool(env, monkeypatch, tmp_path):
    monkeypatch.setitem(sink_types(), SINK.kind, SINK)  # what the registry does with a module's SINK
    monkeypatch.setenv("EVENT_REPLAY_TEST_SPOOL", str(tmp_path / "spool"))
    return tmp_path / "spool"


def test_a_sink_module_alone_is_enough(spool, instance):
    from replay_defs.definitions import build_definitions

    spec = dataclasses.replace(
        TELEMETRY,
        name="telemetry_spool",
        parsed_prefix="telemetry_spool_flat",
        redrive=RedriveSpec(unit="event", sink=SpoolSinkSpec("events")),
        dead_letters=(DeadLettersSpec("spool", "events-dlq", growth=5),),
    )
    defs = build_definitions([spec])
    assert isinstance(defs.resources["spool"], SpoolResource), "the registry built its resource"

    job = defs.resolve_job_def("telemetry_spool_replay")
    result = job.execute_in_process(instance=instance, partition_key=DAY, raise_on_error=False)
    assert result.success
    (mat,) = result.asset_materializations_for_node("telemetry_spool__redrive")
    md = {k: v.value for k, v in mat.metadata.items()}
    sent = [json.loads(line) for line in (spool / "events.jsonl").read_text().splitlines()]
    assert md["sink"] == "spool:events" and md["published"] == md["selected"] == len(sent) > 0
    assert check_verdicts(result)[("deliveries_reconcile", DAY)] is True

    # Its dead-letter source is watched by a sensor reading through the same resource.
    (sensor,) = [s for s in defs.sensors if "__dlq_" in s.name]
    (spool / "events-dlq.jsonl").write_text("".join(json.dumps(m) + "\n" for m in sent[:20]))
    context = dg.build_sensor_context(
        instance=instance, repository_def=defs.get_repository_def(), resources=defs.resources
    )
    tick = sensor(context)
    assert "depth 20" in tick.skip_reason.skip_message, "a first reading is a baseline"


def _sink_modules() -> list:
    names = [m.name for m in pkgutil.iter_modules(replay_defs.sinks.__path__) if m.name != "base"]
    return [importlib.import_module(f"replay_defs.sinks.{n}") for n in names]


def _example(spec_class):
    """A spec of the class with "x" for each required field (a valid name for every sink)."""
    required = [f.name for f in dataclasses.fields(spec_class) if f.default is dataclasses.MISSING]
    return spec_class(**{name: "x" for name in required})


def test_the_registry_covers_every_sink_a_spec_can_name(env):
    from replay_defs.definitions import build_definitions

    modules = _sink_modules()
    assert {m.SINK.kind for m in modules} == set(sink_types()) >= {"outbox", "kafka", "sqs", "rabbitmq", "redis"}
    for module in modules:
        entry = module.SINK
        # Every declaration a spec can name is its module's registered `<X>SinkSpec`.
        specs = [v for k, v in vars(module).items() if k.endswith("SinkSpec") and isinstance(v, type)]
        assert specs == [entry.spec] and entry.spec.__module__ == module.__name__
        example = _example(entry.spec)
        assert example.kind == entry.kind and sink_type(example) is entry
        # A spec naming it gets its resource in the code location, and its sender is `<X>Sink`.
        spec = dataclasses.replace(TELEMETRY, redrive=RedriveSpec(sink=example))
        resources = build_definitions([spec]).resources
        assert isinstance(resources[entry.resource_key], entry.resource)
        with dg.build_resources({entry.resource_key: resources[entry.resource_key]}) as built:
            sender = open_sink(built, example)
            try:
                assert type(sender).__name__ == re.sub("Spec$", "", entry.spec.__name__)
                assert sender.name == example.name, "the ledger's name for the sink is the spec's"
            finally:
                sender.close()
    for spec in (*PIPELINES, *REFILLS):
        assert sink_type(spec.redrive.sink).kind == spec.redrive.sink.kind
    # Every dead-letter kind the docs name is accepted; one no module reads is refused.
    for kind in ("sqs", "bullmq", "kafka", "rabbitmq", "postgres"):
        DeadLettersSpec(kind, "q")
    with pytest.raises(ValueError):
        DeadLettersSpec("spool", "q")
