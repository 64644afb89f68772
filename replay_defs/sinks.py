"""Where redrive deliveries go. A sink confirms or fails each message; the ledger records which.

- `Outbox`: JSONL files in a directory (the embedded default).
- `KafkaTopic`: an idempotent Kafka producer; a message counts only once the broker confirmed it.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from replay_defs.lake import check_partition


@dataclass(frozen=True)
class Message:
    id: str
    body: dict
    type: str | None = None


class Sink(Protocol):
    name: str

    def deliver(self, pipeline: str, day: str, messages: list[Message], run_id: str = "", resend: bool = False) -> list[str | None]:
        """Deliver a batch; per message None when confirmed, else the error text."""


class Outbox:
    """`<root>/<pipeline>/day=<D>/batch-<hash>.jsonl`, one JSON message a line.

    Batch files are written to a temp name and renamed, and named after a hash of their message
    ids, so a batch re-sent after a crash (same pending messages, same batches) replaces itself
    instead of appearing twice. A forced re-send (`resend`) is a new delivery: the run id salts
    the name.
    """

    name = "outbox"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def deliver(self, pipeline: str, day: str, messages: list[Message], run_id: str = "", resend: bool = False) -> list[str | None]:
        d = self.root / pipeline / f"day={check_partition(day)}"
        d.mkdir(parents=True, exist_ok=True)
        salt = run_id if resend else ""
        name = hashlib.sha256(("\n".join(m.id for m in messages) + "\n" + salt).encode()).hexdigest()[:32]
        path = d / f"batch-{name}.jsonl"
        tmp = d / f".{path.name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            for m in messages:
                f.write(json.dumps({"id": m.id, **m.body}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return [None] * len(messages)

    def read(self, pipeline: str) -> Iterator[dict]:
        for path in sorted((self.root / pipeline).glob("day=*/batch-*.jsonl")):
            with open(path) as f:
                for line in f:
                    yield json.loads(line)


class KafkaTopic:
    """Idempotent producer (acks=all): retries inside one producer never duplicate. A restarted
    process is a new producer, which is why the ledger, not idempotence, prevents re-sends."""

    def __init__(self, bootstrap_servers: str, topic: str, message_timeout_ms: int = 30_000, config: dict | None = None):
        from confluent_kafka import Producer

        self.topic = topic
        self.name = f"kafka:{topic}"
        self.timeout_s = message_timeout_ms / 1000 + 5
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": message_timeout_ms,
                **(config or {}),
            }
        )

    def deliver(self, pipeline: str, day: str, messages: list[Message], run_id: str = "", resend: bool = False) -> list[str | None]:
        errors: list[str | None] = ["no delivery report before the flush timeout"] * len(messages)

        def report(i: int):
            def on_delivery(err, _msg):
                errors[i] = None if err is None else str(err)

            return on_delivery

        headers = [("replay_run_id", run_id.encode()), ("pipeline", pipeline.encode()), ("day", day.encode())]
        for i, m in enumerate(messages):
            value = json.dumps({"id": m.id, **m.body}, sort_keys=True).encode()
            while True:
                try:
                    self._producer.produce(self.topic, key=m.id.encode(), value=value, headers=headers, on_delivery=report(i))
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self._producer.poll(0.1)
            self._producer.poll(0)
        self._producer.flush(self.timeout_s)
        return errors
