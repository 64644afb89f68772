"""The parse path: raw JSONL(.gz) lines -> validated, de-duplicated events as Parquet by type.

Two stages, both bounded in memory by batch size rather than partition size:

1. `parse_file` (one task per raw file, run in worker processes): stream-decompress, split lines,
   validate a batch at a time with msgspec, quarantine bad lines with a reason, and write the
   events of the target day to staging Arrow IPC files, spread over hash buckets of the event id.
2. `dedupe_buckets`: for each bucket, keep the first copy of every event id (ordered by
   source_ref, line_no, so the winner is deterministic) and write the rows per event type.

Every raw line is accounted for exactly once per file: kept (before de-duplication), routed to a
neighbouring day, quarantined, or (for a neighbour's file) left to its own partition.
This module must not import dagster: worker processes import it.
"""

from __future__ import annotations

import ctypes
import operator
import os
import re
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from isal import igzip, isal_zlib
from isal.isal_zlib import IsalError

from replay_defs.core.storage import open_binary
from replay_defs.pipeline.spec import SAFE_TYPE_VALUE, EventSchema

BATCH_LINES = 20_000
READ_CHUNK = 8 << 20
SAMPLE_BYTES = 512
# Rows buffered per file task before staging writes; bounds worker memory.
STAGE_FLUSH_ROWS = 100_000

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_ref", pa.string()),
        ("line_no", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("sample", pa.binary()),
        # 1 for a bad line; the number of readable lines for a rejected file.
        ("lines", pa.int64()),
    ]
)

_ARROW_TYPES = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "json": pa.string(),
}


def event_arrow_schema(schema: EventSchema) -> pa.Schema:
    cols = [(f.name, _ARROW_TYPES[f.type]) for f in schema.fields]
    return pa.schema([*cols, ("source_ref", pa.string()), ("line_no", pa.int64())])


# --------------------------------------------------------------------------------------------
# Reading raw files


class RawFileError(Exception):
    """A raw file that cannot be read to its end (truncated or corrupt compression)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_READ_ERRORS = (EOFError, OSError, zlib.error, IsalError)


@contextmanager
def _open_raw(path: str):
    with open_binary(path) as f:
        if path.endswith(".gz"):
            with igzip.open(f, "rb") as g:
                yield g
        else:
            yield f


def _read_error(exc: Exception) -> RawFileError:
    if isinstance(exc, EOFError):
        return RawFileError("truncated_gzip", f"compressed stream ends early: {exc}")
    return RawFileError("corrupt_gzip", f"{type(exc).__name__}: {exc}")


def count_lines(path: str) -> tuple[int, int, RawFileError | None]:
    """Independent line count (newline bytes, plus a final unterminated line).

    Returns (lines, uncompressed bytes, error). On a read error the counts cover everything that
    was readable before the break, which is what the parser quarantines for a rejected file.
    """
    lines = size = 0
    last = b"\n"
    try:
        for chunk in _readable_chunks(path):
            lines += chunk.count(b"\n")
            size += len(chunk)
            last = chunk[-1:]
    except _READ_ERRORS as exc:
        return lines + (last != b"\n"), size, _read_error(exc)
    return lines + (last != b"\n"), size, None


def _readable_chunks(path: str, read_size: int = 1 << 20) -> Iterator[bytes]:
    """The file's bytes, decompressed when gzipped, yielding all that decompresses before a
    truncation or corruption is raised (a file reader drops the chunk it was filling)."""
    with open_binary(path) as f:
        if not path.endswith(".gz"):
            while chunk := f.read(read_size):
                yield chunk
            return
        d, in_member = isal_zlib.decompressobj(wbits=31), False
        while data := f.read(read_size):
            while data:
                in_member = True
                if out := d.decompress(data):
                    yield out
                if not d.eof:
                    break
                data, d, in_member = d.unused_data, isal_zlib.decompressobj(wbits=31), False  # next gzip member
        if in_member:
            if out := d.flush():
                yield out
            raise EOFError("compressed file ended before the end-of-stream marker was reached")


@dataclass
class _Oversize:
    line_no: int
    sample: bytes

    def __len__(self) -> int:  # lets batches test line lengths with C-level min()/max()
        return 0


class _LineSplitter:
    """Cuts a stream of chunks into lines of at most `max_line_bytes`. A longer line is never held
    whole: it becomes an `_Oversize` marker with a sample of its start, and the rest of its bytes
    are dropped up to its newline. `lines` counts the lines cut so far (numbered from 1)."""

    def __init__(self, max_line_bytes: int):
        self.max_line_bytes = max_line_bytes
        self.lines = 0
        self.rest = b""  # the unterminated end of the last chunk
        self.skipping: _Oversize | None = None  # inside an oversize line, dropping bytes to its newline

    def feed(self, chunk: bytes) -> list[bytes | _Oversize]:
        """The lines the chunk completes."""
        out = []
        if self.skipping is not None:
            nl = chunk.find(b"\n")
            if nl < 0:
                return out
            out.append(self.skipping)
            self.lines += 1
            self.skipping = None
            chunk = chunk[nl + 1 :]
        parts = (self.rest + chunk).split(b"\n") if self.rest else chunk.split(b"\n")
        self.rest = parts.pop()
        if parts and max(map(len, parts)) > self.max_line_bytes:
            for i, line in enumerate(parts):
                if len(line) > self.max_line_bytes:
                    parts[i] = _Oversize(self.lines + 1 + i, line[:SAMPLE_BYTES])
        self.lines += len(parts)
        if len(self.rest) > self.max_line_bytes:
            self.skipping = _Oversize(self.lines + 1, self.rest[:SAMPLE_BYTES])
            self.rest = b""
        if out:
            out.extend(parts)
            return out
        return parts

    def finish(self) -> list[bytes | _Oversize]:
        """The last line, when the stream does not end with a newline."""
        if self.skipping is not None:
            return [self.skipping]
        return [self.rest] if self.rest else []


def iter_line_batches(
    path: str,
    max_line_bytes: int,
    batch_lines: int = BATCH_LINES,
    max_bytes: int | None = None,
    max_lines: int | None = None,
) -> Iterator[tuple[int, list[bytes | _Oversize]]]:
    """Yield (first line number, lines) with lines of at most max_line_bytes.

    A longer line is never held whole: it becomes an `_Oversize` marker with a sample of its
    start, so memory stays bounded by the batch even for a 100 MB line. Line numbers start at 1.
    Raises RawFileError if the file cannot be read to its end, or (`file_too_large`) once it holds
    more than `max_bytes` uncompressed bytes or `max_lines` lines.
    """
    size = 0
    splitter = _LineSplitter(max_line_bytes)
    batch: list[bytes | _Oversize] = []
    batch_start = 1
    try:
        with _open_raw(path) as f:
            while chunk := f.read(READ_CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise RawFileError(
                        "file_too_large", f"more than {max_bytes} uncompressed bytes (EventSchema.max_file_bytes)"
                    )
                batch.extend(splitter.feed(chunk))
                if max_lines is not None and splitter.lines > max_lines:
                    raise RawFileError("file_too_large", f"more than {max_lines} lines (EventSchema.max_file_lines)")
                while len(batch) >= batch_lines:
                    yield batch_start, batch[:batch_lines]
                    batch = batch[batch_lines:]
                    batch_start += batch_lines
    except _READ_ERRORS as exc:
        raise _read_error(exc) from exc
    batch.extend(splitter.finish())
    if batch:
        yield batch_start, batch


# --------------------------------------------------------------------------------------------
# Decoding and validating a batch


_MSGSPEC_TYPES: dict[str, Any] = {
    "string": str,
    "int": Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)],
    "float": float,
    "bool": bool,
    "timestamp": str,  # parsed by Arrow, see parse_timestamps
    "json": msgspec.Raw,
}
_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_timestamps(values: list) -> pa.Array:
    """RFC 3339 text -> UTC microseconds. The one timestamp parser of both decode paths, so a
    line's verdict never depends on its neighbours. Requires a zone offset; accepts up to
    nanosecond fractions (truncated to microseconds); years 1677-2262 (Arrow's ns range)."""
    ns = pa.array(values, pa.string()).cast(pa.timestamp("ns", tz="UTC"))
    return ns.cast(pa.timestamp("us", tz="UTC"), safe=False)


def _classify(exc: Exception, line: bytes) -> str:
    msg = str(exc)
    if isinstance(exc, RecursionError):
        return "nesting_too_deep"
    if isinstance(exc, UnicodeError):
        return "invalid_utf8"
    if "surrogate" in msg or _LONE_SURROGATE.search(line):
        return "invalid_unicode"
    if isinstance(exc, msgspec.ValidationError):
        if "missing required field" in msg:
            return "missing_field"
        if msg.startswith("Expected `object`"):
            # The line itself, or (`... - at `$.envelope``) a value on a field's path.
            return "wrong_type" if " - at `$" in msg else "not_an_object"
        if re.match(r"Expected `\w+` (of length|[<>]=?)", msg):
            return "invalid_value"  # right type, value out of range (e.g. an empty id)
        if msg.startswith("Expected `"):
            return "wrong_type"
        return "invalid_value"
    return "malformed_json"


def _event_struct(schema: EventSchema) -> tuple[type, dict[str, Any]]:
    """The msgspec Struct a line decodes into, and per field name the getter of its value.

    A field's path becomes nested Structs (an object holding a required field is required itself;
    msgspec skips every key no field asks for, at any depth). A leaf's attribute is its field name;
    the JSON keys come in through `rename`, so a flat schema whose paths are its names is the same
    single Struct read by C-level attrgetters as before paths existed.
    """
    names = {f.name for f in schema.fields}
    held = {f.keys[:depth] for f in schema.fields if f.required for depth in range(1, len(f.keys))}
    tree: dict = {}
    for f in schema.fields:
        node = tree
        for key in f.keys[:-1]:
            node = node.setdefault(key, {})
        node[f.keys[-1]] = f
    objects = (f"obj{i}" for i in range(1 << 16) if f"obj{i}" not in names)
    chains: dict[str, tuple[str, ...]] = {}

    def build(node: dict, struct_name: str, keys: tuple[str, ...], attrs: tuple[str, ...]) -> type:
        members, rename = [], {}
        for key, child in node.items():
            if isinstance(child, dict):
                attr = next(objects)
                typ = build(child, f"{struct_name}_{attr}", (*keys, key), (*attrs, attr))
                required = (*keys, key) in held
            else:
                attr, typ, required = child.name, _MSGSPEC_TYPES[child.type], child.required
                if child.name == schema.id_field:
                    typ = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
                chains[child.name] = (*attrs, attr)
            rename[attr] = key
            if required:
                members.append((attr, typ))
            else:  # Raw cannot be in a union; a missing json field still defaults to None
                members.append((attr, typ if typ is msgspec.Raw else typ | None, None))
        # Required fields must come before optional ones in a Struct.
        members.sort(key=lambda m: len(m) == 3)
        renamed = {a: k for a, k in rename.items() if a != k} or None
        # gc=False: an event holds only scalars, Raw and nested events, so it can never be part of
        # a cycle, and a batch of 20k tracked objects would set off collections that cost a third
        # of the decode.
        return msgspec.defstruct(struct_name, members, rename=renamed and rename, gc=False)

    event = build(tree, "Event", (), ())
    getters = {}
    for f in schema.fields:
        through_optional = any(f.keys[:depth] not in held for depth in range(1, len(f.keys)))
        getters[f.name] = (
            _none_safe_getter(chains[f.name]) if through_optional else operator.attrgetter(".".join(chains[f.name]))
        )
    return event, getters


def _none_safe_getter(attrs: tuple[str, ...]):
    """A getter through objects that may be absent (None): their fields read as None."""

    def get(event):
        for attr in attrs:
            event = getattr(event, attr)
            if event is None:
                return None
        return event

    return get


class EventDecoder:
    """Validates lines against an `EventSchema` and converts good ones to an Arrow table."""

    def __init__(self, schema: EventSchema):
        self.schema = schema
        event, getters = _event_struct(schema)
        self.decoder = msgspec.json.Decoder(event)
        self.arrow_schema = event_arrow_schema(schema)
        self._getters = [(f, getters[f.name]) for f in schema.fields]
        self._timestamps = [get for f, get in self._getters if f.type == "timestamp"]
        self._time_getter = getters[schema.time_field]
        self._known = pa.array(list(schema.known_types), pa.string()) if schema.known_types else None

    def to_table(self, events: list, line_nos: pa.Array, source_ref: str) -> pa.Table:
        """Raises pa.ArrowInvalid on an unconvertible value (the batch is then checked line by line)."""
        cols = []
        for f, get in self._getters:
            vals = list(map(get, events))
            if f.type == "json":
                cols.append(_json_column(vals))
            elif f.name == self.schema.time_field:
                cols.append(self.event_times(vals))
            elif f.type == "timestamp":
                cols.append(parse_timestamps(vals))
            else:
                cols.append(pa.array(vals, _ARROW_TYPES[f.type]))
        cols.append(pa.array([source_ref] * len(events), pa.string()))
        cols.append(line_nos)
        return pa.Table.from_arrays(cols, schema=self.arrow_schema)

    def event_times(self, vals: list) -> pa.Array:
        """The event-time field's values as UTC timestamps (a variant may read them otherwise: the demo's bug)."""
        return parse_timestamps(vals)

    def decode_batch(
        self, start: int, lines: list, source_ref: str, only_day: date | None = None
    ) -> tuple[pa.Table, list[tuple[int, str, str, bytes]], int]:
        """Returns (valid events, bad lines as (line_no, reason, detail, sample), other-day events).

        With `only_day` (a neighbour's file, where most events belong elsewhere) valid events of
        other days are only counted, not converted; bad lines are still reported.
        """
        # Fast path: no empty or oversize line, valid UTF-8 throughout (msgspec does not check
        # the bytes of fields it skips), and every line decodes. Otherwise go line by line.
        if min(map(len, lines)) > 1:
            # Line by line: joining the batch to check it at once copies it, which costs more.
            if all(map(bytes.isascii, lines)) or _is_utf8(b"\n".join(lines)):
                try:
                    events = list(map(self.decoder.decode, lines))
                    nos = pa.array(np.arange(start, start + len(lines), dtype=np.int64))
                    other = 0
                    if only_day is not None:
                        days = pc.cast(self.event_times(list(map(self._time_getter, events))), pa.date32())
                        keep = pc.equal(days, pa.scalar(only_day, pa.date32()))
                        nos = pc.filter(nos, keep)
                        events = [events[i - start] for i in nos.to_pylist()]
                        other = len(lines) - len(events)
                    table, bad = self._check_types(self.to_table(events, nos, source_ref), lines, start)
                    return table, bad, other
                except (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, pa.ArrowInvalid, RecursionError):
                    pass
        table, bad = self._decode_each(start, lines, source_ref)
        return table, bad, 0

    def _decode_each(self, start: int, lines: list, source_ref: str):
        good, nos, bad = [], [], []
        for i, line in enumerate(lines):
            no = start + i
            if isinstance(line, _Oversize):
                bad.append((no, "oversize_line", f"longer than {self.schema.max_line_bytes} bytes", line.sample))
                continue
            if not line.strip():
                bad.append((no, "empty_line", "blank line", line[:SAMPLE_BYTES]))
                continue
            try:
                line.decode("utf-8")
                event = self.decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, RecursionError) as exc:
                # RecursionError: JSON nested deeper than the decoder's stack allows (a few hundred levels).
                bad.append((no, _classify(exc, line), str(exc)[:300], line[:SAMPLE_BYTES]))
                continue
            problem = self._bad_timestamp(event)
            if problem:
                bad.append((no, "invalid_value", problem, line[:SAMPLE_BYTES]))
                continue
            good.append(event)
            nos.append(no)
        table = self.to_table(good, pa.array(nos, pa.int64()), source_ref)
        table, more_bad = self._check_types(table, lines, start)
        return table, sorted(bad + more_bad)

    def _bad_timestamp(self, event) -> str | None:
        for get in self._timestamps:
            value = get(event)
            if value is not None:
                try:
                    parse_timestamps([value])
                except (pa.ArrowInvalid, OverflowError):
                    return f"timestamp {value[:80]!r} is not RFC 3339 with a zone offset (years 1677-2262)"
        return None

    def _check_types(self, table: pa.Table, lines: list, start: int):
        """Quarantine events whose type is unknown (or unsafe as a path component)."""
        types = table.column(self.schema.type_field)
        if self._known is not None:
            ok = pc.is_in(types, value_set=self._known)
        else:
            ok = pc.match_substring_regex(types, SAFE_TYPE_VALUE.pattern)
        if pc.all(ok).as_py():
            return table, []
        bad = []
        for no, t in zip(
            pc.filter(table.column("line_no"), pc.invert(ok)).to_pylist(),
            pc.filter(types, pc.invert(ok)).to_pylist(),
        ):
            bad.append((no, "unknown_type", f"type {t!r} is not a known type", lines[no - start][:SAMPLE_BYTES]))
        return table.filter(ok), bad


_NO_JSON = msgspec.Raw(b"")
_MAX_CHUNK_BYTES = 2**31 - 1  # the most a string array with 32-bit offsets holds


def _json_column(vals: list) -> pa.Array | pa.ChunkedArray:
    """Raw JSON values (None: absent) as a string column, copied once into one buffer (a bytes()
    per value costs as much as decoding the line). The batch's UTF-8 was checked before decoding:
    the bytes are reinterpreted, not checked again."""
    present, validity = vals, None
    if None in vals:
        validity = pa.array([v is not None for v in vals]).buffers()[1]
        present = [_NO_JSON if v is None else v for v in vals]
    offsets = np.zeros(len(vals) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, present), np.int64, len(vals)), out=offsets[1:])
    if offsets[-1] > _MAX_CHUNK_BYTES and len(vals) > 1:  # past 32-bit offsets: a column of two chunks
        half = len(vals) // 2
        return pa.chunked_array([_json_column(vals[:half]), _json_column(vals[half:])], pa.string())
    return pa.Array.from_buffers(
        pa.string(), len(vals), [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(present))]
    )


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --------------------------------------------------------------------------------------------
# Stage 1: one raw file


@dataclass(frozen=True)
class FileTask:
    path: str
    source_ref: str
    arrival: datetime  # start of the file's arrival hour (UTC)
    home: bool  # True: the file arrived on the partition's day and it owns all its lines
    file_index: int


@dataclass(frozen=True)
class ParseJob:
    """Everything a worker needs to parse files for one event-time day."""

    schema: EventSchema
    day: date
    early: timedelta
    late: timedelta
    buckets: int
    stage_dir: str


@dataclass
class FileResult:
    source_ref: str
    home: bool
    lines: int = 0
    kept: int = 0  # events of the target day, before de-duplication
    routed_out: Counter = field(default_factory=Counter)  # day -> events owned by a neighbour
    quarantined: Counter = field(default_factory=Counter)  # reason -> lines
    neighbour_skipped: int = 0  # lines of a neighbour's file that belong to other days
    staged: dict[int, tuple[str, int]] = field(default_factory=dict)  # bucket -> (file, rows)
    quarantine_file: str | None = None


def scan_window(day: date, early: timedelta, late: timedelta) -> tuple[datetime, datetime]:
    """Arrival times a parsed partition scans: [day - early, day+1 + late)."""
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    return start - early, start + timedelta(days=1) + late


class _QuarantineWriter:
    """One file's quarantine records. Past `per_reason` records of one reason, further lines of it
    are only counted, and `close` writes one record with their count (so a file of millions of
    blank lines costs a count, not millions of records)."""

    def __init__(self, path: str, per_reason: int):
        self.path = path
        self.per_reason = per_reason
        self.rows: list[tuple] = []
        self.writer: pq.ParquetWriter | None = None
        self.recorded: Counter = Counter()
        self.overflow: dict[str, list] = {}  # reason -> [source_ref, lines]

    def add(self, source_ref, line_no, reason, detail, sample, lines=1):
        if self.recorded[reason] >= self.per_reason:
            self.overflow.setdefault(reason, [source_ref, 0])[1] += lines
            return
        self.recorded[reason] += 1
        self.rows.append((source_ref, line_no, reason, detail, sample, lines))
        if len(self.rows) >= 10_000:
            self.flush()

    def flush(self):
        if not self.rows:
            return
        cols = list(zip(*self.rows))
        table = pa.Table.from_arrays(
            [pa.array(c, t) for c, t in zip(cols, QUARANTINE_SCHEMA.types)], schema=QUARANTINE_SCHEMA
        )
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, QUARANTINE_SCHEMA, compression="zstd")
        self.writer.write_table(table)
        self.rows = []

    def close(self) -> bool:
        for reason, (source_ref, lines) in sorted(self.overflow.items()):
            detail = (
                f"{lines} more lines quarantined as {reason}: only the first {self.per_reason} are recorded one by one "
                "(EventSchema.max_quarantine_rows_per_reason)"
            )
            self.rows.append((source_ref, None, reason, detail, b"", lines))
        self.overflow = {}
        self.flush()
        if self.writer is not None:
            self.writer.close()
            return True
        return False

    def discard(self):
        """Forget every record so far, flushed or not (the file is being rejected whole)."""
        self.rows, self.recorded, self.overflow = [], Counter(), {}
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            os.remove(self.path)


class _StageWriter:
    """Per-bucket staging files of one raw file, written to temp names until done. Arrow IPC: the
    rows are read once, right away, on the same machine, and IPC is a plain copy of the columns
    both ways (uncompressed Parquet's encoding cost about a tenth of stage 1). The rows' source_ref
    is the file's own, so stage 2 builds it from the file (`staging_schema`, `_with_source_ref`)."""

    def __init__(self, stage_dir: str, file_index: int, buckets: int, schema: pa.Schema):
        self.paths = [os.path.join(stage_dir, f"bucket{b:04d}", f"f{file_index:06d}.arrow") for b in range(buckets)]
        self.schema = schema
        self.buffers: list[list[pa.Table]] = [[] for _ in range(buckets)]
        self.buffered = 0
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        self.rows = Counter()

    def add(self, table: pa.Table, bucket_ids: pa.Array | None):
        if bucket_ids is None:
            self.buffers[0].append(table)
        else:
            # One reordering by bucket, then zero-copy slices (cheaper than a filter per bucket).
            order = pc.sort_indices(bucket_ids)
            table = table.take(order)
            counts = np.bincount(bucket_ids.to_numpy(), minlength=len(self.buffers))
            offset = 0
            for b, n in enumerate(counts.tolist()):
                if n:
                    self.buffers[b].append(table.slice(offset, n))
                offset += n
        self.buffered += table.num_rows
        if self.buffered >= STAGE_FLUSH_ROWS:
            self.flush()

    def flush(self):
        for b, parts in enumerate(self.buffers):
            if not parts:
                continue
            if b not in self.writers:
                os.makedirs(os.path.dirname(self.paths[b]), exist_ok=True)
                self.writers[b] = pa.ipc.new_file(self.paths[b] + ".tmp", self.schema)
            t = pa.concat_tables(parts)
            self.writers[b].write_table(t)
            self.rows[b] += t.num_rows
            self.buffers[b] = []
        self.buffered = 0

    def commit(self) -> dict[int, tuple[str, int]]:
        self.flush()
        for b, w in self.writers.items():
            w.close()
            os.replace(self.paths[b] + ".tmp", self.paths[b])
        return {b: (self.paths[b], self.rows[b]) for b in self.writers}

    def abort(self):
        for b, w in self.writers.items():
            w.close()
            os.remove(self.paths[b] + ".tmp")


_decoders: dict[tuple[type[EventDecoder], EventSchema], EventDecoder] = {}


def _decoder(variant: type[EventDecoder], schema: EventSchema) -> EventDecoder:
    """One decoder per class and schema in a worker process: building one compiles the schema."""
    if (variant, schema) not in _decoders:
        _decoders[variant, schema] = variant(schema)
    return _decoders[variant, schema]


# The crc32 of each staged row's id: it picks the row's bucket, and in stage 2 only rows whose
# crc32 repeats are compared by id. Not a valid field name (those start with a letter).
ID_CRC32 = "_id_crc32"


def _id_crc32s(ids: pa.Array) -> np.ndarray:
    # crc32 is stable across processes and runs (Python's hash() is not).
    return np.fromiter(map(zlib.crc32, ids.cast(pa.binary()).to_pylist()), np.uint32, len(ids))


def staging_schema(schema: pa.Schema) -> pa.Schema:
    """The events' schema as staged: without source_ref, the same for every row of a staging file
    (with the bench's local paths, a third of the bytes staged, each written and faulted into the
    page cache for nothing), and with each id's crc32."""
    return schema.remove(schema.get_field_index("source_ref")).append(pa.field(ID_CRC32, pa.uint32()))


def parse_file(job: ParseJob, task: FileTask, decoder: type[EventDecoder] = EventDecoder) -> FileResult:
    """Stage 1 for one raw file. `decoder`: the class that validates its lines (a module-level
    class, so worker processes can import it: `EventDecoder`, or a variant such as the demo's)."""
    return _FileParse(job, task, _decoder(decoder, job.schema)).run()


class _FileParse:
    """One raw file's lines, batch by batch: events of the target day staged by bucket; from the
    file's home partition, bad lines quarantined and other days' events routed to their owner or,
    outside every owner's window, quarantined; from a neighbour's, all else left to its owner."""

    def __init__(self, job: ParseJob, task: FileTask, decoder: EventDecoder):
        self.job, self.task, self.decoder = job, task, decoder
        self.time_field = job.schema.time_field
        self.result = FileResult(source_ref=task.source_ref, home=task.home)
        self.stage = _StageWriter(job.stage_dir, task.file_index, job.buckets, staging_schema(decoder.arrow_schema))
        self.quarantine = None
        if task.home:
            qpath = os.path.join(job.stage_dir, "quarantine", f"f{task.file_index:06d}.parquet")
            os.makedirs(os.path.dirname(qpath), exist_ok=True)
            self.quarantine = _QuarantineWriter(qpath, job.schema.max_quarantine_rows_per_reason)
        # This file is in the scan window of the event days listed here (its own day is always one).
        self.owners = {
            d
            for d in (job.day - timedelta(days=1), job.day, job.day + timedelta(days=1))
            if scan_window(d, job.early, job.late)[0] <= task.arrival < scan_window(d, job.early, job.late)[1]
        }

    def run(self) -> FileResult:
        schema = self.job.schema
        try:
            for start, lines in iter_line_batches(
                self.task.path, schema.max_line_bytes, max_bytes=schema.max_file_bytes, max_lines=schema.max_file_lines
            ):
                self.batch(start, lines)
        except RawFileError as err:
            self.reject(err)
        else:
            self.result.staged = self.stage.commit()
        if self.quarantine is not None and self.quarantine.close():
            self.result.quarantine_file = self.quarantine.path
        return self.result

    def batch(self, start: int, lines: list) -> None:
        task, result = self.task, self.result
        if start == 1 and isinstance(lines[0], bytes) and lines[0].startswith(b"\xef\xbb\xbf"):
            lines[0] = lines[0][3:]  # a UTF-8 byte order mark is not part of the JSON
        result.lines += len(lines)
        table, bad, other_days = self.decoder.decode_batch(
            start, lines, task.source_ref, None if task.home else self.job.day
        )
        result.neighbour_skipped += other_days
        if task.home:
            for no, reason, detail, sample in bad:
                self.quarantine.add(task.source_ref, no, reason, detail, sample)
                result.quarantined[reason] += 1
        else:
            result.neighbour_skipped += len(bad)
        mine = pc.equal(pc.cast(table.column(self.time_field), pa.date32()), pa.scalar(self.job.day, pa.date32()))
        kept = table if pc.all(mine).as_py() else table.filter(mine)  # most batches: no copy
        if kept.num_rows:
            crc32s = _id_crc32s(kept.column(self.job.schema.id_field).combine_chunks())
            kept = kept.drop_columns(["source_ref"]).append_column(ID_CRC32, pa.array(crc32s))
            self.stage.add(
                kept, pa.array((crc32s % self.job.buckets).astype(np.uint16)) if self.job.buckets > 1 else None
            )
            result.kept += kept.num_rows
        other = table.num_rows - kept.num_rows
        if other and task.home:
            self.route(table.filter(pc.invert(mine)), lines, start)
        elif other:
            result.neighbour_skipped += other

    def route(self, others: pa.Table, lines: list, start: int) -> None:
        """The home file's events of other days: counted as routed out to the neighbour whose
        window the file is in, quarantined when no neighbour scans it."""
        days = pc.cast(others.column(self.time_field), pa.date32())
        for (d,), n in Counter(zip(days.to_pylist())).items():
            if d in self.owners:
                self.result.routed_out[d.isoformat()] += n
        outside = others.filter(pc.invert(pc.is_in(days, value_set=pa.array(sorted(self.owners), pa.date32()))))
        times = outside.column(self.time_field).cast(pa.string()).to_pylist()
        for no, t in zip(outside.column("line_no").to_pylist(), times):
            self.quarantine.add(
                self.task.source_ref,
                no,
                "outside_lateness_window",
                f"event time {t} is too far from arrival {self.task.arrival.isoformat()}",
                lines[no - start][:SAMPLE_BYTES],
            )
            self.result.quarantined["outside_lateness_window"] += 1

    def reject(self, err: RawFileError) -> None:
        """A file that cannot be read to its end is rejected whole: none of its events count."""
        result = self.result
        self.stage.abort()
        result.kept = 0
        result.routed_out.clear()
        result.staged = {}
        lines_read, _, _ = count_lines(self.task.path)
        result.lines = lines_read
        if self.task.home:
            self.quarantine.discard()
            result.quarantined = Counter({err.reason: lines_read})
            self.quarantine.add(self.task.source_ref, None, err.reason, err.detail, b"", lines_read)
        else:
            result.quarantined.clear()
            result.neighbour_skipped = lines_read


# --------------------------------------------------------------------------------------------
# Stage 2: de-duplicate each bucket and write Parquet per event type


@dataclass
class DedupeResult:
    rows_in: int
    rows_out: int
    rows_by_type: dict[str, int]
    files: list[str]


# pyarrow's Parquet writer: DuckDB's COPY of the same rows cost ~4x the CPU (measured on the
# bench's 2M events; its cost did not depend on the codec). Dictionaries off: the per-type files'
# repeated values compress as well under zstd, without paying for dictionaries that ids and
# payloads overflow.
_PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": False, "row_group_size": 122_880}


def dedupe_buckets(
    schema: EventSchema, staged: dict[int, list[tuple[str, str]]], out_dir: str, day: date, threads: int
) -> DedupeResult:
    """Write `<out_dir>/type=<t>/day=<day>/part-<bucket>.parquet`: the first copy of each id wins.

    "First" is the lowest (source_ref, line_no), so re-runs pick the same row. `threads` threads
    write the files (pyarrow filters, encodes and compresses without the GIL) while the next
    bucket's losing copies are found; at most two buckets are open, which bounds memory by the
    bucket size, not the day's.
    """
    rows_in = rows_out = 0
    rows_by_type: Counter = Counter()
    files: list[str] = []

    def write(bucket: int, table: pa.Table, refs: pa.Array, keep: pa.Array, t: str) -> tuple[str, str, int]:
        part = table.filter(pc.and_(pc.equal(table.column(schema.type_field), t), keep))
        if not part.num_rows:  # every row of the type lost to a copy of another type
            return t, "", 0
        part = _with_source_ref(part, refs)
        # Types were checked against SAFE_TYPE_VALUE while parsing, so they are safe in a path.
        dest = Path(out_dir, f"type={t}", f"day={day.isoformat()}", f"part-{bucket:04d}.parquet")
        dest.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, f"{dest}.tmp", **_PARQUET_OPTIONS)
        os.replace(f"{dest}.tmp", dest)  # a file under its final name is complete
        return t, str(dest), part.num_rows

    def collect(writes: list) -> None:
        nonlocal rows_out
        for w in writes:
            t, dest, n = w.result()
            if n:
                rows_by_type[t] += n
                rows_out += n
                files.append(dest)

    open_buckets: deque[list] = deque()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for bucket in sorted(staged):
            if len(open_buckets) == 2:
                collect(open_buckets.popleft())
            table, refs = _staged_table(staged[bucket])
            rows_in += table.num_rows
            keep = np.ones(table.num_rows, bool)
            keep[_losers(table, schema.id_field, refs)] = False
            table = table.drop_columns([ID_CRC32])
            types = sorted(pc.unique(table.column(schema.type_field)).to_pylist())
            open_buckets.append([pool.submit(write, bucket, table, refs, pa.array(keep), t) for t in types])
        while open_buckets:
            collect(open_buckets.popleft())
    return DedupeResult(rows_in, rows_out, dict(rows_by_type), sorted(files))


def _losers(table: pa.Table, id_field: str, refs: pa.Array) -> np.ndarray:
    """Row positions of every copy of an id but the first by (source_ref, line_no). Duplicates
    are rare, so only the candidates are compared by id: the rows whose id's crc32 (staged with
    the row) repeats. Sorting integers costs a fraction of hashing every id string."""
    crc32s = table.column(ID_CRC32)
    ordered = np.sort(crc32s.to_numpy())
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeated):
        return np.empty(0, np.int64)
    candidate = pc.is_in(crc32s, value_set=pa.array(repeated))
    copies = (
        table.select([id_field, FILE_NO, "line_no"])
        .filter(candidate)  # chunk by chunk; a take would first join the chunks
        .append_column("row", pc.indices_nonzero(candidate))
    )
    copies = _with_source_ref(copies, refs).sort_by(
        [(id_field, "ascending"), ("source_ref", "ascending"), ("line_no", "ascending")]
    )
    sorted_ids = copies.column(id_field).to_numpy(zero_copy_only=False)
    later = np.concatenate([[False], sorted_ids[1:] == sorted_ids[:-1]])  # not the first of its id
    return copies.column("row").to_numpy()[later]


# Stage 2's own column: the number of the staging file a row came from, which names its source_ref.
FILE_NO = "_file_no"


def _staged_table(files: list[tuple[str, str]]) -> tuple[pa.Table, pa.Array]:
    """A bucket's staging files, (path, source_ref of its raw file), memory-mapped (the columns
    are read in place), each row with its file's number; and the files' source_refs by number."""
    tables = [pa.ipc.open_file(pa.memory_map(path)).read_all() for path, _ in files]
    numbers = pa.chunked_array([np.full(t.num_rows, i, np.int32) for i, t in enumerate(tables)], pa.int32())
    return pa.concat_tables(tables).append_column(FILE_NO, numbers), pa.array([r for _, r in files], pa.string())


def _with_source_ref(table: pa.Table, refs: pa.Array) -> pa.Table:
    """The rows' source_ref, from their file's number, in its place before line_no: built for the
    rows written (or compared) only, not for the whole bucket."""
    source_refs = refs.take(table.column(FILE_NO))
    table = table.drop_columns([FILE_NO])
    return table.add_column(table.schema.get_field_index("line_no"), "source_ref", source_refs)


# --------------------------------------------------------------------------------------------
# Orchestration for one day


@dataclass
class ParseResult:
    files: list[FileResult]
    dedupe: DedupeResult
    quarantine_files: list[str]
    stage1_seconds: float = 0.0
    stage2_seconds: float = 0.0

    @property
    def home_lines(self) -> int:
        return sum(f.lines for f in self.files if f.home)

    @property
    def routed_in(self) -> int:
        return sum(f.kept for f in self.files if not f.home)

    @property
    def routed_out(self) -> Counter:
        total = Counter()
        for f in self.files:
            if f.home:
                total.update(f.routed_out)
        return total

    @property
    def quarantined(self) -> Counter:
        total = Counter()
        for f in self.files:
            total.update(f.quarantined)
        return total

    @property
    def duplicates(self) -> int:
        return self.dedupe.rows_in - self.dedupe.rows_out


def worker_pool(workers: int) -> ProcessPoolExecutor | None:
    """Processes for stage 1; spawned, because the caller may be a threaded Dagster process."""
    if workers <= 1:
        return None
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_start_worker)


def _start_worker() -> None:
    _skip_pandas()
    _keep_freed_memory()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep what a batch frees for the next one. By default a block over 128 kB
    (a read chunk, a batch's buffers) is mapped fresh and unmapped when freed, so each batch faults
    its pages in again; on a VM that hands freed memory back to its host a first touch costs ~2 s a
    GB, and the workers' kernel time fell by a fifth (`./dev bench`, alternating runs). A worker's
    memory then stays at its peak, which bounds it anyway. A no-op where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)


class _NoPandas:
    """A module finder that refuses pandas (see `_skip_pandas`)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pandas":
            raise ModuleNotFoundError("pandas is not imported by parse workers", name=name)
        return None


def _skip_pandas() -> None:
    """pyarrow imports pandas on its first conversion of a Python list, only to ask whether the
    list is a pandas object; that import is about 0.3 s of a worker's CPU. Lines never are: let
    pyarrow find no pandas once, and stop asking. A later explicit `import pandas` still works."""
    sys.meta_path.insert(0, _NoPandas)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(_NoPandas)


def parse_day(
    job: ParseJob,
    tasks: list[FileTask],
    out_dir: str,
    workers: int,
    on_progress=None,
    pool: ProcessPoolExecutor | None = None,
    decoder: type[EventDecoder] = EventDecoder,
) -> ParseResult:
    """Parse all files scanned by one event day and write its outputs under out_dir. `decoder`:
    see `parse_file`."""
    os.makedirs(job.stage_dir, exist_ok=True)
    t0 = time.perf_counter()
    own_pool = pool is None and workers > 1 and len(tasks) > 1
    if own_pool:
        pool = worker_pool(workers)
    try:
        n = len(tasks)
        mapped = (
            pool.map(parse_file, [job] * n, tasks, [decoder] * n)
            if pool
            else (parse_file(job, t, decoder) for t in tasks)
        )
        results: list[FileResult] = []
        for r in mapped:
            results.append(r)
            if on_progress:
                on_progress(r)
    finally:
        if own_pool:
            pool.shutdown()
    staged: dict[int, list[tuple[str, str]]] = {}
    for r in results:
        for b, (path, _rows) in r.staged.items():
            staged.setdefault(b, []).append((path, r.source_ref))
    t1 = time.perf_counter()
    dedupe = dedupe_buckets(job.schema, staged, out_dir, job.day, threads=workers)
    quarantine_files = [r.quarantine_file for r in results if r.quarantine_file]
    return ParseResult(results, dedupe, quarantine_files, t1 - t0, time.perf_counter() - t1)
