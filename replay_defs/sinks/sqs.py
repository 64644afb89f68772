"""The SQS sink: SendMessageBatch, retrying the entries a batch reports as failed, with
queue-depth backpressure. Its resource also reads SQS dead-letter queues (`DeadLettersSpec("sqs", queue)`)."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import boto3
from botocore.config import Config
from dagster_aws.utils import ResourceWithBoto3Configuration
from pydantic import Field

from replay_defs.core.redact import redact
from replay_defs.sinks.base import Batch, SinkType


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


class SqsResource(ResourceWithBoto3Configuration):
    """SQS for redrive sinks. dagster-aws has no SQS resource; this uses its boto3 settings
    (region_name, endpoint_url, profile_name, credentials, max_attempts). Env: AWS_* as usual,
    EVENT_REPLAY_SQS_ENDPOINT for a local endpoint."""

    poll_seconds: float = Field(
        default=5.0, description="Backpressure: how often to re-check queue depth while paused."
    )

    def client(self):
        session = boto3.session.Session(profile_name=self.profile_name)
        return session.client(
            "sqs",
            region_name=self.region_name,
            endpoint_url=self.endpoint_url,
            use_ssl=self.use_ssl,
            verify=self.verify,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            config=Config(retries={"max_attempts": self.max_attempts, "mode": "standard"}),
        )

    def sink(self, queue: str, max_visible: int | None = None) -> SqsSink:
        return SqsSink(self.client(), queue, max_visible=max_visible, poll_s=self.poll_seconds)


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
    settings={"endpoint_url": ("EVENT_REPLAY_SQS_ENDPOINT", None), "region_name": ("AWS_REGION", "us-east-1")},
    open=lambda resource, spec: resource.sink(spec.queue, spec.max_visible),
    dead_letters={"sqs": peek_dead_letters},
)
