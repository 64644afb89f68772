"""Redrive: deliver a partition's raw files or events to a sink, at most once per sink.

Selection modes follow the telemetry redrive script: the whole day (`day`, optionally one event type), one raw file
(`file`), every raw file under a prefix (`prefix`), or one parsed Parquet file (`parquet`).
Messages flow as `Batch`es; the idempotency ledger (`replay_defs.core.ledger`) makes a re-run skip what
a sink already has, unless `force` is set.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import duckdb

from replay_defs.core.duckdb_file import ident
from replay_defs.core.lake import Lake, check_partition
from replay_defs.core.ledger import DELIVERED, FAILED, SENDING, UNKNOWN, Ledger
from replay_defs.core.pacing import Pacer, read_ahead
from replay_defs.pipeline.spec import PipelineSpec
from replay_defs.sinks.base import (
    Batch,
    Sink,
    Unknown,
    Unreachable,
    can_tell,
    held,
    resend_is_deduplicated,
    unknown,
)


@dataclass
class RedriveCounts:
    selected: int = 0
    published: int = 0
    skipped_already_delivered: int = 0
    dropped: int = 0
    failed: int = 0  # refused by the target, or not sent: it does not hold them
    unknown: int = 0  # sent, never confirmed nor refused: a later run reconciles them before sending again
    reconciled: int = 0  # in doubt from an earlier attempt and found in the target: recorded, not sent again
    possible_duplicates: int = 0  # sent again after an attempt in doubt, to a target that cannot say
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None  # every failure goes to `on_failed` (the dead-letter file)
    paused_s: float = 0.0  # time the sink waited for its target to drain

    def balanced(self) -> bool:
        return (
            self.selected == self.published + self.skipped_already_delivered + self.dropped + self.failed + self.unknown
        )


def message_id(source_ref: str) -> str:
    return hashlib.sha256(source_ref.encode()).hexdigest()[:32]


def message_id_of(spec: PipelineSpec, body: dict) -> str:
    """The message id a delivered body was sent under (the inverse of how batches name them)."""
    if spec.redrive.unit == "event":
        return body[spec.schema.id_field]
    return message_id(body["source_ref"])


def expected_messages(lake: Lake, spec: PipelineSpec, day: str, parsed_files: list[str]) -> tuple[list[str], list[str]]:
    """The message set a whole-day redrive of the committed version sends: (ids to deliver, ids
    dropped because their source file is gone)."""
    if not parsed_files:
        return [], []
    if spec.redrive.unit == "event":
        rows = lake.sql(parsed_files, f"SELECT DISTINCT {ident(spec.schema.id_field)} FROM files")
        return [r[0] for r in rows], []
    batch = raw_file_batch(lake, select_source_refs(lake, spec, day, parsed_files, None, "day"))
    ids = [m for m, why in zip(batch.ids, batch.drop) if why is None]
    return ids, [m for m, why in zip(batch.ids, batch.drop) if why is not None]


def raw_file_message(lake: Lake, source_ref: str) -> tuple[str, dict, None]:
    """The telemetry redrive's SQS payload: {"kind": "redrive_raw_file", "bucket": ..., "key": ...}."""
    bucket, key = lake.storage.bucket_key(lake.rel_from_uri(source_ref))
    body = {"kind": "redrive_raw_file", "bucket": bucket, "key": key, "source_ref": source_ref}
    return message_id(source_ref), body, None


def _parquet_selection(
    lake: Lake, spec: PipelineSpec, parsed_files: list[str], mode: str, uri: str | None, event_type: str | None
) -> list[str]:
    """The committed Parquet files a selection reads: all of the day's, or the one named (mode
    parquet), narrowed to one event type when given."""
    files = parsed_files
    if mode == "parquet":
        if not uri:
            raise ValueError("mode 'parquet' needs `uri`: a parsed Parquet file of this partition")
        rel = lake.rel_from_uri(uri) if "://" in uri else uri
        if rel not in parsed_files:
            raise ValueError(f"{uri!r} is not a committed Parquet file of this partition")
        files = [rel]
    elif mode not in ("day", "file", "prefix"):
        raise ValueError(f"unknown mode {mode!r}: use day, file, prefix or parquet")
    if event_type is not None:
        if event_type not in spec.schema.known_types:
            raise ValueError(f"unknown type {event_type!r}; known: {', '.join(spec.schema.known_types)}")
        files = [f for f in files if f"/type={event_type}/" in f]
    return files


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
        files = _parquet_selection(lake, spec, parsed_files, mode, uri, event_type)
        if not files:
            return {}
        rows = lake.sql(
            files, f"SELECT {ident(spec.schema.type_field)}, source_ref FROM files GROUP BY ALL ORDER BY ALL"
        )
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


def raw_file_batch(lake: Lake, refs_by_type: dict[str | None, list[str]]) -> Batch:
    """One seed-004 message per raw file, even when the file holds events of several types;
    a file that is no longer in the lake is marked to be dropped (`source_missing`)."""
    seen: dict[str, str | None] = {}
    for t, refs in refs_by_type.items():
        for ref in refs:
            seen.setdefault(ref, t)
    refs = sorted(seen)
    batch = Batch.of([raw_file_message(lake, ref) for ref in refs])
    batch.types = [seen[r] for r in refs]
    batch.drop = [None if lake.exists(lake.rel_from_uri(r)) else "source_missing" for r in refs]
    return batch


SORT_MEMORY = "256MB"


def event_batches(
    lake: Lake,
    spec: PipelineSpec,
    parsed_files: list[str],
    mode: str,
    uri: str | None = None,
    prefix: str | None = None,
    event_type: str | None = None,
    batch_rows: int = 10_000,
) -> Iterator[Batch]:
    """unit="event": the partition's parsed events, in event-time order, `batch_rows` at a time
    (memory is bounded by the batch). Each body is the event's schema fields as JSON; the key is
    the spec's `key_field`. Modes as for raw files: the day (optionally one type), one parsed
    Parquet file, the events of one raw file, or of raw files under a prefix."""
    files = _parquet_selection(lake, spec, parsed_files, mode, uri, event_type)
    if not files:
        return
    schema = spec.schema
    where, params = "TRUE", {}  # the files are registered as the relation `files`
    if mode == "file":
        if not uri:
            raise ValueError("mode 'file' needs `uri`: a raw file whose events to send")
        where, params["ref"] = "source_ref = $ref", uri
    elif mode == "prefix":
        if not prefix:
            raise ValueError("mode 'prefix' needs `prefix` (lake-relative or a URI)")
        where, params["ref"] = (
            "starts_with(source_ref, $ref)",
            prefix if "://" in prefix else lake.uri(prefix.strip("/")),
        )
    fields = []
    for f in schema.fields:
        col = ident(f.name)
        if f.type == "timestamp":
            col = f"strftime({col}, '%Y-%m-%dT%H:%M:%S.%fZ')"
        elif f.type == "json":
            col = f"{col}::JSON"
        fields.append(f"{ident(f.name)} := {col}")
    key = ident(spec.redrive.key_field or schema.id_field)
    sql = (
        f"SELECT {ident(schema.id_field)} AS id, {ident(schema.type_field)} AS type, "
        f"encode(coalesce(CAST({key} AS VARCHAR), '')) AS key, encode(to_json(struct_pack({', '.join(fields)}))) AS body "
        f"FROM files WHERE {where} ORDER BY {ident(schema.time_field)}, id"
    )
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        # The event-time ORDER BY holds the whole day unless DuckDB may spill it: cap its memory
        # so a redrive's memory stays bounded by the batch, not the partition.
        con.execute(f"SET memory_limit = '{SORT_MEMORY}'")
        con.execute("SET temp_directory = $dir", {"dir": tempfile.gettempdir() + "/event-replay-duckdb-spill"})
        for rb in con.register("files", lake.dataset(files)).sql(sql, params=params).to_arrow_reader(batch_rows):
            yield Batch(
                rb.column("id").to_pylist(),
                rb.column("body").to_pylist(),
                rb.column("type").to_pylist(),
                rb.column("key").to_pylist(),
            )
    finally:
        con.close()


# What a crash can leave in doubt is two chunks (up to four batches where the sink can say what it
# holds: two on their way, two read ahead with their intents). A sink that can say settles them
# exactly, so its chunks are whole batches (every chunk costs two ledger writes: ~10 ms for the
# intent of 10k ids in DuckDB, one row for its outcome); one that cannot (RabbitMQ, SQS, the
# outbox) would re-send them as possible duplicates, so its chunks are small.
SMALL_CHUNK = 500


def redrive(
    sink: Sink,
    ledger: Ledger,
    pipeline: str,
    partition: str,
    batches: Iterable[Batch],
    run_id: str,
    dry_run: bool = False,
    limit: int | None = None,
    force: bool = False,
    batch_size: int = 10_000,
    chunk_size: int | None = None,
    retries: int = 2,
    retry_backoff_s: float = 1.0,
    rate_limit: float | None = None,
    handled_in_run: set[str] | None = None,
    log=None,
    on_failed=None,
) -> RedriveCounts:
    """Deliver the selected messages that the sink does not have yet, recording each outcome.

    Batches of `batch_size` are looked up in the ledger; they go to the sink `chunk_size` at a
    time, each chunk recorded as `sending` before it is sent and with its outcome after, so a
    crash at any point leaves at most a chunk or two in doubt (up to four batches for a sink that
    can say what it holds: see `_Lookup`, `_Delivery.begin`), never unrecorded (`chunk_size`
    None: `SMALL_CHUNK` for a sink that cannot say what it holds, else the batch). Messages in doubt
    (from a crash, a timeout, a lost connection) are reconciled with the sink before anything is
    sent again: those it holds are recorded as delivered; where it cannot say (RabbitMQ, standard
    SQS) they are sent again and counted as possible duplicates. Refused messages are retried
    `retries` times with exponential backoff before they count as failed; `on_failed` then gets
    them as dead letters (id, error, message), like those still in doubt. `rate_limit`: at most
    this many messages per second.

    `handled_in_run`: message ids an earlier day of the same run already handled (a raw file can
    hold events of two days); they count as already delivered, even when forced, and the ids this
    day handles are added to it.
    """
    counts = RedriveCounts()
    paused_before = getattr(sink, "paused_s", 0.0)
    if chunk_size is None:
        chunk_size = batch_size if can_tell(sink) else SMALL_CHUNK
    if rate_limit:  # pace in chunks of about a tenth of a second
        chunk_size = max(1, min(chunk_size, int(rate_limit / 10)))
    pacer, progress = Pacer(rate_limit), _ProgressLog(partition, counts, log)
    with LedgerWriter(ledger, pipeline, sink.name, partition, run_id) as writer:
        delivery = _Delivery(
            sink, writer, pipeline, partition, run_id, force, retries, retry_backoff_s, counts, log, on_failed
        )
        # A batch sent as one chunk to a sink that can say what it holds may have its intent
        # recorded by its lookup (`_Lookup`): a crash leaves it in doubt, and the next run asks.
        claim_up_to = chunk_size if can_tell(sink) and not (dry_run or force) else 0
        lookup = _Lookup(ledger, pipeline, sink.name, partition, run_id, force, claim_up_to)
        # The next batch is read and looked up on a thread while this one is sent.
        looked_up = read_ahead(map(lookup, _first(batches, limit)))
        chunks = _chunks(looked_up, delivery, counts, handled_in_run, chunk_size, dry_run)
        _send_chunks(delivery, writer, chunks, pacer, progress)
    counts.paused_s = round(getattr(sink, "paused_s", 0.0) - paused_before, 3)
    return counts


def _chunks(
    looked_up, delivery, counts, handled_in_run, chunk_size: int, dry_run: bool
) -> Iterator[tuple[Batch, bool]]:
    """What is left to send of each looked-up batch once counted and reconciled, in chunks, each
    with whether its intent is recorded already (a claimed batch: see `_Lookup`)."""
    for batch, sendable, already, in_doubt, claimed in looked_up:
        pending = _tally(batch, sendable, already, counts, handled_in_run)
        if dry_run:
            continue
        if claimed:  # nothing of it was in the ledger, so no earlier day of the run handled any of it
            yield pending, True
            continue
        pending = delivery.reconcile(pending, in_doubt)
        for start in range(0, len(pending), chunk_size):
            yield pending.slice(start, start + chunk_size), False


def _send_chunks(delivery, writer, chunks: Iterator[tuple[Batch, bool]], pacer: Pacer, progress) -> None:
    """The chunks to the sink, each recorded as `sending` before it goes: its intent is written
    while the chunk before it is being sent (the next batch's first chunk too), and waited for.
    A sink that sends without waiting has the next chunk on its way before this one's outcomes
    are waited for (`_Delivery.begin`)."""

    def intent_of(item):
        if item is None:
            return None, None
        chunk, recorded = item
        return chunk, _RECORDED if recorded else writer.record(chunk.ids, SENDING)

    chunk, intent = intent_of(next(chunks, None))
    finish = None
    while chunk is not None:
        following, following_intent = intent_of(next(chunks, None))
        pacer.wait(len(chunk))
        intent.result()
        started = delivery.begin(chunk)
        if finish is not None:
            finish()
        finish, chunk, intent = started, following, following_intent
        progress.maybe_log()
    if finish is not None:
        finish()


_RECORDED = Future()  # the intent of a claimed chunk: written by its lookup
_RECORDED.set_result(None)


@dataclass
class _Lookup:
    """Looks a batch up in the ledger: the batch, the part of it that can be sent, the ids of that
    part the sink already has, those whose last send is in doubt (with when and for which day they
    were sent), and whether that part's intent is recorded already.

    A day's first delivery finds none of its ids in the ledger, and then records each chunk's
    intent: one insert (`Ledger.claim`) does both, when the part goes as one chunk (up to
    `claim_up_to` messages). It is tried while the batches before found nothing in the ledger."""

    ledger: Ledger
    pipeline: str
    sink: str
    day: str
    run_id: str
    force: bool
    claim_up_to: int
    claiming: bool = True

    def __call__(self, batch: Batch) -> tuple[Batch, Batch, set[str], dict[str, tuple[float, str]], bool]:
        sendable = batch if batch.drop is None else batch.take([i for i, r in enumerate(batch.drop) if r is None])
        if self.force:
            return batch, sendable, set(), {}, False
        ids = sendable.ids
        if self.claiming and 0 < len(ids) <= self.claim_up_to:
            if self.ledger.claim(self.pipeline, self.sink, self.day, ids, self.run_id):
                return batch, sendable, set(), {}, True
        delivered, in_doubt = self.ledger.lookup(self.pipeline, self.sink, ids)
        self.claiming = not delivered and not in_doubt
        return batch, sendable, delivered, in_doubt, False


def _tally(
    batch: Batch, sendable: Batch, already: set[str], counts: RedriveCounts, handled_in_run: set[str] | None
) -> Batch:
    """Counts a batch as selected, dropped and already delivered; returns what is left to send."""
    counts.selected += len(batch)
    for t, n in Counter(batch.types).items():
        counts.by_type[t or "any"] = counts.by_type.get(t or "any", 0) + n
    for reason in filter(None, batch.drop or ()):
        counts.dropped += 1
        counts.dropped_reasons[reason] = counts.dropped_reasons.get(reason, 0) + 1
    if handled_in_run is not None:
        already |= handled_in_run.intersection(sendable.ids)
        handled_in_run.update(sendable.ids)
    pending = sendable.take([i for i, m in enumerate(sendable.ids) if m not in already]) if already else sendable
    counts.skipped_already_delivered += len(sendable) - len(pending)
    return pending


class _ProgressLog:
    """Logs how far a day's delivery got, at most every `every_s` seconds."""

    def __init__(self, partition: str, counts: RedriveCounts, log, every_s: float = 5.0):
        self.partition, self.counts, self.log, self.every_s = partition, counts, log, every_s
        self.started = self.last = time.monotonic()

    def maybe_log(self) -> None:
        if not self.log or time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        rate = self.counts.published / (self.last - self.started)
        c = self.counts
        self.log(
            f"redrive {self.partition}: {c.published} delivered ({rate:,.0f}/s), {c.failed} failed, "
            f"{c.unknown} in doubt so far"
        )


def _first(batches: Iterable[Batch], limit: int | None) -> Iterator[Batch]:
    """The batches, cut after `limit` messages in all."""
    left = limit
    for batch in batches:
        if left is not None:
            if left <= 0:
                return
            batch = batch.slice(0, left)
            left -= len(batch)
        yield batch


class LedgerWriter:
    """Records in the ledger on a background thread, in order, so the next chunk is being sent
    while the last one's outcome (or the next one's intent) is written. `record` returns the
    write's future: an intent is waited for before its chunk is sent. Leaving the block waits for
    every write and re-raises a failed one."""

    def __init__(self, ledger: Ledger, pipeline: str, sink: str, day: str, run_id: str):
        self.ledger, self.pipeline, self.sink, self.day, self.run_id = ledger, pipeline, sink, day, run_id
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self._pending: list[Future] = []

    def record(self, ids: list[str], status: str, error: str | None = None, possible_duplicate: bool = False) -> Future:
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        future = self._pool.submit(
            self.ledger.record,
            self.pipeline,
            self.sink,
            self.day,
            ids,
            status,
            self.run_id,
            error,
            possible_duplicate,
        )
        self._pending.append(future)
        return future

    def __enter__(self) -> "LedgerWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            for f in self._pending:
                f.result()
        finally:
            self._pool.shutdown(wait=True)


# After a chunk delivered nothing through all its retries, and the target answered none of it (every
# error `Unreachable` or `Unknown`, not a refusal), the target counts as down: later chunks
# fail at once without being sent, except one probe every this many seconds, which (if it gets
# through) puts the target back in use. So a dead endpoint fails a day in about one chunk's time.
PROBE_EVERY_S = 10.0


@dataclass
class _Delivery:
    """Sends chunks of one day to the sink with retries and records every outcome in the ledger:
    delivered as the sink confirms; failed or in doubt (with the error) also as dead letters."""

    sink: Sink
    writer: LedgerWriter
    pipeline: str
    partition: str
    run_id: str
    force: bool
    retries: int
    backoff_s: float
    counts: RedriveCounts
    log: Callable[[str], None] | None = None
    on_failed: Callable[[list[dict]], None] | None = None
    # The target may hold them, and cannot say: id -> when first sent. A later refusal leaves them in
    # doubt; delivered again, they are possible duplicates unless the target deduplicates the re-send.
    doubted: dict[str, float] = field(default_factory=dict)
    down_since: float | None = None  # monotonic time the target was found down
    down_error: str = ""

    def reconcile(self, pending: Batch, in_doubt: dict[str, tuple[float, str]]) -> Batch:
        """What is left to send of `pending` once its messages in doubt from an earlier attempt are
        settled with the sink: those it holds are recorded as delivered and not sent. Each is asked
        for under the day it was sent for (a raw file's message may have gone out with another day)."""
        doubt = [m for m in pending.ids if m in in_doubt]
        if not doubt:
            return pending
        since = min(in_doubt[m][0] for m in doubt) - 60  # a minute for clocks that disagree
        by_day: dict[str, list[str]] = {}
        for m in doubt:
            by_day.setdefault(in_doubt[m][1], []).append(m)
        try:
            answers = [held(self.sink, self.pipeline, day, ids, since) for day, ids in by_day.items()]
            found = None if None in answers else set().union(*answers)
        except Exception as exc:  # noqa: BLE001 - the target cannot be asked now: they stay in doubt
            error = unknown(f"not sent: in doubt since an earlier attempt, and {self.sink.name} cannot be asked: {exc}")
            keep = set(doubt)
            self._give_up(pending.take([i for i, m in enumerate(pending.ids) if m in keep]), [error] * len(keep))
            return pending.take([i for i, m in enumerate(pending.ids) if m not in keep])
        if found is None:
            self.doubted.update({m: in_doubt[m][0] - 60 for m in doubt})  # a minute for clocks that disagree
            return pending
        if found:
            self.writer.record(sorted(found), DELIVERED)
            self.counts.reconciled += len(found)
            self.counts.skipped_already_delivered += len(found)
            if self.log:
                self.log(f"redrive {self.partition}: {len(found)} messages in doubt were found in {self.sink.name}")
        return pending.take([i for i, m in enumerate(pending.ids) if m not in found])

    def begin(self, chunk: Batch) -> Callable[[], None]:
        """Starts `send` of a chunk whose intent is recorded; what it returns finishes it. A sink
        that can hand a chunk over without waiting for its outcomes (a method `send`: Kafka) has it
        on its way now, so the caller can start the next chunk before this one's outcomes are
        waited for; any other sink is sent the chunk when it is finished, as `send` does."""
        if not callable(getattr(self.sink, "send", None)) or self._down():
            return partial(self.send, chunk)
        outcomes = self.sink.send(self.pipeline, self.partition, chunk, run_id=self.run_id, resend=self.force)
        return partial(self.send, chunk, outcomes)

    def _down(self) -> bool:
        return self.down_since is not None and time.monotonic() - self.down_since < PROBE_EVERY_S

    def send(self, chunk: Batch, first: Callable[[], list] | None = None) -> None:
        """One chunk, whose intent is recorded: sent (refusals retried), each outcome recorded. A
        message in doubt is not sent again in this run — a copy may still be on its way (a socket
        buffer, a slow replica) — but recorded in doubt for the next run to settle with the sink.
        `first`: the outcomes of a first attempt already on its way (`begin`)."""
        if first is None and self._down():
            self._give_up(chunk, [Unreachable(f"not sent: {self.sink.name} is down ({self.down_error})")] * len(chunk))
            return
        attempts = 1 if self.down_since is not None else self.retries + 1
        delivered_any, answered, last_error = False, False, ""
        for attempt in range(attempts):
            if attempt:  # a retry is a new attempt: its intent first
                self.writer.record(chunk.ids, SENDING).result()
            if attempt == 0 and first is not None:
                errors = first()
            else:
                errors = self.sink.deliver(self.pipeline, self.partition, chunk, run_id=self.run_id, resend=self.force)
            delivered_any |= self._delivered([m for m, e in zip(chunk.ids, errors) if e is None]) > 0
            answered |= any(type(e) is str for e in errors)  # a refusal is an answer: the target is up
            unsure = [i for i, e in enumerate(errors) if isinstance(e, Unknown)]
            if unsure:
                self._give_up(chunk.take(unsure), [errors[i] for i in unsure])
                if self.log:
                    self.log(
                        f"redrive {self.partition}: {len(unsure)} deliveries in doubt ({errors[unsure[0]]}); "
                        "not sent again in this run: the next run settles them with the sink"
                    )
            left = [i for i, e in enumerate(errors) if e is not None and not isinstance(e, Unknown)]
            last_error = next((e for e in errors if e is not None), last_error)
            if not left:
                break
            chunk, errors = chunk.take(left), [errors[i] for i in left]
            if attempt + 1 < attempts:
                if self.log:
                    self.log(
                        f"redrive {self.partition}: {len(chunk)} deliveries failed ({errors[0]}); "
                        f"retry {attempt + 1}/{self.retries}"
                    )
                time.sleep(self.backoff_s * 2**attempt)
        else:
            self._give_up(chunk, errors)
        if delivered_any or answered:
            self.down_since = None
        elif self.down_since is None or attempts == 1:  # nothing got through, nothing answered
            self.down_since, self.down_error = time.monotonic(), last_error

    def _delivered(self, ids: list[str]) -> int:
        # Decided now, not when it was sent again: an SQS FIFO window may have closed meanwhile.
        dup = [m for m in ids if m in self.doubted and not resend_is_deduplicated(self.sink, self.doubted[m])]
        if dup:
            self.writer.record(dup, DELIVERED, possible_duplicate=True)
            self.counts.possible_duplicates += len(dup)
            dup_set = set(dup)
            ids = [m for m in ids if m not in dup_set]
        self.writer.record(ids, DELIVERED)
        self.counts.published += len(ids) + len(dup)
        return len(ids) + len(dup)

    def _give_up(self, chunk: Batch, errors: list[str]) -> None:
        """Records what is left of a chunk as failed or unknown, with its error, and as dead letters.
        A refusal of a message the target may hold from an earlier attempt leaves it in doubt."""
        if self.doubted:
            errors = [
                unknown(f"{e} (an earlier attempt is in doubt)")
                if m in self.doubted and not isinstance(e, Unknown)
                else e
                for m, e in zip(chunk.ids, errors)
            ]
        by_error: dict[str, list[int]] = {}
        for i, e in enumerate(errors):
            by_error.setdefault(e, []).append(i)
        for error, index in by_error.items():
            in_doubt = isinstance(error, Unknown)
            self.writer.record([chunk.ids[i] for i in index], UNKNOWN if in_doubt else FAILED, error)
            if in_doubt:
                self.counts.unknown += len(index)
            else:
                self.counts.failed += len(index)
            self.counts.first_error = self.counts.first_error or error
            if self.on_failed:
                self.on_failed(
                    [{"id": chunk.ids[i], "error": error, "message": chunk.bodies[i].decode()} for i in index]
                )
