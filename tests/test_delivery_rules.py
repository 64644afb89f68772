"""Rules of the delivery loop (replay_defs/pipeline/delivery.py) that no single sink's fault test
pins down, each against a real broker and counted by reading the broker back."""

import json
import uuid

import pika
import redis
from services import rabbitmq_port

from replay_defs.core.ledger import SENDING, open_ledger
from replay_defs.pipeline import delivery as rd
from replay_defs.pipeline.store import DuckDBStore
from replay_defs.sinks.base import Batch
from replay_defs.sinks.rabbitmq import RabbitMQSink
from replay_defs.sinks.redis import RedisSink

D1, D2 = "2025-11-24", "2025-11-25"


def _batch(ids: list[str], types: list[str]) -> Batch:
    return Batch(ids, [json.dumps({"id": m}).encode() for m in ids], types)


def test_a_refusal_is_an_answer_the_chunks_after_it_are_still_sent(tmp_path):
    """A chunk RabbitMQ refuses whole (no queue takes its type) must not count the broker as down:
    the good chunks after it are sent, not failed unsent."""
    port = rabbitmq_port()
    url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
    exchange, queue = f"rules-{uuid.uuid4().hex[:8]}", f"rules-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.exchange_declare(exchange, "topic")
    ch.queue_declare(queue)
    ch.queue_bind(queue, exchange, "good")  # "bad" messages are unroutable: refused one by one
    ids = [f"m{i:05d}" for i in range(1500)]
    batch = _batch(ids, ["bad"] * 500 + ["good"] * 1000)
    sink = RabbitMQSink(url, exchange)
    try:
        with open_ledger(None, DuckDBStore(tmp_path / "l.duckdb")) as ledger:
            counts = rd.redrive(sink, ledger, "rules", D1, [batch], "run-1", chunk_size=500, retries=0)
        held = ch.queue_declare(queue, passive=True).method.message_count
        assert (counts.failed, counts.published, counts.unknown) == (500, 1000, 0), counts
        assert held == 1000, "the broker holds the good messages"
    finally:
        sink.close()
        ch.queue_delete(queue)
        ch.exchange_delete(exchange)
        conn.close()


def test_a_message_in_doubt_is_asked_for_under_the_day_it_was_sent_for(tmp_path, redis_url):
    """A raw file's message can go out with either of two days. Sent with day 1, its outcome lost
    (the ledger still says `sending`), then selected again for day 2: it is found under day 1 and
    not appended a second time."""
    key = f"rules-{uuid.uuid4().hex[:8]}"
    ids = [f"f{i:03d}" for i in range(50)]
    sink = RedisSink(redis_url, key, "list")
    r = redis.Redis.from_url(redis_url)
    try:
        with open_ledger(None, DuckDBStore(tmp_path / "l.duckdb")) as ledger:
            first = rd.redrive(sink, ledger, "rules", D1, [_batch(ids, ["x"] * 50)], "run-1")
            assert first.published == r.llen(key) == 50
            ledger.record("rules", sink.name, D1, ids, SENDING, "run-1")  # a crash before the outcome
            second = rd.redrive(sink, ledger, "rules", D2, [_batch(ids, ["x"] * 50)], "run-2")
        assert (second.reconciled, second.published, second.possible_duplicates) == (50, 0, 0), second
        assert r.llen(key) == 50, "each message once on the list"
    finally:
        sink.close()
        r.delete(key, *r.keys(f"{key}:*"))
        r.close()
