"""The outbox sink (the embedded default): JSONL batch files in a directory a consumer can tail."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from replay_defs.core.lake import check_partition
from replay_defs.deployment import deployed_path
from replay_defs.pipeline.delivery import message_id_of
from replay_defs.sinks.base import Batch, SinkType

# Where the outbox keeps its files: a deployment setting (see replay_defs/deployment.py).
OUTBOX = ("EVENT_REPLAY_OUTBOX", "data/outbox")


@dataclass(frozen=True)
class OutboxSinkSpec:
    """Deliveries written as JSONL files to `<outbox root>/<pipeline>/day=<D>/` (resource `outbox`)."""

    kind: Literal["outbox"] = "outbox"

    @property
    def name(self) -> str:  # the ledger's name for this sink
        return "outbox"


class OutboxSink:
    """`<root>/<pipeline>/day=<D>/batch-<hash>.jsonl`, one JSON message a line.

    Batch files are written to a temp name and renamed, and named after a hash of their message
    ids, so a batch re-sent after a crash (same pending messages, same batches) replaces itself
    instead of appearing twice. A forced re-send (`resend`) is a new delivery: the run id salts
    the name.
    """

    name = "outbox"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        d = self.root / pipeline / f"day={check_partition(day)}"
        d.mkdir(parents=True, exist_ok=True)
        salt = run_id if resend else ""
        name = hashlib.sha256(("\n".join(batch.ids) + "\n" + salt).encode()).hexdigest()[:32]
        path = d / f"batch-{name}.jsonl"
        tmp = d / f".{path.name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            for body in batch.bodies:
                f.write(body + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return [None] * len(batch)

    def close(self) -> None:
        pass

    def read(self, pipeline: str, days: list[str] | None = None) -> Iterator[dict]:
        """The messages delivered for the pipeline (those of `days` only, when given)."""
        dirs = [f"day={check_partition(d)}" for d in days] if days is not None else ["day=*"]
        for path in sorted(p for d in dirs for p in (self.root / pipeline).glob(f"{d}/batch-*.jsonl")):
            with open(path) as f:
                for line in f:
                    yield json.loads(line)


class OutboxResource(dg.ConfigurableResource):
    """The default redrive sink: JSONL files in a directory a consumer can tail."""

    root: str = Field(description="Outbox directory (env EVENT_REPLAY_OUTBOX).")

    def get(self) -> OutboxSink:
        return OutboxSink(deployed_path(self.root, OUTBOX))


def held_ids(resource: OutboxResource, pipeline_spec):
    """Which of some ids the outbox holds, read from its files (a raw file's message can sit under a
    neighbouring day's directory: a file holds events of up to three days)."""
    outbox = resource.get()

    def held(day: str, ids: list[str]) -> set[str]:
        d = date.fromisoformat(day)
        days = [(d + timedelta(days=k)).isoformat() for k in range(-2, 3)]
        return set(ids) & {message_id_of(pipeline_spec, body) for body in outbox.read(pipeline_spec.name, days)}

    return held


SINK = SinkType(
    kind="outbox",
    spec=OutboxSinkSpec,
    resource=OutboxResource,
    settings={"root": OUTBOX},
    open=lambda resource, spec: resource.get(),
    always=True,  # the embedded default: every code location has it
    held_ids=held_ids,
)
