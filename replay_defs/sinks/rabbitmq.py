"""The RabbitMQ sink: AMQP publishes with publisher confirms, routed by event type. The
processed-events jobs publish through the same sender (`RabbitMQSink.publish`), and its resource
also reads RabbitMQ dead-letter queues (`DeadLettersSpec("rabbitmq", queue)`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import dagster as dg
from pydantic import Field

from replay_defs.core import connect
from replay_defs.core.redact import redact, register_url
from replay_defs.sinks.base import Batch, SinkType, Unreachable, unknown


@dataclass(frozen=True)
class RabbitMQSinkSpec:
    """One AMQP message per delivery to `exchange` (resource `rabbitmq`), routed by the event type
    (`routing_key` may use `{type}` and `{pipeline}`), with publisher confirms."""

    exchange: str
    routing_key: str = "{type}"
    kind: Literal["rabbitmq"] = "rabbitmq"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,255}", self.exchange):
            raise ValueError(f"{self.exchange!r} is not a valid exchange name")

    @property
    def name(self) -> str:
        return f"rabbitmq:{self.exchange}"


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


class RabbitMQSink:
    """pika with publisher confirms: a publish counts once the broker acked it (`mandatory`, so a
    message no queue would take is a failure, not a silent drop). A message whose shape AMQP or the
    broker refuses (a routing key, message id or header key over 255 bytes, a body over
    `max_message_bytes`) fails alone with `refused: <reason>: ...`, before anything is sent.

    Each message carries its id as the AMQP `message_id` property: the consumer's dedupe key. The
    broker cannot say which messages it holds (no `held`), so a publish whose confirm never came
    (the connection lost, the broker hung past `timeout_s`) is in doubt (`unknown: ...`): the redrive
    sends it again and reports it as a possible duplicate, which a consumer drops by `message_id`.
    A broker that cannot be reached fails the message as not sent (`connection: ...`), and the rest
    of the batch after a lost connection too; the next batch reconnects.

    `timeout_s` bounds each wait: connecting (TCP and the AMQP handshake), a blocked connection, and
    a hung broker, found by pika's heartbeat check within max(`timeout_s`, 12 s) (the check runs
    every heartbeat + 5 s, and the heartbeat is at least 1 s)."""

    REFUSED = "refused: "

    @staticmethod
    def connection_lost(error: str | None) -> bool:
        """Whether a publish's error means the connection is gone (the rest of a batch is not sent):
        not there when publishing (`connection: ...`), or lost before the confirm (an `Unknown`)."""
        return error is not None and error.startswith(("connection", "unknown: connection"))

    def __init__(
        self,
        url: str,
        exchange: str,
        routing_key: str = "{type}",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout_s: float = 30.0,
    ):
        self.url = url
        self.exchange = exchange
        self.routing_key = routing_key
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s
        self.name = f"rabbitmq:{exchange}"
        self._connection = None
        self._channel = None

    def _connect(self):
        """A connection whose every wait ends within about `timeout_s`: two silent heartbeat checks,
        each heartbeat + 5 s apart, close a connection to a hung broker."""
        from pika.adapters.utils.connection_workflow import AMQPConnectorException
        from pika.exceptions import AMQPConnectionError

        t = self.timeout_s
        try:
            return connect.rabbitmq(
                self.url,
                connection_attempts=1,
                socket_timeout=t,
                stack_timeout=t,
                blocked_connection_timeout=t,
                heartbeat=max(1, int(t / 2) - 5),
            )
        except AMQPConnectorException as exc:  # a handshake past stack_timeout: raised as is, not an AMQPError
            raise AMQPConnectionError(exc) from None

    def _open(self):
        from pika.exceptions import AMQPError

        if self._connection is not None and self._connection.is_open:
            # Reads what came since the last call: a connection the broker closed meanwhile is
            # found here, before a message is written to it, and replaced.
            try:
                self._connection.process_data_events(0)
            except (AMQPError, OSError):
                self._drop_connection()
        if self._channel is None or self._channel.is_closed:
            if self._connection is None or self._connection.is_closed:
                self._connection = self._connect()
            self._channel = (
                self._connection.channel()
            )  # the broker closed the channel alone: a new one on the same connection
            self._channel.confirm_delivery()
        return self._channel

    def publish(self, routing_key: str, body: bytes, message_id: str, headers: dict | None = None) -> str | None:
        """One persistent, `mandatory` message to the exchange, waiting for the broker's confirm:
        None when confirmed; "refused: <reason>: ..." when the message's shape is refused (that
        message alone); "connection: ..." when the broker cannot be reached (not sent); an
        `Unknown` ("unknown: connection lost ...") when the connection was lost after the message
        was written and before its confirm (the broker may hold it)."""
        import pika
        from pika.exceptions import AMQPError

        refusal = amqp_refusal(routing_key, body, message_id, headers, self.max_message_bytes)
        if refusal:
            return self.REFUSED + refusal
        props = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=message_id, headers=headers
        )
        try:
            channel = self._open()
        except (AMQPError, OSError) as exc:  # nothing of this message was written
            self._drop_connection()
            return Unreachable(
                redact(
                    f"connection: RabbitMQ at {self.url} cannot be reached ({exc!r}): "
                    "start it, or set EVENT_REPLAY_RABBITMQ_URL"
                )
            )
        try:
            channel.basic_publish(self.exchange, routing_key, body, properties=props, mandatory=True)
            return None
        except pika.exceptions.UnroutableError:  # no queue took it
            return "not confirmed: UnroutableError"
        except pika.exceptions.NackError:  # one queue refused it (e.g. full); others it routes to may hold it
            return unknown("not confirmed: NackError (a queue refused it; others it is routed to may hold it)")
        except pika.exceptions.ShortStringTooLong:  # pika refuses to encode it; nothing was sent (never echo the value)
            return self.REFUSED + "short_string_too_long: a field over 255 bytes"
        except pika.exceptions.ChannelClosedByBroker as exc:  # the broker refused this message
            self._channel = None
            if exc.reply_code == 406 and "size" in str(exc.reply_text).lower():  # over the broker's max_message_size
                return self.REFUSED + redact(f"body_too_large_for_broker: {exc.reply_code} {exc.reply_text}")[:300]
            return redact(f"connection: {type(exc).__name__}: {exc}")
        except (AMQPError, OSError) as exc:
            self._drop_connection()
            return unknown(redact(f"connection lost before the confirm: {type(exc).__name__}: {exc}"))

    def require_exchange(self) -> None:
        """Fail before anything is selected or sent when the broker is unreachable or the exchange
        is missing, saying what to set or create (publishing to a missing exchange closes the
        channel with NOT_FOUND only at the first message)."""
        import pika

        if not self.exchange:  # the default exchange always exists
            return
        where = redact(self.url)
        try:
            conn = self._connect()
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise ConnectionError(
                redact(
                    f"RabbitMQ at {where} is unreachable ({type(exc).__name__}: {exc}): set EVENT_REPLAY_RABBITMQ_URL"
                )
            ) from None
        try:
            conn.channel().exchange_declare(self.exchange, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            raise LookupError(
                f"RabbitMQ exchange {self.exchange!r} does not exist on {where}: messages are published to it with the "
                f"event type as routing key, so create it as a durable topic exchange, e.g. "
                f"`rabbitmqadmin declare exchange name={self.exchange} type=topic durable=true`, "
                "or name the existing one (--exchange, launchpad config `exchange`)"
            ) from None
        finally:
            if conn.is_open:
                conn.close()

    def _drop_connection(self) -> None:
        self._channel = None
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
        lost = None
        for message_id, body, event_type in zip(batch.ids, batch.bodies, batch.types):
            if lost:
                errors.append(lost)
                continue
            key = self.routing_key.format(type=event_type or "any", pipeline=pipeline)
            error = self.publish(key, body, message_id, headers)  # a refused message fails alone
            errors.append(error)
            if self.connection_lost(error):  # the rest of the batch fails fast: never written, so not in doubt
                lost = Unreachable(
                    "connection: not sent: " + error.removeprefix("unknown: ").removeprefix("connection: ")
                )
        return errors

    def close(self) -> None:
        self._drop_connection()


class RabbitMQResource(dg.ConfigurableResource):
    """A RabbitMQ broker (pika): redrive sinks, and the exchange processed-events replays publish to."""

    url: str = Field(
        description="AMQP URL, e.g. amqp://user:pass@host:5672/%2F (env EVENT_REPLAY_RABBITMQ_URL).",
        json_schema_extra={"dagster__is_secret": True},
    )

    timeout_s: float = Field(
        default=30.0,
        description="Seconds one wait on the broker may take: connecting, a blocked connection, a hung broker "
        "(found within max(timeout_s, 12 s)) (env EVENT_REPLAY_SINK_TIMEOUT_S).",
    )

    def setup_for_execution(self, context) -> None:
        # resolved now (EnvVar): its password is masked by value in every message of this process
        register_url(self.url)

    def sink(self, exchange: str, routing_key: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> RabbitMQSink:
        return RabbitMQSink(self.url, exchange, routing_key, max_message_bytes, self.timeout_s)


def peek_dead_letters(source, rabbitmq: RabbitMQResource, peek: bool):
    """A dead-letter queue's message count and, with `peek`, its first messages, taken with
    `basic_get` and never acknowledged: closing the channel puts every one back."""
    conn = connect.rabbitmq(rabbitmq.url)
    try:
        ch = conn.channel()
        depth = ch.queue_declare(source.name, passive=True).method.message_count
        letters = []
        for _ in range(min(depth, source.peek) if peek else 0):
            method, _props, body = ch.basic_get(source.name, auto_ack=False)
            if method is None:
                break
            letters.append(body.decode(errors="replace"))
        return depth, letters
    finally:
        conn.close()


SINK = SinkType(
    kind="rabbitmq",
    spec=RabbitMQSinkSpec,
    resource=RabbitMQResource,
    settings={
        "url": ("EVENT_REPLAY_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        "timeout_s": ("EVENT_REPLAY_SINK_TIMEOUT_S", 30.0),
    },
    open=lambda resource, spec: resource.sink(spec.exchange, spec.routing_key),
    dead_letters={"rabbitmq": peek_dead_letters},
    always=True,  # the processed-events jobs (jobs/) publish through it
)
