"""`event-replay` commands of the day pipelines (telemetry, billing; `verify` also takes a refill):
`generate` and `demo` (demo telemetry and its backfill), `status`, `verify` and `rollback`."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date, timedelta

from replay_defs.cli_common import (
    days_between,
    ensure_dagster_home,
    failed_steps,
    find_spec,
    resolve,
    run_in_process,
    run_status,
)


def register(sub) -> None:
    """Add this system's commands to `event-replay`'s subparsers."""
    _add_demo_commands(sub)
    _add_day_commands(sub)


def _day(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD)") from None


def _at_least(least: int):
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least:,}")
        return value

    return number


# The generator spreads a day's events over its 24 hours: fewer than one per hour writes none.
EVENTS_PER_DAY = _at_least(24)


def _add_demo_commands(sub) -> None:
    kept = (
        "Days the lake holds already (their truth is in <lake>/_demo/truth/) are kept as they were generated: only the "
        "missing days are generated, and no raw file of another day is ever replaced. Delete the lake to regenerate."
    )
    g = sub.add_parser("generate", help="write demo telemetry files with realistic faults", description=kept)
    g.add_argument("--lake", default="data/lake", help="lake root (default data/lake)")
    g.add_argument("--start", type=_day, default="2025-11-24", help="first day, YYYY-MM-DD")
    g.add_argument("--days", type=_at_least(1), default=3)
    g.add_argument("--events-per-day", type=EVENTS_PER_DAY, default=100_000, help="at least 24 (one an hour)")
    g.add_argument("--files-per-hour", type=int, default=1)
    g.add_argument("--seed", type=int, default=7)
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser(
        "demo", help="generate demo data, backfill it, print per-day counts and checks", description=kept
    )
    d.add_argument("--start", type=_day, default="2025-11-24", help="first day, YYYY-MM-DD")
    d.add_argument("--days", type=_at_least(1), default=3)
    d.add_argument("--events-per-day", type=EVENTS_PER_DAY, default=100_000, help="at least 24 (one an hour)")
    d.add_argument("--no-bug-story", action="store_true", help="skip the bad-parser-then-replay part")
    d.set_defaults(fn=cmd_demo)


def _add_day_commands(sub) -> None:
    s = sub.add_parser(
        "status",
        help="per-day counts, deliveries and latest check verdicts",
        description="A row per day: the parsed version and its counts, then the redrive's messages per sink across "
        "every run (deliv.: confirmed; fail: refused or not sent; doubt: sent but never confirmed, which the next "
        "run reconciles with the sink before sending again; dups: sent again while in doubt to a sink that cannot "
        "say what it holds, so the consumer may see them twice), then the latest check verdicts.",
    )
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

    va = sub.add_parser(
        "vacuum",
        help="delete lake files no version within the retention uses (dry run unless --yes)",
        description="Deletes the Delta tables' files that no version newer than the retention "
        "(EVENT_REPLAY_LAKE_RETENTION_HOURS, default 168) uses, and files killed writers left behind. "
        "Versions older than the retention can no longer be rolled back to. Without --yes it only lists what it would delete.",
    )
    va.add_argument("--hours", type=int, help="retention in hours (default: the deployment's)")
    va.add_argument("--yes", action="store_true", help="delete (default: only count)")
    va.set_defaults(fn=cmd_vacuum)


def _lake(defs):
    """The code location's lake, its settings resolved as a run would."""
    return defs.resources["lake"].process_config_and_initialize().get()


# ---- per-day counts and check verdicts ----------------------------------------------------------


def partition_rows(spec_name: str, days: list[str]) -> list[dict]:
    """Per-partition counts, read back from the lake state and the stores."""
    from replay_defs.definitions import defs
    from replay_defs.pipeline.committed import parsed_state
    from replay_defs.pipeline.store import open_store

    spec = find_spec(spec_name)
    lake = _lake(defs)
    configured = defs.resources["store"]
    store = open_store(resolve(configured.path), resolve(configured.postgres_url))
    count_proj = next((p for p in spec.projections if p.kind == "increment"), None)
    with defs.resources["ledger"].process_config_and_initialize().open() as ledger:
        deliveries = {day: ledger.summary(spec.name, day) for day in days}
    rows = []
    for day in days:
        state = parsed_state(lake, spec, day)
        s = state.stats if state else {}
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
                "deliveries": deliveries[day],  # per sink, across runs: the ledger's rows by status
                "rows_by_type": s.get("rows_by_type", {}),
            }
        )
    return rows


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


def check_step_key(check_key) -> str:
    """The step that runs a check (with the other checks of its asset), as run events name it."""
    from assets.checks import checks_op_name

    return checks_op_name(check_key.asset_key)


def check_results(spec_name: str, days: list[str]) -> dict[tuple[str, str], str]:
    """Latest verdict per (check, day) from the Dagster instance: see `evaluation_verdict`, or for
    a check planned without a verdict: running, errored (its step failed: it raised) or not run
    (an upstream step or blocking check failed first)."""
    import dagster as dg

    from replay_defs.definitions import defs
    from sensors.launch import latest_check_executions

    instance = dg.DagsterInstance.get()
    keys = [k for k in defs.resolve_asset_graph().asset_check_keys if k.asset_key.path[0] == spec_name]
    failed_steps_of: dict[str, set[str]] = {}  # run id -> its failed step keys

    def unresolved(check_key, run_id: str) -> str:
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            return RUNNING
        if run_id not in failed_steps_of:
            failed_steps_of[run_id] = {
                e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
            }
        return ERRORED if check_step_key(check_key) in failed_steps_of[run_id] else NOT_RUN

    out: dict[tuple[str, str], str] = {}
    for day in days:
        since = _built_at(instance, spec_name, day)
        for key, execution in latest_check_executions(instance, keys, day).items():
            if execution.evaluation is None:
                out[(key.name, day)] = unresolved(key, execution.run_id)
            elif execution.timestamp < since:
                out[(key.name, day)] = STALE
            else:
                out[(key.name, day)] = evaluation_verdict(execution.evaluation)
        for key in keys:
            out.setdefault((key.name, day), NONE)
    return out


def _built_at(instance, spec_name: str, day: str) -> float:
    """When the day's parsed events were last built (or rolled back): older verdicts are stale."""
    import dagster as dg

    parsed = dg.AssetKey([spec_name, "parsed_events"])
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=parsed, asset_partitions=[day]), limit=1
    ).records
    return records[0].timestamp if records else 0.0


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
    head = (
        f"{'day':10} {'ver':>3} {'raw lines':>10} {'parsed':>9} {'dupes':>6} {'quar.':>5} {'in':>5} {'out':>5} "
        f"{'proj.':>9} {'deliv.':>7} {'fail':>5} {'doubt':>5} {'dups':>4}  checks"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        status = verdict_summary([(c, checks.get((c, r["day"]))) for c in names])
        own = find_spec(spec_name).redrive.sink.name  # the spec's sink first, a launch's other destinations after
        sinks = sorted(r["deliveries"].items(), key=lambda item: (item[0] != own, item[0])) or [(None, {})]
        line = (
            f"{r['day']:10} {_fmt(r['version'], 3)} {_fmt(r['raw_lines'], 10)} {_fmt(r['parsed'], 9)} "
            f"{_fmt(r['duplicates'], 6)} {_fmt(r['quarantined'], 5)} {_fmt(r['routed_in'], 5)} {_fmt(r['routed_out'], 5)} "
            f"{_fmt(r['projection'], 9)} {_delivery_columns(sinks[0][1])}  {status}"
        )
        if len(sinks) > 1 or sinks[0][0] not in (None, own):
            line += f"  | {sinks[0][0]}"
        if truth_lake:
            truth = read_truth(truth_lake, r["day"])
            if truth is not None:
                line += "  | truth: " + (
                    "match" if truth == r["rows_by_type"] else f"MISMATCH {r['rows_by_type']} != {truth}"
                )
        print(line)
        for sink, figures in sinks[1:]:  # the day's other sinks (a launch's `destination`)
            print(
                f"{'':10} {'':>3} {'':>10} {'':>9} {'':>6} {'':>5} {'':>5} {'':>5} {'':>9} {_delivery_columns(figures)}  | {sink}"
            )


def _fmt(value, width: int) -> str:
    return f"{value:>{width},}" if isinstance(value, int) else f"{'-':>{width}}"


def _delivery_columns(figures: dict) -> str:
    """A sink's messages for the day, across runs: delivered, failed, in doubt (sent, never
    confirmed: the next run reconciles them), and possible duplicates (sent again while in doubt
    to a sink that cannot say what it holds)."""
    doubt = figures.get("unknown", 0) + figures.get("sending", 0) if figures else None
    return (
        f"{_fmt(figures.get('delivered'), 7)} {_fmt(figures.get('failed'), 5)} {_fmt(doubt, 5)} "
        f"{_fmt(figures.get('possible_duplicates'), 4)}"
    )


def run_checks(spec_name: str, days: list[str]) -> dict[tuple[str, str], tuple[str, str]]:
    """Run `<pipeline>_verify` (every check, nothing rebuilt) over the days, in this process:
    (check, day) -> (verdict, description). A check that raised is `errored` for its days."""
    from replay_defs.definitions import defs

    result = run_in_process(f"{spec_name}_verify", days=days)
    out: dict[tuple[str, str], tuple[str, str]] = {}
    # A ranged run records one evaluation per day plus a summary without a partition: keep the days'.
    for e in sorted(result.get_asset_check_evaluations(), key=lambda e: e.partition is not None):
        for day in [e.partition] if e.partition else days:
            out[(e.check_name, day)] = (evaluation_verdict(e), e.description or "")
    checks_of_step: dict[str, list[str]] = {}  # a step runs the checks of one asset
    for k in defs.resolve_asset_graph().asset_check_keys:
        checks_of_step.setdefault(check_step_key(k), []).append(k.name)
    for event in failed_steps(result):
        error = event.event_specific_data.error
        while error.cause is not None:  # the check's own exception, not Dagster's wrapper
            error = error.cause
        # Its checks without a verdict could not conclude (a blocking failure leaves verdicts).
        for name in checks_of_step.get(event.step_key, [event.step_key]):
            for day in days:
                if (name, day) not in out:
                    out[(name, day)] = (ERRORED, error.message.strip().splitlines()[0])
    return out


def failing(verdicts: dict) -> list[tuple[str, str]]:
    return [k for k, (v, _) in verdicts.items() if v in (FAILED, ERRORED)]


def print_verdicts(verdicts: dict) -> None:
    for (check, day), (verdict, description) in sorted(verdicts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{day}  {verdict.upper():7}  {check:32}  {description}")


# ---- commands -----------------------------------------------------------------------------------


def cmd_generate(args) -> None:
    from replay_defs.jsonl_files.demo import DemoConfig

    t0 = time.time()
    cfg = DemoConfig(
        start=date.fromisoformat(args.start),
        days=args.days,
        events_per_day=args.events_per_day,
        files_per_hour=args.files_per_hour,
        seed=args.seed,
    )
    runs = _generate_missing(args.lake, cfg)
    if runs:
        print(
            f"wrote {sum(map(len, runs))} days x {args.events_per_day:,} events to {args.lake}/ in {time.time() - t0:.1f}s"
        )


def _generate_missing(lake: str, cfg) -> list[list[str]]:
    """The demo days of `cfg` that are not in the lake yet, generated; says which days it keeps."""
    from replay_defs.jsonl_files.demo import generate_missing, generated_days

    days = [(cfg.start + timedelta(days=i)).isoformat() for i in range(cfg.days)]
    kept = generated_days(lake, days)
    if kept:
        print(
            f"   demo data for {_ranges(kept)} already in {lake}/, kept as it was generated (other days' files are never "
            "replaced; delete the lake to regenerate them with other options)"
        )
    missing = [d for d in days if d not in kept]
    if missing:
        print(f"   generating {_ranges(missing)} ({cfg.events_per_day:,} events/day) into {lake}/ ...")
    return generate_missing(lake, cfg)


def _ranges(days: list[str]) -> str:
    """`2025-11-20..2025-11-23, 2025-11-27` for sorted days."""
    runs: list[list[str]] = []
    for d in days:
        if runs and date.fromisoformat(runs[-1][-1]) + timedelta(days=1) == date.fromisoformat(d):
            runs[-1].append(d)
        else:
            runs.append([d])
    return ", ".join(r[0] if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)


def cmd_demo(args) -> None:
    ensure_dagster_home()
    from replay_defs.definitions import defs

    lake_root = resolve(defs.resources["lake"].root)
    end = (date.fromisoformat(args.start) + timedelta(days=args.days - 1)).isoformat()
    days = days_between(args.start, end)
    _demo_data(args, lake_root)
    print(f"2. backfilling telemetry {args.start}...{end} (one run, per-day checks) ...")
    t0 = time.time()
    result = run_in_process("telemetry_replay", days=days)
    print(f"   run {result.run_id}: {run_status(result)} in {time.time() - t0:.1f}s")
    print()
    print_table("telemetry", days, truth_lake=lake_root)
    if args.days >= 2 and not args.no_bug_story:
        _demo_bug_story(days[1], lake_root)
    print(
        "\nColumns: ver = the Delta table version that committed the day; in/out = events that crossed midnight (event time vs. arrival);\n"
        "proj. = daily_counts total; deliv./fail/doubt/dups = the sink's redrive messages across runs: delivered, failed,\n"
        "in doubt (the next run reconciles them), possible duplicates (see `event-replay status --help`).\n"
        "Open the UI with `./dev ui` (http://127.0.0.1:3000) to see runs, per-day metadata and checks."
    )
    if not result.success:
        sys.exit(1)


def _demo_data(args, lake_root: str) -> None:
    """Demo telemetry in the lake for the days it does not hold yet."""
    from replay_defs.jsonl_files.demo import DemoConfig

    print("1. demo data")
    cfg = DemoConfig(start=date.fromisoformat(args.start), days=args.days, events_per_day=args.events_per_day)
    _generate_missing(lake_root, cfg)


def _demo_bug_story(bad: str, lake_root: str) -> None:
    """A bad parser rewrites a day, its blocking check stops the run; a replay with the fixed parser
    swaps the wrong version out."""
    print(f"\n3. a bad parser deploy rewrites {bad} (timestamps read as US/Pacific) ...")
    caught = run_in_process(
        "telemetry_replay",
        {"ops": {"telemetry__parsed_events": {"config": {"simulate_parser_bug": True}}}},
        days=[bad],
        log_level="CRITICAL",
    )
    print_table("telemetry", [bad], truth_lake=lake_root)
    if not caught.success:
        print(
            "   the run failed, as it should: the new version lost events, so its blocking check stopped it before the projections and the sink"
        )
    print(f"\n4. replaying {bad} with the fixed parser: the wrong version is swapped out (and kept for rollback) ...")
    run_in_process("telemetry_replay", days=[bad])
    print_table("telemetry", [bad], truth_lake=lake_root)


def cmd_status(args) -> None:
    ensure_dagster_home()
    print_table(args.pipeline, days_between(args.start, args.end or args.start))


def cmd_verify(args) -> None:
    """Every check of the days, nothing rebuilt; exit 1 if any failed or errored."""
    ensure_dagster_home()
    from partitions import daily_partitions

    spec = find_spec(args.pipeline, refills=True)
    days = days_between(args.start, args.end or args.start)
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


# ---- retention ----------------------------------------------------------------------------------


def cmd_vacuum(args) -> None:
    from replay_defs.definitions import defs
    from replay_defs.ingestion_refill.spec import refill_tables
    from replay_defs.pipeline.committed import parsed_tables
    from replay_defs.pipelines import PIPELINES, REFILLS

    lake = _lake(defs)
    tables = [t.rel for spec in PIPELINES for t in parsed_tables(spec)]
    tables += [t.rel for spec in REFILLS for t in refill_tables(spec)]
    hours = lake.retention_hours if args.hours is None else args.hours
    removed = lake.vacuum(tables, hours, dry_run=not args.yes)
    for table, n in removed.items():
        print(f"{table}: {n} file(s) {'deleted' if args.yes else 'would be deleted'}")
    print(f"retention {hours} h; {'done' if args.yes else 'dry run: add --yes to delete'}")


# ---- rollback -----------------------------------------------------------------------------------


def cmd_rollback(args) -> None:
    """Restore the previous (or a given) kept version of a parsed day after verifying its files,
    re-fold the projections from it, then run every check of the day."""
    ensure_dagster_home()
    from replay_defs.core.lake import check_partition

    spec = find_spec(args.pipeline)
    try:
        day = check_partition(args.day)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    before, state = _restore(spec, day, args.to)
    print(
        f"{spec.name} {day}: parsed_events now holds version {state.built_version} (was {before.built_version if before else '-'}; "
        f"table version {state.version}); re-folding projections ..."
    )
    ok = _refold(spec, day) if spec.projections else True
    print("running every check of the day ...")
    verdicts = run_checks(spec.name, [day])
    print_verdicts(verdicts)
    print_table(spec.name, [day])
    if not ok or failing(verdicts):
        sys.exit(1)


def _restore(spec, day: str, to: int | None):
    """Publish the kept version `to` (default: `rollback_target`) of the day's parsed events and
    record it as a materialization; (the state before, the state now)."""
    import dagster as dg

    from assets.common import asset_key
    from replay_defs.core.lake import DamagedVersion
    from replay_defs.core.naming import PARSED, owner
    from replay_defs.definitions import defs
    from replay_defs.pipeline.committed import parsed_state, parsed_tables

    lake = _lake(defs)
    before = parsed_state(lake, spec, day)
    to = to if to is not None else rollback_target(lake, spec, day, before)
    try:
        state = lake.rollback(owner(spec, PARSED), day, parsed_tables(spec), to=to)
    except (LookupError, DamagedVersion) as exc:
        raise SystemExit(f"rollback refused: {exc}") from exc
    dg.DagsterInstance.get().report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=asset_key(spec, PARSED),
            partition=day,
            description=f"rolled back from version {before.built_version if before else '-'} to {state.built_version}",
            metadata={
                "version": state.version,
                "restored_version": state.built_version,
                "rolled_back_from": before.built_version if before else 0,
                "parsed": state.stats.get("parsed", 0),
            },
        )
    )
    return before, state


def _refold(spec, day: str) -> bool:
    """Re-fold the day's projections from the restored version; whether the run succeeded."""
    from assets.common import asset_key
    from replay_defs.core.naming import PROJECTIONS

    return run_in_process(
        f"{spec.name}_replay", partition_key=day, asset_selection=[asset_key(spec, PROJECTIONS)]
    ).success


def rollback_target(lake, spec, day: str, current) -> int:
    """The newest kept version older than the live one that did not fail its shrink check when it
    was built (a known-bad version is restored only when named with --to)."""
    from replay_defs.core.naming import PARSED, owner
    from replay_defs.pipeline.shrink import unconsented_shrink

    own, table = owner(spec, PARSED), spec.parsed_prefix
    older = [v for v in lake.kept_versions(own, day, table) if current is None or v < current.built_version]
    for v in reversed(older):
        if not unconsented_shrink(lake.kept_state(own, day, table, v).stats, spec.shrink_tolerance):
            return v
        print(
            f"skipping version {v}: it lost events without consent when it was built (its shrink check failed); --to {v} restores it anyway"
        )
    raise SystemExit(
        f"rollback refused: {spec.name} {day}: no earlier version is kept to roll back to"
        + (" that passed its shrink check" if older else "")
    )
