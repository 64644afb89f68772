"""The SQS sink: SendMessageBatch, each call bounded in time and its failures classified as
refused or in doubt, with queue-depth backpressure. Its resource also reads SQS dead-letter queues (`DeadLettersSpec("sqs", queue)`)."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from botocore.config import Config
from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import Field

from replay_defs.core.redact import redact
from replay_defs.sinks.base import Batch, SinkType, Unreachable, unknown
from resources.aws import Boto3Resource


@dataclass(frozen=True)
class SqsSinkSpec:
    """One SQS message per delivery on queue `queue` (resource `sqs`). A `.fifo` queue gets
    deduplication ids. `max_visible`: pause while the queue holds more visible messages than this
    (the telemetry redrive script's `--monitor --max-queue-visible`)."""

    queue: str
    max_visible: int | None = None
    kind: Literal["sqs"] = "sqs"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,75}(\.fifo)?", self.queue):
            raise ValueError(f"{self.queue!r} is not a valid SQS queue name")

    @property
    def name(self) -> str:
        return f"sqs:{self.queue}"


class SqsSink:
    """SQS via boto3. Batches hold at most 10 entries and `max_batch_bytes` (256 KiB: what moto
    enforces; AWS now takes 1 MiB). Each SendMessageBatch is sent once (the delivery loop retries);
    SendMessageBatch succeeds as a call even when entries fail, and those entries fail alone.

    One `deliver()` takes at most `timeout_s` (waiting for room on the queue aside): calls start
    within its first half, and the client's timeouts (`client_config`) end each within a quarter.
    The first call that cannot connect or gets no answer ends the batch: the rest is not sent.
    Nothing sent (no connection, a refusal) is a plain error; a call sent without an answer (read
    timeout, connection closed, a 5xx other than 503) is `unknown`. A `.fifo` queue drops a re-sent
    deduplication id within 5 minutes of its first send (`dedup_window_s`); a standard queue cannot
    tell what it holds, so messages in doubt go again and count as possible duplicates."""

    MAX_ENTRIES = 10
    # Whole-call refusals an entry's content can cause: the entries are then sent one by one.
    CONTENT_ERRORS = ("InvalidParameterValue", "InvalidMessageContents", "TooLong", "InvalidAttribute")

    def __init__(
        self,
        client,
        queue: str,
        max_visible: int | None = None,
        max_batch_bytes: int = 256 * 1024,
        poll_s: float = 1.0,
        timeout_s: float = 30.0,
    ):
        self.client = client
        self.queue = queue
        self.name = f"sqs:{queue}"
        self.fifo = queue.endswith(".fifo")
        self.dedup_window_s = 300.0 if self.fifo else 0.0
        self.max_visible = max_visible
        self.max_batch_bytes = max_batch_bytes
        self.poll_s = poll_s
        self.timeout_s = timeout_s
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

    def _entries(self, pipeline: str, day: str, batch: Batch, run_id: str, resend: bool) -> list[dict]:
        """SendMessageBatch entries: the body as sent, with `replay_run_id`, `pipeline` and `day`
        attributes; on a FIFO queue the day is the group and the message id the deduplication id."""
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
        return entries

    def deliver(
        self, pipeline: str, day: str, batch: Batch, run_id: str = "", resend: bool = False
    ) -> list[str | None]:
        errors: list[str | None] = [None] * len(batch)
        started, paused = time.monotonic(), self.paused_s
        stop: str | None = None  # why the rest of the batch is not sent
        for chunk in self._chunks(self._entries(pipeline, day, batch, run_id, resend)):
            if stop is None and time.monotonic() - started - (self.paused_s - paused) > self.timeout_s / 2:
                stop = Unreachable(
                    f"not sent: {self.name} took over {self.timeout_s / 2:g} s for the batch (EVENT_REPLAY_SINK_TIMEOUT_S / 2)"
                )
            if stop is None:
                stop = self._ready()
            if stop is not None:
                for e in chunk:
                    errors[int(e["Id"])] = stop
                continue
            failed, call_error = self._send(chunk)
            for e, err in failed:
                errors[int(e["Id"])] = err
            if call_error is not None:
                stop = Unreachable(f"not sent, after: {call_error}")
        return errors

    def close(self) -> None:
        pass

    def _ready(self) -> str | None:
        """None when the queue can take messages now (its URL known, room on it with
        `max_visible`), else why not: nothing of the batch was sent."""
        try:
            self._queue_url()
            self._wait_for_room()
            return None
        except Exception as exc:  # noqa: BLE001 - no message went out: every cause is a refusal
            return Unreachable("not sent: " + self._describe(exc))

    def _send(self, entries: list[dict]) -> tuple[list[tuple[dict, str]], str | None]:
        """One SendMessageBatch: (entry, error) for every entry that failed, and the error of the
        call when it failed as a whole (the rest of the batch is then not sent)."""
        try:
            resp = self.client.send_message_batch(QueueUrl=self._queue_url(), Entries=entries)
        except Exception as exc:  # noqa: BLE001 - classified: refused, or in doubt
            error = self._describe(exc)
            if isinstance(exc, ClientError) and type(error) is str and len(entries) > 1:
                if any(c in exc.response["Error"].get("Code", "") for c in self.CONTENT_ERRORS):
                    return [f for e in entries for f in self._send([e])[0]], None  # find the culprit
            return [(e, error) for e in entries], error
        by_id = {e["Id"]: e for e in entries}
        # SQS did not store these (a sender fault, or its own): refused, the loop retries them.
        return [(by_id[f["Id"]], f"{f.get('Code')}: {f.get('Message')}") for f in resp.get("Failed", [])], None

    def _describe(self, exc: Exception) -> str:
        """The error of a call: `unknown` when it was sent and may have taken effect (no answer, or
        a 5xx other than 503), else a refusal (no connection, or SQS refused the call)."""
        if isinstance(exc, ClientError):
            err, status = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            text = redact(f"{self.name}: {err.get('Code')}: {err.get('Message')}")
            return unknown(text) if (status or 0) >= 500 and status != 503 else text
        text = redact(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, BotoConnectionError):  # never connected: nothing went out
            return Unreachable(f"{text}; is SQS up, and EVENT_REPLAY_SQS_ENDPOINT (or AWS_REGION) right?")
        if isinstance(exc, (NoCredentialsError, ParamValidationError)):  # refused before sending
            return text
        return unknown(text)  # read timeout, connection closed: the request may have been stored


def client_config(timeout_s: float) -> Config:
    """The sending client's settings: a call gets at most a quarter of `timeout_s` to connect (5 s
    at most) and a quarter to be answered, and is sent once: a botocore retry after a timeout could
    store a second copy that nothing records (the delivery loop retries, knowing the first is in doubt)."""
    return Config(
        connect_timeout=min(5.0, timeout_s / 4),
        read_timeout=timeout_s / 4,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )


class SqsResource(Boto3Resource):
    """SQS for redrive sinks, with dagster-aws's boto3 settings
    (region_name, endpoint_url, profile_name, credentials; max_attempts for reading dead-letter
    queues: a redrive sends each batch once). Env: AWS_* as usual, EVENT_REPLAY_SQS_ENDPOINT for a
    local endpoint, EVENT_REPLAY_SINK_TIMEOUT_S for `timeout_s`."""

    poll_seconds: float = Field(
        default=5.0, description="Backpressure: how often to re-check queue depth while paused."
    )
    timeout_s: float = Field(
        default=30.0, description="At most this long for one delivery call (a redrive chunk), waiting for room aside."
    )

    def client(self, config: Config | None = None):
        return self.boto3_client("sqs", config)

    def sink(self, queue: str, max_visible: int | None = None) -> SqsSink:
        return SqsSink(
            self.client(client_config(self.timeout_s)),
            queue,
            max_visible=max_visible,
            poll_s=self.poll_seconds,
            timeout_s=self.timeout_s,
        )


def peek_dead_letters(source, sqs: SqsResource, peek: bool):
    """A dead-letter queue's depth (ApproximateNumberOfMessages) and, with `peek`, its messages,
    received with VisibilityTimeout=0: they stay visible to the real consumer."""
    client = sqs.client()
    url = client.get_queue_url(QueueName=source.name)["QueueUrl"]
    depth = int(
        client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
            "ApproximateNumberOfMessages"
        ]
    )
    letters: dict[str, str] = {}
    for _ in range(source.peek // 10 if peek else 0):
        batch = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0
        ).get("Messages", [])
        new = {m["MessageId"]: m["Body"] for m in batch if m["MessageId"] not in letters}
        if not new:
            break
        letters.update(new)
    return depth, list(letters.values())


SINK = SinkType(
    kind="sqs",
    spec=SqsSinkSpec,
    resource=SqsResource,
    settings={
        "endpoint_url": ("EVENT_REPLAY_SQS_ENDPOINT", None),
        "region_name": ("AWS_REGION", "us-east-1"),
        "timeout_s": ("EVENT_REPLAY_SINK_TIMEOUT_S", 30.0),
    },
    open=lambda resource, spec: resource.sink(spec.queue, spec.max_visible),
    dead_letters={"sqs": peek_dead_letters},
)
