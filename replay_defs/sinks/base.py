"""What every sink shares, Dagster-free: the engines import `Batch` and `Sink` from here.

- `Batch`: messages to deliver, column by column.
- `Sink`: a sender. It takes a `Batch` and answers per message: None when confirmed, an `Unknown`
  error when the target may hold it anyway (timed out, connection lost after sending), else the
  error of a refusal (the target does not hold it). It may say which messages the target holds.
- `SinkSpec`: what a sink's declaration (`<X>SinkSpec`, a frozen dataclass in its module) offers.
- `SinkType`: a sink module's entry in the registry (`replay_defs.sinks`): its spec, its Dagster
  resource, the resource's env settings, how a sender is opened, the dead-letter sources it reads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Batch:
    """Messages to deliver, column by column: a million events stay a few lists, not objects.

    `bodies` are the JSON messages as sent (the message id is inside); `keys` are partition keys
    (Kafka message keys), the ids when absent.
    """

    ids: list[str]
    bodies: list[bytes]
    types: list[str | None]
    keys: list[bytes] | None = None
    drop: list[str | None] | None = None  # per message, why it cannot be sent (counted as dropped)

    def __len__(self) -> int:
        return len(self.ids)

    def key_list(self) -> list[bytes]:
        return self.keys if self.keys is not None else [i.encode() for i in self.ids]

    def take(self, index: list[int]) -> "Batch":
        def pick(col):
            return None if col is None else [col[i] for i in index]

        return Batch(pick(self.ids), pick(self.bodies), pick(self.types), pick(self.keys), pick(self.drop))

    def slice(self, start: int, stop: int) -> "Batch":
        def cut(col):
            return None if col is None else col[start:stop]

        return Batch(cut(self.ids), cut(self.bodies), cut(self.types), cut(self.keys), cut(self.drop))

    @staticmethod
    def of(messages: list[tuple[str, dict, str | None]]) -> "Batch":
        """From (id, body, type) triples; the id is added to each JSON body."""
        return Batch(
            [m[0] for m in messages],
            [json.dumps({"id": m[0], **m[1]}, sort_keys=True).encode() for m in messages],
            [m[2] for m in messages],
        )


class Unknown(str):
    """A delivery's error after which the target may hold the message anyway: a timeout, or a
    connection lost after the message was sent. Any other error means the target refused it."""


class Unreachable(str):
    """A delivery's error when the target could not be reached, or stopped answering before the
    message was sent: it does not hold it (a failure, like a refusal), and the target is down."""


def unknown(error: str) -> Unknown:
    return Unknown(error if error.startswith("unknown: ") else "unknown: " + error)


class Sink(Protocol):
    name: str

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        """Deliver a batch; per message None when confirmed, an `Unknown` when the outcome is in
        doubt, else the error text of a refusal."""

    def close(self) -> None:
        """Release connections."""

    # Optional: `send(pipeline, day, batch, run_id, resend)` hands the batch over and returns at
    # once a function that waits for its outcomes and returns them as `deliver` does (Kafka), so
    # the redrive sends the next chunk while this one's are on their way.


def held(sink, pipeline: str, day: str, ids: list[str], since: float) -> set[str] | None:
    """Which of `ids` the sink's target holds, asked of a sink that can tell (a method `held` with
    these arguments; `since`: epoch seconds before their first possible send), None for one that
    cannot (RabbitMQ, a standard SQS queue). Raises when the target cannot be asked now."""
    ask = getattr(sink, "held", None)
    return None if ask is None else ask(pipeline, day, ids, since)


def can_tell(sink) -> bool:
    """Whether the sink can say which messages its target holds (see `held`)."""
    return callable(getattr(sink, "held", None))


def resend_is_deduplicated(sink, since: float) -> bool:
    """Whether sending again what may have been sent at `since` (epoch seconds) leaves one copy
    although the sink cannot say what it holds: an SQS FIFO queue within its deduplication window
    (a sink's `dedup_window_s`)."""
    import time

    window = getattr(sink, "dedup_window_s", 0.0)
    return window > 0 and time.time() - since < window


class PlanOnlySink:
    """A dry run's sink: the ledger's name of the target, no connection, nothing can be sent."""

    def __init__(self, name: str):
        self.name = name

    def deliver(self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False) -> list:
        raise RuntimeError(f"a dry run sends nothing ({self.name})")

    def close(self) -> None:
        pass


class SinkSpec(Protocol):
    """A sink as a pipeline declares it (`RedriveSpec(sink=...)`): a frozen dataclass whose `kind`
    names its registry entry and whose `name` is the ledger's name for the target."""

    kind: str

    @property
    def name(self) -> str: ...


def with_destination(spec, destination: str):
    """`spec` delivering to another destination of its kind (its first required field: a Kafka
    topic, an SQS queue, a RabbitMQ exchange, a Redis key), its other options kept: a launch's own
    target. Its `name` changes with it, so the ledger keeps the two targets' deliveries apart.
    Raises ValueError for a sink without a destination (the outbox) or a bad one (the spec's own checks)."""
    required = [
        f.name
        for f in dataclasses.fields(spec)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if not required:
        raise ValueError(f"the {spec.kind} sink takes no destination")
    return dataclasses.replace(spec, **{required[0]: destination})


# (source, resource, peek) -> (depth, the newest dead letters as JSON text or timestamps)
DeadLetterProbe = Callable[[Any, Any, bool], tuple[int, list]]


@dataclass(frozen=True)
class SinkType:
    """A sink module's entry in the registry: all the Dagster layer needs to build and use the sink.

    `kind` is the spec's `kind` and the key of the Dagster resource (`resource`), which is built
    from `settings` (resource field -> (env var, default); set, the variable is resolved at launch).
    `open(resource, spec)` returns the sender. `dead_letters`: dead-letter kinds (`DeadLettersSpec.kind`)
    this system's resource reads, each with its probe. `always`: the resource is in every code
    location, whether or not a spec names the sink. `held_ids(resource, pipeline_spec)`: for a
    sink that can be read back, a function `(day, ids) -> the ids it holds`, which the
    `deliveries_reconcile` check compares with the ledger; None where it cannot be read back.
    """

    kind: str
    spec: type
    resource: type
    settings: dict[str, tuple[str, Any]]
    open: Callable[[Any, Any], Sink]
    dead_letters: dict[str, DeadLetterProbe] = field(default_factory=dict)
    always: bool = False
    held_ids: Callable[[Any, Any], Callable[[str, list[str]], set[str]]] | None = None

    @property
    def resource_key(self) -> str:
        return self.kind
