"""The Kafka sink: an idempotent producer; a message counts only once the broker confirmed it.
Its resource also reads Kafka dead-letter topics (`DeadLettersSpec("kafka", topic)`)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import dagster as dg
from confluent_kafka import OFFSET_END, KafkaError, KafkaException
from pydantic import Field

from replay_defs.core.redact import redact
from replay_defs.sinks.base import Batch, SinkType, Unknown, Unreachable, unknown

log = logging.getLogger(__name__)

# Errors the broker answered a message with: it does not hold it. Any other error leaves it in doubt.
REFUSED = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_TIMESTAMP,
    KafkaError.POLICY_VIOLATION,
    KafkaError._INVALID_ARG,
}
# Errors after which a producer refuses everything it is given (Tansu fences a producer whose
# messages timed out while it stalled): it is replaced by a new one.
FENCED = {KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH, KafkaError._FENCED, KafkaError._FATAL}


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
    process is a new producer, which is why the ledger, not idempotence, prevents re-sends; what
    the broker may hold without having confirmed it is found by its `message_id` header (`held`).

    `timeout_s` bounds one call: a message not confirmed by then is in doubt (librdkafka's
    message.timeout.ms), a broker that does not answer fails the call's messages unsent."""

    def __init__(self, bootstrap_servers: str, topic: str, timeout_s: float = 30.0, config: dict | None = None):
        self.topic = topic
        self.name = f"kafka:{topic}"
        self.bootstrap = bootstrap_servers
        self.timeout_s = timeout_s
        self._config = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": int(timeout_s * 1000),
            "error_cb": self._on_error,
            **(config or {}),
        }
        self._producer = self._new_producer()

    def _new_producer(self):
        from confluent_kafka import Producer

        self._reachable = False  # until the broker answers; again once librdkafka says all brokers are down
        self._down = None  # "all brokers are down", until the broker answers again
        self._fatal = None  # an error after which this producer cannot send: it is replaced
        return Producer(self._config)

    def _on_error(self, err) -> None:
        if err.fatal():
            self._fatal = err
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._reachable, self._down = False, err

    def _outcome(self, err) -> str:
        """A delivery error: refused (the broker answered no) or in doubt; a fenced producer is replaced."""
        text = redact(f"{err.name()}: {err.str()}")
        if err.fatal() or err.code() in FENCED:
            self._fatal = self._fatal or err
        return text if err.code() in REFUSED else unknown(text)

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        return self.send(pipeline, day, batch, run_id, resend)()

    def send(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> Callable[[], list[str | None]]:
        """Hands the batch to the producer and returns at once what waits for its delivery reports
        and answers as `deliver` does: the next batch can be produced while this one's acks come
        back (its reports are served by the next batch's polls)."""
        if not self._reachable and (refused := self._reach()):
            return lambda: [refused] * len(batch)
        # One callback for the call, not one per message (a closure per message costs as much as
        # the produce): confirmations are counted, errors kept with the message's value (a report
        # of a failed message carries no headers), which names it.
        confirmed, failed, unsent = 0, [], {}

        def on_delivery(err, msg) -> None:
            nonlocal confirmed
            if err is None:
                confirmed += 1
            else:
                failed.append((msg.value(), self._outcome(err)))

        common = [("replay_run_id", run_id.encode()), ("pipeline", pipeline.encode()), ("day", day.encode())]
        producer = self._producer
        produce, poll = producer.produce, producer.poll
        for i, (mid, key, value) in enumerate(zip(batch.ids, batch.key_list(), batch.bodies)):
            headers = [*common, ("message_id", mid.encode())]
            while True:
                try:
                    produce(self.topic, value, key, headers=headers, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    poll(0.1)
                except KafkaException as exc:  # refused before sending (too large), or a fatal state
                    unsent[i] = self._outcome(exc.args[0])
                    break
            if self._fatal is not None:
                unsent.update(
                    (j, unknown("no delivery report: the producer hit a fatal error first"))
                    for j in range(i + 1, len(batch))
                )
                break
            if i % 1000 == 0:
                poll(0)

        def outcomes() -> list[str | None]:
            expected, deadline = len(batch) - len(unsent), time.monotonic() + self.timeout_s + 5
            while confirmed + len(failed) < expected and time.monotonic() < deadline:
                poll(0.05)
            if confirmed + len(failed) < expected:  # nothing of this call may be sent after it answers
                producer.purge()  # what is left (a later call's too) is reported now, as purged: in doubt
                producer.poll(0)
            errors = self._errors(batch, confirmed, failed, unsent)
            if self._fatal is not None and producer is self._producer:
                self._replace(errors)
            return errors

        return outcomes

    def _errors(self, batch: Batch, confirmed: int, failed: list, unsent: dict[int, str]) -> list[str | None]:
        """Each message's outcome from one call's reports: the errors reported, by value (a value
        two messages share leaves both in doubt); when a report is missing or names no message,
        every message not reported as failed is in doubt: which of them were confirmed cannot be told."""
        errors: list[str | None] = [unsent.get(i) for i in range(len(batch))] if unsent else [None] * len(batch)
        told = confirmed + len(failed) == len(batch) - len(unsent)
        if failed:
            where: dict[bytes, list[int]] = {}
            for i, value in enumerate(batch.bodies):
                where.setdefault(value, []).append(i)
            for value, error in failed:
                index = where.get(value, [])
                told &= len(index) > 0
                for i in index:
                    errors[i] = error if len(index) == 1 else unknown(error)
        if not told:
            missing = unknown(f"no delivery report within {self.timeout_s:g} s")
            errors = [missing if e is None else e for e in errors]
        return errors

    def _reach(self) -> str | None:
        """None once the broker answers a metadata request, else why not (nothing is sent): fast
        when every broker refuses the connection, else after `timeout_s`."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self._producer.list_topics(self.topic, timeout=1)
                self._reachable, self._down = True, None
                return None
            except KafkaException as exc:
                why = exc.args[0].str()
            self._producer.poll(0)  # serves error_cb: are all brokers down?
            if self._down is not None or time.monotonic() > deadline:
                why = self._down.str() if self._down is not None else f"no answer within {self.timeout_s:g} s ({why})"
                return Unreachable(
                    redact(
                        f"not sent: the Kafka broker at {self.bootstrap} cannot be reached: {why}; "
                        "start it, or set EVENT_REPLAY_KAFKA_BOOTSTRAP to its host:port"
                    )
                )

    def _replace(self, errors: list[str | None]) -> None:
        """A producer that hit a fatal error (e.g. PRODUCER_FENCED after a broker stall) refuses
        everything it is given: a new one takes over. Whatever it did not confirm is in doubt."""
        fatal = self._fatal
        self._producer.purge()
        self._producer.poll(0)
        note = f"the producer hit a fatal error ({fatal.name()}: {fatal.str()}) and was replaced by a new one"
        log.warning("%s: %s", self.name, note)
        for i, e in enumerate(errors):
            if isinstance(e, Unknown):
                errors[i] = unknown(redact(f"{note}; {e.removeprefix('unknown: ')}"))
        self._producer = self._new_producer()

    def held(self, pipeline: str, day: str, ids: list[str], since: float) -> set[str]:
        """Which of `ids` are on the topic, by `message_id` header: each partition read with
        assign() from the offset of time `since` (offsets_for_times; the low watermark when it
        answers an error) to its end when the call began. Raises when the broker does not answer."""
        from confluent_kafka import Consumer, TopicPartition

        wanted, found = {m.encode() for m in ids}, set()
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": "event-replay-held",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        try:
            meta = consumer.list_topics(self.topic, timeout=self.timeout_s).topics[self.topic]
            if meta.error is not None:
                if meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    return found
                raise KafkaException(meta.error)
            marks = {
                p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=self.timeout_s)
                for p in meta.partitions
            }
            starts = consumer.offsets_for_times(
                [TopicPartition(self.topic, p, int(since * 1000)) for p in marks], timeout=self.timeout_s
            )
            consumer.assign([TopicPartition(self.topic, s.partition, _start(s, marks[s.partition])) for s in starts])
            ends = {p: high for p, (_low, high) in marks.items()}
            deadline = time.monotonic() + self.timeout_s
            while ends:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no message for {self.timeout_s:g} s before its end")
                messages = consumer.consume(1000, 0.5)
                if messages:  # a busy topic may take long to read: only a stall gives up
                    deadline = time.monotonic() + self.timeout_s
                for m in messages:
                    err = m.error()
                    if err is None:
                        found.update(v for k, v in m.headers() or () if k == "message_id" and v in wanted)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(err)
                    elif m.offset() >= ends.get(m.partition(), 0):
                        # The end of the partition, not the mark alone: Tansu's marks can fall short.
                        ends.pop(m.partition(), None)
        finally:
            consumer.close()
        return {m.decode() for m in found}

    def close(self) -> None:
        self._producer.flush(self.timeout_s)


def _start(answer, marks: tuple[int, int]) -> int:
    """Where to read a partition from: the offset of the time asked, its end when no message is as
    new (OFFSET_END), the low watermark when the broker answered nothing usable."""
    if answer.error is None and answer.offset >= 0:
        return answer.offset
    return marks[1] if answer.error is None and answer.offset == OFFSET_END else marks[0]


class KafkaResource(dg.ConfigurableResource):
    """A Kafka cluster for redrive sinks (confluent-kafka)."""

    bootstrap_servers: str = Field(description="host:port[,host:port] (env EVENT_REPLAY_KAFKA_BOOTSTRAP).")
    timeout_s: float = Field(
        default=30.0,
        description="How long a message may take to be confirmed before it is in doubt, and a broker "
        "to answer before it counts as unreachable (env EVENT_REPLAY_SINK_TIMEOUT_S).",
    )

    def sink(self, topic: str) -> KafkaSink:
        return KafkaSink(self.bootstrap_servers, topic, timeout_s=self.timeout_s)


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
        "timeout_s": ("EVENT_REPLAY_SINK_TIMEOUT_S", 30.0),
    },
    open=lambda resource, spec: resource.sink(spec.topic),
    dead_letters={"kafka": peek_dead_letters},
)
