"""Where redrive deliveries go. A sink confirms or fails each message; the ledger records which.

- `Outbox`: JSONL files in a directory (the embedded default).
- `KafkaTopic`: an idempotent Kafka producer; a message counts only once the broker confirmed it.
- `SqsQueue`: SendMessageBatch, retrying the entries a batch reports as failed; queue-depth
  backpressure.
- `RabbitExchange`: AMQP publishes with publisher confirms, routed by event type.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from replay_defs.lake import check_partition
from replay_defs.redact import redact


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
                errors[i] = None if err is None else redact(str(err))

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


class SqsQueue:
    """SQS via boto3. Batches hold at most 10 entries and `max_batch_bytes` (256 KiB: what moto
    enforces; AWS now takes 1 MiB). SendMessageBatch succeeds as a call even when entries fail,
    so failed entries are retried with backoff before they count as failed."""

    MAX_ENTRIES = 10

    def __init__(self, client, queue: str, max_visible: int | None = None, max_batch_bytes: int = 256 * 1024,
                 retries: int = 3, poll_s: float = 1.0):
        self.client = client
        self.queue = queue
        self.name = f"sqs:{queue}"
        self.fifo = queue.endswith(".fifo")
        self.max_visible = max_visible
        self.max_batch_bytes = max_batch_bytes
        self.retries = retries
        self.poll_s = poll_s
        self.paused_s = 0.0  # time spent waiting for the queue to drain (backpressure)
        self._url: str | None = None

    def _queue_url(self) -> str:
        if self._url is None:
            self._url = self.client.get_queue_url(QueueName=self.queue)["QueueUrl"]
        return self._url

    def _wait_for_room(self) -> None:
        if self.max_visible is None:
            return
        while True:
            attrs = self.client.get_queue_attributes(QueueUrl=self._queue_url(), AttributeNames=["ApproximateNumberOfMessages"])
            if int(attrs["Attributes"]["ApproximateNumberOfMessages"]) <= self.max_visible:
                return
            time.sleep(self.poll_s)
            self.paused_s += self.poll_s

    def _chunks(self, entries: list[dict]) -> Iterator[list[dict]]:
        chunk, size = [], 0
        for e in entries:
            n = len(e["MessageBody"].encode())
            if chunk and (len(chunk) == self.MAX_ENTRIES or size + n > self.max_batch_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append(e)
            size += n
        if chunk:
            yield chunk

    def deliver(self, pipeline: str, day: str, messages: list[Message], run_id: str = "", resend: bool = False) -> list[str | None]:
        errors: list[str | None] = [None] * len(messages)
        attrs = {k: {"DataType": "String", "StringValue": v} for k, v in (("replay_run_id", run_id or "-"), ("pipeline", pipeline), ("day", day))}
        entries = []
        for i, m in enumerate(messages):
            entry = {"Id": str(i), "MessageBody": json.dumps({"id": m.id, **m.body}, sort_keys=True), "MessageAttributes": attrs}
            if self.fifo:
                entry["MessageGroupId"] = f"{pipeline}-{day}"
                # A forced re-send must not be swallowed by the 5-minute deduplication window.
                entry["MessageDeduplicationId"] = hashlib.sha256(f"{m.id}{run_id if resend else ''}".encode()).hexdigest()[:64]
            entries.append(entry)
        for chunk in self._chunks(entries):
            self._wait_for_room()
            pending, attempt = chunk, 0
            while pending:
                failed = self._send(pending)
                attempt += 1
                for e, err, retryable in failed:
                    if not retryable or attempt > self.retries:
                        errors[int(e["Id"])] = err
                pending = [e for e, _, retryable in failed if retryable and attempt <= self.retries]
                if pending:
                    time.sleep(0.2 * 2**attempt)
        return errors

    def _send(self, entries: list[dict]) -> list[tuple[dict, str, bool]]:
        """One SendMessageBatch; returns (entry, error, retryable) for every entry that failed."""
        from botocore.exceptions import ClientError

        try:
            resp = self.client.send_message_batch(QueueUrl=self._queue_url(), Entries=entries)
        except ClientError as exc:
            if len(entries) > 1:  # refused as a whole (e.g. one entry too big): isolate the culprit
                return [f for e in entries for f in self._send([e])]
            code = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            return [(entries[0], redact(f"{exc.response['Error'].get('Code')}: {exc.response['Error'].get('Message')}"), code >= 500)]
        except Exception as exc:  # the endpoint is down or unreachable: retry later
            return [(e, redact(f"{type(exc).__name__}: {exc}"), True) for e in entries]
        by_id = {e["Id"]: e for e in entries}
        return [(by_id[f["Id"]], f"{f.get('Code')}: {f.get('Message')}", not f.get("SenderFault", False)) for f in resp.get("Failed", [])]


class RabbitExchange:
    """pika with publisher confirms: a publish counts once the broker acked it (`mandatory`, so a
    message no queue would take is a failure, not a silent drop). A lost connection fails the
    rest of the batch; the next batch reconnects."""

    def __init__(self, url: str, exchange: str, routing_key: str = "{type}"):
        self.url = url
        self.exchange = exchange
        self.routing_key = routing_key
        self.name = f"rabbitmq:{exchange}"
        self._channel = None

    def _open(self):
        import pika

        if self._channel is None or self._channel.is_closed:
            params = pika.URLParameters(self.url)
            params.connection_attempts = 1
            params.socket_timeout = 5
            self._channel = pika.BlockingConnection(params).channel()
            self._channel.confirm_delivery()
        return self._channel

    def deliver(self, pipeline: str, day: str, messages: list[Message], run_id: str = "", resend: bool = False) -> list[str | None]:
        import pika
        from pika.exceptions import AMQPError

        errors: list[str | None] = []
        props = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, headers={"replay_run_id": run_id, "pipeline": pipeline, "day": day}
        )
        for m in messages:
            if errors and errors[-1] is not None and errors[-1].startswith("connection"):
                errors.append(errors[-1])  # the connection is gone: fail the rest of the batch fast
                continue
            key = self.routing_key.format(type=m.type or "any", pipeline=pipeline)
            body = json.dumps({"id": m.id, **m.body}, sort_keys=True).encode()
            try:
                self._open().basic_publish(self.exchange, key, body, properties=props, mandatory=True)
                errors.append(None)
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                errors.append(f"not confirmed: {type(exc).__name__}")
            except (AMQPError, OSError) as exc:
                self._channel = None
                errors.append(redact(f"connection: {type(exc).__name__}: {exc}"))
        return errors
