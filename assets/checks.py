"""Asset checks: each re-reads what is on disk and in the stores, never the asset's own claims alone.

All are blocking, so a failing day fails the run (and a CI job) instead of passing silently.
"""


import duckdb
import dagster as dg

from assets.common import PARSED, PROJECTIONS, RAW, REDRIVE, DayVerdict, asset_key, check_each_day, manifest_name, owner, parsed_slot_patterns
from assets.projections import committed_parquet
from partitions import daily_partitions
from replay_defs import redrive as rd
from replay_defs.lake import Lake
from replay_defs.spec import PipelineSpec
from resources import LakeResource, LedgerResource, StoreResource


def parquet_on_disk(lake: Lake, spec: PipelineSpec, day: str) -> list[str]:
    """Every Parquet file a reader globbing `type=*/day=<day>/` would see, committed or not."""
    return sorted(
        str(p) for slot in lake.matching_slots([f"{spec.parsed_prefix}/type=*/day={day}"]) for p in lake.path(slot).glob("*.parquet")
    )


def duplicate_ids(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    files = parquet_on_disk(lake, spec, day)
    if not files:
        return DayVerdict(True, "no parsed files for this day", {"rows": 0, "duplicate_rows": 0})
    idc = f'"{spec.schema.id_field}"'
    rows, distinct = duckdb.execute(f"SELECT count(*), count(DISTINCT {idc}) FROM read_parquet($f)", {"f": files}).fetchone()
    sample = []
    if rows != distinct:
        sample = [r[0] for r in duckdb.execute(f"SELECT {idc} FROM read_parquet($f) GROUP BY 1 HAVING count(*) > 1 LIMIT 5", {"f": files}).fetchall()]
    return DayVerdict(
        rows == distinct,
        f"{rows - distinct} duplicate rows" + (f", e.g. {sample}" if sample else ""),
        {"rows": rows, "distinct_event_ids": distinct, "duplicate_rows": rows - distinct, "files": len(files)},
    )


def accounting(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    """raw lines + routed in = parsed + duplicates + quarantined + routed out, from independent counts."""
    state = lake.state(owner(spec, PARSED), day)
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    if state is None or manifest is None:
        return DayVerdict(False, "parsed_events or raw_events not materialized for this day", {})
    s = state.stats
    parquet = [str(lake.path(f)) for f in committed_parquet(lake, spec, day)]
    parsed = duckdb.execute("SELECT count(*) FROM read_parquet($f)", {"f": parquet}).fetchone()[0] if parquet else 0
    qfiles = [str(lake.path(f)) for f in state.files if f.startswith(f"quarantine/{spec.name}/")]
    quarantined = duckdb.execute("SELECT coalesce(sum(lines), 0)::BIGINT FROM read_parquet($f)", {"f": qfiles}).fetchone()[0] if qfiles else 0
    raw_lines = manifest["totals"]["lines"]
    left = raw_lines + s["routed_in"]
    right = parsed + s["duplicates"] + quarantined + s["routed_out"]
    problems = []
    if left != right:
        problems.append(f"raw {raw_lines} + routed in {s['routed_in']} = {left} but parsed {parsed} + duplicates {s['duplicates']} + quarantined {quarantined} + routed out {s['routed_out']} = {right}")
    if s["parser_lines"] != raw_lines:
        problems.append(f"parser read {s['parser_lines']} lines but the raw files hold {raw_lines}")
    if s["raw_lines"] != raw_lines:
        problems.append(f"raw files changed since parsing: {s['raw_lines']} lines then, {raw_lines} now")
    return DayVerdict(
        not problems,
        "; ".join(problems) or f"{left} lines accounted for",
        {"raw_lines": raw_lines, "routed_in": s["routed_in"], "parsed": parsed, "duplicates": s["duplicates"], "quarantined": quarantined, "routed_out": s["routed_out"], "difference": left - right},
    )


def stale_files(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    problems = lake.stale_files(owner(spec, PARSED), day, parsed_slot_patterns(spec, day))
    return DayVerdict(not problems, "; ".join(problems[:10]) or "only the committed files are present", {"problems": len(problems)})


def projection_totals(lake: Lake, store, spec: PipelineSpec, day: str) -> DayVerdict:
    parquet = [str(lake.path(f)) for f in committed_parquet(lake, spec, day)]
    parsed = duckdb.execute("SELECT count(*) FROM read_parquet($f)", {"f": parquet}).fetchone()[0] if parquet else 0
    md, problems = {"parsed": parsed}, []
    for p in spec.projections:
        if p.kind != "increment":
            continue
        total = store.increment_total(spec.name, p, day)
        md[f"{p.name}_{p.count_column}"] = total
        if total != parsed:
            problems.append(f"{p.name}.{p.count_column} sums to {total}, parsed has {parsed}")
    return DayVerdict(not problems, "; ".join(problems) or "projection totals equal parsed counts", md)


def deliveries(lake: Lake, ledger_resource, spec: PipelineSpec, day: str) -> DayVerdict:
    last = lake.read_json(owner(spec, REDRIVE), f"last/day={day}.json")
    if last is None:
        return DayVerdict(False, "redrive has not run for this day", {})
    counts = rd.RedriveCounts(**{k: v for k, v in last.items() if k in rd.RedriveCounts.__dataclass_fields__})
    md = {k: last[k] for k in ("selected", "published", "skipped_already_delivered", "dropped", "failed")}
    problems = []
    if not counts.balanced() and not last["dry_run"]:
        problems.append("selected != published + already delivered + dropped + failed")
    if counts.failed:
        problems.append(f"{counts.failed} deliveries failed")
    if not last["dry_run"]:
        with ledger_resource.open() as ledger:
            in_ledger = ledger.count(spec.name, spec.redrive.sink.name, day, run_id=last["run_id"])
        md["ledger_rows_for_run"] = in_ledger
        if in_ledger != counts.published:
            problems.append(f"ledger records {in_ledger} deliveries for the run, the run reported {counts.published}")
    return DayVerdict(not problems, "; ".join(problems) or ("dry run: nothing sent" if last["dry_run"] else "deliveries reconcile"), md)


def found_accounted_for(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    """Table sources (seed 002): found = published + already delivered + dropped + transformation
    errors + publish failures, with no publish failure."""
    last = lake.read_json(owner(spec, REDRIVE), f"last/day={day}.json")
    state = lake.state(owner(spec, PARSED), day)
    if last is None or state is None:
        return DayVerdict(False, "parsed_events or redrive has not run for this day", {})
    s = state.stats
    md = {"found": s["found"], "published": last["published"], "skipped_already_delivered": last["skipped_already_delivered"],
          "dropped": s["dropped"] + last["dropped"], "transformation_errors": s["transformation_errors"], "publish_failures": last["failed"]}
    if last["dry_run"]:
        return DayVerdict(True, "dry run: nothing sent", md)
    if not last.get("whole_day", True):
        return DayVerdict(True, "the last redrive sent part of the day (mode, type or limit): not applicable", md)
    right = last["published"] + last["skipped_already_delivered"] + md["dropped"] + s["transformation_errors"] + last["failed"]
    problems = []
    if s["found"] != right:
        problems.append(f"found {s['found']} but published {last['published']} + already delivered {last['skipped_already_delivered']} + "
                        f"dropped {md['dropped']} + transformation errors {s['transformation_errors']} + publish failures {last['failed']} = {right}")
    if last["selected"] != s["parsed"]:
        problems.append(f"redrive selected {last['selected']} events, parsed_events holds {s['parsed']}")
    if last["failed"]:
        problems.append(f"{last['failed']} publish failures")
    md["difference"] = s["found"] - right
    return DayVerdict(not problems, "; ".join(problems) or f"{s['found']} rows found, all accounted for", md)


def build_checks(spec: PipelineSpec) -> list[dg.AssetChecksDefinition]:
    parts = daily_partitions(spec)
    parsed, projections = asset_key(spec, PARSED), asset_key(spec, PROJECTIONS)

    @dg.asset_check(asset=parsed, name="no_duplicate_event_ids", partitions_def=parts, blocking=True,
                    description=f"No `{spec.schema.id_field}` appears twice in the day's Parquet (all files present, committed or not).")
    def no_duplicate_event_ids(context: dg.AssetCheckExecutionContext, lake: LakeResource):
        return check_each_day(context, parsed, "no_duplicate_event_ids", lambda d: duplicate_ids(lake.get(), spec, d))

    @dg.asset_check(asset=parsed, name="raw_lines_accounted_for", partitions_def=parts, blocking=True,
                    description="raw lines (independent count) + routed in = parsed + duplicates + quarantined + routed out.")
    def raw_lines_accounted_for(context: dg.AssetCheckExecutionContext, lake: LakeResource):
        return check_each_day(context, parsed, "raw_lines_accounted_for", lambda d: accounting(lake.get(), spec, d))

    @dg.asset_check(asset=parsed, name="no_stale_files", partitions_def=parts, blocking=True,
                    description="The day's directories hold exactly the files of the committed version.")
    def no_stale_files(context: dg.AssetCheckExecutionContext, lake: LakeResource):
        return check_each_day(context, parsed, "no_stale_files", lambda d: stale_files(lake.get(), spec, d))

    @dg.asset_check(asset=projections, name="totals_match_parsed", partitions_def=parts, blocking=True,
                    description="Each increment projection's count for the day equals the day's parsed rows.")
    def totals_match_parsed(context: dg.AssetCheckExecutionContext, lake: LakeResource, store: StoreResource):
        return check_each_day(context, projections, "totals_match_parsed", lambda d: projection_totals(lake.get(), store.get(), spec, d))

    checks = [no_duplicate_event_ids, raw_lines_accounted_for, no_stale_files, totals_match_parsed, build_deliveries_check(spec)]
    if spec.from_table:
        redrive = asset_key(spec, REDRIVE)

        @dg.asset_check(asset=redrive, name="found_accounted_for", partitions_def=parts, blocking=True,
                        description="found = published + already delivered + dropped (by rule) + transformation errors + publish failures, no publish failure.")
        def found_accounted_for_check(context: dg.AssetCheckExecutionContext, lake: LakeResource):
            return check_each_day(context, redrive, "found_accounted_for", lambda d: found_accounted_for(lake.get(), spec, d))

        checks.append(found_accounted_for_check)
    return checks


def build_deliveries_check(spec) -> dg.AssetChecksDefinition:
    """The redrive's check, for pipelines and refills alike."""
    redrive = asset_key(spec, REDRIVE)

    @dg.asset_check(asset=redrive, name="deliveries_reconcile", partitions_def=daily_partitions(spec), blocking=True,
                    description="selected = published + already delivered + dropped + failed, failed = 0, and the ledger agrees.")
    def deliveries_reconcile(context: dg.AssetCheckExecutionContext, lake: LakeResource, ledger: LedgerResource):
        return check_each_day(context, redrive, "deliveries_reconcile", lambda d: deliveries(lake.get(), ledger, spec, d))

    return deliveries_reconcile
