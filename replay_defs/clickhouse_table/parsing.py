"""Table sources (the billing reprocessing reads one): a day of a ClickHouse table, read by keyset
pagination, turned into events by the spec's declarative `Mapping`.

- `TableSelection`: which rows of a day (equality filters named by the source, a time window).
- `KeysetReader`: `count()` the selected rows, and `batches()` of at most `batch_size` rows in
  ORDER BY order: `WHERE (k1, ..., kn) > (last keys) ORDER BY k1, ..., kn LIMIT n` with FINAL
  (the tuple comparison spelled out so the primary key prunes what earlier pages read), so
  memory is bounded by the batch, each query starts where the last ended (never OFFSET), rows with
  equal timestamps are told apart by the rest of the key, and a ReplacingMergeTree yields only the
  latest version of a row.
- `Transformer`: a batch of rows -> events of the schema, rows dropped by a named rule, and rows
  that could not be transformed (malformed payload, wrong types), each with its reason.
- `parse_table_day`: the whole day, written as the parsed Parquet by type plus a quarantine file.

Every value reaches SQL as a `{name:Type}` parameter; identifiers come from the validated spec.
"""

from __future__ import annotations

import gc
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from replay_defs.core.clickhouse import ClickHouse, quote_ident
from replay_defs.core.pacing import read_ahead
from replay_defs.jsonl_files.parsing import QUARANTINE_SCHEMA, event_arrow_schema
from replay_defs.pipeline.spec import SAFE_TYPE_VALUE, ClickHouseSourceSpec, PipelineSpec

# Reasons a row could not be transformed (the mapping's rules name the drops).


def _utc(value: str | datetime | None) -> datetime | None:
    if value is None or value == "":
        return None
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone: give one (e.g. 2024-01-01T00:00:00Z)")
    return dt.astimezone(timezone.utc)


@dataclass(frozen=True)
class TableSelection:
    """Which rows of a day are read: `filters` (filter name -> value, only those set) and the
    window [start, end) within the day."""

    filters: dict[str, str] = field(default_factory=dict)
    start: datetime | None = None
    end: datetime | None = None

    @staticmethod
    def of(source: ClickHouseSourceSpec, filters: dict[str, str | None], start=None, end=None) -> "TableSelection":
        unknown = set(filters) - set(source.filters)
        if unknown:
            raise ValueError(f"unknown filters {sorted(unknown)}; this source has {sorted(source.filters)}")
        sel = TableSelection({k: v for k, v in filters.items() if v is not None and v != ""}, _utc(start), _utc(end))
        if sel.start and sel.end and sel.end <= sel.start:
            raise ValueError(f"end {sel.end.isoformat()} is not after start {sel.start.isoformat()}")
        return sel

    def window(self, day: str) -> tuple[datetime, datetime]:
        d = date.fromisoformat(day)
        lo = datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
        hi = lo + timedelta(days=1)
        return max(lo, self.start or lo), min(hi, self.end or hi)

    def to_json(self) -> dict:
        return {
            "filters": dict(sorted(self.filters.items())),
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
        }

    @staticmethod
    def from_json(d: dict) -> "TableSelection":
        return TableSelection(dict(d["filters"]), _utc(d["start"]), _utc(d["end"]))


class KeysetReader:
    def __init__(
        self,
        ch: ClickHouse,
        source: ClickHouseSourceSpec,
        day: str,
        selection: TableSelection,
        batch_size: int = 10_000,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.ch, self.source, self.day, self.selection, self.batch_size = ch, source, day, selection, batch_size
        rows = ch.rows(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = {table:String}",
            {"table": source.table},
        )
        self.types = dict(rows)
        missing = [c for c in source.columns if c not in self.types]
        if missing:
            raise ValueError(f"table {source.table!r} ({ch.where}, database {ch.database}) lacks columns {missing}")
        self.queries = self.pages = 0

    def _where(self) -> tuple[list[str], dict]:
        s, sel = self.source, self.selection
        lo, hi = sel.window(self.day)
        t = self.types[s.time_column]
        conds = [f"{quote_ident(s.time_column)} >= {{lo:{t}}}", f"{quote_ident(s.time_column)} < {{hi:{t}}}"]
        params: dict = {"lo": lo, "hi": hi}
        for name, value in sorted(sel.filters.items()):
            col = s.filters[name]
            conds.append(f"{quote_ident(col)} = {{f_{name}:{self.types[col]}}}")
            params[f"f_{name}"] = value
        return conds, params

    def _beyond(self, i: int, prefix: str, op: str) -> str:
        """`(k_i, ..., k_n) op (prefix_i, ..., prefix_n)` for op `>` or `<=`, spelled out as
        `k_i > x OR (k_i = x AND ...)`: the same lexicographic order, in a form ClickHouse's
        primary-key analysis uses to skip granules outside the page (with the tuple form every
        page scans the whole day)."""
        k, value = quote_ident(self.source.order_by[i]), f"{{{prefix}{i}:{self.types[self.source.order_by[i]]}}}"
        if i == len(self.source.order_by) - 1:
            return f"{k} {op} {value}"
        strict = ">" if op == ">" else "<"
        return f"({k} {strict} {value} OR ({k} = {value} AND {self._beyond(i + 1, prefix, op)}))"

    def _from(self) -> str:
        return quote_ident(self.source.table) + (" FINAL" if self.source.final else "")

    def count(self) -> int:
        """The selected rows, counted by the engine (independently of the reader)."""
        lo, hi = self.selection.window(self.day)
        if hi <= lo:
            return 0
        conds, params = self._where()
        return int(self.ch.rows(f"SELECT count() FROM {self._from()} WHERE {' AND '.join(conds)}", params)[0][0])

    def batches(self, extra: str = "", extra_params: dict | None = None) -> Iterator[pa.Table]:
        """Pages of at most `batch_size` rows, in key order; `extra`: more select items (`expr AS
        name, ...`) the engine evaluates on each page's rows, with their `extra_params` (evaluated
        eagerly: with short-circuit evaluation, a subexpression shared by the branches of an `if`
        is computed again in each, measured 3x the page's time with a JSONExtract in them).

        With FINAL, each page is two queries: the page's last key U, from the next `batch_size`
        stored rows after the previous page (without FINAL: a cheap key-only read in order), then
        the rows with last < key <= U with FINAL, so the engine merges the versions of that range
        only. Versions of one key collapse, so a page holds at most `batch_size` rows; the next
        page starts after U. Without FINAL, a page is `key > last ORDER BY key LIMIT batch_size`."""
        lo, hi = self.selection.window(self.day)
        if hi <= lo:
            return
        keys = self.source.order_by
        conds, params = self._where()
        key_list = ", ".join(quote_ident(k) for k in keys)
        select = ", ".join([*(quote_ident(c) for c in self.source.columns), *([extra] if extra else [])])
        table = quote_ident(self.source.table)
        params.update(extra_params or {}, limit=self.batch_size)
        settings = " SETTINGS short_circuit_function_evaluation = 'disable'" if extra else ""
        last = None
        while True:
            where = " AND ".join(conds + ([self._beyond(0, "k", ">")] if last is not None else []))
            bound = {f"k{i}": v for i, v in enumerate(last or ())}
            if self.source.final:
                upper = self.ch.query(
                    f"SELECT {key_list} FROM (SELECT {key_list} FROM {table} WHERE {where} ORDER BY {key_list} LIMIT {{limit:UInt64}}) "
                    f"ORDER BY {', '.join(quote_ident(k) + ' DESC' for k in keys)} LIMIT 1",
                    {**params, **bound},
                )
                self.queries += 1
                if upper.num_rows == 0:
                    return
                top = [upper.column(k)[0].as_py() for k in keys]
                page = self.ch.query(
                    f"SELECT {select} FROM {table} FINAL WHERE {where} AND {self._beyond(0, 'u', '<=')} ORDER BY {key_list}"
                    + settings,
                    {**params, **bound, **{f"u{i}": v for i, v in enumerate(top)}},
                )
                self.queries += 1
                if page.num_rows:
                    self.pages += 1
                    yield page
                last = top
            else:
                page = self.ch.query(
                    f"SELECT {select} FROM {table} WHERE {where} ORDER BY {key_list} LIMIT {{limit:UInt64}}" + settings,
                    {**params, **bound},
                )
                self.queries += 1
                if page.num_rows:
                    self.pages += 1
                    yield page
                if page.num_rows < self.batch_size:
                    return
                end = page.slice(page.num_rows - 1, 1)
                last = [end.column(k)[0].as_py() for k in keys]


# ---- the mapping ------------------------------------------------------------------------------


def _has(v) -> bool:
    return v is not None and v != ""


def _dig(doc, parts: tuple[str, ...]):
    for p in parts:
        if type(doc) is not dict:
            return None
        doc = doc.get(p)
    return doc


def _dig_all(docs: list, parts: tuple[str, ...]) -> list:
    """`_dig` over a column of documents (None for rows whose payload did not decode); the
    common depths are comprehensions, without a call per row."""
    if len(parts) == 1:
        (a,) = parts
        return [d.get(a) if d is not None else None for d in docs]
    if len(parts) == 2:
        a, b = parts
        return [x.get(b) if d is not None and type(x := d.get(a)) is dict else None for d in docs]
    if len(parts) == 3:
        a, b, c = parts
        return [
            y.get(c) if d is not None and type(x := d.get(a)) is dict and type(y := x.get(b)) is dict else None
            for d in docs
        ]
    return [_dig(d, parts) for d in docs]


class Transformer:
    """Applies a spec's `Mapping` to batches of source rows, column by column: each path is
    resolved once per batch into a list, so per-row work is a few list lookups."""

    select, params = "", {}  # what it asks the page query for besides the source columns: nothing

    def __init__(self, spec: PipelineSpec):
        self.spec, self.source, self.mapping, self.schema = spec, spec.source, spec.mapping, spec.schema
        self.arrow_schema = event_arrow_schema(spec.schema)
        self._decode = msgspec.json.Decoder().decode
        self._encode = msgspec.json.Encoder().encode
        self.types = {f.name: f.type for f in spec.schema.fields}
        self.required = {f.name for f in spec.schema.fields if f.required}
        self.ref_prefix = f"clickhouse:{self.source.table}?{self.source.id_column}="
        for paths in (
            *(r.paths for r in self.mapping.rules),
            *self.mapping.fields.values(),
            *(p for obj in self.mapping.objects.values() for p in obj.values()),
        ):
            for path in paths:
                self._path(path)

    def compile(self) -> "Transformer":
        return self

    def _path(self, path: str) -> tuple[str, str | tuple[str, ...]]:
        head, _, rest = path.partition(".")
        if head == self.source.payload_column and rest:
            return "payload", tuple(rest.split("."))
        if path not in self.source.columns:
            raise ValueError(
                f"mapping path {path!r} is neither a column of {self.source.table} nor inside {self.source.payload_column}"
            )
        return "column", path

    def _coerce(self, name: str, v):
        t = self.types[name]
        if t == "string":
            if isinstance(v, str):
                return v
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return str(v)
        elif t == "int":
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lstrip("-").isdigit():
                return int(v)
        elif t == "float":
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        elif t == "bool":
            if isinstance(v, bool):
                return v
        elif t == "timestamp":
            if isinstance(v, datetime):
                return v if v.tzinfo else v.replace(tzinfo=timezone.utc)
            if isinstance(v, str):
                try:
                    dt = datetime.fromisoformat(v)
                except ValueError:
                    dt = None
                if dt is not None and dt.tzinfo is not None:
                    return dt.astimezone(timezone.utc)
        elif t == "json":
            return self._encode(v).decode()
        raise TypeError(f"{name}: {type(v).__name__} {str(v)[:80]!r} is not a valid {t}")

    def run(
        self, rows: pa.Table, first_no: int, line_nos: list[int] | None = None
    ) -> tuple[pa.Table, list[tuple], Counter, Counter]:
        """(events, quarantine rows, dropped by rule, errors by reason) for one batch; quarantine
        rows follow QUARANTINE_SCHEMA, `line_no` being the row's position in the day's read order
        (`first_no` onwards, or each row's own in `line_nos`).

        The cyclic garbage collector is paused meanwhile: decoding a batch creates hundreds of
        thousands of dicts (no cycles), and each collection they trigger re-scans all of them
        (measured: 1.3-1.5x the batch's time)."""
        paused = gc.isenabled()
        gc.disable()
        try:
            return self._run(rows, line_nos or range(first_no, first_no + rows.num_rows))
        finally:
            if paused:
                gc.enable()

    def _run(self, rows: pa.Table, line_nos) -> tuple[pa.Table, list[tuple], Counter, Counter]:
        batch = _MappedBatch(self, rows, line_nos)
        batch.decode_payloads()
        dropped = batch.apply_rules()
        out, direct = batch.map_fields()
        batch.map_objects(out)
        for name, value in self.mapping.constants.items():
            out[name] = [value] * rows.num_rows
        batch.check_types(out, direct)
        errors = Counter(r for r in batch.reasons if r is not None and r not in dropped)
        return batch.events(out, direct), batch.quarantine(), dropped, errors


class _MappedBatch:
    """One batch of source rows on its way through the mapping. `reasons[i]` says why row i is
    quarantined (None: kept so far) and `details[i]` how; the first reason found wins."""

    def __init__(self, transformer: Transformer, rows: pa.Table, line_nos):
        self.t, self.rows, self.n, self.line_nos = transformer, rows, rows.num_rows, line_nos
        self.reasons: list[str | None] = [None] * self.n
        self.details: list[str | None] = [None] * self.n
        self.docs: list = [None] * self.n  # the decoded payloads (None where it did not decode)
        self._values: dict[str, list] = {}
        self.ref_prefix = transformer.ref_prefix

    def decode_payloads(self) -> None:
        column = self.t.source.payload_column
        reasons, details, docs, decode = self.reasons, self.details, self.docs, self.t._decode
        for i, raw in enumerate(self.rows.column(column).to_pylist()):
            try:
                doc = decode(raw) if raw is not None else None
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                reasons[i], details[i] = "malformed_json", f"{column}: {exc}"
                continue
            except RecursionError as exc:  # nested deeper than the decoder's stack allows
                reasons[i], details[i] = "nesting_too_deep", f"{column}: {exc}"
                continue
            if type(doc) is not dict:
                reasons[i], details[i] = "not_an_object", f"{column} is not a JSON object"
                continue
            docs[i] = doc

    def values(self, path: str) -> list:
        """A mapping path's value per row (a column, or a path inside the payload), resolved once."""
        if path not in self._values:
            kind, ref = self.t._path(path)
            self._values[path] = self.rows.column(ref).to_pylist() if kind == "column" else _dig_all(self.docs, ref)
        return self._values[path]

    def first(self, paths: tuple[str, ...]) -> list:
        """Per row, the first of `paths` that has a value."""
        cols = [self.values(p) for p in paths]
        if len(cols) == 1:
            return [v if v != "" else None for v in cols[0]]
        return [next((v for v in vs if _has(v)), None) for vs in zip(*cols)]

    def apply_rules(self) -> Counter:
        """The mapping's rules: a row missing what a rule needs is dropped by it. Returns the drops by rule."""
        reasons, details, dropped = self.reasons, self.details, Counter()
        for rule in self.t.mapping.rules:
            cols = [self.values(p) for p in rule.paths]
            if len(cols) == 1:
                failed = [i for i, v in enumerate(cols[0]) if (v is None or v == "") and reasons[i] is None]
            else:
                test = any if rule.need == "any" else all
                failed = [i for i, vs in enumerate(zip(*cols)) if reasons[i] is None and not test(_has(v) for v in vs)]
            for i in failed:
                reasons[i], details[i] = rule.name, f"validation rule {rule.name} failed"
            if failed:
                dropped[rule.name] += len(failed)
        return dropped

    def map_fields(self) -> tuple[dict[str, list], dict[str, pa.Array]]:
        """The schema's mapped fields: (Python values by field, Arrow columns copied as they are)."""
        out: dict[str, list] = {}
        direct: dict[str, pa.Array] = {}  # fields copied from a column as they are, never made Python objects
        for name, paths in self.t.mapping.fields.items():
            col = self._column_as_is(name, paths)
            if col is not None:
                direct[name] = col
            else:
                out[name] = self._field_values(name, paths)
        return out, direct

    def _column_as_is(self, name: str, paths: tuple[str, ...]) -> pa.Array | None:
        """A string or timestamp field mapped from one column of the schema's Arrow type, cast
        without a Python object per row (its missing values marked); None for any other field."""
        t = self.t
        kind, ref = t._path(paths[0])
        want = t.arrow_schema.field(name).type
        if len(paths) != 1 or kind != "column" or t.types[name] not in ("string", "timestamp"):
            return None
        col = self.rows.column(ref).combine_chunks()
        if not castable_as_is(col.type, want):
            return None
        missing = pc.is_null(col) if t.types[name] == "timestamp" else pc.or_kleene(pc.is_null(col), pc.equal(col, ""))
        if name in t.required and pc.any(missing).as_py():
            for i in pc.indices_nonzero(missing).to_pylist():
                if self.reasons[i] is None:
                    self.reasons[i], self.details[i] = "missing_field", f"no value for required field {name}"
        return col.cast(want)

    def _field_values(self, name: str, paths: tuple[str, ...]) -> list:
        """A field's values, coerced to its type; a row without a required value or with a value
        of the wrong type gets its reason."""
        reasons, details = self.reasons, self.details
        vals, t = self.first(paths), self.t.types[name]
        required = name in self.t.required
        for i, v in enumerate(vals):
            if reasons[i] is not None:
                continue
            if v is None:
                if required:
                    reasons[i], details[i] = "missing_field", f"no value for required field {name}"
            elif not (t == "string" and type(v) is str) and not (t == "timestamp" and type(v) is datetime and v.tzinfo):
                try:
                    vals[i] = self.t._coerce(name, v)
                except TypeError as exc:
                    reasons[i], details[i] = "wrong_type", str(exc)
        return vals

    def map_objects(self, out: dict[str, list]) -> None:
        """Object fields: a JSON object of their members' values (members without a value left out)."""
        encode, reasons = self.t._encode, self.reasons
        for name, members in self.t.mapping.objects.items():
            keys = list(members)
            cols = [self.first(paths) for paths in members.values()]
            out[name] = [
                None if reasons[i] is not None else encode({k: v for k, v in zip(keys, vs) if v is not None}).decode()
                for i, vs in enumerate(zip(*cols))
            ]

    def check_types(self, out: dict[str, list], direct: dict[str, pa.Array]) -> None:
        """An event type must be able to name a directory of the lake."""
        type_field = self.t.schema.type_field
        types = direct[type_field].to_pylist() if type_field in direct else out[type_field]
        for i, t in enumerate(types):
            if self.reasons[i] is None and not SAFE_TYPE_VALUE.fullmatch(str(t)):
                self.reasons[i], self.details[i] = (
                    "unsafe_type",
                    f"{type_field} {str(t)[:80]!r} cannot name a directory",
                )

    def quarantine(self) -> list[tuple]:
        """The rows not kept, as QUARANTINE_SCHEMA rows."""
        bad = [i for i, r in enumerate(self.reasons) if r is not None]
        return quarantine_records(
            self.t, self.rows, bad, [self.line_nos[i] for i in bad], [(self.reasons[i], self.details[i]) for i in bad]
        )

    def events(self, out: dict[str, list], direct: dict[str, pa.Array]) -> pa.Table:
        """The kept rows as events of the schema, with their source reference and row number."""
        t = self.t
        keep = [i for i, r in enumerate(self.reasons) if r is None]
        take = pa.array(keep, pa.int64())
        arrays = [
            direct[f.name].take(take)
            if f.name in direct
            else pa.array([out[f.name][i] for i in keep], t.arrow_schema.field(f.name).type)
            for f in t.schema.fields
        ]
        ids = self.rows.column(t.source.id_column).take(take).cast(pa.string())
        arrays += [
            prefixed(self.ref_prefix, ids),
            pa.array([self.line_nos[i] for i in keep], pa.int64()),
        ]
        return pa.Table.from_arrays(arrays, schema=t.arrow_schema)


def castable_as_is(have: pa.DataType, want: pa.DataType) -> bool:
    """A column of type `have` is a field of type `want` as it is (a timestamp only changes unit)."""
    return have == want or (pa.types.is_timestamp(have) and pa.types.is_timestamp(want) and have.tz == want.tz)


def prefixed(prefix: str, values: pa.Array) -> pa.Array:
    """`prefix` + each string (the prefix as an array: joining with a scalar is ~100x slower)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    n = len(values)
    return pc.binary_join_element_wise(pa.repeat(prefix, n), values, pa.repeat("", n))


def quarantine_records(
    t: Transformer, rows: pa.Table, bad: list[int], line_nos: list[int], verdicts: list[tuple[str, str]]
) -> list[tuple]:
    """Rows `bad` of `rows` as QUARANTINE_SCHEMA rows: the source row as JSON, with its line number
    and (reason, detail)."""
    if not bad:
        return []
    encode, id_column = t._encode, t.source.id_column
    raws = rows.select(list(t.source.columns)).take(bad).to_pylist()
    return [
        (
            t.ref_prefix + str(raw[id_column]),
            line_no,
            reason,
            detail,
            encode({c: (v.isoformat() if isinstance(v, datetime) else v) for c, v in raw.items()}),
            1,
        )
        for raw, line_no, (reason, detail) in zip(raws, line_nos, verdicts)
    ]


# ---- a day -------------------------------------------------------------------------------------


class _DayFiles:
    """The day's output: a Parquet file per event type, and the quarantine file (each opened on
    its first row)."""

    def __init__(self, spec: PipelineSpec, day: str, out_root: str, quarantine_path: str, schema: pa.Schema):
        self.spec, self.day, self.out_root, self.quarantine_path = spec, day, out_root, quarantine_path
        self.schema = schema
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.qwriter: pq.ParquetWriter | None = None
        self.by_type: Counter = Counter()

    def write_events(self, events: pa.Table) -> None:
        types = events.column(self.spec.schema.type_field)
        for t in pc.unique(types).to_pylist():
            part = events.filter(pc.equal(types, t))
            if t not in self.writers:
                path = os.path.join(
                    self.out_root, self.spec.parsed_prefix, f"type={t}", f"day={self.day}", "part.parquet"
                )
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self.writers[t] = pq.ParquetWriter(path, self.schema, compression="zstd")
            self.writers[t].write_table(part)
            self.by_type[t] += part.num_rows

    def write_quarantine(self, rows: list[tuple]) -> None:
        if self.qwriter is None:
            os.makedirs(os.path.dirname(self.quarantine_path), exist_ok=True)
            self.qwriter = pq.ParquetWriter(self.quarantine_path, QUARANTINE_SCHEMA, compression="zstd")
        self.qwriter.write_table(
            pa.Table.from_arrays(
                [pa.array(c, t) for c, t in zip(zip(*rows), QUARANTINE_SCHEMA.types)],
                schema=QUARANTINE_SCHEMA,
            )
        )

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        if self.qwriter is not None:
            self.qwriter.close()


def parse_table_day(
    ch: ClickHouse,
    spec: PipelineSpec,
    day: str,
    selection: TableSelection,
    batch_size: int,
    out_root: str,
    quarantine_path: str,
    log=None,
) -> dict:
    """Read the day by keyset, transform it batch by batch, and write `<out_root>/<parsed_prefix>/type=<t>/day=<day>/
    part.parquet` per event type and the quarantine file. Returns the day's counts."""
    t0 = time.monotonic()
    from replay_defs.clickhouse_table.engine_mapping import EngineMapping  # it builds on this module

    reader = KeysetReader(ch, spec.source, day, selection, batch_size)
    # The engine parses the payloads in the page query where the mapping allows it.
    transformer = EngineMapping.of(spec, reader.types) or Transformer(spec)
    files = _DayFiles(spec, day, out_root, quarantine_path, transformer.arrow_schema)
    found = parsed = 0
    dropped, errors = Counter(), Counter()
    last_log = t0
    try:
        # The next page is read on a thread (the engine works outside the GIL) while this one is transformed.
        for batch in read_ahead(reader.batches(transformer.select, transformer.params)):
            events, quarantine, d, e = transformer.run(batch, found + 1)
            found += batch.num_rows
            dropped += d
            errors += e
            if events.num_rows:
                files.write_events(events)
                parsed += events.num_rows
            if quarantine:
                files.write_quarantine(quarantine)
            if log and time.monotonic() - last_log >= 5:
                last_log = time.monotonic()
                log(f"{day}: read {found:,} rows in {reader.queries} keyset queries, {parsed:,} events")
    finally:
        files.close()
    seconds = time.monotonic() - t0
    return {
        "found": found,
        "parsed": parsed,
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dict(sorted(dropped.items())),
        "transformation_errors": sum(errors.values()),
        "transformation_errors_by_reason": dict(sorted(errors.items())),
        "quarantined": sum(dropped.values()) + sum(errors.values()),
        "quarantined_by_reason": dict(sorted((dropped + errors).items())),
        "rows_by_type": dict(sorted(files.by_type.items())),
        "batches": reader.pages,
        "queries": reader.queries,
        "batch_size": batch_size,
        "duration_s": round(seconds, 3),
        "events_per_s": round(found / seconds) if seconds else 0,
    }
