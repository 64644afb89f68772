"""Dagster overhead benchmark: what Dagster and the checks cost per day on the embedded default.

    ./dev bench dagster                        # 30 empty days in one ranged run; a 300,000-event day for the checks
    ./dev bench dagster --days 10 --events 50000

The telemetry pipeline (jsonl_files source) on a real Dagster instance (SQLite, the embedded
default's dagster.yaml) in a temporary DAGSTER_HOME, with a temporary lake, DuckDB store and
outbox; every run is the `telemetry_replay` job (all assets and checks) run in this process the
way `event-replay demo` runs it (`run_in_process` over a range of days: one run, since every asset
has `BackfillPolicy.single_run()`; a UI backfill of the days launches the same single run).

1. Dagster's overhead per day, measured on days with no raw files, so the pipeline has nothing to
   parse, fold or send and what remains is the per-day plumbing: Dagster's run, steps and event
   log, and each step's per-day bookkeeping (lake state, store and ledger connections, checks).
   (a) the wall time of a run of one empty day (after a warm-up run of another empty day: the
   first run of a process also pays lazy imports); (b) the wall time of one run over `--days`
   empty days, divided by the days. Target: under 2 s a day.
2. The checks' share of a day's build, on a day of `--events` demo events (with the generator's
   faults): the check steps' durations plus the content hashes the build computes only for
   verification (the SHA-256 of every raw and Parquet file of the day, recorded for the checks and
   for the verified reads), over the asset steps' durations; durations are STEP_START to
   STEP_SUCCESS in the run's event log (the checks of an asset run in one step). Target: at most 10%.
   Printed with it: each check's own work (the `check_seconds` of its evaluation's metadata) and
   what is left of the check steps, Dagster's per-step costs.

Exits 1 when a figure misses its target.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

JOB = "telemetry_replay"
ASSET_STEPS = {f"telemetry__{a}" for a in ("raw_events", "parsed_events", "projections", "redrive")}
DATA_DAY = "2025-11-24"  # the realistic day; the empty days start a week later (beyond its lateness window)
EMPTY_START = date(2025, 12, 1)
PER_DAY_TARGET_S, CHECK_SHARE_TARGET = 2.0, 0.10


def use_temporary_deployment(root: Path) -> None:
    """Point the code location and the instance at `root` (before anything imports them)."""
    os.environ.update(
        EVENT_REPLAY_LAKE=str(root / "lake"),
        EVENT_REPLAY_DUCKDB=str(root / "event_replay.duckdb"),
        EVENT_REPLAY_OUTBOX=str(root / "outbox"),
        DAGSTER_HOME=str(root / "dagster_home"),
    )
    from replay_defs.cli_common import ensure_dagster_home

    ensure_dagster_home()  # the embedded default's dagster.yaml (SQLite storage)


class Timed:
    """A run of the job over `days` in this process: its wall and CPU time, and its step durations."""

    def __init__(self, days: list[str]):
        import dagster as dg

        from replay_defs.cli_common import run_in_process

        cpu0, t0 = time.process_time(), time.perf_counter()
        result = run_in_process(JOB, days=days, log_level="ERROR")
        self.wall, self.cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if not result.success:
            raise SystemExit(f"the run over {days[0]}..{days[-1]} failed (run {result.run_id}): see its event log")
        started, self.steps, self.check_work = {}, {}, {}
        for entry in dg.DagsterInstance.get().all_logs(result.run_id):
            event = entry.dagster_event
            if event is not None and event.event_type == dg.DagsterEventType.STEP_START:
                started[event.step_key] = entry.timestamp
            elif event is not None and event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                self.steps[event.step_key] = entry.timestamp - started[event.step_key]
            elif event is not None and event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                evaluation = event.event_specific_data
                seconds = evaluation.metadata.get("check_seconds")
                if seconds is not None:  # a check's own time for a day (assets/common.py `_day_verdict`)
                    name = evaluation.check_name
                    self.check_work[name] = self.check_work.get(name, 0.0) + seconds.value

    def total(self, checks: bool) -> float:
        """The check steps' (or the asset steps') summed durations."""
        return sum(s for k, s in self.steps.items() if (k not in ASSET_STEPS) == checks)


def empty_days(first: date, n: int) -> list[str]:
    return [(first + timedelta(days=i)).isoformat() for i in range(n)]


def verification_hashes(day: str) -> tuple[float, int, int]:
    """Seconds to SHA-256 the day's raw files and committed Parquet files once each (what the
    build records for verification), the number of files and their bytes."""
    from replay_defs.core.lake import Lake
    from replay_defs.core.naming import RAW, manifest_name, owner
    from replay_defs.pipeline.committed import parsed_state
    from replay_defs.pipelines import TELEMETRY

    lake = Lake(os.environ["EVENT_REPLAY_LAKE"])
    raw = [f["rel_path"] for f in lake.read_json(owner(TELEMETRY, RAW), manifest_name(day))["files"]]
    files = raw + parsed_state(lake, TELEMETRY, day).files
    t0 = time.perf_counter()
    for rel in files:
        lake.storage.sha256(rel)
    return time.perf_counter() - t0, len(files), sum(lake.storage.info(rel).size for rel in files)


def generate_day(events: int) -> None:
    from replay_defs.jsonl_files.demo import DemoConfig, generate

    generate(
        os.environ["EVENT_REPLAY_LAKE"], DemoConfig(start=date.fromisoformat(DATA_DAY), days=1, events_per_day=events)
    )


def report(name: str, figure: str, target: str, ok: bool) -> bool:
    print(f"{name:58} {figure:>12}   target {target:8} {'PASS' if ok else 'MISS'}")
    return ok


def overhead_per_day(n_days: int) -> bool:
    """1. Dagster's overhead: a run of one empty day, and one run over `n_days` empty days."""
    warm = Timed(empty_days(EMPTY_START, 1))
    one = Timed(empty_days(EMPTY_START + timedelta(days=1), 1))
    ranged = Timed(empty_days(EMPTY_START + timedelta(days=2), n_days))
    print(f"runs of empty days (no raw files: nothing to parse, fold or send), {len(one.steps)} steps a run:")
    print(f"  {'first run of the process (warm-up)':36} {warm.wall:6.2f} s wall {warm.cpu:6.2f} s CPU")
    print(f"  {'one day':36} {one.wall:6.2f} s wall {one.cpu:6.2f} s CPU")
    print(
        f"  {f'{n_days} days in one run':36} {ranged.wall:6.2f} s wall {ranged.cpu:6.2f} s CPU "
        f"({ranged.cpu / n_days:.2f} s CPU a day); outside the steps {ranged.wall - sum(ranged.steps.values()):.2f} s, "
        f"check steps {ranged.total(True):.2f} s, asset steps {ranged.total(False):.2f} s"
    )
    print(
        "  one run over the days: every asset has BackfillPolicy.single_run(), so `event-replay demo`,\n"
        "  `dagster asset materialize --partition-range` and a UI backfill all run a range of days as one run.\n"
        "  The machine is shared: wall time well above CPU time is time spent waiting for a core or a disk."
    )
    a = report(
        "(a) a run of one empty day", f"{one.wall:.2f} s", f"< {PER_DAY_TARGET_S:g} s", one.wall < PER_DAY_TARGET_S
    )
    per_day = ranged.wall / n_days
    b = report(
        f"(b) per day in one run over {n_days} empty days",
        f"{per_day:.2f} s",
        f"< {PER_DAY_TARGET_S:g} s",
        per_day < PER_DAY_TARGET_S,
    )
    return a and b


def check_share(events: int) -> bool:
    """2. The checks' share of a realistic day's build."""
    t0 = time.perf_counter()
    generate_day(events)
    print(f"\ngenerated {events:,} demo events for {DATA_DAY} in {time.perf_counter() - t0:.1f} s; its run:")
    run = Timed([DATA_DAY])
    hashing, files, size = verification_hashes(DATA_DAY)
    for key, seconds in sorted(run.steps.items(), key=lambda kv: (kv[0] not in ASSET_STEPS, kv[0])):
        print(f"  {'asset' if key in ASSET_STEPS else 'check'} {key.removeprefix('telemetry__'):50} {seconds:7.2f} s")
    build, checks = run.total(False), run.total(True)
    print(
        f"  run {run.wall:.2f} s wall; build (asset steps) {build:.2f} s, checks {checks:.2f} s, SHA-256 of the day's "
        f"{files} raw and Parquet files ({size / 1e6:,.0f} MB) {hashing:.2f} s"
    )
    work = sum(run.check_work.values())
    print(
        f"  of the check steps' {checks:.2f} s, the checks' own work (their `check_seconds`) {work:.2f} s "
        f"({work / build:.1%} of the build), Dagster's per-step costs the rest:"
    )
    for name, seconds in sorted(run.check_work.items(), key=lambda kv: -kv[1]):
        print(f"    {name:52} {seconds:7.3f} s")
    share = (checks + hashing) / build
    return report(
        "checks + verification hashes / build",
        f"{share:.1%}",
        f"<= {CHECK_SHARE_TARGET:.0%}",
        share <= CHECK_SHARE_TARGET,
    )


def run_benchmark(args) -> bool:
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"sizes: {args.days} empty days, a day of {args.events:,} events"
    )
    t0 = time.perf_counter()
    from replay_defs.definitions import defs  # noqa: F401  (the code location, loaded once)

    print(f"code location loaded in {time.perf_counter() - t0:.1f} s (once per process, not counted below)\n")
    first = overhead_per_day(args.days)
    second = check_share(args.events)
    return first and second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=30, help="empty days in the ranged run (default 30)")
    ap.add_argument("--events", type=int, default=300_000, help="demo events in the realistic day (default 300,000)")
    ap.add_argument("--workdir", help="where the temporary deployment goes (default: the system's temp dir)")
    args = ap.parse_args()
    if args.days < 1 or args.events < 24:
        ap.error("--days must be at least 1 and --events at least 24 (one an hour)")
    import warnings

    warnings.filterwarnings("ignore", module="dagster")
    warnings.filterwarnings("ignore", message=".*(beta|preview).*")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="dagster-bench-") as tmp:
        use_temporary_deployment(Path(tmp))
        ok = run_benchmark(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
