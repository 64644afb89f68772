"""Redrive: deliver a partition's raw files to a sink, at most once per sink.

Selection modes follow seed 004: the whole day's source refs (`day`, optionally one event type),
one raw file (`file`), every raw file under a prefix (`prefix`), or the source refs of one parsed
Parquet file (`parquet`). An idempotency ledger makes a re-run skip what a sink already has,
unless `force` is set.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import duckdb

from replay_defs.lake import Lake, check_partition
from replay_defs.sinks import Message, Sink
from replay_defs.spec import PipelineSpec
from replay_defs.store import DuckDBStore


@dataclass
class RedriveCounts:
    selected: int = 0
    published: int = 0
    skipped_already_delivered: int = 0
    dropped: int = 0
    failed: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)  # the dead letters: id, error, message
    paused_s: float = 0.0  # time the sink waited for its target to drain

    def balanced(self) -> bool:
        return self.selected == self.published + self.skipped_already_delivered + self.dropped + self.failed


def message_id(source_ref: str) -> str:
    return hashlib.sha256(source_ref.encode()).hexdigest()[:32]


def raw_file_message(lake: Lake, source_ref: str, event_type: str | None = None) -> Message:
    """Seed 004's SQS payload: {"kind": "redrive_raw_file", "bucket": ..., "key": ...}."""
    rel = lake.rel_from_uri(source_ref)
    body = {"kind": "redrive_raw_file", "bucket": lake.root.name, "key": rel, "source_ref": source_ref}
    return Message(message_id(source_ref), body, event_type)


def select_source_refs(
    lake: Lake,
    spec: PipelineSpec,
    partition: str,
    parsed_files: list[str],
    raw_manifest: dict | None,
    mode: str,
    uri: str | None = None,
    prefix: str | None = None,
    event_type: str | None = None,
) -> dict[str, list[str]]:
    """The partition's source refs to redrive, grouped by event type (None when unknown)."""
    check_partition(partition)
    if mode in ("day", "parquet"):
        files = parsed_files
        if mode == "parquet":
            if not uri:
                raise ValueError("mode 'parquet' needs `uri`: a parsed Parquet file of this partition")
            rel = lake.rel_from_uri(uri) if "://" in uri else uri
            if rel not in parsed_files:
                raise ValueError(f"{uri!r} is not a committed Parquet file of partition {partition}")
            files = [rel]
        if event_type is not None:
            if event_type not in spec.schema.known_types:
                raise ValueError(f"unknown type {event_type!r}; known: {', '.join(spec.schema.known_types)}")
            files = [f for f in files if f"/type={event_type}/" in f]
        if not files:
            return {}
        rows = duckdb.execute(
            f'SELECT "{spec.schema.type_field}", source_ref FROM read_parquet($files) GROUP BY ALL ORDER BY ALL',
            {"files": [str(lake.path(f)) for f in files]},
        ).fetchall()
        out: dict[str, list[str]] = {}
        for t, ref in rows:
            out.setdefault(t, []).append(ref)
        return out
    if mode in ("file", "prefix"):
        if raw_manifest is None:
            raise ValueError(f"raw_events for {partition} is not materialized: materialize it first")
        refs = [f["uri"] for f in raw_manifest["files"]]
        if mode == "file":
            if not uri:
                raise ValueError("mode 'file' needs `uri`: a raw file that arrived on this day")
            if uri not in refs:
                raise ValueError(f"{uri!r} is not a raw file of partition {partition}")
            return {None: [uri]}
        if not prefix:
            raise ValueError("mode 'prefix' needs `prefix` (lake-relative or a URI)")
        want = prefix if "://" in prefix else lake.uri(prefix.strip("/"))
        chosen = [r for r in refs if r.startswith(want)]
        if not chosen:
            raise ValueError(f"no raw file of partition {partition} is under {prefix!r}")
        return {None: chosen}
    raise ValueError(f"unknown mode {mode!r}: use day, file, prefix or parquet")


class Ledger:
    """Which message ids each pipeline's sink has been given; lives in the store (DuckDB here)."""

    DDL = """CREATE TABLE IF NOT EXISTS redrive_ledger (
        pipeline VARCHAR, sink VARCHAR, message_id VARCHAR, day VARCHAR,
        status VARCHAR, attempts INTEGER, last_error VARCHAR, run_id VARCHAR,
        updated_at TIMESTAMPTZ DEFAULT current_timestamp,
        PRIMARY KEY (pipeline, sink, message_id))"""

    def __init__(self, store: DuckDBStore):
        self.store = store

    def delivered(self, pipeline: str, sink: str, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        if not ids:
            return set()
        with self.store.connect() as con:
            con.execute(self.DDL)
            rows = con.execute(
                "SELECT message_id FROM redrive_ledger WHERE pipeline = $pipeline AND sink = $sink "
                "AND status = 'delivered' AND list_contains($ids, message_id)",
                {"pipeline": pipeline, "sink": sink, "ids": ids},
            ).fetchall()
        return {r[0] for r in rows}

    def record(self, pipeline: str, sink: str, day: str, ids: list[str], status: str, run_id: str, error: str | None = None):
        with self.store.connect() as con:
            con.execute(self.DDL)
            con.execute(
                """INSERT INTO redrive_ledger (pipeline, sink, message_id, day, status, attempts, last_error, run_id)
                   SELECT $pipeline, $sink, unnest($ids), $day, $status, 1, $error, $run_id
                   ON CONFLICT (pipeline, sink, message_id) DO UPDATE SET status = excluded.status,
                     attempts = redrive_ledger.attempts + 1, last_error = excluded.last_error,
                     run_id = excluded.run_id, day = excluded.day, updated_at = now()""",
                {"pipeline": pipeline, "sink": sink, "ids": ids, "day": day, "status": status, "error": error, "run_id": run_id},
            )

    def count(self, pipeline: str, sink: str, day: str, run_id: str | None = None) -> int:
        with self.store.connect() as con:
            con.execute(self.DDL)
            sql = "SELECT count(*) FROM redrive_ledger WHERE pipeline = $pipeline AND sink = $sink AND day = $day AND status = 'delivered'"
            params = {"pipeline": pipeline, "sink": sink, "day": day}
            if run_id:
                sql += " AND run_id = $run_id"
                params["run_id"] = run_id
            return con.execute(sql, params).fetchone()[0]


def redrive(
    lake: Lake,
    sink: Sink,
    ledger: Ledger,
    spec: PipelineSpec,
    partition: str,
    refs_by_type: dict[str | None, list[str]],
    run_id: str,
    dry_run: bool = False,
    limit: int | None = None,
    force: bool = False,
    batch_size: int = 500,
    log=None,
    handled_in_run: set[str] | None = None,
    rate_limit: float | None = None,
) -> RedriveCounts:
    """`handled_in_run`: message ids an earlier day of the same run already handled (a raw file
    can hold events of two days); they count as already delivered, even when forced, and the ids
    this day handles are added to it."""
    handled_in_run = set() if handled_in_run is None else handled_in_run
    counts = RedriveCounts()
    # One message per raw file, even when the file holds events of several types.
    seen: dict[str, str | None] = {}
    for t, refs in refs_by_type.items():
        for ref in refs:
            seen.setdefault(ref, t)
    refs = sorted(seen)
    if limit is not None:
        refs = refs[:limit]
    counts.selected = len(refs)
    for ref in refs:
        t = seen[ref] or "any"
        counts.by_type[t] = counts.by_type.get(t, 0) + 1
    messages = []
    for ref in refs:
        if not lake.path(lake.rel_from_uri(ref)).exists():
            counts.dropped += 1
            counts.dropped_reasons["source_missing"] = counts.dropped_reasons.get("source_missing", 0) + 1
            continue
        messages.append(raw_file_message(lake, ref, seen[ref]))
    already = set() if force else ledger.delivered(spec.name, sink.name, (m.id for m in messages))
    already |= handled_in_run
    pending = [m for m in messages if m.id not in already]
    counts.skipped_already_delivered = len(messages) - len(pending)
    if dry_run:
        return counts
    handled_in_run.update(m.id for m in messages)
    paused_before = getattr(sink, "paused_s", 0.0)
    if rate_limit:  # pace in batches of about a tenth of a second
        batch_size = max(1, min(batch_size, int(rate_limit / 10)))
    started = time.monotonic()
    for i in range(0, len(pending), batch_size):
        if rate_limit:
            wait = i / rate_limit - (time.monotonic() - started)
            if wait > 0:
                time.sleep(wait)
        batch = pending[i : i + batch_size]
        errors = sink.deliver(spec.name, partition, batch, run_id=run_id, resend=force)
        ok = [m.id for m, e in zip(batch, errors) if e is None]
        ledger.record(spec.name, sink.name, partition, ok, "delivered", run_id)
        counts.published += len(ok)
        failed: dict[str, list[Message]] = {}
        for m, e in zip(batch, errors):
            if e is not None:
                failed.setdefault(e, []).append(m)
        for error, msgs in failed.items():
            ledger.record(spec.name, sink.name, partition, [m.id for m in msgs], "failed", run_id, error=error)
            counts.failed += len(msgs)
            counts.failures.extend({"id": m.id, "error": error, "message": m.body} for m in msgs)
        if log:
            log(f"redrive {partition}: {counts.published}/{len(pending)} delivered, {counts.failed} failed")
    counts.paused_s = round(getattr(sink, "paused_s", 0.0) - paused_before, 3)
    return counts
