"""Asset checks of a pipeline's days.

A check is only as good as the independence of what it compares, so each compares two figures
produced separately, and its description names them. Every check is a `DayCheck`: the asset it
guards, which specs it applies to, the resources it reads and a per-day verdict. `CHECKS` holds
those of every source kind; a kind's own (e.g. the raw files' listing for files) are in its module
under `assets/sources/`. `build_checks` turns the ones that apply to a spec into partitioned Dagster
asset checks, those of one asset in one step; all but the late-window warning and the table
sources' rate alerts are blocking, so a failing day fails the run (and a CI job).
"""

from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from assets.common import DayVerdict, asset_key, check_each_day, latest_materializations
from partitions import daily_partitions
from replay_defs.core.lake import Lake
from replay_defs.core.naming import PARSED, PROJECTIONS, RAW, REDRIVE, manifest_name, owner, whole_day_marker
from replay_defs.pipeline import delivery as rd
from replay_defs.pipeline.committed import (
    committed_parquet,
    committed_quarantine,
    events_dataset,
    out_for_redrive,
    out_rows_by_type,
    parsed_state,
    parsed_tables,
)
from replay_defs.pipeline.shrink import shrunk_types
from replay_defs.pipeline.spec import PipelineSpec
from replay_defs.sinks import sink_type

SINK = "<sink>"  # in `DayCheck.resources`: the resource of the spec's sink


def count_rows(
    lake: Lake, files: list[str], sql: str = "SELECT count(*) FROM files", params: dict | None = None
) -> int:
    return lake.sql(files, sql, params)[0][0] if files else 0


def not_built(what: str) -> DayVerdict:
    return DayVerdict(False, f"{what} not materialized for this day", {})


# ---- parsed_events ---------------------------------------------------------------------------


def duplicate_ids(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    # What a reader of the Delta table sees for the day now, whatever the recorded state says.
    files = sorted(lake.live_files(parsed_tables(spec)[0], day))
    if not files:
        return DayVerdict(True, "no parsed files for this day", {"rows": 0, "duplicate_rows": 0})
    idc = f'"{spec.schema.id_field}"'
    [(rows, distinct)] = lake.sql(files, f"SELECT count(*), count(DISTINCT {idc}) FROM files")
    sample = []
    if rows != distinct:
        sample = [r[0] for r in lake.sql(files, f"SELECT {idc} FROM files GROUP BY 1 HAVING count(*) > 1 LIMIT 5")]
    return DayVerdict(
        rows == distinct,
        f"{rows - distinct} duplicate rows" + (f", e.g. {sample}" if sample else ""),
        {"rows": rows, "distinct_event_ids": distinct, "duplicate_rows": rows - distinct, "files": len(files)},
    )


def accounting(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    """raw lines + routed in = parsed + duplicates + quarantined + routed out, from independent counts."""
    state = parsed_state(lake, spec, day)
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    if state is None or manifest is None:
        return not_built("parsed_events or raw_events")
    s = state.stats
    parsed = count_rows(lake, committed_parquet(lake, spec, day, state))
    quarantined = count_rows(
        lake, committed_quarantine(state, spec), "SELECT coalesce(sum(lines), 0)::BIGINT FROM files"
    )
    raw_lines = manifest["totals"]["lines"]
    out = sum(out_rows_by_type(s).values())  # taken out by a parquet-mode redrive, until re-ingested
    left = raw_lines + s["routed_in"]
    right = parsed + s["duplicates"] + quarantined + s["routed_out"] + out
    problems = []
    if left != right:
        problems.append(
            f"raw {raw_lines} + routed in {s['routed_in']} = {left} but parsed {parsed} + duplicates {s['duplicates']} + quarantined {quarantined} + routed out {s['routed_out']}"
            + (f" + out for redrive {out}" if out else "")
            + f" = {right}"
        )
    if s["parser_lines"] != raw_lines:
        problems.append(f"parser read {s['parser_lines']} lines but the raw files hold {raw_lines}")
    if s["raw_lines"] != raw_lines:
        problems.append(f"raw files changed since parsing: {s['raw_lines']} lines then, {raw_lines} now")
    md = {
        "raw_lines": raw_lines,
        "routed_in": s["routed_in"],
        "parsed": parsed,
        "duplicates": s["duplicates"],
        "quarantined": quarantined,
        "routed_out": s["routed_out"],
        "out_for_redrive": out,
        "difference": left - right,
    }
    if not problems and out:
        # Accounted for, but not all in the table: a warning until the sources are re-ingested.
        outs = out_for_redrive(s)
        return DayVerdict(
            False,
            f"{left} lines accounted for, but {out} parsed rows are out of the day: a parquet-mode redrive took out "
            f"{', '.join(o['file'] for o in outs)} ({sum(len(o['source_refs']) for o in outs)} source files). "
            f"Re-ingest them: materialize parsed_events for {day} with type "
            f"{' / '.join(sorted({o['type'] for o in outs}))} (or the whole day)",
            md,
            severity=dg.AssetCheckSeverity.WARN,
        )
    return DayVerdict(not problems, "; ".join(problems) or f"{left} lines accounted for", md)


def stale_files(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    problems = lake.stale_files(owner(spec, PARSED), day, parsed_tables(spec))
    return DayVerdict(
        not problems,
        "; ".join(problems[:10])
        or "the tables hold exactly the committed files of the day, with their committed content",
        {"problems": len(problems)},
    )


def shrink(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    """Events per type in the committed Parquet, against the replaced version's recorded counts."""
    state = parsed_state(lake, spec, day)
    if state is None:
        return not_built("parsed_events")
    previous, allowed = state.stats.get("previous"), state.stats.get("allow_shrink", False)
    if not previous:
        return DayVerdict(True, "the first version of the day: nothing to compare with", {"baseline_version": 0})
    files = committed_parquet(lake, spec, day, state)
    tcol = f'"{spec.schema.type_field}"'
    now = dict(lake.sql(files, f"SELECT {tcol}, count(*) FROM files GROUP BY 1"))
    # Rows a parquet-mode redrive took out are waiting for re-ingest, not lost (the accounting check warns).
    out = out_rows_by_type(state.stats)
    lost = shrunk_types(
        previous["rows_by_type"], {t: now.get(t, 0) + out.get(t, 0) for t in {*now, *out}}, spec.shrink_tolerance
    )
    md = {
        "baseline_version": previous["version"],
        "events_before": sum(previous["rows_by_type"].values()),
        "events_now": sum(now.values()),
        "out_for_redrive": sum(out.values()),
        "types_shrunk": len(lost),
        "allow_shrink": allowed,
    }
    if not lost:
        return DayVerdict(
            True,
            f"no type lost events against version {previous['version']} (tolerance {spec.shrink_tolerance:.1%})"
            + (f", counting {sum(out.values())} rows out for redrive until re-ingested" if out else ""),
            md,
        )
    if allowed:
        return DayVerdict(True, f"shrink allowed by the run (allow_shrink): {'; '.join(lost)}", md)
    return DayVerdict(
        False,
        f"version {state.version} holds fewer events than version {previous['version']} ({'; '.join(lost)}); "
        "if that is intended, re-run with allow_shrink: true, else roll back",
        md,
    )


# ---- projections -------------------------------------------------------------------------------


def projection_totals(lake: Lake, store, spec: PipelineSpec, day: str) -> DayVerdict:
    """Each increment projection's count for the day, against the parsed count parsed_events recorded."""
    state = parsed_state(lake, spec, day)
    if state is None:
        return not_built("parsed_events")
    parsed = state.stats["parsed"]
    md, problems = {"parsed_recorded": parsed}, []
    for p in spec.projections:
        if p.kind == "increment":
            total = store.increment_total(spec.name, p, day)
            md[f"{p.name}_{p.count_column}"] = total
            if total != parsed:
                problems.append(f"{p.name}.{p.count_column} sums to {total}, parsed_events recorded {parsed}")
    if problems and out_for_redrive(state.stats):
        out = sum(out_rows_by_type(state.stats).values())
        problems.append(f"{out} rows are out of the day for a parquet-mode redrive until re-ingested")
    return DayVerdict(
        not problems, "; ".join(problems) or f"projection totals equal the {parsed} events parsed_events recorded", md
    )


def committed_days(lake: Lake, spec: PipelineSpec) -> list[str]:
    return lake.committed_days(owner(spec, PARSED), spec.parsed_prefix)


def projections_fold(lake: Lake, store, spec: PipelineSpec, day: str) -> DayVerdict:
    """Each projection against a from-scratch fold of the committed Parquet (`fold_mismatches`)."""
    states = lake.latest_states(owner(spec, PARSED), spec.parsed_prefix)  # every committed day, one history read
    if day not in states:
        return not_built("parsed_events")
    days = list(states)
    day_events = events_dataset(lake, spec, committed_parquet(lake, spec, day, states[day]))
    needs_all = any(p.kind == "replace" for p in spec.projections)
    all_events = events_dataset(
        lake, spec, [f for d in days for f in committed_parquet(lake, spec, d, states[d])] if needs_all else []
    )
    md, problems = {"committed_days": len(days)}, []
    for p in spec.projections:
        found, wrong = store.fold_mismatches(spec.name, p, spec.schema, day, day_events, days, all_events)
        md.update(found)
        problems += wrong
    return DayVerdict(
        not problems, "; ".join(problems) or "every projection equals a from-scratch fold of the committed Parquet", md
    )


# ---- redrive -----------------------------------------------------------------------------------


def deliveries(lake: Lake, ledger_resource, spec, day: str, expected=None, sink_ids=None) -> DayVerdict:
    """The last redrive's own balance, then — once the day has been delivered whole, whatever dry
    or partial runs came after — the day's whole expected message set against the ledger (every
    run) and, where the sink can be read without consuming, the sink.

    `expected(lake, day)`: (ids a whole-day redrive must deliver, ids it drops); `sink_ids(day, ids)`:
    the subset of ids the sink holds, or None when the sink cannot be read."""
    last = lake.read_json(owner(spec, REDRIVE), f"last/day={day}.json")
    if last is None:
        return DayVerdict(False, "redrive has not run for this day", {})
    counts = rd.RedriveCounts(**{k: v for k, v in last.items() if k in rd.RedriveCounts.__dataclass_fields__})
    md = {k: getattr(counts, k) for k in ("selected", "published", "skipped_already_delivered", "dropped", "failed")}
    md.update(unknown=counts.unknown, reconciled=counts.reconciled, possible_duplicates=counts.possible_duplicates)
    # The sink (ledger name) each record names: a launch's `destination` may differ from the spec's.
    last_sink = last.get("sink", spec.redrive.sink.name)
    marker = lake.read_json(owner(spec, REDRIVE), whole_day_marker(day))
    whole_sink = marker.get("sink", spec.redrive.sink.name) if marker is not None else last_sink
    whole = expected is not None and (marker is not None or (last.get("whole_day", True) and not last["dry_run"]))
    md["sink"] = last_sink
    problems = []
    with ledger_resource.open() as ledger:
        if not last["dry_run"]:
            if not counts.balanced():
                problems.append("selected != published + already delivered + dropped + failed + in doubt")
            if counts.failed:
                problems.append(f"{counts.failed} deliveries failed")
            if counts.unknown:
                problems.append(f"{counts.unknown} deliveries in doubt (re-run to reconcile them with the sink)")
            # The run's rows: what it sent and confirmed, and what it found in the sink while in doubt.
            in_ledger = ledger.count(spec.name, last_sink, day, run_id=last["run_id"])
            md["ledger_rows_for_run"] = in_ledger
            if in_ledger != counts.published + counts.reconciled:
                problems.append(
                    f"ledger records {in_ledger} deliveries for the run, the run reported "
                    f"{counts.published} sent and {counts.reconciled} found in the sink"
                )
        if whole:
            problems += _whole_day(lake, ledger, spec, day, whole_sink, expected, sink_ids, md)
    if problems:
        return DayVerdict(False, "; ".join(problems), md)
    if whole:
        return DayVerdict(True, "deliveries reconcile, for the whole day", md)
    return DayVerdict(
        True,
        "dry run: nothing sent, and the day was never delivered whole"
        if last["dry_run"]
        else "deliveries reconcile, for the last run only (it sent part of the day: mode, type or limit)",
        md,
    )


def _whole_day(lake: Lake, ledger, spec, day: str, sink: str, expected, sink_ids, md: dict) -> list[str]:
    """The day's whole expected message set against the ledger of `sink` (every run) and, for the
    spec's own sink when it can be read back, against the sink; adds its counts to `md`."""
    ids, dropped = expected(lake, day)
    delivered = ledger.delivered(spec.name, sink, ids)
    md.update(whole_day_sink=sink, expected_messages=len(ids), dropped_messages=len(dropped), in_ledger=len(delivered))
    problems = []
    if len(delivered) != len(ids):
        missing = sorted(set(ids) - delivered)
        problems.append(
            f"{len(missing)} of the day's {len(ids)} messages are not delivered according to the ledger ({sink}), e.g. {missing[:3]}"
        )
    held = sink_ids(day, ids) if sink_ids is not None and sink == spec.redrive.sink.name else None
    if held is not None:
        md["in_sink"] = len(held)
        if len(held) != len(ids):
            missing = sorted(set(ids) - held)
            problems.append(
                f"{len(missing)} of the day's {len(ids)} messages are not in the {sink} sink, e.g. {missing[:3]}"
            )
    return problems


def day_messages(lake: Lake, spec: PipelineSpec, day: str) -> tuple[list[str], list[str]]:
    """A pipeline's whole-day message set from the committed Parquet (see `rd.expected_messages`)."""
    return rd.expected_messages(lake, spec, day, committed_parquet(lake, spec, day))


# ---- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayCheck:
    name: str
    asset: str
    description: str
    verify: Callable  # (resources, spec, day) -> DayVerdict
    applies: Callable[[PipelineSpec], bool] = lambda spec: True  # does a day of this spec have the check?
    resources: frozenset[str] = frozenset({"lake"})
    blocking: bool = True


def _has(kind: str) -> Callable[[PipelineSpec], bool]:
    return lambda spec: any(p.kind == kind for p in spec.projections)


def _deliveries(r, spec, day):
    sink = sink_type(spec.redrive.sink)  # a sink that can be read back is counted independently of the ledger
    sink_ids = sink.held_ids(getattr(r, sink.resource_key), spec) if sink.held_ids else None
    return deliveries(r.lake.get(), r.ledger, spec, day, lambda lake, d: day_messages(lake, spec, d), sink_ids)


CHECKS = (
    DayCheck(
        "no_duplicate_event_ids",
        PARSED,
        "Rows against distinct event ids over the day's files in the Delta table now (committed by this project or not).",
        lambda r, spec, d: duplicate_ids(r.lake.get(), spec, d),
    ),
    DayCheck(
        "raw_lines_accounted_for",
        PARSED,
        "raw lines (counted by raw_events, independently of the parser) + routed in = "
        "parsed rows (counted in the committed Parquet) + duplicates + quarantined lines (counted in the quarantine files) + routed out.",
        lambda r, spec, d: accounting(r.lake.get(), spec, d),
    ),
    DayCheck(
        "no_stale_files",
        PARSED,
        "The day's files in the Delta tables and in the store against the committed version's list, sizes "
        "and SHA-256 hashes (recorded from the staged files before publishing).",
        lambda r, spec, d: stale_files(r.lake.get(), spec, d),
    ),
    DayCheck(
        "no_unconsented_shrink",
        PARSED,
        "Events per type in the committed Parquet against the replaced version's recorded counts: "
        "fewer (beyond the spec's shrink_tolerance) fails unless the run set allow_shrink. The first version is exempt.",
        lambda r, spec, d: shrink(r.lake.get(), spec, d),
    ),
    DayCheck(
        "totals_match_parsed",
        PROJECTIONS,
        "Each increment projection's count for the day (summed in the store) against the "
        "parsed count parsed_events recorded in the day's state.",
        lambda r, spec, d: projection_totals(r.lake.get(), r.store.get(), spec, d),
        applies=_has("increment"),
        resources=frozenset({"lake", "store"}),
    ),
    DayCheck(
        "projections_match_fold",
        PROJECTIONS,
        "Each projection against a from-scratch fold of the committed Parquet: an "
        "increment projection's rows of the day against a fold of the day's files; a replace projection's rows for the keys the "
        "day touches against a fold (latest row per key) of every committed day, with no row from a day that is not committed.",
        lambda r, spec, d: projections_fold(r.lake.get(), r.store.get(), spec, d),
        applies=lambda spec: bool(spec.projections),
        resources=frozenset({"lake", "store"}),
    ),
    DayCheck(
        "deliveries_reconcile",
        REDRIVE,
        "The last run: selected = published + already delivered + dropped + failed + in doubt, failed = in doubt = 0, "
        "and the ledger's delivered rows for the run = published + found in the sink while in doubt. The whole day: the message set of the committed version against the "
        "ledger (all runs) and, for a sink that can be read back (the outbox), against the messages it holds.",
        _deliveries,
        resources=frozenset({"lake", "ledger", SINK}),
    ),
)


def checks_op_name(asset: dg.AssetKey) -> str:
    """The step that runs an asset's checks: one step for all of them, since each step has a fixed
    cost in Dagster (its events and bookkeeping) that outweighs most checks' own work."""
    return "__".join(asset.path) + "_checks"


def build_asset_checks(spec, asset: str, checks: list[DayCheck]) -> dg.AssetChecksDefinition:
    """The checks of one asset of the spec, in one step. Each is still a check of its own (name,
    description, blocking, verdict per day); a subset runs alone (`can_subset`)."""
    key = asset_key(spec, asset)
    specs = [
        dg.AssetCheckSpec(
            c.name, asset=key, description=c.description, blocking=c.blocking, partitions_def=daily_partitions(spec)
        )
        for c in checks
    ]
    resources = {spec.redrive.sink.kind if r == SINK else r for c in checks for r in c.resources}

    @dg.multi_asset_check(
        name=checks_op_name(key),
        specs=specs,
        can_subset=True,
        required_resource_keys=resources,
        description=f"The checks of {key.to_user_string()}, each with its own verdict per day.",
    )
    def _checks(context: dg.AssetCheckExecutionContext):
        targets = latest_materializations(context, key)
        for check, check_spec in zip(checks, specs):
            if check_spec.key in context.selected_asset_check_keys:
                verify = check.verify
                yield check_each_day(
                    context, key, check.name, lambda d, verify=verify: verify(context.resources, spec, d), targets
                )

    return _checks


def build_checks(spec, checks: tuple[DayCheck, ...]) -> list[dg.AssetChecksDefinition]:
    """`checks` that apply to the spec, one step per asset (`build_asset_checks`)."""
    by_asset: dict[str, list[DayCheck]] = {}
    for c in checks:
        if c.applies(spec):
            by_asset.setdefault(c.asset, []).append(c)
    return [build_asset_checks(spec, asset, cs) for asset, cs in by_asset.items()]


def deliveries_check(expected) -> DayCheck:
    """The redrive's check for specs that are not pipelines (refills): `expected(lake, day)` gives
    the day's whole message set."""
    check = next(c for c in CHECKS if c.name == "deliveries_reconcile")
    return DayCheck(
        check.name,
        REDRIVE,
        check.description,
        lambda r, s, d: deliveries(r.lake.get(), r.ledger, s, d, expected),
        resources=frozenset({"lake", "ledger"}),
    )
