"""What every source kind's parsed_events shares: how a day's new version is staged and published,
and the shrink consent it is checked against."""

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from pydantic import Field

from replay_defs.core.lake import DayState, Lake
from replay_defs.core.naming import PARSED, owner
from replay_defs.pipeline.committed import (
    OUT,
    TYPE,
    file_type,
    out_for_redrive,
    out_rows_by_type,
    parsed_state,
    parsed_tables,
    quarantine_table,
)
from replay_defs.pipeline.shrink import unconsented_shrink
from replay_defs.pipeline.spec import PipelineSpec

ONLY_TYPE = Field(
    default=None,
    description="Rebuild only this event type of the day: its events are replaced; the other types' events and the "
    "day's quarantine stay as committed.",
)
DRY_RUN = Field(
    default=False,
    description="Plan only: list the committed files (and their rows, per type) the rebuild would replace; "
    "parse and publish nothing.",
)
ALLOW_SHRINK = Field(
    default=False,
    description="Consent to a new version holding fewer events of a type than the one it replaces (beyond the "
    "spec's shrink_tolerance); otherwise the blocking no_unconsented_shrink check fails. Recorded in the day's state.",
)


def publish_parsed_day(
    lake: Lake,
    spec: PipelineSpec,
    day: str,
    run_id: str,
    log,
    allow_shrink: bool,
    build: Callable[[Path], dict],
    only_type: str | None = None,
) -> dict:
    """A parsed day's new version, the same steps for every source kind: under the day's lock,
    drop the staging an interrupted earlier run left (`recover`), stage the new version
    (`build(staging dir)` writes it there and returns its counts), and publish it with the shrink
    baseline its check compares with (`only_type`: replace only that type's events of the day).
    Returns the counts, with the published version."""
    own = owner(spec, PARSED)
    with lake.lock(own, day):
        if lake.recover(own, day):
            log.warning(f"{day}: cleaned up the staging an interrupted earlier run left")
        current = parsed_state(lake, spec, day)
        staged = lake.new_staging(own, day)
        stats = build(staged)
        baseline = same_selection_state(lake, spec, day, current, stats.get("selection"))
        stats.update(previous=shrink_baseline(spec, baseline), allow_shrink=allow_shrink)
        only = {TYPE: only_type} if only_type else None
        if only:
            keep_only(staged, spec, only_type)
            if current is not None:
                keep_other_types(stats, current.stats, only_type)
        state = lake.publish(own, day, staged, parsed_tables(spec), stats, run_id=run_id, only=only)
        stats["version"] = state.version
        return stats


def keep_only(staged: Path, spec: PipelineSpec, event_type: str) -> None:
    """A one-type rebuild publishes that type's events only: the parse staged every type and the
    day's quarantine, which stay as committed."""
    for path in staged.iterdir():
        if path.name != spec.parsed_prefix.split("/")[0]:
            shutil.rmtree(path)
    for path in Path(staged, spec.parsed_prefix).iterdir():
        if path.name != f"{TYPE}={event_type}":
            shutil.rmtree(path)


def keep_other_types(stats: dict, committed: dict, only_type: str) -> None:
    """A one-type rebuild's counts of events: the rebuilt type's from the parse, the other types'
    as committed (their files stay), with the files a redrive took out of them."""
    rows = {t: n for t, n in committed.get("rows_by_type", {}).items() if t != only_type}
    rows[only_type] = stats["rows_by_type"].get(only_type, 0)
    stats.update(rows_by_type=dict(sorted(rows.items())), parsed=sum(rows.values()))
    outs = [o for o in out_for_redrive(committed) if o["type"] != only_type]
    if outs:
        stats[OUT] = outs


def replaced_files(state: DayState | None, spec: PipelineSpec, only_type: str | None) -> list[dict]:
    """The committed files a rebuild replaces (one type's events, or every file of the day), with
    their table, type and rows: what a dry run lists."""
    if state is None:
        return []
    out = []
    for rel in state.files:
        e = state.entries[rel]
        t = file_type(spec, rel) if e["table"] == spec.parsed_prefix else None
        if only_type is None or t == only_type:
            out.append({"file": rel, "table": e["table"], "type": t or "", "rows": e["rows"]})
    return out


def files_table(files: list[dict]) -> dg.TableMetadataValue:
    """Files (and their rows) as a metadata table."""
    return dg.MetadataValue.table(
        [dg.TableRecord({k: f[k] for k in ("file", "type", "rows")}) for f in files],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("file", "string"),
                dg.TableColumn("type", "string"),
                dg.TableColumn("rows", "int"),
            ]
        ),
    )


def plan_metadata(prefix: str, files: list[dict]) -> dict:
    """What a dry run would delete or replace: the files as a table, and counts (rows per type;
    the quarantine's rows under its table's name)."""
    md = {
        f"{prefix}": files_table(files),
        f"{prefix}_files": len(files),
        f"{prefix}_rows": sum(f["rows"] for f in files),
    }
    for f in files:
        key = f"{prefix}_rows_{f['type'] or f['table'].split('/')[0]}"
        md[key] = md.get(key, 0) + f["rows"]
    return md


def log_plan(log, day: str, verb: str, files: list[dict]) -> None:
    log.info(f"{day}: dry run, would {verb} {len(files)} file(s), {sum(f['rows'] for f in files)} rows")
    for f in files:
        log.info(f"{day}: would {verb} {f['file']} ({f['type'] or f['table']}, {f['rows']} rows)")


def take_out_file(lake: Lake, spec: PipelineSpec, day: str, rel: str, run_id: str, log) -> dict:
    """Seed 004's parquet mode deletes a parsed Parquet file before redriving its source files, so
    their re-ingest does not duplicate its rows. Here the file leaves the day as a new version of it
    (the other files of its type are re-committed as they are, copied under new names), and the
    day's state records it as out for redrive — its type, rows and source files — so the checks
    count those rows as out rather than lost until the day (or that type) is re-ingested.
    Returns the record."""
    own = owner(spec, PARSED)
    with lake.lock(own, day):
        state = parsed_state(lake, spec, day)
        if state is None or rel not in state.files_of(spec.parsed_prefix):
            raise ValueError(f"{rel!r} is not a committed Parquet file of {spec.name} {day}")
        event_type = file_type(spec, rel)
        refs = [r[0] for r in lake.sql([rel], "SELECT DISTINCT source_ref FROM files ORDER BY 1")]
        staged = lake.new_staging(own, day)
        for other in state.files_of(spec.parsed_prefix):
            if other != rel and file_type(spec, other) == event_type:
                # publish names it again: drop the name's earlier publish token (`-<12 hex>`)
                local = staged / re.sub(r"-[0-9a-f]{12}(\.parquet)$", r"\1", other)
                local.parent.mkdir(parents=True, exist_ok=True)
                with lake.storage.open(other) as src, open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        record = {"file": rel, "type": event_type, "rows": state.entries[rel]["rows"], "source_refs": refs}
        # The day's counts as committed, less the file's rows, which are now out for redrive.
        stats = {k: v for k, v in state.stats.items() if k != "rolled_back_to"}
        rows = dict(stats["rows_by_type"])
        rows[event_type] = rows.get(event_type, 0) - record["rows"]
        stats.update(
            rows_by_type=rows,
            parsed=stats["parsed"] - record["rows"],
            previous=shrink_baseline(spec, state),
            allow_shrink=False,
        )
        stats[OUT] = [*out_for_redrive(state.stats), {**record, "run_id": run_id}]
        new = lake.publish(own, day, staged, parsed_tables(spec), stats, run_id=run_id, only={TYPE: event_type})
        log.info(
            f"{day}: took {rel} ({record['rows']} {event_type} rows of {len(refs)} source files) out of the day, "
            f"now version {new.version}; re-ingest its sources (materialize parsed_events with type {event_type}) to bring them back"
        )
        return {**record, "version": new.version}


def staged_quarantine(staged: Path, spec: PipelineSpec, day: str) -> Path:
    """Where a staged version holds the day's one quarantine file."""
    return staged / quarantine_table(spec) / f"day={day}" / "quarantine.parquet"


def same_selection_state(lake: Lake, spec: PipelineSpec, day: str, current, selection) -> DayState | None:
    """The day's latest version built from the same `selection` (a table source's filters and time
    window; None for file sources): one customer's slice of a billing day is no shrink of the
    tenant's whole day, nor the whole day a growth of the slice, so each compares with its own kind."""
    if current is None or current.stats.get("selection") == selection:
        return current
    for state in lake.day_states(owner(spec, PARSED), day, spec.parsed_prefix):
        if state.stats.get("selection") == selection:
            return state
    return None


def shrink_baseline(spec: PipelineSpec, state) -> dict | None:
    """What the shrink check compares a new version with: the replaced version's counts, or, when
    that version was itself an unconsented shrink (its check failed), the baseline it failed
    against, so retrying a rejected build cannot make it the new normal."""
    if state is None:
        return None
    if unconsented_shrink(state.stats, spec.shrink_tolerance):
        return state.stats["previous"]
    # Rows a redrive took out (waiting for re-ingest) are not lost: the re-ingest must bring them back.
    out = out_rows_by_type(state.stats)
    rows = state.stats.get("rows_by_type", {})
    return {
        "version": state.version,
        "rows_by_type": {t: rows.get(t, 0) + out.get(t, 0) for t in sorted({*rows, *out})},
        "parsed": state.stats.get("parsed", 0) + sum(out.values()),
    }


def shrink_metadata(stats: dict) -> dict:
    """The version the shrink check compares with (see `shrink_baseline`) and whether the run
    consented to a shrink, next to the counts."""
    prev = stats["previous"]
    return {
        "allow_shrink": stats["allow_shrink"],
        "shrink_baseline_version": prev["version"] if prev else 0,
        "shrink_baseline_parsed": prev["parsed"] if prev else 0,
    }
