"""ClickHouse source benchmark: billing raw_events read by keyset pagination vs one plain ordered
scan, measured in the same run on the same chDB table (the embedded default).

    ./dev bench clickhouse                       # 5M rows in one day, keyset pages of 50k
    ./dev bench clickhouse --rows 1000000 --batch 10000

The table is the seed's raw_events (ReplacingMergeTree(version), PARTITION BY toDate(timestamp),
ORDER BY (tenant, environment, customer, timestamp, event name, id)), filled with one day of rows
(one tenant and environment, 1,000 customers, ~300-byte JSON payloads; 1% fail a validation rule,
0.1% are not JSON) plus a second version of 2% of the rows in a separate insert, so FINAL has
duplicates to collapse. Rows:

- baseline: `SELECT ... FROM raw_events FINAL WHERE <day> ORDER BY <key>` to Arrow in one query;
- keyset read: `KeysetReader.batches()` (FINAL, `(key) > (last key)`, `LIMIT batch`) to Arrow;
- transform: the spec's mapping and rules on those pages as the pipeline runs them (`EngineMapping`:
  the page query also parses the payloads, evaluates the rules and writes the object fields; Python
  assembles the events and maps the rows the engine might read differently), Python's time only
  (the engine's share is in the page reads, excluded here);
- pipeline day: `parse_table_day` as parsed_events runs it: keyset read + transform + Parquet by
  type + quarantine.

Target (issue 17): the pipeline day's rows/s at least 0.5x the single scan's, in the same run; the
bench prints the ratio, the target and PASS/MISS, and exits non-zero on a miss.

Each row runs in a fresh process (chDB lives inside the process and keeps what it allocates):
"peak RSS" is that process's peak, "RSS growth" how far it rose above its level once connected.
Each method runs `--repeat` times (default 2), the methods taking turns, and its fastest run
counts (its memory figures: the largest of its runs): on a VM whose freed memory goes back to its
host, a first touch costs ~2 s of kernel time per GB, which moves a single run of the baseline,
which holds the whole day, by up to 3x.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from method_runs import CPU_NOTE, REPEAT_HELP, children_cpu, fastest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from replay_defs.clickhouse_table.demo import generate_billing  # noqa: E402
from replay_defs.clickhouse_table.engine_mapping import EngineMapping  # noqa: E402
from replay_defs.clickhouse_table.parsing import KeysetReader, TableSelection, parse_table_day  # noqa: E402
from replay_defs.core.clickhouse import ClickHouse  # noqa: E402
from replay_defs.pipelines import BILLING  # noqa: E402

DAY = "2024-03-04"
TARGET = 0.5  # pipeline day rows/s over the single scan's


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill(ch: ClickHouse, rows: int) -> float:
    """One day of rows, then a second version of 2% of them, in chDB itself (INSERT ... SELECT)."""
    t0 = time.monotonic()
    generate_billing(ch, DAY, rows)
    return time.monotonic() - t0


def child(method: str, path: str, batch: int) -> dict:
    """One measurement, in a process of its own, so each row's RSS is its own (chDB runs inside
    the process and keeps what it allocated)."""
    with ClickHouse(data_path=path, database="bench") as ch:
        if method == "fill":
            secs = fill(ch, int(batch))
            rows, size = ch.rows(
                "SELECT sum(rows), sum(data_compressed_bytes) FROM system.parts WHERE database = 'bench' AND table = 'raw_events' AND active"
            )[0]
            return {"rows": int(rows), "seconds": secs, "note": f"{size / 2**20:,.0f} MB compressed"}
        src, sel = BILLING.source, TableSelection()
        reader = KeysetReader(ch, src, DAY, sel, batch)
        base = rss_mb()
        t0 = time.monotonic()
        if method == "baseline":
            where, params = reader._where()
            sql = f"SELECT {', '.join(src.columns)} FROM raw_events FINAL WHERE {' AND '.join(where)} ORDER BY {', '.join(src.order_by)}"
            rows, note = ch.query(sql, params).num_rows, "1 query"
        elif method == "keyset":
            rows = sum(b.num_rows for b in reader.batches())
            note = f"{reader.pages} pages, {reader.queries} queries"
        elif method == "transform":
            transformer, spent, rows, kept = EngineMapping.of(BILLING, reader.types), 0.0, 0, 0
            for b in reader.batches(transformer.select, transformer.params):
                t1 = time.monotonic()
                events, _q, _d, _e = transformer.run(b, rows + 1)
                spent += time.monotonic() - t1
                rows += b.num_rows
                kept += events.num_rows
            note = f"{kept:,} events; read time excluded"
            return {
                "rows": rows,
                "seconds": spent,
                "growth_mb": peak_rss_mb() - base,
                "peak_mb": peak_rss_mb(),
                "note": note,
            }
        elif method == "pipeline":
            out = Path(path).parent / "parsed"
            stats = parse_table_day(ch, BILLING, DAY, sel, batch, str(out), str(out / "quarantine.parquet"))
            rows = stats["found"]
            note = (
                f"{stats['parsed']:,} events, {stats['dropped']:,} dropped, {stats['transformation_errors']:,} errors"
            )
        else:
            raise SystemExit(f"unknown method {method}")
        secs = time.monotonic() - t0
        return {
            "rows": rows,
            "seconds": secs,
            "growth_mb": peak_rss_mb() - base,
            "peak_mb": peak_rss_mb(),
            "note": note,
        }


ROWS = [
    ("baseline", "baseline: one ordered scan (FINAL) to Arrow"),
    ("keyset", "keyset read, pages of {batch:,} (FINAL)"),
    ("transform", "transform (mapping + rules), CPU only"),
    ("pipeline", "pipeline day: keyset + transform + Parquet"),
]


def run_child(method: str, path: str, arg: int) -> dict:
    with children_cpu() as cpu:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", method, "--dir", path, "--batch", str(arg)],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), **cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000, help="rows in the day (default 5,000,000)")
    ap.add_argument("--batch", type=int, default=50_000, help="keyset page size (default 50,000)")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed at the end)")
    ap.add_argument("--repeat", type=int, default=2, help=REPEAT_HELP)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.batch)))
        return
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ch-bench-"))
    path = str(work / "chdb")
    results = []
    try:
        filled = run_child("fill", path, args.rows)
        print(
            f"filled raw_events: {filled['rows']:,} stored rows ({args.rows:,} + 2% second versions), {filled['note']}, in {filled['seconds']:.1f}s",
            flush=True,
        )
        runs: dict[str, list[dict]] = {method: [] for method, _ in ROWS}
        for _ in range(max(1, args.repeat)):
            for method, _label in ROWS:
                r = run_child(method, path, args.batch)
                runs[method].append(r)
                print(f"  {method}: {r['rows']:,} rows in {r['seconds']:.2f}s", flush=True)
        for method, label in ROWS:
            results.append((label.format(batch=args.batch), fastest(runs[method], largest=("growth_mb", "peak_mb"))))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{results[0][1]['rows']:,} rows in the day after FINAL; {psutil.cpu_count()} CPUs; each row measured in a fresh process\n"
    )
    print("| method | rows | seconds | rows/s | RSS growth | peak RSS | CPU s, user + kernel | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results:
        print(
            f"| {name} | {r['rows']:,} | {r['seconds']:.2f} | {r['rows'] / r['seconds']:,.0f} | {r['growth_mb']:,.0f} MB | {r['peak_mb']:,.0f} MB | {r['user_s']:.2f} + {r['kernel_s']:.2f} | {r['note']} |"
        )
    print("\n" + CPU_NOTE)
    base, keyset, _transform, pipeline = (r["rows"] / r["seconds"] for _, r in results)
    print(f"\nkeyset read is {keyset / base:.2f}x the single scan's rate")
    ratio = pipeline / base
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(f"pipeline day is {ratio:.2f}x the single scan's rate (target >= {TARGET}x): {verdict}")
    if verdict == "MISS":
        sys.exit(1)


if __name__ == "__main__":
    main()
