"""The Kafka sink: an idempotent producer; a message counts only once the broker confirmed it.
Its resource also reads Kafka dead-letter topics (`DeadLettersSpec("kafka", topic)`)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import dagster as dg
from pydantic import Field

from replay_defs.core.redact import redact
from replay_defs.sinks.base import Batch, SinkType


@dataclass(frozen=True)
class KafkaSinkSpec:
    """One Kafka message per delivery on `topic` (resource `kafka`), keyed by the message id."""

    topic: str
    kind: Literal["kafka"] = "kafka"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", self.topic):
            raise ValueError(f"{self.topic!r} is not a valid Kafka topic name")

    @property
    def name(self) -> str:
        return f"kafka:{self.topic}"


class KafkaSink:
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


class KafkaResource(dg.ConfigurableResource):
    """A Kafka cluster for redrive sinks (confluent-kafka)."""

    bootstrap_servers: str = Field(description="host:port[,host:port] (env EVENT_REPLAY_KAFKA_BOOTSTRAP).")
    message_timeout_ms: int = Field(
        default=30_000, description="How long a message may take to be confirmed before it counts as failed."
    )

    def sink(self, topic: str) -> KafkaSink:
        return KafkaSink(self.bootstrap_servers, topic, message_timeout_ms=self.message_timeout_ms)


def peek_dead_letters(source, kafka: KafkaResource, peek: bool):
    """A dead-letter topic's depth (end - start offsets) and, with `peek`, its newest messages,
    read with assign(): nothing is committed."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": kafka.bootstrap_servers, "group.id": "event-replay-dlq-peek", "enable.auto.commit": False}
    )
    try:
        meta = consumer.list_topics(source.name, timeout=10).topics[source.name]
        if meta.error is not None:
            raise RuntimeError(f"Kafka topic {source.name!r}: {meta.error}")
        marks = {p: consumer.get_watermark_offsets(TopicPartition(source.name, p), timeout=10) for p in meta.partitions}
        depth = sum(high - low for low, high in marks.values())
        letters = []
        if peek:  # the newest `peek` messages of each partition
            consumer.assign(
                [
                    TopicPartition(source.name, p, max(low, high - source.peek))
                    for p, (low, high) in marks.items()
                    if high > low
                ]
            )
            want = sum(min(source.peek, high - low) for low, high in marks.values())
            deadline = time.monotonic() + 20
            while len(letters) < want and time.monotonic() < deadline:
                letters += [
                    m.value().decode(errors="replace") for m in consumer.consume(1000, 0.5) if m.error() is None
                ]
        return depth, letters
    finally:
        consumer.close()


SINK = SinkType(
    kind="kafka",
    spec=KafkaSinkSpec,
    resource=KafkaResource,
    settings={
        "bootstrap_servers": ("EVENT_REPLAY_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        "message_timeout_ms": ("EVENT_REPLAY_KAFKA_MESSAGE_TIMEOUT_MS", 30_000),
    },
    open=lambda resource, spec: resource.sink(spec.topic),
    dead_letters={"kafka": peek_dead_letters},
)
