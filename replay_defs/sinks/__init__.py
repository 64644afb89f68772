"""Where redrive deliveries go: one module per sink, and this registry of them.

A sink module (`outbox.py`, `kafka.py`, `sqs.py`, `rabbitmq.py`, `redis.py`) holds everything of
its sink: the declaration a pipeline writes (`<X>SinkSpec`), the sender (`<X>Sink`), its Dagster
resource, and `SINK`, its `SinkType` entry (resource key and env settings, how a sender is opened,
the dead-letter sources its resource reads). Adding a sink is adding such a module: the registry
finds it, and the Dagster layer (`replay_defs/definitions.py`, `assets/redrive.py`, `sensors/`)
knows sinks only through the registry.

`base.py` holds what they share (`Batch`, the `Sink` protocol, `SinkType`) and imports no Dagster:
the engines use it. The sink modules import Dagster for their resource, so this registry imports
them on first use, not when the package is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from replay_defs.sinks.base import DeadLetterProbe, PlanOnlySink, Sink, SinkType


@cache
def sink_types() -> dict[str, SinkType]:
    """Every sink by kind: the `SINK` entry of each module of this package but `base`."""
    found: dict[str, SinkType] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name == "base" or module.name.startswith("_"):
            continue
        entry: SinkType = importlib.import_module(f"{__name__}.{module.name}").SINK
        if entry.kind in found:
            raise RuntimeError(f"two sink modules declare kind {entry.kind!r}")
        found[entry.kind] = entry
    return found


def sink_type(spec) -> SinkType:
    """The registry's entry for a sink spec."""
    entry = sink_types().get(getattr(spec, "kind", None))
    if entry is None or not isinstance(spec, entry.spec):
        known = ", ".join(t.spec.__name__ for t in sink_types().values())
        raise ValueError(f"{spec!r} is not a sink spec; the sinks are {known}")
    return entry


def open_sink(resources, spec, dry_run: bool = False) -> Sink:
    """The sender for `spec`, from its resource among `resources` (a Dagster context's resources).
    A dry run gets a sender that connects to nothing: a plan needs no broker."""
    entry = sink_type(spec)
    if dry_run:
        return PlanOnlySink(spec.name)
    return entry.open(getattr(resources, entry.resource_key), spec)


def dead_letter_readers() -> dict[str, tuple[str, DeadLetterProbe]]:
    """Dead-letter kind -> (the resource key it is read through, its probe), from every sink."""
    return {kind: (t.resource_key, probe) for t in sink_types().values() for kind, probe in t.dead_letters.items()}
