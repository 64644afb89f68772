"""`event-replay`: demo data, the demo backfill, per-partition status and rollback, and the seed
systems: ingestion refill (`refill`), processed-events replays (`processed-events`), billing
reprocessing (`billing`) and projection replay (`projections`); `<command> --help` for each.

Everything here goes through the same Dagster definitions the UI and `dagster asset materialize`
use, against the instance in $DAGSTER_HOME (default: ./.dagster_home, SQLite).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date, timedelta
from pathlib import Path

from replay_defs.core.redact import redact, secrets_masked

DEFAULT_HOME = ".dagster_home"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


INITIALIZED = ".event-replay-initialized"


def ensure_dagster_home() -> Path:
    """A project-local SQLite instance unless DAGSTER_HOME says otherwise, its storage created
    once, under a lock: two first commands at once on a fresh home would otherwise both create
    the SQLite schemas and leave the schedule storage with two migration heads."""
    from filelock import FileLock

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(DEFAULT_HOME).resolve())))
    home.mkdir(parents=True, exist_ok=True)
    if (home / INITIALIZED).exists():
        return home
    with FileLock(str(home / ".init.lock")):
        if not (home / INITIALIZED).exists():
            cfg = home / "dagster.yaml"
            if not cfg.exists():
                cfg.write_text("telemetry:\n  enabled: false\n")
            import dagster as dg

            instance = dg.DagsterInstance.get()  # creates the run, event log and schedule storage
            try:
                instance.get_runs(limit=1)
                instance.all_instigator_state()
            finally:
                instance.dispose()
            (home / INITIALIZED).touch()
    return home


def _days(start: str, end: str) -> list[str]:
    from replay_defs.core.lake import check_partition

    try:
        a, b = date.fromisoformat(check_partition(start)), date.fromisoformat(check_partition(end))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if b < a:
        raise SystemExit(f"end {end} is before start {start}")
    return [(a + timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]


QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _spec_or_refill(name: str):
    from replay_defs.pipelines import PIPELINES, REFILLS

    for spec in (*PIPELINES, *REFILLS):
        if spec.name == name:
            return spec
    raise SystemExit(f"no pipeline {name!r}; known: {', '.join(p.name for p in (*PIPELINES, *REFILLS))}")


def _spec(name: str):
    from replay_defs.pipelines import PIPELINES

    for spec in PIPELINES:
        if spec.name == name:
            return spec
    raise SystemExit(f"no pipeline {name!r}; known: {', '.join(p.name for p in PIPELINES)}")


def run_job(
    spec_name: str,
    start: str,
    end: str,
    run_config: dict | None = None,
    tags: dict | None = None,
    log_level: str = "WARNING",
):
    """Materialize the pipeline's replay job for a day range, in this process, on the instance."""
    import dagster as dg

    from replay_defs.definitions import defs

    job = defs.resolve_job_def(f"{spec_name}_replay")
    # The console shows warnings only; the full run log is in the instance (and the UI).
    config = {"loggers": {"console": {"config": {"log_level": log_level}}}, **(run_config or {})}
    return job.execute_in_process(
        instance=dg.DagsterInstance.get(),
        tags={RANGE_START: start, RANGE_END: end, **(tags or {})},
        run_config=config,
        raise_on_error=False,
    )


def partition_rows(spec_name: str, days: list[str]) -> list[dict]:
    """Per-partition counts, read back from the lake state and the stores."""
    from replay_defs.core.lake import Lake
    from replay_defs.core.naming import PARSED, REDRIVE, owner
    from replay_defs.definitions import defs
    from replay_defs.pipeline.store import DuckDBStore

    spec = _spec(spec_name)
    lake_res, store_res = defs.resources["lake"], defs.resources["store"]
    lake = Lake(_resolve(lake_res.root), keep_versions=lake_res.keep_versions)
    store = DuckDBStore(_resolve(store_res.path))
    count_proj = next((p for p in spec.projections if p.kind == "increment"), None)
    rows = []
    for day in days:
        state = lake.state(owner(spec, PARSED), day)
        s = state.stats if state else {}
        last = lake.read_json(owner(spec, REDRIVE), f"last/day={day}.json") or {}
        rows.append(
            {
                "day": day,
                "version": state.version if state else None,
                "raw_lines": s.get("raw_lines"),
                "parsed": s.get("parsed"),
                "duplicates": s.get("duplicates"),
                "quarantined": s.get("quarantined"),
                "routed_in": s.get("routed_in"),
                "routed_out": s.get("routed_out"),
                "projection": store.increment_total(spec.name, count_proj, day) if (count_proj and state) else None,
                "redrive_sent": last.get("published"),
                "redrive_skipped": last.get("skipped_already_delivered"),
                "rows_by_type": s.get("rows_by_type", {}),
            }
        )
    return rows


def _resolve(value) -> str:
    """A resource field may hold an EnvVar; resolve it the way a run would."""
    import dagster as dg

    if isinstance(value, dg.EnvVar):
        return value.get_value()
    return value


PASSED, FAILED, WARN, ERRORED, RUNNING, NOT_RUN, STALE, NONE = (
    "passed",
    "failed",
    "warn",
    "errored",
    "running",
    "not run",
    "stale",
    "no verdict",
)


def evaluation_verdict(evaluation) -> str:
    """passed, failed, warn (a failure of WARN severity) or errored (the check raised for the day)."""
    import dagster as dg

    if evaluation.passed:
        return PASSED
    if "errored" in evaluation.metadata:
        return ERRORED
    return WARN if evaluation.severity == dg.AssetCheckSeverity.WARN else FAILED


def check_results(spec_name: str, days: list[str]) -> dict[tuple[str, str], str]:
    """Latest verdict per (check, day) from the Dagster instance: see `evaluation_verdict`, or for
    a check planned without a verdict: running, errored (its step failed: it raised) or not run
    (an upstream step or blocking check failed first)."""
    import dagster as dg
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus as S

    from replay_defs.definitions import defs

    instance = dg.DagsterInstance.get()
    keys = [k for k in defs.resolve_asset_graph().asset_check_keys if k.asset_key.path[0] == spec_name]
    failed_steps: dict[str, set[str]] = {}  # run id -> its failed step keys

    def unresolved(check_key, run_id: str) -> str:
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            return RUNNING
        if run_id not in failed_steps:
            failed_steps[run_id] = {
                e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
            }
        return (
            ERRORED if "__".join(check_key.asset_key.path) + "_" + check_key.name in failed_steps[run_id] else NOT_RUN
        )

    def built_at(day: str) -> float:
        """When the day's parsed events were last built (or rolled back): older verdicts are stale."""
        parsed = dg.AssetKey([spec_name, "parsed_events"])
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=parsed, asset_partitions=[day]), limit=1
        ).records
        return records[0].timestamp if records else 0.0

    out: dict[tuple[str, str], str] = {}
    for day in days:
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            keys, partition_filter=PartitionKeyFilter(key=day)
        )
        since = built_at(day)
        for key, record in latest.items():
            if record.status == S.PLANNED or record.event is None:
                out[(key.name, day)] = unresolved(key, record.run_id)
            elif record.event.timestamp < since:
                out[(key.name, day)] = STALE
            else:
                out[(key.name, day)] = evaluation_verdict(record.event.dagster_event.event_specific_data)
        for key in keys:
            out.setdefault((key.name, day), NONE)
    return out


def verdict_summary(verdicts: list[tuple[str, str]]) -> str:
    """`9/10 passed, FAILED: a, WARN: b, ERRORED: c` for one day's (check, verdict) pairs."""
    if all(v == NONE for _, v in verdicts):
        return "no check has run"
    ok = sum(v == PASSED for _, v in verdicts)
    parts = [f"{ok}/{len(verdicts)} passed"]
    for verdict in (FAILED, WARN, ERRORED, RUNNING, NOT_RUN, STALE, NONE):
        names = [c for c, v in verdicts if v == verdict]
        if names:
            parts.append(f"{verdict.upper() if verdict in (FAILED, WARN, ERRORED) else verdict}: {', '.join(names)}")
    return ", ".join(parts)


def print_table(spec_name: str, days: list[str], truth_lake: str | None = None) -> None:
    from replay_defs.jsonl_files.demo import read_truth

    rows = partition_rows(spec_name, days)
    checks = check_results(spec_name, days)
    names = sorted({c for c, _ in checks})  # every check of the pipeline (`check_results` lists each per day)
    head = f"{'day':10} {'ver':>3} {'raw lines':>10} {'parsed':>9} {'dupes':>6} {'quar.':>5} {'in':>5} {'out':>5} {'proj.':>9} {'sent':>5} {'skip':>5}  checks"
    print(head)
    print("-" * len(head))
    for r in rows:
        status = verdict_summary([(c, checks.get((c, r["day"]))) for c in names])
        fmt = lambda v, w: f"{v:>{w},}" if isinstance(v, int) else f"{'-':>{w}}"  # noqa: E731
        line = (
            f"{r['day']:10} {fmt(r['version'], 3)} {fmt(r['raw_lines'], 10)} {fmt(r['parsed'], 9)} {fmt(r['duplicates'], 6)} "
            f"{fmt(r['quarantined'], 5)} {fmt(r['routed_in'], 5)} {fmt(r['routed_out'], 5)} {fmt(r['projection'], 9)} "
            f"{fmt(r['redrive_sent'], 5)} {fmt(r['redrive_skipped'], 5)}  {status}"
        )
        if truth_lake:
            truth = read_truth(truth_lake, r["day"])
            if truth is not None:
                line += "  | truth: " + (
                    "match" if truth == r["rows_by_type"] else f"MISMATCH {r['rows_by_type']} != {truth}"
                )
        print(line)


# ---- commands ---------------------------------------------------------------------------------


def cmd_generate(args) -> None:
    from replay_defs.jsonl_files.demo import DemoConfig, generate

    t0 = time.time()
    generate(
        args.lake,
        DemoConfig(
            start=date.fromisoformat(args.start),
            days=args.days,
            events_per_day=args.events_per_day,
            files_per_hour=args.files_per_hour,
            seed=args.seed,
        ),
    )
    print(f"wrote {args.days} days x {args.events_per_day:,} events to {args.lake}/ in {time.time() - t0:.1f}s")


def cmd_demo(args) -> None:
    ensure_dagster_home()
    from replay_defs.definitions import defs

    lake_root = _resolve(defs.resources["lake"].root)
    start = date.fromisoformat(args.start)
    end = (start + timedelta(days=args.days - 1)).isoformat()
    days = _days(args.start, end)
    if not Path(lake_root, "_demo", "truth", f"day={args.start}.json").exists():
        print(
            f"1. generating {args.days} days of demo telemetry ({args.events_per_day:,} events/day) into {lake_root}/ ..."
        )
        from replay_defs.jsonl_files.demo import DemoConfig, generate

        generate(lake_root, DemoConfig(start=start, days=args.days, events_per_day=args.events_per_day))
    else:
        print(f"1. demo data already in {lake_root}/ (delete it to regenerate)")
    print(f"2. backfilling telemetry {args.start}...{end} (one run, per-day checks) ...")
    t0 = time.time()
    result = run_job("telemetry", args.start, end)
    print(f"   run {result.run_id}: {'SUCCESS' if result.success else 'FAILURE'} in {time.time() - t0:.1f}s")
    print()
    print_table("telemetry", days, truth_lake=lake_root)
    if args.days >= 2 and not args.no_bug_story:
        bad = days[1]
        print(f"\n3. a bad parser deploy rewrites {bad} (timestamps read as US/Pacific) ...")
        caught = run_job(
            "telemetry",
            bad,
            bad,
            {"ops": {"telemetry__parsed_events": {"config": {"simulate_parser_bug": True}}}},
            log_level="CRITICAL",
        )
        print_table("telemetry", [bad], truth_lake=lake_root)
        if not caught.success:
            print(
                "   the run failed, as it should: the new version lost events, so its blocking check stopped it before the projections and the sink"
            )
        print(
            f"\n4. replaying {bad} with the fixed parser: the wrong version is swapped out (and kept for rollback) ..."
        )
        run_job("telemetry", bad, bad)
        print_table("telemetry", [bad], truth_lake=lake_root)
    print(
        "\nColumns: ver = lake version of the day; in/out = events that crossed midnight (event time vs. arrival);\n"
        "proj. = daily_counts total; sent/skip = redrive messages sent / already delivered.\n"
        "Open the UI with `./dev ui` (http://127.0.0.1:3000) to see runs, per-day metadata and checks."
    )
    if not result.success:
        sys.exit(1)


def cmd_status(args) -> None:
    ensure_dagster_home()
    print_table(args.pipeline, _days(args.start, args.end or args.start))


def cmd_rollback(args) -> None:
    """Restore the previous (or a given) kept version of a parsed day after verifying its files,
    re-fold the projections from it, then run every check of the day."""
    ensure_dagster_home()
    import dagster as dg

    from assets.common import asset_key
    from replay_defs.core.lake import DamagedVersion, Lake, check_partition
    from replay_defs.core.naming import PARSED, PROJECTIONS, owner, parsed_slot_patterns
    from replay_defs.definitions import defs

    spec = _spec(args.pipeline)
    try:
        day = check_partition(args.day)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    lake_res = defs.resources["lake"]
    lake = Lake(_resolve(lake_res.root), keep_versions=lake_res.keep_versions)
    before = lake.state(owner(spec, PARSED), day)
    to = args.to if args.to is not None else rollback_target(lake, spec, day, before)
    try:
        state = lake.rollback(owner(spec, PARSED), day, parsed_slot_patterns(spec, day), to=to)
    except (LookupError, DamagedVersion) as exc:
        raise SystemExit(f"rollback refused: {exc}") from exc
    instance = dg.DagsterInstance.get()
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=asset_key(spec, PARSED),
            partition=day,
            description=f"rolled back from version {before.version if before else '-'} to {state.version}",
            metadata={
                "version": state.version,
                "rolled_back_from": before.version if before else 0,
                "parsed": state.stats.get("parsed", 0),
            },
        )
    )
    print(
        f"{spec.name} {day}: parsed_events now version {state.version} (was {before.version if before else '-'}); re-folding projections ..."
    )
    ok = True
    if spec.projections:
        job = defs.resolve_job_def(f"{spec.name}_replay")
        ok = job.execute_in_process(
            instance=instance,
            partition_key=day,
            asset_selection=[asset_key(spec, PROJECTIONS)],
            run_config=QUIET,
            raise_on_error=False,
        ).success
    print("running every check of the day ...")
    verdicts = run_checks(spec.name, [day])
    print_verdicts(verdicts)
    print_table(spec.name, [day])
    if not ok or failing(verdicts):
        sys.exit(1)


def rollback_target(lake, spec, day: str, current) -> int:
    """The newest kept version older than the live one that did not fail its shrink check when it
    was built (a known-bad version is restored only when named with --to)."""
    from replay_defs.core.naming import PARSED, owner
    from replay_defs.pipeline.shrink import unconsented_shrink

    older = [v for v in lake.kept_versions(owner(spec, PARSED), day) if current is None or v < current.version]
    for v in reversed(older):
        if not unconsented_shrink(lake.kept_state(owner(spec, PARSED), day, v).stats, spec.shrink_tolerance):
            return v
        print(
            f"skipping version {v}: it lost events without consent when it was built (its shrink check failed); --to {v} restores it anyway"
        )
    raise SystemExit(
        f"rollback refused: {spec.name} {day}: no earlier version is kept to roll back to"
        + (" that passed its shrink check" if older else "")
    )


def run_checks(spec_name: str, days: list[str]) -> dict[tuple[str, str], tuple[str, str]]:
    """Run `<pipeline>_verify` (every check, nothing rebuilt) over the days, in this process:
    (check, day) -> (verdict, description). A check that raised is `errored` for its days."""
    import dagster as dg

    from replay_defs.definitions import defs

    job = defs.resolve_job_def(f"{spec_name}_verify")
    result = job.execute_in_process(
        instance=dg.DagsterInstance.get(),
        tags={RANGE_START: days[0], RANGE_END: days[-1]},
        run_config=QUIET,
        raise_on_error=False,
    )
    out: dict[tuple[str, str], tuple[str, str]] = {}
    # A ranged run records one evaluation per day plus a summary without a partition: keep the days'.
    for e in sorted(result.get_asset_check_evaluations(), key=lambda e: e.partition is not None):
        for day in [e.partition] if e.partition else days:
            out[(e.check_name, day)] = (evaluation_verdict(e), e.description or "")
    check_of_step = {
        "__".join(k.asset_key.path) + "_" + k.name: k.name for k in defs.resolve_asset_graph().asset_check_keys
    }
    for event in result.all_events:
        if event.is_step_failure:
            name = check_of_step.get(event.step_key, event.step_key)
            error = event.event_specific_data.error
            while error.cause is not None:  # the check's own exception, not Dagster's wrapper
                error = error.cause
            for day in days:
                if (name, day) not in out:
                    out[(name, day)] = (ERRORED, error.message.strip().splitlines()[0])
    return out


def failing(verdicts: dict) -> list[tuple[str, str]]:
    return [k for k, (v, _) in verdicts.items() if v in (FAILED, ERRORED)]


def print_verdicts(verdicts: dict) -> None:
    for (check, day), (verdict, description) in sorted(verdicts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{day}  {verdict.upper():7}  {check:32}  {description}")


def cmd_verify(args) -> None:
    """Every check of the days, nothing rebuilt; exit 1 if any failed or errored."""
    ensure_dagster_home()
    from partitions import daily_partitions

    spec = _spec_or_refill(args.pipeline)
    days = _days(args.start, args.end or args.start)
    known = daily_partitions(spec).get_partition_keys()
    if days[0] < known[0] or days[-1] > known[-1]:
        raise SystemExit(f"{spec.name}'s days are {known[0]}..{known[-1]}; {days[0]}..{days[-1]} is not within them")
    verdicts = run_checks(args.pipeline, days)
    print_verdicts(verdicts)
    bad = failing(verdicts)
    counts = {v: sum(verdict == v for verdict, _ in verdicts.values()) for v in (PASSED, WARN, FAILED, ERRORED)}
    print(
        f"{counts[PASSED]}/{len(verdicts)} checks passed over {len(days)} day(s): "
        f"{counts[WARN]} warning(s), {counts[FAILED]} failed, {counts[ERRORED]} errored"
    )
    if bad:
        sys.exit(1)


def cmd_refill(args) -> None:
    """Collect the keys of the days from the access logs and enqueue one ingestion job per key."""
    ensure_dagster_home()
    from assets.refill import EVENT_KEYS
    from replay_defs.pipelines import REFILLS

    spec = next((r for r in REFILLS if r.name == args.refill), None)
    if spec is None:
        raise SystemExit(f"no refill {args.refill!r}; known: {', '.join(r.name for r in REFILLS)}")
    days = _days(args.start, args.end or args.start)
    delivery = {
        k: v
        for k, v in {
            "dry_run": args.dry_run,
            "limit": args.limit,
            "force": args.force,
            "rate_limit": args.rate_limit,
            "batch_size": args.batch_size,
        }.items()
        if v not in (None, False)
    }
    # Absolute, not resolved: the asset resolves symlinks itself and checks the result against EVENT_REPLAY_REFILL_ROOTS.
    location = args.location if args.location.startswith("s3://") else os.path.abspath(args.location)
    run_config = {
        "ops": {
            f"{spec.name}__{EVENT_KEYS}": {"config": {"source": args.source, "location": location}},
            f"{spec.name}__redrive": {"config": delivery},
        }
    }
    t0 = time.time()
    result = run_job(spec.name, days[0], days[-1], run_config)
    print(f"run {result.run_id}: {'SUCCESS' if result.success else 'FAILURE'} in {time.time() - t0:.1f}s")
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        if failure is not None:
            print(redact(f"  {failure.step_key}: {failure.event_specific_data.error.message.strip()}"), file=sys.stderr)
    mats = {
        (m.asset_key.path[-1], m.partition): {k: v.value for k, v in m.metadata.items()}
        for node in (f"{spec.name}__{EVENT_KEYS}", f"{spec.name}__redrive")
        for m in result.asset_materializations_for_node(node)
    }
    checks = {(e.check_name, e.partition): e.passed for e in result.get_asset_check_evaluations()}
    verb = "would send" if args.dry_run else "sent"
    print(f"{'day':10} {'PUT rows':>9} {'keys':>8} {'repeats':>7} {'quar.':>6} {verb:>10} {'skip':>8}  checks")
    for day in days:
        k, r = mats.get((EVENT_KEYS, day), {}), mats.get(("redrive", day), {})
        sent = r.get("would_publish") if args.dry_run else r.get("published")
        verdicts = [v for (name, d), v in checks.items() if d == day]
        fmt = lambda v, w: f"{v:>{w},}" if isinstance(v, int) else f"{'-':>{w}}"  # noqa: E731
        print(
            f"{day:10} {fmt(k.get('put_rows'), 9)} {fmt(k.get('keys'), 8)} {fmt(k.get('duplicates'), 7)} "
            f"{fmt(k.get('quarantined'), 6)} {fmt(sent, 10)} {fmt(r.get('skipped_already_delivered'), 8)}  "
            f"{sum(verdicts)}/{len(verdicts)} passed"
        )
    if not result.success:
        sys.exit(1)


def _moment(value: str, end: bool = False):
    """RFC 3339 (a zone is required), or a bare date: its start, or for an end the next midnight."""
    from datetime import datetime, timezone

    if len(value) == 10:
        d = date.fromisoformat(value) + timedelta(days=1 if end else 0)
        return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        raise SystemExit(f"{value!r}: give a time zone, e.g. {value}Z")
    return dt.astimezone(timezone.utc)


def reprocess_plan(
    spec, start: str, end: str | None, filters: dict, batch_size: int, dry_run: bool, force: bool
) -> tuple[list[str], dict]:
    """Seed 002's reprocess request as a partition range and the job's run config: the filters and
    the window go to raw_events (its manifest is the selection), the batch size to the keyset read
    and the redrive, dry_run / force to the redrive."""
    from datetime import datetime, timezone

    lo = _moment(start)
    hi = _moment(end, end=True) if end else datetime.now(timezone.utc)
    if hi <= lo:
        raise SystemExit(f"end {hi.isoformat()} is not after start {lo.isoformat()}")
    days = _days(lo.date().isoformat(), (hi - timedelta(microseconds=1)).date().isoformat())
    op = spec.name + "__"
    selection = {**{k: v for k, v in filters.items() if v}, "start": lo.isoformat(), "end": hi.isoformat()}
    config = {
        "ops": {
            op + "raw_events": {"config": selection},
            op + "parsed_events": {"config": {"batch_size": batch_size}},
            op + "redrive": {"config": {"dry_run": dry_run, "force": force, "batch_size": batch_size}},
        }
    }
    return days, config


def cmd_billing_reprocess(args) -> None:
    """POST /events/raw/reprocess of seed 002, as a run of the billing_reprocessing job."""
    import json

    ensure_dagster_home()
    spec = _spec("billing_reprocessing")
    filters = {
        "tenant": args.tenant,
        "environment": args.environment,
        "customer": args.customer,
        "event_name": args.event_name,
    }
    days, config = reprocess_plan(spec, args.start, args.end, filters, args.batch_size, args.dry_run, args.force)
    result = run_job(spec.name, days[0], days[-1], config)
    totals = dict.fromkeys(
        ("found", "published", "skipped_already_delivered", "dropped", "transformation_errors", "publish_failures"), 0
    )
    for mat in result.asset_materializations_for_node(f"{spec.name}__redrive"):
        for k in totals:
            totals[k] += mat.metadata[k].value if k in mat.metadata else 0
    print(
        json.dumps(
            {
                "run_id": result.run_id,
                "status": "SUCCESS" if result.success else "FAILURE",
                "job": f"{spec.name}_replay",
                "partitions": [days[0], days[-1]],
                "dry_run": args.dry_run,
                **totals,
            }
        )
    )
    if not result.success:
        sys.exit(1)


# ---- processed-events replays (seed 003) -------------------------------------------------------

PROCESSED_EVENTS_JOBS = {
    "replay-one": ("processed_events_replay_one", "replay_one_event"),
    "replay-failed": ("processed_events_replay_failed", "replay_failed_events"),
    "replay-range": ("processed_events_replay_range", "replay_event_range"),
    "reset-stuck": ("processed_events_reset_stuck", "reset_stuck_events"),
    "undo": ("processed_events_undo", "undo_replay"),
}


def processed_events_config(args) -> dict:
    """The op config of a `processed-events` subcommand, from its arguments."""
    config = {"table": args.table, "dry_run": args.dry_run, "reason": args.reason, "requested_by": args.requested_by}
    if args.pe_cmd != "undo":
        config.update(
            exchange=args.exchange,
            force=args.force,
            rate_limit=args.rate_limit,
            batch_size=args.batch_size,
            max_message_bytes=args.max_message_bytes,
        )
    if args.pe_cmd == "replay-one":
        config["event_id"] = args.event_id
    elif args.pe_cmd == "replay-failed":
        config.update(hours=args.hours, since=args.since, until=args.until)
    elif args.pe_cmd == "replay-range":
        config.update(event_type=args.event_type, start=args.start, end=args.end)
    elif args.pe_cmd == "reset-stuck":
        config.update(older_than_minutes=args.older_than_minutes, to_status=args.to_status)
    else:
        config["replay_run_id"] = args.replay_run_id
    return config


def cmd_processed_events(args) -> None:
    """Launch the job on the instance in $DAGSTER_HOME (it shows in the UI's runs) and print its
    counts. Ctrl-C is the emergency stop, as terminating the run in the UI is."""
    ensure_dagster_home()
    import dagster as dg

    from replay_defs.definitions import defs
    from replay_defs.processed_events import engine as pe

    job_name, op_name = PROCESSED_EVENTS_JOBS[args.pe_cmd]
    run_config = {
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
        "ops": {op_name: {"config": processed_events_config(args)}},
    }
    result = defs.resolve_job_def(job_name).execute_in_process(
        instance=dg.DagsterInstance.get(),
        run_config=run_config,
        raise_on_error=False,
        tags={"event_replay/source": "cli"},
    )
    outputs = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    print(f"run_id {result.run_id}: {'SUCCESS' if result.success else 'FAILURE'}")
    if outputs:
        md = {k: v.value for k, v in outputs[0].step_output_data.metadata.items()}
        print("  " + " ".join(f"{k}={md[k]}" for k in pe.COUNTS if k in md))
        print(
            f"  status={md.get('status')} forced={md.get('forced')} selected_by_status={json.dumps(md.get('selected_by_status'))}"
        )
        if md.get("snapshot"):
            print(
                f"  snapshot: {md['snapshot']}\n  undo: event-replay processed-events undo {result.run_id} --table {args.table} --reason ..."
            )
    else:
        try:
            row = pe.audit_row(_resolve(defs.resources["postgres"].url), result.run_id)
        except Exception:  # noqa: BLE001 - the database is what failed
            row = None
        if row:
            print(
                redact(
                    f"  audit: status={row['status']} published={row['published']} failed={row['failed']} refused={row.get('refused', 0)}"
                    f" {json.dumps(row.get('refused_by_reason') or {})} not_reached={row['not_reached']} error={row['error']}"
                )
            )
            if row.get("refused") or row.get("failed"):
                print(f"  dead letters: {pe.dead_letter_location(result.run_id)}")
        for event in result.all_events:
            if event.is_step_failure:  # the error, without Dagster's stack trace (that is in the run's log)
                error = event.step_failure_data.error
                print(redact(f"  {error.message.strip() if error else event.message}"), file=sys.stderr)
    if not result.success:
        sys.exit(1)


def cmd_billing_generate(args) -> None:
    """Demo rows in the configured ClickHouse (chDB at EVENT_REPLAY_CHDB by default)."""
    from replay_defs.clickhouse_table.demo import generate_billing
    from replay_defs.core.clickhouse import ClickHouse
    from replay_defs.definitions import defs

    res = defs.resources["clickhouse"]
    with ClickHouse(_resolve(res.url), _resolve(res.data_path), _resolve(res.database)) as ch:
        for day in _days(args.start, (date.fromisoformat(args.start) + timedelta(days=args.days - 1)).isoformat()):
            stored = generate_billing(ch, day, args.rows_per_day)
            print(f"{day}: {stored:,} rows into raw_events ({ch.where}, database {ch.database})")


# ---- projection replay (seed 001) ---------------------------------------------------------------


# The connections of the projection commands: (flag stem, environment variable, what it is for).
PROJECTION_CONNECTIONS = (
    ("clickhouse", "CLICKHOUSE_URL", "ClickHouse server (unset: chDB in EVENT_REPLAY_CHDB)"),
    ("redis", "EVENT_REPLAY_REDIS_URL", "Redis for the markers"),
    ("postgres", "EVENT_REPLAY_POSTGRES_URL", "PostgreSQL of the increment stores"),
)


class _RefusedSecretFlag(argparse.Action):
    """A flag that used to take a URL with its password: `ps` shows every process's arguments to
    every user of the machine, so it is refused (without echoing the value) in favour of the
    environment variable or a `--...-url-file`."""

    def __init__(self, option_strings, dest, env: str = "", **kwargs):
        self.env = env
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        stem = option_string.removeprefix("--")
        parser.error(
            f"{option_string} is no longer accepted: a URL on the command line (with its password) is visible to "
            f"every user through `ps`. Set {self.env} in the environment, or pass --{stem}-file PATH "
            f"(a file holding the URL, readable only by you)."
        )


def _read_url_file(flag: str, path: str) -> str:
    try:
        url = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SystemExit(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    if not url or "\n" in url:
        raise SystemExit(f"{flag}: {path} must hold exactly one URL on one line")
    return url


def _projection_env(args) -> None:
    """A `--...-url-file` wins over the environment; set before defs load. Its secrets are
    registered for masking at once."""
    from replay_defs.core.redact import register_url

    for stem, env, _ in PROJECTION_CONNECTIONS:
        path = getattr(args, f"{stem}_url_file", None)
        if path:
            os.environ[env] = register_url(_read_url_file(f"--{stem}-url-file", path))


def cmd_projections_list(args) -> None:
    import json

    from replay_defs.projection_replay.engine import PROJECTIONS

    if args.json:
        print(json.dumps([p.summary() for p in PROJECTIONS.values()], indent=2))
        return
    print(f"{'projection':28} {'store':11} {'kind':10} {'scope':10} key")
    for p in PROJECTIONS.values():
        print(f"{p.name:28} {p.store:11} {p.kind:10} {p.scope:10} {', '.join(c for c, _ in p.key_columns)}")
        print(f"{'':28} {p.description}")


def cmd_projections_replay(args) -> None:
    """Replay a projection for a tenant since a day: a run of the projection_replay job over the
    partition range [since, until] on the local instance."""
    import json
    from datetime import datetime, timezone

    _projection_env(args)
    ensure_dagster_home()
    import dagster as dg

    from assets.projection_replay import projection_key
    from replay_defs.definitions import build_definitions
    from replay_defs.projection_replay.engine import get_projection

    defs = build_definitions()  # built now: the connection flags above are in the environment

    try:
        p = get_projection(args.projection)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    until = args.until or datetime.now(timezone.utc).date().isoformat()
    days = _days(args.since, until)
    config = {
        "tenant": args.tenant_id,
        "dry_run": args.dry_run,
        "batch_size": args.batch_size,
        "aggregate_batch": args.aggregate_batch,
        "concurrency": args.concurrency,
    }
    job = defs.resolve_job_def("projection_replay")
    result = job.execute_in_process(
        instance=dg.DagsterInstance.get(),
        tags={RANGE_START: days[0], RANGE_END: days[-1], "event_replay/tenant": args.tenant_id},
        run_config={
            "loggers": {"console": {"config": {"log_level": "WARNING"}}},
            "ops": {f"projection_replay__{p.name}": {"config": config}},
        },
        asset_selection=[projection_key(p)],
        raise_on_error=False,
    )
    mats = result.asset_materializations_for_node(f"projection_replay__{p.name}")
    per_day = {m.partition: {k: v.value for k, v in m.metadata.items()} for m in mats if m.partition}
    checks = [e for e in result.get_asset_check_evaluations()]
    out = {
        "run_id": result.run_id,
        "status": "SUCCESS" if result.success else "FAILURE",
        "projection": p.name,
        "tenant": args.tenant_id,
        "since": days[0],
        "until": days[-1],
        "dry_run": args.dry_run,
        "check_passed": all(e.passed for e in checks) if checks else None,
    }
    for k in ("aggregates", "events", "keys_written", "skipped_aggregates"):
        out[k] = sum(int(d.get(k, 0) or 0) for d in per_day.values())
    errors = [e.step_failure_data.error for e in result.all_events if e.is_step_failure and e.step_failure_data.error]
    if errors:  # the last line of the cause: e.g. ReplayBusy, a ClickHouse error (passwords masked)
        err = errors[0].cause or errors[0]
        out["error"] = redact(err.message.strip().splitlines()[-1])[:500]
    if not args.quiet:
        for day in sorted(per_day):
            d = per_day[day]
            extra = (
                f"would fold {d.get('dry_run_events_to_fold', 0):,} events of {d.get('dry_run_aggregates', 0):,} aggregates"
                if args.dry_run
                else f"{d.get('aggregates', 0):,} aggregates, {d.get('events', 0):,} events, "
                f"{d.get('keys_written', 0):,} keys, cutoff {d.get('cutoff') or '-'}, "
                f"{'verified' if d.get('verified') else 'MISMATCH'}{', resumed' if d.get('resumed') else ''}"
            )
            print(f"{day}  {extra}", file=sys.stderr)
    print(json.dumps(out))
    if not result.success:
        sys.exit(1)


def add_processed_events_parser(sub) -> None:
    pe = sub.add_parser(
        "processed-events",
        help="replay, reset and undo rows of a Postgres processed_events table through RabbitMQ (seed 003)",
        description="Replays of a Postgres `processed_events` table (EVENT_REPLAY_POSTGRES_URL) to a RabbitMQ exchange "
        "(EVENT_REPLAY_RABBITMQ_URL), routed by event type, with publisher confirms. Each command launches the matching "
        "Dagster job (processed_events_*) on the instance in $DAGSTER_HOME, so it shows in the UI like a launchpad run. "
        "Every run snapshots the rows it changes (undo with `undo RUN_ID`) and writes an audit row "
        "(event_replay_audit). Events already processed are skipped unless --force. A message refused for its shape "
        "(event type, event id or header key over AMQP's 255 bytes, payload over --max-message-bytes) or not confirmed fails "
        "that row alone: counted, dead-lettered in event_replay_dead_letter, row left unchanged, and the run goes on; only a lost "
        "connection stops it. Ctrl-C stops publishing at once; the rows published so far are committed and counted.",
    )
    pe_sub = pe.add_subparsers(dest="pe_cmd", required=True)

    def common(p, publishing: bool = True):
        p.add_argument(
            "--table",
            default="processed_events",
            help="events table, optionally schema.table (default processed_events)",
        )
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="only report what would be replayed (counts per status and type); change nothing",
        )
        p.add_argument("--reason", default="", help="why (kept in the audit; required unless --dry-run)")
        p.add_argument(
            "--requested-by", default=os.environ.get("USER", ""), help="who (kept in the audit; default $USER)"
        )
        if publishing:
            p.add_argument(
                "--exchange",
                default="habitat-events",
                help="RabbitMQ exchange; the routing key is the event type (default habitat-events)",
            )
            p.add_argument(
                "--force",
                action="store_true",
                help="also replay events already processed or pending (flagged in the audit: side effects may repeat)",
            )
            p.add_argument(
                "--rate-limit", type=float, default=50.0, help="messages per second, 0 for unlimited (default 50)"
            )
            p.add_argument(
                "--batch-size",
                type=int,
                default=100,
                help="rows locked, published and committed together (default 100)",
            )
            p.add_argument(
                "--max-message-bytes",
                type=int,
                default=16 * 1024 * 1024,
                help="a payload over this is refused before it is sent (default 16 MiB, RabbitMQ 4's max_message_size; "
                "0: no limit). A refused row (also: event type, event id or header key over AMQP's 255 bytes) fails "
                "alone: counted as refused, dead-lettered in event_replay_dead_letter, left unchanged; the run goes on",
            )
        p.set_defaults(fn=cmd_processed_events)

    p = pe_sub.add_parser(
        "replay-one", help="replay one event by its event_id", description="Replay one event, by event_id."
    )
    p.add_argument("event_id")
    common(p)
    p = pe_sub.add_parser(
        "replay-failed",
        help="replay failed (status error) events of a time window",
        description="Replay the events in status 'error' whose processed_at is in a window (default: the last 24 hours).",
    )
    p.add_argument(
        "--hours", type=float, default=24.0, help="window: the last N hours (default 24), unless --since is given"
    )
    p.add_argument("--since", help="window start, ISO date or timestamp (UTC unless an offset is given)")
    p.add_argument("--until", help="window end, exclusive (a date: the end of that day; default now)")
    common(p)
    p = pe_sub.add_parser(
        "replay-range",
        help="replay the events of one type in a date range",
        description="Replay the events of a type whose processed_at is in START..END (END day inclusive). "
        "Processed ones only with --force.",
    )
    p.add_argument("event_type", help="e.g. contribution.submitted")
    p.add_argument("start", help="first day (YYYY-MM-DD) or timestamp")
    p.add_argument("end", help="last day, inclusive (or an exclusive timestamp)")
    common(p)
    p = pe_sub.add_parser(
        "reset-stuck",
        help="reset events stuck in 'processing' for more than N minutes",
        description="Events in status 'processing' for longer than --older-than-minutes (a crashed worker): "
        "back to pending and re-published (default), or to error for a later replay-failed.",
    )
    p.add_argument("--older-than-minutes", type=float, default=5.0, help="default 5")
    p.add_argument(
        "--to-status", choices=("pending", "error"), default="pending", help="pending (re-published, default) or error"
    )
    common(p)
    p = pe_sub.add_parser(
        "undo",
        help="undo a replay: restore the statuses its snapshot holds",
        description="Restore status, retry_count, error_message and processed_at of the rows a replay run changed, "
        "from its snapshot (messages already consumed cannot be recalled). The undo is itself snapshotted.",
    )
    p.add_argument(
        "replay_run_id", help="the run id of the replay (printed by the replay, in its audit row and in the UI)"
    )
    common(p, publishing=False)


def cmd_projections_cleanup(args) -> None:
    """Remove markers of crashed replays (a run of projection_replay_cleanup_markers)."""
    import json

    _projection_env(args)
    ensure_dagster_home()
    import dagster as dg

    from replay_defs.definitions import build_definitions
    from replay_defs.projection_replay.engine import get_projection

    defs = build_definitions()
    try:
        get_projection(args.projection)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    job = defs.resolve_job_def("projection_replay_cleanup_markers")
    result = job.execute_in_process(
        instance=dg.DagsterInstance.get(),
        run_config={
            "loggers": {"console": {"config": {"log_level": "WARNING"}}},
            "ops": {
                "cleanup_projection_markers": {
                    "config": {
                        "projection": args.projection,
                        "tenant": args.tenant_id or "",
                        "older_than_minutes": args.older_than_minutes,
                    }
                }
            },
        },
        raise_on_error=False,
    )
    out = result.output_for_node("cleanup_projection_markers") if result.success else {}
    print(json.dumps({"run_id": result.run_id, "status": "SUCCESS" if result.success else "FAILURE", **out}))
    if not result.success:
        sys.exit(1)


def cmd_projections_generate(args) -> None:
    """Demo data: an event_log in the configured ClickHouse (chDB by default)."""
    _projection_env(args)
    from replay_defs.definitions import build_definitions
    from replay_defs.projection_replay.engine import generate_event_log

    res = build_definitions().resources["clickhouse"]
    t0 = time.time()
    with _resolved_clickhouse(res) as ch:
        generate_event_log(ch, args.tenant_id, args.events, args.per_aggregate, args.start, args.days)
    print(
        f"wrote {args.events:,} events ({args.tenant_id}, {args.days} days from {args.start}) to event_log at {ch.where} "
        f"in {time.time() - t0:.1f}s"
    )


def _resolved_clickhouse(res):
    from replay_defs.core.clickhouse import connect

    return connect(_resolve(res.url), _resolve(res.data_path), _resolve(res.database))


def _add_projection_commands(sub) -> None:
    conn = argparse.ArgumentParser(add_help=False)
    for stem, env, what in PROJECTION_CONNECTIONS:
        conn.add_argument(
            f"--{stem}-url-file",
            metavar="PATH",
            help=f"{what}: read its URL from this file instead of {env} (never put a URL with a password on the command line)",
        )
        conn.add_argument(f"--{stem}-url", action=_RefusedSecretFlag, env=env, help=argparse.SUPPRESS)
    pr = sub.add_parser(
        "projections",
        help="projection replay (seed 001): list, replay, cleanup-markers, generate",
        description="Replay fold projections from ClickHouse event_log for a tenant since a day, coordinated with live "
        "consumers through Redis markers (see README, 'Projection replay'). Connections come from CLICKHOUSE_URL, "
        "EVENT_REPLAY_REDIS_URL and EVENT_REPLAY_POSTGRES_URL, or from files (--clickhouse-url-file, --redis-url-file, "
        "--postgres-url-file); URLs are not accepted as arguments, where `ps` would show their passwords.",
    ).add_subparsers(dest="projections_cmd", required=True)
    ls = pr.add_parser("list", help="the registered projections, their stores and keys")
    ls.add_argument("--json", action="store_true", help="as JSON")
    ls.set_defaults(fn=cmd_projections_list)
    rp = pr.add_parser(
        "replay",
        parents=[conn],
        help="replay a projection for a tenant since a day (a run over the day partitions)",
        description="Runs the projection_replay job on the local Dagster instance ($DAGSTER_HOME) over the days "
        "[--since, --until]: per day mark, drain, cutoff, fold in batches, verify, unmark. An interrupted replay "
        "resumes when run again. Prints one line per day on stderr and a JSON summary on stdout; exits 1 if a day "
        "does not match the from-scratch fold.",
    )
    rp.add_argument("--projection", required=True, help="projection name (see `projections list`)")
    rp.add_argument("--tenant-id", "--tenant", dest="tenant_id", required=True, help="tenant whose events are replayed")
    rp.add_argument("--since", required=True, help="first day, YYYY-MM-DD (UTC day of event time)")
    rp.add_argument("--until", help="last day, YYYY-MM-DD (default: today, UTC)")
    rp.add_argument("--batch-size", type=int, default=5000, help="events per ClickHouse page (default 5000)")
    rp.add_argument(
        "--aggregate-batch",
        type=int,
        default=1000,
        help="aggregates per batch; each key written once per batch (default 1000)",
    )
    rp.add_argument("--concurrency", type=int, default=4, help="aggregate streams folded in parallel (default 4)")
    rp.add_argument(
        "--dry-run", action="store_true", help="count aggregates and events per day; write nothing, set no marker"
    )
    rp.add_argument("--quiet", action="store_true", help="only the JSON summary")
    rp.set_defaults(fn=cmd_projections_replay)
    cl = pr.add_parser(
        "cleanup-markers",
        parents=[conn],
        help="remove markers left by a crashed replay; release deferred live events",
        description="For replays that crashed and will not be resumed: removes their Redis markers (live consumers "
        "then resume the deferred events) and marks their progress abandoned, so the next replay of those days starts "
        "afresh. To resume instead, just run the same replay again.",
    )
    cl.add_argument("--projection", required=True)
    cl.add_argument("--tenant-id", "--tenant", dest="tenant_id", help="only this tenant's replays")
    cl.add_argument(
        "--older-than-minutes", type=float, default=0.0, help="only replays started longer ago (default 0: all)"
    )
    cl.set_defaults(fn=cmd_projections_cleanup)
    gn = pr.add_parser("generate", parents=[conn], help="write demo events into event_log (to try a replay)")
    gn.add_argument("--tenant-id", "--tenant", dest="tenant_id", default="project_demo")
    gn.add_argument("--events", type=int, default=100_000)
    gn.add_argument("--per-aggregate", type=int, default=25, help="events per aggregate (default 25)")
    gn.add_argument("--start", default="2025-06-01", help="first day (default 2025-06-01)")
    gn.add_argument("--days", type=int, default=3)
    gn.set_defaults(fn=cmd_projections_generate)


def main(argv: list[str] | None = None) -> None:
    import warnings

    # Dagster flags the partitioned-check and backfill-policy APIs as beta/preview; we pin the version.
    warnings.filterwarnings("ignore", module="dagster")
    warnings.filterwarnings("ignore", message=".*(beta|preview).*")
    ap = argparse.ArgumentParser(
        prog="event-replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="write demo telemetry files with realistic faults")
    g.add_argument("--lake", default="data/lake", help="lake root (default data/lake)")
    g.add_argument("--start", default="2025-11-24", help="first day, YYYY-MM-DD")
    g.add_argument("--days", type=int, default=3)
    g.add_argument("--events-per-day", type=int, default=100_000)
    g.add_argument("--files-per-hour", type=int, default=1)
    g.add_argument("--seed", type=int, default=7)
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="generate demo data, backfill it, print per-day counts and checks")
    d.add_argument("--start", default="2025-11-24")
    d.add_argument("--days", type=int, default=3)
    d.add_argument("--events-per-day", type=int, default=100_000)
    d.add_argument("--no-bug-story", action="store_true", help="skip the bad-parser-then-replay part")
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("status", help="per-day counts and latest check verdicts")
    s.add_argument("pipeline")
    s.add_argument("start", help="first day")
    s.add_argument("end", nargs="?", help="last day (default: start)")
    s.set_defaults(fn=cmd_status)

    v = sub.add_parser(
        "verify",
        help="run every check of some days without rebuilding anything; exit 1 if one fails",
        description="Runs the pipeline's <name>_verify job (every asset check, no asset rebuilt) over the days and prints a "
        "verdict per day and check: passed, failed, warn (a non-blocking check) or errored (the check raised). "
        "Exits 1 if any check failed or errored.",
    )
    v.add_argument("pipeline")
    v.add_argument("start", help="first day, YYYY-MM-DD")
    v.add_argument("end", nargs="?", help="last day (default: start)")
    v.set_defaults(fn=cmd_verify)

    r = sub.add_parser(
        "rollback", help="restore the previous version of a parsed day (verified first), re-fold it, run its checks"
    )
    r.add_argument("pipeline")
    r.add_argument("day")
    r.add_argument("--to", type=int, help="restore this kept version instead (also a newer one: undoes a rollback)")
    r.set_defaults(fn=cmd_rollback)

    f = sub.add_parser(
        "refill",
        help="re-enqueue ingestion jobs for the event objects PUT on some days (seed 000)",
        description="Collect the keys of the objects PUT on the days (from an access-log CSV, S3 access log files or a "
        "listing), validate and de-duplicate them, and enqueue one BullMQ job per key into the refill's queue "
        "(EVENT_REPLAY_REDIS_URL). Keys already enqueued by an earlier refill are skipped unless --force. "
        "Local sources are read only under EVENT_REPLAY_REFILL_ROOTS (colon-separated directories; default: the "
        "lake root EVENT_REPLAY_LAKE and the current directory), checked after resolving symlinks; anything else "
        "fails before it is read. Bad rows (including a line with an unterminated quote or over 1 MiB, each alone) "
        "go to the day's quarantine with their reason and a sample; logs and errors never show the file's content.",
    )
    f.add_argument("--refill", default="ingestion_refill", help="the RefillSpec's name (default ingestion_refill)")
    f.add_argument(
        "--source",
        choices=["csv", "access_logs", "listing"],
        default="csv",
        help='csv: export with header "operation","key" (optional "requestdatetime"); access_logs: S3 server '
        "access log files; listing: objects last modified on the day (default csv)",
    )
    f.add_argument(
        "--location",
        required=True,
        help="CSV path or s3:// URI; log directory or s3://bucket/prefix; s3://bucket/prefix to "
        "list. A local path must resolve under EVENT_REPLAY_REFILL_ROOTS (default: the lake root and the current directory)",
    )
    f.add_argument("--start", required=True, help="first day (YYYY-MM-DD) of the access-log records")
    f.add_argument("--end", help="last day (default: start); several days need a requestdatetime column")
    f.add_argument("--dry-run", action="store_true", help="collect and count, enqueue nothing")
    f.add_argument("--limit", type=int, help="enqueue at most N jobs")
    f.add_argument("--force", action="store_true", help="enqueue again keys an earlier refill enqueued (new job ids)")
    f.add_argument("--rate-limit", type=float, help="at most N jobs per second")
    f.add_argument("--batch-size", type=int, help="jobs per ledger lookup and Redis round trip (default 10000)")
    f.set_defaults(fn=cmd_refill)

    add_processed_events_parser(sub)
    b = sub.add_parser("billing", help="billing reprocessing (seed 002)").add_subparsers(
        dest="billing_cmd", required=True
    )
    rp = b.add_parser(
        "reprocess",
        help="reprocess raw_events from ClickHouse to Kafka (POST /events/raw/reprocess); prints the run id and totals as JSON",
    )
    rp.add_argument("--start", required=True, help="RFC 3339 (2024-01-01T00:00:00Z) or a date")
    rp.add_argument("--end", help="RFC 3339, exclusive, or a date (inclusive); default now")
    rp.add_argument("--tenant", required=True)
    rp.add_argument("--environment", required=True)
    rp.add_argument("--customer", help="external customer id")
    rp.add_argument("--event-name")
    rp.add_argument(
        "--batch-size", type=int, default=10_000, help="rows per keyset page and per delivery (default 10,000)"
    )
    rp.add_argument("--dry-run", action="store_true", help="read, transform and count; publish nothing")
    rp.add_argument("--force", action="store_true", help="publish again what the ledger says Kafka already has")
    rp.set_defaults(fn=cmd_billing_reprocess)
    bg = b.add_parser("generate", help="create raw_events and fill it with demo rows (tenant acme, environment prod)")
    bg.add_argument("--start", default="2024-03-04", help="first day, YYYY-MM-DD")
    bg.add_argument("--days", type=int, default=1)
    bg.add_argument("--rows-per-day", type=int, default=100_000)
    bg.set_defaults(fn=cmd_billing_generate)

    _add_projection_commands(sub)

    args = ap.parse_args(argv)
    with secrets_masked():  # an error that escapes prints without the passwords it may quote
        args.fn(args)


if __name__ == "__main__":
    main()
