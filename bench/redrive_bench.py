"""Redrive benchmark: our redrive (selection from Parquet, ledger, confirmed delivery) vs a bare
client loop sending the same payloads, in the same run, to the same server on loopback.

    ./dev bench redrive                          # 1M events to Kafka and Redis, 50k to RabbitMQ
    ./dev bench redrive --events 200000 --sinks kafka,redis-list

Rows:
- kafka: confluent-kafka produce + flush (idempotent, acks=all) vs our KafkaSink;
- redis-list: the fastest plain push (RPUSH of 1,000 values per command, 10 commands per round
  trip) vs our list mode; redis-stream: pipelined XADD (one entry per command, the only form),
  10k per round trip, vs our stream mode (ours: one script call per 2,000 messages that also
  remembers the ids);
- redis-bullmq: bullmq's own Queue.addBulk in batches vs our BullMQ mode;
- rabbitmq: pika publish with publisher confirms (one round trip per message) vs our exchange sink.

"ours" reads the events of a parsed partition (1M rows of Parquet) in batches, looks each batch
up in the ledger, delivers it and records it: with the DuckDB ledger (embedded default) and the
Postgres one. The bare loop gets the payloads ready-made. "RSS growth" is how far this process's
RSS rose during the measurement (sampled every 20 ms). Brokers share the machine's cores with the
client. Each method runs `--repeat` times (default 2), the bare loop and ours taking turns, each run
on a new Kafka topic or an emptied list or queue (and ours on an empty ledger), and its fastest run
counts (its RSS growth: the largest of its runs).

Targets (issue 17, `TARGETS`): ours with the DuckDB ledger reaches 70% of the bare loop for kafka
and redis-list; each ratio is printed with its target and PASS or MISS, and a miss exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path

import duckdb
import psutil
from method_runs import REPEAT_HELP, fastest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from replay_defs.core.lake import Lake  # noqa: E402
from replay_defs.core.ledger import open_ledger  # noqa: E402
from replay_defs.pipeline import delivery as rd  # noqa: E402
from replay_defs.pipeline.store import DuckDBStore  # noqa: E402
from replay_defs.pipelines import TELEMETRY  # noqa: E402

DAY = "2025-11-24"
PAD = "x" * 200  # events of about 390 bytes of JSON, as in the notes' anchors


def make_partition(lake: Path, n: int) -> list[str]:
    """n parsed events of one day, as the parsed_events asset lays them out (Parquet by type)."""
    files = []
    for t in TELEMETRY.schema.known_types:
        rel = f"{TELEMETRY.parsed_prefix}/type={t}/day={DAY}/part-0.parquet"
        (lake / rel).parent.mkdir(parents=True, exist_ok=True)
        duckdb.execute(
            f"""COPY (SELECT printf('evt-%010d', i) AS event_id,
                       TIMESTAMPTZ '{DAY} 00:00:00+00' + to_microseconds(i * (86400000000 // $n)) AS ts,
                       $t AS type, printf('dev-%05d', i % 20000) AS device_id, i AS seq,
                       '{{"battery": 87, "fw": "2.4.1", "pad": "{PAD}"}}' AS payload,
                       'file://' || $lake || '/raw/f' || (i // 10000) || '.gz' AS source_ref, i AS line_no
                     FROM range($n) r(i)
                     WHERE ['lock', 'bridge', 'video_doorbell'][i % 3 + 1] = $t)
                TO '{lake / rel}' (FORMAT parquet, COMPRESSION zstd)""",
            {"n": n, "t": t, "lake": str(lake)},
        )
        files.append(rel)
    return files


@contextmanager
def peak_rss():
    """Yields a dict that gets 'peak_mb': how far this process's RSS rose above its level at the
    start, at most, while inside (so the payloads held for the bare loops do not count)."""
    proc, out, stop = psutil.Process(), {"peak_mb": 0.0}, threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not stop.is_set():
            out["peak_mb"] = max(out["peak_mb"], (proc.memory_info().rss - base) / 2**20)
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()


# Issue 17: ours with the embedded ledger against the bare loop, measured in the same run.
TARGETS = {("kafka", "duckdb"): 0.70, ("redis-list", "duckdb"): 0.70}

BATCH = 10_000  # --batch-size: messages per read, ledger lookup, delivery and ledger write


def ours(lake: Lake, files: list[str], sink, ledger_url: str | None, store: DuckDBStore, n: int) -> dict:
    spec = TELEMETRY
    run_id = uuid.uuid4().hex
    with peak_rss() as rss, open_ledger(ledger_url, store) as ledger:
        t0 = time.perf_counter()
        batches = rd.event_batches(lake, spec, files, "day", batch_rows=BATCH)
        counts = rd.redrive(sink, ledger, spec.name, DAY, batches, run_id, batch_size=BATCH)
        elapsed = time.perf_counter() - t0
    assert counts.published == n and counts.failed == 0, counts
    return {"seconds": elapsed, "rate": n / elapsed, "peak_mb": rss["peak_mb"]}


def payloads(lake: Lake, files: list[str]) -> tuple[list[bytes], list[bytes], list[str]]:
    bodies, keys, types = [], [], []
    for b in rd.event_batches(lake, TELEMETRY, files, "day"):
        bodies += b.bodies
        keys += b.key_list()
        types += b.types
    return bodies, keys, types


def timed(fn, n: int) -> dict:
    with peak_rss() as rss:
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "rate": n / elapsed, "peak_mb": rss["peak_mb"]}


# ---- bare client loops ----------------------------------------------------------------------


def bare_kafka(bootstrap: str, topic: str, bodies, keys) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
    failed = []

    def report(err, _msg):
        if err is not None:
            failed.append(err)

    for i, (value, key) in enumerate(zip(bodies, keys)):
        while True:
            try:
                p.produce(topic, value, key, on_delivery=report)
                break
            except BufferError:
                p.poll(0.1)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0 and not failed


def bare_redis_list(url: str, key: str, bodies, values_per_command: int = 1_000) -> None:
    """The fastest plain list push: RPUSH with 1,000 values per command, 10 commands per round trip."""
    import redis

    r = redis.Redis.from_url(url)
    pipe = r.pipeline(transaction=False)
    for i, start in enumerate(range(0, len(bodies), values_per_command), 1):
        pipe.rpush(key, *bodies[start : start + values_per_command])
        if i % 10 == 0:
            pipe.execute()
    pipe.execute()
    r.close()


def bare_redis_stream(url: str, key: str, bodies) -> None:
    """The fastest plain stream append: XADD takes one entry per command, so pipelined, 10k per round trip."""
    import redis

    r = redis.Redis.from_url(url)
    pipe = r.pipeline(transaction=False)
    for i, body in enumerate(bodies, 1):
        pipe.xadd(key, {"body": body})
        if i % 10_000 == 0:
            pipe.execute()
    pipe.execute()
    r.close()


def bare_bullmq(url: str, queue: str, bodies, types, ids) -> None:
    import msgspec
    from bullmq import Queue

    async def run():
        q = Queue(queue, {"connection": url})
        for s in range(0, len(bodies), 10_000):
            await q.addBulk(
                [
                    {"name": t, "data": msgspec.json.decode(b), "opts": {"jobId": i}}
                    for b, t, i in zip(bodies[s : s + 10_000], types[s : s + 10_000], ids[s : s + 10_000])
                ]
            )
        await q.close()

    asyncio.run(run())


def bare_rabbit(url: str, exchange: str, bodies, types) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    for body, t in zip(bodies, types):
        ch.basic_publish(exchange, t, body, properties=props, mandatory=True)
    conn.close()


# ---- the run --------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="events in the partition (default 1M)")
    ap.add_argument(
        "--rabbitmq-events",
        type=int,
        default=50_000,
        help="events sent to RabbitMQ (per-message confirms are slow; default 50k)",
    )
    ap.add_argument(
        "--sinks",
        default="kafka,redis-list,redis-stream,redis-bullmq,rabbitmq",
        help="comma-separated rows to run (default: all)",
    )
    ap.add_argument(
        "--ledgers", default="duckdb,postgres", help="ledgers to run ours with: duckdb,postgres (default both)"
    )
    ap.add_argument("--batch-size", type=int, default=10_000, help="the redrive asset's batch_size (default 10,000)")
    ap.add_argument("--repeat", type=int, default=2, help=REPEAT_HELP)
    args = ap.parse_args()
    global BATCH
    BATCH = args.batch_size
    sinks, ledgers = args.sinks.split(","), args.ledgers.split(",")

    import services

    from replay_defs.sinks.kafka import KafkaSink
    from replay_defs.sinks.rabbitmq import RabbitMQSink
    from replay_defs.sinks.redis import RedisSink

    with (
        tempfile.TemporaryDirectory(prefix="redrive-bench-") as tmp,
        services.redis_url() as redis_url,
        services.postgres_dsn() as pg,
    ):
        work = Path(tmp)
        t0 = time.time()
        files = make_partition(work / "lake", args.events)
        lake = Lake(work / "lake")
        bodies, keys, types = payloads(lake, files)
        ids = [f"evt-{i:010d}" for i in range(args.events)]  # only bullmq's bare loop needs them
        print(
            f"{args.events:,} events, {sum(map(len, bodies)) / len(bodies):.0f} bytes of JSON each; data ready in {time.time() - t0:.0f}s",
            flush=True,
        )
        rows = []

        def compare(name: str, n: int, bare, make_sink, reset=lambda: None, src=(lake, files)):
            runs: dict[str | None, list[dict]] = {None: [], **{which: [] for which in ledgers}}
            for _ in range(max(1, args.repeat)):  # the methods take turns, so noise hits each alike
                reset()
                runs[None].append(timed(bare, n))
                print(f"  {name} bare: {runs[None][-1]['rate']:,.0f}/s", flush=True)
                for which in ledgers:  # each run on an empty ledger: a new DuckDB file, a new database
                    reset()
                    store = DuckDBStore(work / f"ledger-{uuid.uuid4().hex[:6]}.duckdb")
                    sink = make_sink()
                    try:
                        with services.scratch_database(pg) if which == "postgres" else nullcontext() as dsn:
                            runs[which].append(ours(*src, sink, dsn, store, n))
                    finally:
                        sink.close()
                    print(f"  {name} ours ({which} ledger): {runs[which][-1]['rate']:,.0f}/s", flush=True)
            base = fastest(runs[None], largest=("peak_mb",))
            rows.append((name, None, n, base, None))
            for which in ledgers:
                got = fastest(runs[which], largest=("peak_mb",))
                rows.append((name, which, n, got, got["rate"] / base["rate"]))

        if "kafka" in sinks:
            tansu = services.Tansu().start()
            try:
                topic_n = iter(range(100))

                def fresh_topic():
                    name = f"bench-{next(topic_n)}"
                    tansu.create_topic(name, partitions=3)
                    return name

                topic = {"name": None}

                def reset():
                    topic["name"] = fresh_topic()

                compare(
                    "kafka",
                    args.events,
                    lambda: bare_kafka(tansu.bootstrap, topic["name"], bodies, keys),
                    lambda: KafkaSink(tansu.bootstrap, topic["name"]),
                    reset,
                )
            finally:
                tansu.stop()

        import redis

        r = redis.Redis.from_url(redis_url)
        key = f"redrive-bench-{uuid.uuid4().hex[:6]}"

        def clear():
            r.delete(key, *r.keys(f"{key}:replay-seen:*"), *r.keys(f"bull:{key}:*"))

        try:
            if "redis-list" in sinks:
                compare(
                    "redis-list",
                    args.events,
                    lambda: bare_redis_list(redis_url, key, bodies),
                    lambda: RedisSink(redis_url, key, "list"),
                    clear,
                )
            if "redis-stream" in sinks:
                compare(
                    "redis-stream",
                    args.events,
                    lambda: bare_redis_stream(redis_url, key, bodies),
                    lambda: RedisSink(redis_url, key, "stream"),
                    clear,
                )
            if "redis-bullmq" in sinks:
                compare(
                    "redis-bullmq",
                    args.events,
                    lambda: bare_bullmq(redis_url, key, bodies, types, ids),
                    lambda: RedisSink(redis_url, key, "bullmq"),
                    clear,
                )
        finally:
            clear()
            r.close()

        if "rabbitmq" in sinks:
            import pika

            port = services.rabbitmq_port()
            url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
            conn = pika.BlockingConnection(pika.URLParameters(url))
            ch = conn.channel()
            exchange = queue = f"redrive-bench-{uuid.uuid4().hex[:6]}"
            ch.exchange_declare(exchange, "topic")
            ch.queue_declare(queue)
            ch.queue_bind(queue, exchange, "#")
            n = min(args.rabbitmq_events, args.events)
            small = (Lake(work / "lake-small"), make_partition(work / "lake-small", n))
            small_bodies, _, small_types = payloads(*small)
            try:
                compare(
                    "rabbitmq",
                    n,
                    lambda: bare_rabbit(url, exchange, small_bodies, small_types),
                    lambda: RabbitMQSink(url, exchange),
                    lambda: ch.queue_purge(queue),
                    src=small,
                )
            finally:
                ch.queue_delete(queue)
                ch.exchange_delete(exchange)
                conn.close()

    print()
    print("| sink | method | events | events/s | MB/s | RSS growth | ratio to bare | target |")
    print("|---|---|---|---|---|---|---|---|")
    size = sum(map(len, bodies)) / len(bodies)
    missed = []
    for name, ledger, n, m, ratio in rows:
        target, verdict = TARGETS.get((name, ledger)), ""
        if target is not None:
            verdict = f">= {target:.0%} {'PASS' if ratio >= target else 'MISS'}"
            if ratio < target:
                missed.append(f"{name} ({ledger} ledger) {ratio:.0%} < {target:.0%}")
        method = "bare client loop" if ledger is None else f"ours, {ledger} ledger"
        print(
            f"| {name} | {method} | {n:,} | {m['rate']:,.0f} | {m['rate'] * size / 1e6:.0f} | {m['peak_mb']:,.0f} MB | "
            f"{'' if ratio is None else f'{ratio:.0%}'} | {verdict} |"
        )
    if missed:
        print(f"MISS: {'; '.join(missed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
