"""Where redrive deliveries go. A sink confirms or fails each message; the ledger records which.

- `Outbox`: JSONL files in a directory (the embedded default).
- `KafkaTopic`: an idempotent Kafka producer; a message counts only once the broker confirmed it.
- `SqsQueue`: SendMessageBatch, retrying the entries a batch reports as failed; queue-depth
  backpressure.
- `RabbitExchange`: AMQP publishes with publisher confirms, routed by event type.
- `RedisTarget`: BullMQ jobs, list or stream entries, one atomic step per batch.

Every sink takes a `Batch` and answers per message: None when confirmed, else the error.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

from replay_defs.core import connect
from replay_defs.core.lake import check_partition
from replay_defs.core.redact import redact


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


class Sink(Protocol):
    name: str

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        """Deliver a batch; per message None when confirmed, else the error text."""

    def close(self) -> None:
        """Release connections."""


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


class KafkaTopic:
    """Idempotent producer (acks=all): retries inside one producer never duplicate. A restarted
    process is a new producer, which is why the ledger, not idempotence, prevents re-sends."""

    def __init__(
        self, bootstrap_servers: str, topic: str, message_timeout_ms: int = 30_000, config: dict | None = None
    ):
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

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        errors: list[str | None] = ["no delivery report before the flush timeout"] * len(batch)

        def on_delivery(i: int, err, _msg) -> None:
            errors[i] = None if err is None else redact(str(err))

        headers = [("replay_run_id", run_id.encode()), ("pipeline", pipeline.encode()), ("day", day.encode())]
        produce, poll = self._producer.produce, self._producer.poll
        for i, (key, value) in enumerate(zip(batch.key_list(), batch.bodies)):
            while True:
                try:
                    produce(self.topic, value, key, headers=headers, on_delivery=partial(on_delivery, i))
                    break
                except BufferError:  # local queue full: let deliveries drain
                    poll(0.1)
            if i % 1000 == 0:
                poll(0)
        self._producer.flush(self.timeout_s)
        return errors

    def close(self) -> None:
        self._producer.flush(self.timeout_s)


class SqsQueue:
    """SQS via boto3. Batches hold at most 10 entries and `max_batch_bytes` (256 KiB: what moto
    enforces; AWS now takes 1 MiB). SendMessageBatch succeeds as a call even when entries fail,
    so failed entries are retried with backoff before they count as failed."""

    MAX_ENTRIES = 10

    def __init__(
        self,
        client,
        queue: str,
        max_visible: int | None = None,
        max_batch_bytes: int = 256 * 1024,
        retries: int = 3,
        poll_s: float = 1.0,
    ):
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
            attrs = self.client.get_queue_attributes(
                QueueUrl=self._queue_url(), AttributeNames=["ApproximateNumberOfMessages"]
            )
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

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        errors: list[str | None] = [None] * len(batch)
        attrs = {
            k: {"DataType": "String", "StringValue": v}
            for k, v in (("replay_run_id", run_id or "-"), ("pipeline", pipeline), ("day", day))
        }
        entries = []
        for i, (mid, body) in enumerate(zip(batch.ids, batch.bodies)):
            entry = {"Id": str(i), "MessageBody": body.decode(), "MessageAttributes": attrs}
            if self.fifo:
                entry["MessageGroupId"] = f"{pipeline}-{day}"
                # A forced re-send must not be swallowed by the 5-minute deduplication window.
                entry["MessageDeduplicationId"] = hashlib.sha256(
                    f"{mid}{run_id if resend else ''}".encode()
                ).hexdigest()[:64]
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

    def close(self) -> None:
        pass

    def _send(self, entries: list[dict]) -> list[tuple[dict, str, bool]]:
        """One SendMessageBatch; returns (entry, error, retryable) for every entry that failed."""
        from botocore.exceptions import ClientError

        try:
            resp = self.client.send_message_batch(QueueUrl=self._queue_url(), Entries=entries)
        except ClientError as exc:
            if len(entries) > 1:  # refused as a whole (e.g. one entry too big): isolate the culprit
                return [f for e in entries for f in self._send([e])]
            code = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            return [
                (
                    entries[0],
                    redact(f"{exc.response['Error'].get('Code')}: {exc.response['Error'].get('Message')}"),
                    code >= 500,
                )
            ]
        except Exception as exc:  # the endpoint is down or unreachable: retry later
            return [(e, redact(f"{type(exc).__name__}: {exc}"), True) for e in entries]
        by_id = {e["Id"]: e for e in entries}
        return [
            (by_id[f["Id"]], f"{f.get('Code')}: {f.get('Message')}", not f.get("SenderFault", False))
            for f in resp.get("Failed", [])
        ]


AMQP_SHORT_STRING_BYTES = 255  # AMQP 0-9-1 short strings: routing key, message_id, header (field table) keys
# RabbitMQ 4's default `max_message_size` (3.8 to 3.13: 128 MiB); a body over it is refused before it is sent.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def amqp_refusal(
    routing_key: str,
    body: bytes,
    message_id: str | None = None,
    headers: dict | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> str | None:
    """Why an AMQP broker (or pika, before sending) would refuse this message for its shape, as
    `reason: detail` (no content of the message, only sizes); None when it fits."""

    def too_long(what: str, value) -> str | None:
        if not isinstance(value, str):
            return None
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            return f"{what}_not_utf8: not encodable as UTF-8"
        return f"{what}_too_long: {n} bytes > {AMQP_SHORT_STRING_BYTES}" if n > AMQP_SHORT_STRING_BYTES else None

    def header_keys(table: dict) -> str | None:
        for k, v in table.items():
            why = too_long("header_key", k) or (header_keys(v) if isinstance(v, dict) else None)
            if why:
                return why
        return None

    why = too_long("routing_key", routing_key) or too_long("message_id", message_id) or header_keys(headers or {})
    if why:
        return why
    if max_message_bytes and len(body) > max_message_bytes:
        return f"body_too_large: {len(body)} bytes > {max_message_bytes}"
    return None


class RabbitExchange:
    """pika with publisher confirms: a publish counts once the broker acked it (`mandatory`, so a
    message no queue would take is a failure, not a silent drop). A message whose shape AMQP or the
    broker refuses (a routing key, message id or header key over 255 bytes, a body over
    `max_message_bytes`) fails alone with `refused: <reason>: ...`, before anything is sent. A lost
    connection fails the rest of the batch; the next batch reconnects."""

    REFUSED = "refused: "

    def __init__(
        self, url: str, exchange: str, routing_key: str = "{type}", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ):
        self.url = url
        self.exchange = exchange
        self.routing_key = routing_key
        self.max_message_bytes = max_message_bytes
        self.name = f"rabbitmq:{exchange}"
        self._connection = None
        self._channel = None

    def _open(self):
        if self._channel is None or self._channel.is_closed:
            if self._connection is None or self._connection.is_closed:
                self._connection = connect.rabbitmq(self.url, connection_attempts=1, socket_timeout=5)
            self._channel = (
                self._connection.channel()
            )  # the broker closed the channel alone: a new one on the same connection
            self._channel.confirm_delivery()
        return self._channel

    def publish(self, routing_key: str, body: bytes, message_id: str, headers: dict | None = None) -> str | None:
        """One persistent, `mandatory` message to the exchange, waiting for the broker's confirm:
        None when confirmed, else the error: "refused: <reason>: ..." when the message's shape is
        refused (that message alone), "connection: ..." when the connection is gone."""
        import pika
        from pika.exceptions import AMQPError

        refusal = amqp_refusal(routing_key, body, message_id, headers, self.max_message_bytes)
        if refusal:
            return self.REFUSED + refusal
        # message_id lets a consumer drop the one copy a cut connection can leave ambiguous
        # (published, confirm lost, sent again by the retry).
        props = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=message_id, headers=headers
        )
        try:
            self._open().basic_publish(self.exchange, routing_key, body, properties=props, mandatory=True)
            return None
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            return f"not confirmed: {type(exc).__name__}"
        except pika.exceptions.ShortStringTooLong:  # pika refuses to encode it; nothing was sent (never echo the value)
            return self.REFUSED + "short_string_too_long: a field over 255 bytes"
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code == 406 and "size" in str(exc.reply_text).lower():  # over the broker's max_message_size
                return self.REFUSED + redact(f"body_too_large_for_broker: {exc.reply_code} {exc.reply_text}")[:300]
            return redact(f"connection: {type(exc).__name__}: {exc}")
        except (AMQPError, OSError) as exc:
            self._channel = None
            self._drop_connection()
            return redact(f"connection: {type(exc).__name__}: {exc}")

    def _drop_connection(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is being dropped because it failed
                pass

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        errors: list[str | None] = []
        headers = {"replay_run_id": run_id, "pipeline": pipeline, "day": day}
        for message_id, body, event_type in zip(batch.ids, batch.bodies, batch.types):
            if errors and errors[-1] is not None and errors[-1].startswith("connection"):
                errors.append(errors[-1])  # the connection is gone: fail the rest of the batch fast
                continue
            key = self.routing_key.format(type=event_type or "any", pipeline=pipeline)
            errors.append(self.publish(key, body, message_id, headers))  # a refused message fails alone
        return errors

    def close(self) -> None:
        self._channel = None
        self._drop_connection()


class RedisTarget:
    """Redis as a sink, in one of three modes (see `spec.RedisSink`). Every batch is one atomic
    server-side step: BullMQ's own add-job scripts in one MULTI (`Queue.addBulk`), or our script
    for lists and streams, which appends only ids it has not appended before. So a batch whose
    reply was lost can be sent again safely, and the consumer sees each message once."""

    # KEYS[1] target list/stream, KEYS[2] set of ids already appended for this pipeline and day.
    # ARGV: mode, seen ttl, force (1: append even seen ids), then id, type, body triples.
    APPEND = """
    local fresh = {}
    for i = 4, #ARGV, 3 do
      if redis.call('SADD', KEYS[2], ARGV[i]) == 1 or ARGV[3] == '1' then
        if ARGV[1] == 'stream' then
          redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'type', ARGV[i + 1], 'body', ARGV[i + 2])
        else
          fresh[#fresh + 1] = ARGV[i + 2]
        end
      end
    end
    for i = 1, #fresh, 1000 do
      redis.call('RPUSH', KEYS[1], unpack(fresh, i, math.min(i + 999, #fresh)))
    end
    redis.call('EXPIRE', KEYS[2], ARGV[2])
    return #fresh
    """
    SCRIPT_CHUNK = 2000  # messages per script call; several calls ride one pipeline

    def __init__(
        self,
        url: str,
        key: str,
        mode: str = "bullmq",
        prefix: str = "bull",
        seen_ttl_s: int = 7 * 24 * 3600,
        job_name: str | None = None,
    ):
        import redis

        self.url, self.key, self.mode, self.prefix, self.seen_ttl_s = url, key, mode, prefix, seen_ttl_s
        self.job_name = job_name
        self.name = f"redis:{mode}:{key}"
        # A few quick retries; the redrive loop retries whole batches with longer backoff.
        retry = redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=1, base=0.1), 2)
        self._redis = connect.redis(url, retry=retry, socket_timeout=30, socket_connect_timeout=5)
        self._append = self._redis.register_script(self.APPEND)
        self._loop = None
        self._queue = None

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        try:
            if self.mode == "bullmq":
                self._add_jobs(batch, run_id if resend else None)
            else:
                self._append_all(pipeline, day, batch, resend)
        except Exception as exc:  # the server is down, or refused the batch as a whole
            self._queue = None  # reconnect on the next batch
            return [redact(f"{type(exc).__name__} ({self.url}): {exc}")] * len(batch)
        return [None] * len(batch)

    def _append_all(self, pipeline: str, day: str, batch: Batch, resend: bool) -> None:
        seen = f"{self.key}:replay-seen:{pipeline}:{day}"
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(batch), self.SCRIPT_CHUNK):
            args: list = [self.mode, self.seen_ttl_s, "1" if resend else "0"]
            for i in range(start, min(start + self.SCRIPT_CHUNK, len(batch))):
                args += (batch.ids[i], batch.types[i] or "", batch.bodies[i])
            self._append(keys=[self.key, seen], args=args, client=pipe)
        pipe.execute()

    def _add_jobs(self, batch: Batch, resend_run_id: str | None) -> None:
        import asyncio

        import msgspec
        from bullmq import Queue

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        if self._queue is None:
            self._queue = Queue(self.key, {"connection": self._async_client(), "prefix": self.prefix})
        decode = msgspec.json.decode
        # BullMQ's addStandardJob returns the existing job for an id it already holds, so a batch
        # sent twice adds each job once. A forced re-send is a new job: the run id salts the id.
        salt = f"-{resend_run_id}" if resend_run_id else ""
        jobs = [
            {"name": self.job_name or t or "redrive", "data": decode(body), "opts": {"jobId": mid + salt}}
            for mid, body, t in zip(batch.ids, batch.bodies, batch.types)
        ]
        self._loop.run_until_complete(self._queue.addBulk(jobs))

    def _async_client(self):
        import redis.asyncio

        retry = redis.asyncio.retry.Retry(redis.backoff.ExponentialBackoff(cap=1, base=0.1), 2)
        return connect.redis_async(
            self.url, decode_responses=True, retry=retry, socket_timeout=30, socket_connect_timeout=5
        )

    def close(self) -> None:
        if self._queue is not None:
            self._loop.run_until_complete(self._queue.close())
            self._queue = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self._redis.close()
