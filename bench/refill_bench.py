"""Refill benchmark: key collection from a large S3 access-log CSV export.

    ./dev bench refill                 # a 256 MB export (~2.6M rows), as in issue 17's table
    ./dev bench refill --size-mb 1024  # 1 GB (~10M rows), as in issue 5
    ./dev bench refill --size-mb 64 --no-naive

Writes a CSV in the seed's format ("operation","key"; 10% GET rows, 2% keys listed twice, 0.1%
invalid keys), then runs each method in its own process so each peak RSS is its own:

- ours: `collect_keys` (DuckDB streams the file: parse, classify, quarantine, de-duplicate per
  day, keys.parquet sorted by project and type), then building every BullMQ job body from the
  Parquet (`job_batches`) — everything but the Redis round trips (see `./dev bench redrive` for
  BullMQ enqueue rates);
- baseline: DuckDB `count(*)` over the same `read_csv` — the floor for reading the file;
- naive: Python's csv module and a set of keys, as a refill script would (the seed's Node script
  reads the whole file into one string, which fails past 512 MB: "invalid string length").

Target (issue 17): ours, job bodies included, at least 2x the naive script's rate, in the same run.
Prints the ratio next to the target with PASS or MISS, and exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

DAY = "2025-07-09"
TYPES = ("trace", "observation", "score")
TARGET_VS_NAIVE = 2.0  # ours (collection + job bodies) / naive, in rows/s


def make_csv(path: Path, size_mb: int) -> int:
    """About size_mb of export; returns the number of data rows."""
    import duckdb

    rows = size_mb * 1_000_000 // 100  # a row is ~100 bytes
    duckdb.execute(
        f"""COPY (
          SELECT CASE WHEN i % 10 = 0 THEN 'REST.GET.OBJECT' ELSE 'REST.PUT.OBJECT' END AS operation,
                 CASE WHEN i % 1000 = 7 THEN 'proj/../../etc/passwd.json'
                      ELSE 'proj-' || (k % 40) || '/' || ['trace', 'observation', 'score'][k % 3 + 1] || '/'
                           || md5(k::VARCHAR)[:24] || '/' || md5((k * 7)::VARCHAR) || '.json' END AS key
          FROM (SELECT i, CASE WHEN i % 50 = 3 THEN i - 2 ELSE i END AS k FROM range({rows}) t(i))
        ) TO '{path}' (HEADER, DELIMITER ',', QUOTE '"', FORCE_QUOTE *)"""
    )
    return rows


def child(method: str, csv_path: str, work: str) -> dict:
    t0 = time.perf_counter()
    out: dict = {}
    if method == "ours":
        from replay_defs.ingestion_refill.access_logs import collect_keys, job_batches

        found = collect_keys(
            "csv",
            csv_path,
            [DAY],
            TYPES,
            lambda d: Path(work) / "keys",
            lambda d: Path(work) / "quarantine",
            Path(work) / "tmp",
            roots=[Path(csv_path).resolve().parent],
        )  # the benchmark's own export
        day = found.days[DAY]
        out["collect_s"] = round(time.perf_counter() - t0, 2)
        jobs = sum(len(b.ids) for b in job_batches([str(Path(work) / "keys" / "keys.parquet")], 10_000))
        out.update(rows=found.rows, keys=day.keys, jobs=jobs, duplicates=day.duplicates, quarantined=day.quarantined)
    elif method == "baseline":
        import duckdb

        out["rows"] = duckdb.execute(
            "SELECT count(*) FROM read_csv($p, header = true, auto_detect = false, columns = {'c0': 'VARCHAR', 'c1': 'VARCHAR'})",
            {"p": csv_path},
        ).fetchone()[0]
    else:
        import csv

        keys: set[str] = set()
        rows = 0
        with open(csv_path, newline="") as f:
            reader = csv.reader(f)
            next(reader)
            for operation, key in reader:
                rows += 1
                if operation == "REST.PUT.OBJECT":
                    keys.add(key)
        out.update(rows=rows, keys=len(keys))
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run(method: str, csv_path: Path, work: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", method, str(csv_path), str(work / method)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256, help="size of the generated export (default 256)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive Python script (and so the target)")
    ap.add_argument("--workdir", help="where to write the CSV and outputs (default: a temp dir, removed)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        csv_path = work / "events.csv"
        t0 = time.perf_counter()
        rows = make_csv(csv_path, args.size_mb)
        size_mb = csv_path.stat().st_size / 1e6
        print(f"export: {rows:,} rows, {size_mb:,.0f} MB, written in {time.perf_counter() - t0:.1f} s\n")
        methods = ["baseline", "ours"] + ([] if args.no_naive else ["naive"])
        results = {m: run(m, csv_path, work) for m in methods}
        base = results["baseline"]["seconds"]
        print(f"{'method':10} {'rows/s':>11} {'MB/s':>7} {'seconds':>8} {'peak RSS':>9} {'vs baseline':>11}")
        for m, r in results.items():
            print(
                f"{m:10} {rows / r['seconds']:>11,.0f} {size_mb / r['seconds']:>7,.0f} {r['seconds']:>8.1f} "
                f"{r['peak_rss_mb']:>7,.0f} MB {base / r['seconds']:>10.2f}x"
            )
        ours = results["ours"]
        print(
            f"\nours: {ours['keys']:,} distinct keys ({ours['keys'] / ours['seconds']:,.0f} keys/s end to end), "
            f"{ours['duplicates']:,} repeats, {ours['quarantined']:,} quarantined; collection {ours['collect_s']} s, "
            f"{ours['jobs']:,} job bodies built from the Parquet in {ours['seconds'] - ours['collect_s']:.1f} s"
        )
    if "naive" in results:
        ratio = results["naive"]["seconds"] / ours["seconds"]
        verdict = "PASS" if ratio >= TARGET_VS_NAIVE else "MISS"
        print(
            f"\nrefill key collection + job bodies / naive: {ratio:.2f}x (target >= {TARGET_VS_NAIVE:.0f}x) {verdict}"
        )
        if verdict == "MISS":
            sys.exit(1)


if __name__ == "__main__":
    main()
