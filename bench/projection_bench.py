"""Projection replay benchmark: a >= 5M-row `event_log` in chDB, read by keyset pages,
folded, and replayed end to end into the stores, against baselines measured in the same run.

    ./dev bench projection                     # 5M events, 200k aggregates over 5 days
    ./dev bench projection --rows 1000000 --batch-size 20000

Rows (rows/s = event_log rows per second of wall time):
- baseline GROUP BY: the whole from-scratch fold of `aggregate_state` as one ClickHouse GROUP BY
  (what the check runs), and one `SELECT` of every column into Arrow in a single query;
- keyset read: `EventLog.pages` over the tenant, `--batch-size` rows per page (no fold);
- fold: keyset read + the Python fold of each projection, coalesced per key (no store);
- replay: `replay_day` for every day, end to end (markers in Redis, progress, store writes,
  verification against the SQL fold): aggregate_state into ClickHouse (latest row wins),
  tenant_daily_event_counts into PostgreSQL (increments).

Peak RSS is the process's (sampled every 20 ms) during each step; "RSS growth" is how far it rose
above the level before the step. Redis and PostgreSQL are the machine's, or private ones started
for the run (tests/services.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from replay_defs.core.clickhouse import ClickHouse  # noqa: E402
from replay_defs.projection_replay.engine import (  # noqa: E402
    PROJECTIONS,
    EventLog,
    ReplayLog,
    ReplayOptions,
    fold_pages,
    generate_event_log,
    replay_day,
)
from replay_defs.projection_replay.live import Coordinator  # noqa: E402
from replay_defs.projection_replay.stores import ClickHouseLatestStore, PostgresIncrementStore  # noqa: E402

TENANT = "bench-tenant"
START = "2025-06-01"


@contextmanager
def measure(label: str, rows: int, results: list):
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    extra: dict = {}
    yield extra
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    results.append(
        {
            "step": label,
            "rows": rows,
            "seconds": dt,
            "rows_per_s": rows / dt if dt else 0,
            "peak_rss_mb": peak[0] / 2**20,
            "rss_growth_mb": (peak[0] - base) / 2**20,
            **extra,
        }
    )
    print(
        f"  {label:58} {dt:7.2f} s  {rows / dt:>12,.0f} rows/s  peak RSS {peak[0] / 2**20:6.0f} MB (+{(peak[0] - base) / 2**20:.0f})",
        flush=True,
    )


def generate(ch: ClickHouse, rows: int, per_aggregate: int, days: int) -> None:
    generate_event_log(ch, TENANT, rows, per_aggregate, START, days)


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="./dev bench projection", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=5_000_000, help="event_log rows (default 5,000,000)")
    ap.add_argument("--per-aggregate", type=int, default=25, help="events per aggregate (default 25)")
    ap.add_argument("--days", type=int, default=5, help="days the events span (default 5)")
    ap.add_argument("--batch-size", type=int, default=50_000, help="events per keyset page (default 50,000)")
    ap.add_argument("--aggregate-batch", type=int, default=5_000, help="aggregates per replay batch (default 5,000)")
    ap.add_argument("--concurrency", type=int, default=2, help="aggregate streams per batch (default 2)")
    ap.add_argument("--skip-replay", action="store_true", help="only the reads and folds")
    args = ap.parse_args()

    import services

    tmp = tempfile.mkdtemp(prefix="projection-bench-")
    ch = ClickHouse(data_path=str(Path(tmp) / "chdb"))
    results: list[dict] = []
    print(
        f"event_log: {args.rows:,} rows ({args.per_aggregate} events per aggregate, {args.days} days) in chDB at {tmp}",
        flush=True,
    )
    with measure("generate (INSERT ... SELECT FROM numbers)", args.rows, results):
        generate(ch, args.rows, args.per_aggregate, args.days)
    tenant_rows = int(ch.rows("SELECT count() FROM event_log WHERE tenant = {t:String}", {"t": TENANT})[0][0])
    print(f"tenant {TENANT}: {tenant_rows:,} rows", flush=True)
    agg, daily = PROJECTIONS["aggregate_state"], PROJECTIONS["tenant_daily_event_counts"]

    with measure("baseline: GROUP BY fold of aggregate_state in ClickHouse", tenant_rows, results) as x:
        x["groups"] = len(
            ch.query(
                "SELECT aggregate_id, count(), min(time), max(time), argMax(type, event_id), max(event_id) FROM event_log "
                "WHERE tenant = {t:String} GROUP BY aggregate_id",
                {"t": TENANT},
            )
        )
    with measure("baseline: GROUP BY fold of tenant_daily_event_counts", tenant_rows, results):
        ch.query(
            "SELECT toDate(time) d, type, count(), sum(JSONExtractInt(payload, 'units')) FROM event_log "
            "WHERE tenant = {t:String} GROUP BY d, type",
            {"t": TENANT},
        )
    with measure("baseline: one SELECT of all columns into Arrow", tenant_rows, results):
        t = ch.query(
            "SELECT aggregate_id, event_id, toUnixTimestamp64Milli(time), toString(type), payload FROM event_log "
            "WHERE tenant = {t:String}",
            {"t": TENANT},
        )
        del t
    elog = EventLog(ch, TENANT)
    with measure(f"keyset read, {args.batch_size:,}-row pages", tenant_rows, results) as x:
        n = sum(p.num_rows for p in elog.pages("", "\U0010ffff", "\U0010ffff", args.batch_size))
        x["pages"] = elog.queries
        assert n == tenant_rows, (n, tenant_rows)
    for p in (agg, daily):
        with measure(f"keyset read + fold {p.name}", tenant_rows, results) as x:
            rows, n = fold_pages(p, EventLog(ch, TENANT).pages("", "\U0010ffff", "\U0010ffff", args.batch_size))
            x["keys"] = len(rows)
            assert n == tenant_rows
            del rows

    if not args.skip_replay:
        days = [f"2025-06-{i:02d}" for i in range(1, args.days + 1)]
        opts = ReplayOptions(
            batch_size=args.batch_size, aggregate_batch=args.aggregate_batch, concurrency=args.concurrency
        )
        with (
            services.redis_url() as redis_url,
            services.postgres_dsn() as server,
            services.scratch_database(server) as dsn,
        ):
            for p, store in (
                (agg, ClickHouseLatestStore(ClickHouse(data_path=str(Path(tmp) / "chdb")))),
                (daily, PostgresIncrementStore(dsn)),
            ):
                store.ensure(p)
                coord = Coordinator(redis_url, p.name, prefix=f"er:bench:{time.time_ns()}")
                log = ReplayLog(str(Path(tmp) / f"projection-replay-{p.name}.jsonl"))
                folded = 0
                with measure(f"replay {p.name} ({p.store}), {len(days)} days end to end", tenant_rows, results) as x:
                    ok = True
                    for day in days:
                        r = replay_day(
                            p,
                            TENANT,
                            day,
                            lambda: ClickHouse(data_path=str(Path(tmp) / "chdb")),
                            store,
                            coord,
                            opts,
                            log,
                        )
                        ok &= bool(r.verified)
                        folded += r.events
                    x["events_folded"] = folded
                    x["verified"] = ok
                print(
                    f"    events folded {folded:,} ({folded / results[-1]['seconds']:,.0f} folded/s), all days verified: {ok}",
                    flush=True,
                )
                log.close()
                coord.close()
                store.close()
    ch.close()
    print("\n| step | rows | s | rows/s | peak RSS MB | RSS growth MB |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['step']} | {r['rows']:,} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
