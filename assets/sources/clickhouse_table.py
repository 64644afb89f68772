"""Source kind `ClickHouseSourceSpec`: a ClickHouse table read by keyset pages (engine:
`replay_defs/clickhouse_table/`).

raw_events[D] records the run's selection (filters, time window) and the engine's count of its rows;
parsed_events[D] reads the selection page by page and maps the rows to events; the checks only
tables have (the selection's rows changed since; billing's found = delivered + dropped + errors;
seed 002's alert thresholds on the success, transformation error and publish failure rates);
and the redrive's metadata gains billing's figures."""

import time
from typing import Optional

import dagster as dg
import pydantic
from pydantic import Field

from assets.checks import DayCheck, count_rows, day_messages, not_built
from assets.common import DayVerdict, asset_key, pipeline_asset, pipeline_pool
from assets.parsed import ALLOW_SHRINK, publish_parsed_day, shrink_metadata, staged_quarantine
from replay_defs.clickhouse_table.parsing import KeysetReader, TableSelection, parse_table_day
from replay_defs.core.lake import Lake
from replay_defs.core.naming import PARSED, RAW, REDRIVE, manifest_name, owner
from replay_defs.pipeline.committed import committed_quarantine, parsed_state
from replay_defs.pipeline.delivery import RedriveCounts
from replay_defs.pipeline.spec import PipelineSpec
from resources import ClickHouseResource, LakeResource

# ---- raw_events: the run's selection and the engine's count of it -------------------------------


def selection_config(spec: PipelineSpec) -> type[dg.Config]:
    """Run config of a table source's raw_events: one optional field per filter of the source,
    plus the time window."""
    fields = {
        name: (Optional[str], Field(default=None, description=f"Only rows whose `{column}` equals this."))
        for name, column in spec.source.filters.items()
    }
    fields["start"] = (
        Optional[str],
        Field(default=None, description="RFC 3339 (e.g. 2024-01-01T06:00:00Z): only rows at or after it."),
    )
    fields["end"] = (Optional[str], Field(default=None, description="RFC 3339: only rows before it."))
    return pydantic.create_model(f"{spec.name}_selection", __base__=dg.Config, **fields)


def table_selection(spec: PipelineSpec, config) -> TableSelection:
    try:
        return TableSelection.of(
            spec.source, {k: getattr(config, k) for k in spec.source.filters}, config.start, config.end
        )
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc


def selection_manifest(spec: PipelineSpec, day: str, ch, selection: TableSelection, rows: int) -> dict:
    """raw_events' manifest of a table day: the selection and the engine's count of its rows."""
    src = spec.source
    return {
        "day": day,
        "source": {"kind": "clickhouse", "table": src.table, "database": ch.database, "at": ch.where},
        "selection": selection.to_json(),
        "files": [],
        "totals": {"files": 0, "bytes": 0, "bytes_uncompressed": 0, "lines": rows, "unreadable_files": 0},
    }


def build_raw_events(spec: PipelineSpec) -> dg.AssetsDefinition:
    src = spec.source
    SelectionConfig = selection_config(spec)

    @pipeline_asset(
        spec,
        RAW,
        kinds={"clickhouse"},
        description=(
            f"The day's rows of ClickHouse table `{src.table}`{' (FINAL)' if src.final else ''} selected by the run's filters "
            f"({', '.join(src.filters)}, start/end), as a manifest: the selection and the row count, counted by the engine "
            "independently of the keyset reader."
        ),
    )
    def raw_events(
        context: dg.AssetExecutionContext, config: SelectionConfig, lake: LakeResource, clickhouse: ClickHouseResource
    ) -> dg.MaterializeResult:
        the_lake = lake.get()
        selection = table_selection(spec, config)
        with clickhouse.open() as ch:
            for day in context.partition_keys:
                t0 = time.monotonic()
                rows = KeysetReader(ch, src, day, selection).count()
                the_lake.write_json(
                    owner(spec, RAW), manifest_name(day), selection_manifest(spec, day, ch, selection, rows)
                )
                context.log.info(f"{day}: {rows:,} rows of {src.table} selected by {selection.to_json()}")
                context.add_asset_metadata(
                    {
                        "dagster/row_count": rows,
                        "rows": rows,
                        "duration_s": round(time.monotonic() - t0, 3),
                        **{f"filter_{k}": v for k, v in selection.to_json()["filters"].items()},
                    },
                    partition_key=day,
                )
        return dg.MaterializeResult()

    return raw_events


# ---- parsed_events: the selection read by keyset and mapped to events ---------------------------


class TableParseConfig(dg.Config):
    batch_size: int = Field(
        default=50_000,
        ge=1,
        le=1_000_000,
        description="Rows per keyset page: memory is bounded by this, not by the day's size (each page costs a fixed "
        "~20-80 ms of query overhead, so pages much smaller than 10k slow a big day down).",
    )
    allow_shrink: bool = ALLOW_SHRINK


def materialize_day(lake: Lake, spec: PipelineSpec, day: str, ch, config: TableParseConfig, run_id: str, log) -> dict:
    """Read the day's selected rows (the raw_events manifest's selection) by keyset, transform them,
    and swap the day's Parquet and quarantine in whole."""
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    if manifest is None:
        raise dg.Failure(
            f"raw_events[{day}] is not materialized: materialize {spec.name}/raw_events (it holds the selection) first"
        )
    selection = TableSelection.from_json(manifest["selection"])

    def read(staged) -> dict:
        quarantine = str(staged_quarantine(staged, spec, day))
        stats = parse_table_day(ch, spec, day, selection, config.batch_size, str(staged), quarantine, log.info)
        stats.update(
            day=day,
            selection=manifest["selection"],
            raw_files=0,
            raw_lines=manifest["totals"]["lines"],
            parser_lines=stats["found"],
            routed_in=0,
            routed_out=0,
            duplicates=0,
            bytes_uncompressed=0,
            mb_per_s=0,
        )
        return stats

    return publish_parsed_day(lake, spec, day, run_id, log, config.allow_shrink, read)


def build_parsed_events(spec: PipelineSpec) -> dg.AssetsDefinition:
    rules = ", ".join(r.name for r in spec.mapping.rules)

    @pipeline_asset(
        spec,
        PARSED,
        pool=pipeline_pool(spec),
        deps=[asset_key(spec, RAW)],
        kinds={"parquet"},
        description=(
            f"The day's selected `{spec.source.table}` rows, read by keyset pagination on "
            f"({', '.join(spec.source.order_by)}) and mapped to events, as Parquet under `{spec.parsed_prefix}/type=<t>/day=<d>/`. "
            f"Rows failing a validation rule ({rules}) are dropped with the rule's name as reason, rows that cannot be "
            f"transformed are counted as transformation errors; both go to `quarantine/{spec.name}/day=<d>/`. "
            "Each day is staged and swapped in whole; the previous version is kept for rollback."
        ),
    )
    def parsed_events(
        context: dg.AssetExecutionContext, config: TableParseConfig, lake: LakeResource, clickhouse: ClickHouseResource
    ) -> dg.MaterializeResult:
        the_lake = lake.get()
        with clickhouse.open() as ch:
            for day in context.partition_keys:
                stats = materialize_day(the_lake, spec, day, ch, config, context.run.run_id, context.log)
                context.log.info(
                    f"{day}: found {stats['found']:,}, {stats['parsed']:,} events, dropped {stats['dropped']:,} "
                    f"{stats['dropped_by_reason']}, transformation errors {stats['transformation_errors']:,} "
                    f"{stats['transformation_errors_by_reason']}, {stats['batches']} keyset queries; now version {stats['version']}"
                )
                context.add_asset_metadata(parsed_metadata(stats), partition_key=day)
        return dg.MaterializeResult()

    return parsed_events


METADATA_COUNTS = (
    "found",
    "parsed",
    "dropped",
    "transformation_errors",
    "batches",
    "batch_size",
    "duration_s",
    "events_per_s",
    "version",
)


def parsed_metadata(stats: dict) -> dict:
    return {
        "dagster/row_count": stats["parsed"],
        **{k: stats[k] for k in METADATA_COUNTS},
        **{f"dropped_{r}": n for r, n in stats["dropped_by_reason"].items()},
        **{f"transformation_error_{r}": n for r, n in stats["transformation_errors_by_reason"].items()},
        **{f"rows_type_{t}": n for t, n in stats["rows_by_type"].items()},
        **shrink_metadata(stats),
    }


# ---- the redrive's figures and the checks only tables have ---------------------------------------


def redrive_figures(the_lake, spec: PipelineSpec, day: str, counts: RedriveCounts) -> dict:
    """Billing's figures for a table source's day: rows found, published, dropped by validation
    rule, transformation errors, publish failures, and the share of found rows the sink has."""
    stats = parsed_state(the_lake, spec, day).stats
    found = stats["found"]
    delivered = counts.published + counts.skipped_already_delivered
    return {
        "found": found,
        "dropped": stats["dropped"] + counts.dropped,
        **{f"dropped_{r}": n for r, n in stats["dropped_by_reason"].items()},
        "transformation_errors": stats["transformation_errors"],
        **{f"transformation_error_{r}": n for r, n in stats["transformation_errors_by_reason"].items()},
        "publish_failures": counts.failed + counts.unknown,
        "success_rate_percent": round(100 * delivered / found, 2) if found else 100.0,
    }


def table_rows_current(lake: Lake, spec: PipelineSpec, day: str, ch) -> DayVerdict:
    """A table source's selected rows counted by the engine now, against raw_events' count."""
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    if manifest is None:
        return not_built("raw_events")
    then = manifest["totals"]["lines"]
    now = KeysetReader(ch, spec.source, day, TableSelection.from_json(manifest["selection"])).count()
    return DayVerdict(
        now == then,
        f"out of date, re-materialize the day: the selection holds {now} rows now, {then} when raw_events counted it"
        if now != then
        else f"the selection still holds the {now} rows raw_events counted",
        {"rows_now": now, "rows_built_from": then, "difference": now - then},
    )


def found_accounted_for(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    """Table sources (billing): found = published + already delivered + dropped + transformation
    errors + publish failures, with no publish failure."""
    last = lake.read_json(owner(spec, REDRIVE), f"last/day={day}.json")
    state = parsed_state(lake, spec, day)
    if last is None or state is None:
        return not_built("parsed_events or redrive")
    s = state.stats
    md = {
        "found": s["found"],
        "published": last["published"],
        "skipped_already_delivered": last["skipped_already_delivered"],
        "dropped": s["dropped"] + last["dropped"],
        "transformation_errors": s["transformation_errors"],
        "publish_failures": last["failed"] + last.get("unknown", 0),
    }
    if last["dry_run"]:
        return DayVerdict(True, "dry run: nothing sent", md)
    if not last.get("whole_day", True):
        return DayVerdict(True, "the last redrive sent part of the day (mode, type or limit): not applicable", md)
    right = (
        last["published"]
        + last["skipped_already_delivered"]
        + md["dropped"]
        + s["transformation_errors"]
        + md["publish_failures"]
    )
    problems = []
    if s["found"] != right:
        problems.append(
            f"found {s['found']} but published {last['published']} + already delivered {last['skipped_already_delivered']} + "
            f"dropped {md['dropped']} + transformation errors {s['transformation_errors']} + publish failures {md['publish_failures']} = {right}"
        )
    if last["selected"] != s["parsed"]:
        problems.append(f"redrive selected {last['selected']} events, parsed_events holds {s['parsed']}")
    if md["publish_failures"]:
        problems.append(f"{md['publish_failures']} publish failures (failed or in doubt)")
    md["difference"] = s["found"] - right
    return DayVerdict(not problems, "; ".join(problems) or f"{s['found']} rows found, all accounted for", md)


# ---- seed 002's alert thresholds, one non-blocking check each --------------------------------------
# Each rate is a count taken from the day's files or the ledger over the rows raw_events counted
# (the engine's count(), independent of the keyset reader), and the count is compared with the
# figure the pipeline recorded: a disagreement fails the check too. They do not block: the quarantine
# keeps every row not sent, and a re-run after a fix sends exactly the missing ones (the ledger), so
# holding back the valid events of this and the range's other days would only delay billing; the
# mechanics (every row accounted for, no publish failure) are blocked on by found_accounted_for.


def _rate_verdict(
    what: str, count: int, found: int, limit: float, at_most: bool, recorded: int, md: dict
) -> DayVerdict:
    """`count` over `found` in percent against `limit` (a maximum, else a minimum); `recorded`: the
    pipeline's own figure for `count`."""
    rate = round(100 * count / found, 4) if found else (0.0 if at_most else 100.0)
    md = {**md, "found": found, "rate_percent": rate, "threshold_percent": limit}
    problems = []
    if count != recorded:
        problems.append(f"the files/ledger hold {count}, the pipeline recorded {recorded}")
    over = rate > limit if at_most else rate < limit
    if over:
        problems.append(f"{what} {rate:g}% is {'over' if at_most else 'under'} the threshold {limit:g}%")
    if problems:
        return DayVerdict(False, f"{what} ({count} of {found} rows): " + "; ".join(problems), md)
    return DayVerdict(
        True,
        f"{what} {rate:g}% ({count} of {found} rows), threshold {'at most' if at_most else 'at least'} {limit:g}%",
        md,
    )


def _found(lake: Lake, spec: PipelineSpec, day: str) -> int | None:
    manifest = lake.read_json(owner(spec, RAW), manifest_name(day))
    return None if manifest is None else manifest["totals"]["lines"]


def transformation_error_rate(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    """Rows that could not be transformed (counted in the committed quarantine: every reason that
    is not a validation rule) over the rows raw_events counted."""
    state, found = parsed_state(lake, spec, day), _found(lake, spec, day)
    if state is None or found is None:
        return not_built("parsed_events or raw_events")
    errors = count_rows(
        lake,
        committed_quarantine(state, spec),
        "SELECT coalesce(sum(lines), 0)::BIGINT FROM files WHERE NOT list_contains($rules, reason)",
        {"rules": [r.name for r in spec.mapping.rules]},
    )
    return _rate_verdict(
        "transformation error rate",
        errors,
        found,
        spec.rate_thresholds.max_transformation_error_rate,
        True,
        state.stats["transformation_errors"],
        {"transformation_errors": errors},
    )


def _last_redrive(lake: Lake, spec: PipelineSpec, day: str) -> tuple[dict | None, int | None, DayVerdict | None]:
    """The last redrive of the day and the rows raw_events counted, or the verdict when there is
    nothing to rate (not run, dry run)."""
    last, found = lake.read_json(owner(spec, REDRIVE), f"last/day={day}.json"), _found(lake, spec, day)
    if last is None or found is None:
        return None, None, not_built("raw_events or redrive")
    if last["dry_run"]:
        return (
            None,
            None,
            DayVerdict(True, "the last redrive was a dry run: nothing sent, nothing to rate", {"dry_run": True}),
        )
    return last, found, None


def success_rate(lake: Lake, ledger_resource, spec: PipelineSpec, day: str) -> DayVerdict:
    """Events of the committed day the sink has according to the ledger (every run) over the rows
    raw_events counted; the run's published + already delivered must agree."""
    last, found, verdict = _last_redrive(lake, spec, day)
    if verdict is not None:
        return verdict
    if not last.get("whole_day", True):
        return DayVerdict(True, "the last redrive sent part of the day (mode, type or limit): not applicable", {})
    sink = last.get("sink", spec.redrive.sink.name)
    ids, _ = day_messages(lake, spec, day)
    with ledger_resource.open() as ledger:
        delivered = len(ledger.delivered(spec.name, sink, ids))
    return _rate_verdict(
        "success rate",
        delivered,
        found,
        spec.rate_thresholds.min_success_rate,
        False,
        last["published"] + last["skipped_already_delivered"],
        {"delivered_in_ledger": delivered, "sink": sink},
    )


def publish_failure_rate(lake: Lake, spec: PipelineSpec, day: str) -> DayVerdict:
    """Messages the sink refused after retries in the last redrive (counted in its dead-letter
    file) over the rows raw_events counted."""
    last, found, verdict = _last_redrive(lake, spec, day)
    if verdict is not None:
        return verdict
    failures = len(lake.read_jsonl(owner(spec, REDRIVE), f"dead_letter/day={day}/{last['run_id']}.jsonl"))
    return _rate_verdict(
        "publish failure rate",
        failures,
        found,
        spec.rate_thresholds.max_publish_failure_rate,
        True,
        last["failed"] + last.get("unknown", 0),
        {"publish_failures": failures, "sink": last.get("sink", spec.redrive.sink.name)},
    )


def _table_rows_current(r, spec, day):
    with r.clickhouse.open() as ch:
        return table_rows_current(r.lake.get(), spec, day, ch)


CHECKS = (
    DayCheck(
        "raw_rows_current",
        PARSED,
        "The rows of the day's selection counted by the engine now, against the count raw_events recorded.",
        _table_rows_current,
        resources=frozenset({"lake", "clickhouse"}),
    ),
    DayCheck(
        "found_accounted_for",
        REDRIVE,
        "Rows found (counted by the engine) = published + already delivered + dropped (by rule) + "
        "transformation errors + publish failures, with no publish failure.",
        lambda r, spec, d: found_accounted_for(r.lake.get(), spec, d),
    ),
    DayCheck(
        "transformation_error_rate_within_threshold",
        PARSED,
        "Seed 002's alert: rows that could not be transformed (counted in the committed quarantine, reasons other "
        "than a validation rule) over the rows raw_events counted, at most the spec's "
        "rate_thresholds.max_transformation_error_rate (default 5%); the count must equal parsed_events' own. "
        "Non-blocking: the rest of the day is still sent.",
        lambda r, spec, d: transformation_error_rate(r.lake.get(), spec, d),
        blocking=False,
    ),
    DayCheck(
        "success_rate_within_threshold",
        REDRIVE,
        "Seed 002's alert: the day's events the sink has according to the ledger (every run) over the rows "
        "raw_events counted, at least the spec's rate_thresholds.min_success_rate (default 90%); the count must "
        "equal the last run's published + already delivered. Non-blocking.",
        lambda r, spec, d: success_rate(r.lake.get(), r.ledger, spec, d),
        resources=frozenset({"lake", "ledger"}),
        blocking=False,
    ),
    DayCheck(
        "publish_failure_rate_within_threshold",
        REDRIVE,
        "Seed 002's alert: the last redrive's messages the sink refused after retries (counted in its dead-letter "
        "file) over the rows raw_events counted, at most the spec's rate_thresholds.max_publish_failure_rate "
        "(default 1%); the count must equal the run's own. Non-blocking (found_accounted_for blocks on any failure).",
        lambda r, spec, d: publish_failure_rate(r.lake.get(), spec, d),
        blocking=False,
    ),
)
