"""DLQ-growth sensors: one per dead-letter source declared in a pipeline spec (`DeadLetters`).

Each tick reads the source's depth. The cursor keeps the depths seen within the window; when
depth - (lowest depth in the window) exceeds `growth`, the sensor peeks at the newest dead letters
without consuming them, maps each to its day (event time), and launches one backfill of the
pipeline's assets for those days — minus days a backfill in progress already covers. Every tick
says why it did or did not fire (the tick's skip reason and the sensor log).
"""

import json
import re
import time
from datetime import datetime, timezone

import dagster as dg

from partitions import daily_partitions
from replay_defs.core import connect
from replay_defs.core.redact import secrets_masked
from replay_defs.pipeline.spec import DeadLetters, PipelineSpec
from sensors.launch import backfill_request, days_being_backfilled

# The resource each kind of source is read through.
RESOURCE = {"sqs": "sqs", "bullmq": "redis", "kafka": "kafka", "rabbitmq": "rabbitmq", "postgres": "postgres"}
_KEY_DAY = re.compile(r"year=(\d{4})/month=(\d{2})/day=(\d{2})|day=(\d{4}-\d{2}-\d{2})")


# ---- depth and peek, per kind: (depth, the newest dead letters as JSON text or timestamps) ----


def _sqs(source: DeadLetters, sqs, peek: bool):
    client = sqs.client()
    url = client.get_queue_url(QueueName=source.name)["QueueUrl"]
    depth = int(
        client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
            "ApproximateNumberOfMessages"
        ]
    )
    letters: dict[str, str] = {}
    for _ in range(source.peek // 10 if peek else 0):
        # VisibilityTimeout=0: the messages stay visible to the real consumer.
        batch = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0
        ).get("Messages", [])
        new = {m["MessageId"]: m["Body"] for m in batch if m["MessageId"] not in letters}
        if not new:
            break
        letters.update(new)
    return depth, list(letters.values())


def _bullmq(source: DeadLetters, redis_resource, peek: bool):
    r = connect.redis(redis_resource.url, socket_timeout=10, retry=None)
    try:
        failed = f"{source.prefix}:{source.name}:failed"
        depth = r.zcard(failed)
        letters = []
        if peek:
            ids = r.zrevrange(failed, 0, source.peek - 1)
            pipe = r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(f"{source.prefix}:{source.name}:{job_id.decode()}", "data")
            letters = [d.decode() for d in pipe.execute() if d is not None]
        return depth, letters
    finally:
        r.close()


def _kafka(source: DeadLetters, kafka, peek: bool):
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
        if peek:  # the newest `peek` messages of each partition, read with assign(): nothing committed
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


def _rabbitmq(source: DeadLetters, rabbitmq, peek: bool):
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
        # Never acknowledged: closing the channel puts every peeked message back.
        return depth, letters
    finally:
        conn.close()


def _postgres(source: DeadLetters, postgres, peek: bool):
    from psycopg import sql

    table, status = sql.Identifier(source.name), sql.Identifier(source.status_column)
    with connect.postgres(postgres.url, connect_timeout=10) as con:
        depth = con.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {} = %s").format(table, status), (source.error_value,)
        ).fetchone()[0]
        letters = []
        if peek:
            column = sql.Identifier(source.time_field or "created_at")
            rows = con.execute(
                sql.SQL("SELECT {col} FROM {t} WHERE {s} = %s ORDER BY {col} DESC NULLS LAST LIMIT %s").format(
                    col=column, t=table, s=status
                ),
                (source.error_value, source.peek),
            ).fetchall()
            letters = [r[0] for r in rows]
        return depth, letters


PROBES = {"sqs": _sqs, "bullmq": _bullmq, "kafka": _kafka, "rabbitmq": _rabbitmq, "postgres": _postgres}


# ---- from dead letters to days --------------------------------------------------------------


def day_of(letter, time_field: str) -> str | None:
    """The UTC day a dead letter belongs to: its event time, or the `day=` of a raw file's key."""
    if isinstance(letter, datetime):
        return (
            (letter if letter.tzinfo else letter.replace(tzinfo=timezone.utc))
            .astimezone(timezone.utc)
            .date()
            .isoformat()
        )
    try:
        body = json.loads(letter)
    except (TypeError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    if isinstance(body.get(time_field), str):
        try:
            return day_of(datetime.fromisoformat(body[time_field].replace("Z", "+00:00")), time_field)
        except ValueError:
            pass
    match = _KEY_DAY.search(str(body.get("key", "")))
    if match:
        y, m, d, iso = match.groups()
        return iso or f"{y}-{m}-{d}"
    return None


def grown(samples: list[list[float]], now: float, depth: int, window_s: int) -> int:
    """How much depth rose above its lowest point within the window."""
    return depth - min([d for t, d in samples if now - t <= window_s] + [depth])


# ---- the sensor -----------------------------------------------------------------------------


def build_dead_letter_sensor(spec: PipelineSpec, source: DeadLetters) -> dg.SensorDefinition:
    resource_key = RESOURCE[source.kind]
    selection = dg.AssetSelection.groups(spec.name)
    time_field = source.time_field or spec.schema.time_field

    @dg.sensor(
        name=f"{spec.name}__dlq_{source.kind}_{re.sub(r'[^A-Za-z0-9_]', '_', source.name)}",
        asset_selection=selection,
        minimum_interval_seconds=source.interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING if source.running else dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={resource_key},
        description=(
            f"Launches a backfill of {spec.name} for the days of the dead letters in {source.label} when its depth "
            f"grows by more than {source.growth} within {source.window_s} s."
        ),
    )
    def dlq_sensor(context: dg.SensorEvaluationContext, **_resources):  # direct invocation also passes them by name
        now = time.time()
        state = json.loads(context.cursor) if context.cursor else {"samples": []}
        samples = [s for s in state["samples"] if now - s[0] <= source.window_s]
        probe = PROBES[source.kind]
        resource = getattr(context.resources, resource_key)
        with secrets_masked():  # a failing probe's error reaches the sensor's log and the UI: no secret in it
            depth, _ = probe(source, resource, peek=False)
        rise = grown(samples, now, depth, source.window_s)
        samples.append([now, depth])

        def skip(reason: str) -> dg.SensorResult:
            context.log.info(reason)
            return dg.SensorResult(skip_reason=reason, cursor=json.dumps({"samples": samples}))

        if rise <= source.growth:
            return skip(
                f"{source.label}: depth {depth}, grew {rise} within {source.window_s}s (threshold {source.growth}): not firing"
            )
        with secrets_masked():
            _, letters = probe(source, resource, peek=True)
        days = {d for d in (day_of(letter, time_field) for letter in letters) if d}
        unknown = len(letters) - sum(1 for letter in letters if day_of(letter, time_field))
        partitions = set(daily_partitions(spec).get_partition_keys())
        outside = sorted(days - partitions)
        days &= partitions
        asset_graph = context.repository_def.asset_graph
        keys = set(selection.resolve(asset_graph))
        busy = days_being_backfilled(context.instance, asset_graph, keys) & days
        days -= busy
        notes = []
        if unknown:
            notes.append(f"{unknown} of {len(letters)} peeked dead letters had no readable event time")
        if outside:
            notes.append(f"days outside the partitions skipped: {', '.join(outside)}")
        if busy:
            notes.append(f"already being backfilled: {', '.join(sorted(busy))}")
        if not days:
            return skip(
                f"{source.label}: depth {depth} grew {rise}, but no day to backfill"
                + (f" ({'; '.join(notes)})" if notes else "")
            )
        message = f"{source.label}: depth {depth} grew {rise} within {source.window_s}s; backfilling {', '.join(sorted(days))}"
        context.log.info(message + (f" ({'; '.join(notes)})" if notes else ""))
        tags = {"event_replay/trigger": source.label, "event_replay/dead_letter_depth": str(depth)}
        request = backfill_request(asset_graph, keys, sorted(days), tags)
        # The rise has been acted on: measure the next one from here.
        return dg.SensorResult(run_requests=[request], cursor=json.dumps({"samples": [[now, depth]]}))

    return dlq_sensor
