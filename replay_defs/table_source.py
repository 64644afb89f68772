"""Table sources (seed 002): a day of a ClickHouse table, read by keyset pagination, turned into
events by the spec's declarative `Mapping`.

- `Selection`: which rows of a day (equality filters named by the source, a time window).
- `KeysetReader`: `count()` the selected rows, and `batches()` of at most `batch_size` rows in
  ORDER BY order: `WHERE (k1, ..., kn) > (last keys) ORDER BY k1, ..., kn LIMIT n` with FINAL, so
  memory is bounded by the batch, each query starts where the last ended (never OFFSET), rows with
  equal timestamps are told apart by the rest of the key, and a ReplacingMergeTree yields only the
  latest version of a row.
- `Transformer`: a batch of rows -> events of the schema, rows dropped by a named rule, and rows
  that could not be transformed (malformed payload, wrong types), each with its reason.
- `parse_table_day`: the whole day, written as the parsed Parquet by type plus a quarantine file.

Every value reaches SQL as a `{name:Type}` parameter; identifiers come from the validated spec.
"""

from __future__ import annotations

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

from replay_defs.clickhouse import ClickHouse, quote_ident
from replay_defs.parsing import QUARANTINE_SCHEMA, event_arrow_schema
from replay_defs.spec import SAFE_TYPE_VALUE, ClickHouseSource, PipelineSpec

# Reasons a row could not be transformed (the mapping's rules name the drops).
ERROR_REASONS = ("malformed_json", "not_an_object", "wrong_type", "missing_field", "unsafe_type")


def _utc(value: str | datetime | None) -> datetime | None:
    if value is None or value == "":
        return None
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone: give one (e.g. 2024-01-01T00:00:00Z)")
    return dt.astimezone(timezone.utc)


@dataclass(frozen=True)
class Selection:
    """Which rows of a day are read: `filters` (filter name -> value, only those set) and the
    window [start, end) within the day."""

    filters: dict[str, str] = field(default_factory=dict)
    start: datetime | None = None
    end: datetime | None = None

    @staticmethod
    def of(source: ClickHouseSource, filters: dict[str, str | None], start=None, end=None) -> "Selection":
        unknown = set(filters) - set(source.filters)
        if unknown:
            raise ValueError(f"unknown filters {sorted(unknown)}; this source has {sorted(source.filters)}")
        sel = Selection({k: v for k, v in filters.items() if v is not None and v != ""}, _utc(start), _utc(end))
        if sel.start and sel.end and sel.end <= sel.start:
            raise ValueError(f"end {sel.end.isoformat()} is not after start {sel.start.isoformat()}")
        return sel

    def window(self, day: str) -> tuple[datetime, datetime]:
        d = date.fromisoformat(day)
        lo = datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
        hi = lo + timedelta(days=1)
        return max(lo, self.start or lo), min(hi, self.end or hi)

    def to_json(self) -> dict:
        return {"filters": dict(sorted(self.filters.items())), "start": self.start.isoformat() if self.start else None,
                "end": self.end.isoformat() if self.end else None}

    @staticmethod
    def from_json(d: dict) -> "Selection":
        return Selection(dict(d["filters"]), _utc(d["start"]), _utc(d["end"]))


class KeysetReader:
    def __init__(self, ch: ClickHouse, source: ClickHouseSource, day: str, selection: Selection, batch_size: int = 10_000):
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
        self.queries = 0

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

    def _from(self) -> str:
        return quote_ident(self.source.table) + (" FINAL" if self.source.final else "")

    def count(self) -> int:
        """The selected rows, counted by the engine (independently of the reader)."""
        lo, hi = self.selection.window(self.day)
        if hi <= lo:
            return 0
        conds, params = self._where()
        return int(self.ch.rows(f"SELECT count() FROM {self._from()} WHERE {' AND '.join(conds)}", params)[0][0])

    def batches(self) -> Iterator[pa.Table]:
        lo, hi = self.selection.window(self.day)
        if hi <= lo:
            return
        keys = self.source.order_by
        conds, params = self._where()
        key_list = ", ".join(quote_ident(k) for k in keys)
        after = f"({key_list}) > ({', '.join(f'{{k{i}:{self.types[k]}}}' for i, k in enumerate(keys))})"
        select = ", ".join(quote_ident(c) for c in self.source.columns)
        base = f"SELECT {select} FROM {self._from()} WHERE {' AND '.join(conds)}"
        tail = f" ORDER BY {key_list} LIMIT {{limit:UInt64}}"
        params["limit"] = self.batch_size
        last = None
        while True:
            if last is None:
                table = self.ch.query(base + tail, params)
            else:
                table = self.ch.query(f"{base} AND {after}{tail}", {**params, **{f"k{i}": v for i, v in enumerate(last)}})
            self.queries += 1
            if table.num_rows:
                yield table
            if table.num_rows < self.batch_size:
                return
            end = table.slice(table.num_rows - 1, 1)
            last = [end.column(k)[0].as_py() for k in keys]


# ---- the mapping ------------------------------------------------------------------------------


def _has(v) -> bool:
    return v is not None and v != ""


class _Missing(Exception):
    pass


class Transformer:
    """Applies a spec's `Mapping` to batches of source rows."""

    def __init__(self, spec: PipelineSpec):
        self.spec, self.source, self.mapping, self.schema = spec, spec.source, spec.mapping, spec.schema
        self.arrow_schema = event_arrow_schema(spec.schema)
        self._decode = msgspec.json.Decoder().decode
        self._encode = msgspec.json.Encoder().encode
        self.types = {f.name: f.type for f in spec.schema.fields}
        self.required = {f.name for f in spec.schema.fields if f.required}

    def _getter(self, path: str):
        """A function (row columns, index, payload) -> value for a path."""
        head, _, rest = path.partition(".")
        if head == self.source.payload_column and rest:
            parts = rest.split(".")

            def get(cols, i, payload):
                v = payload
                for p in parts:
                    if not isinstance(v, dict):
                        return None
                    v = v.get(p)
                return v
            return get
        if path not in self.source.columns:
            raise ValueError(f"mapping path {path!r} is neither a column of {self.source.table} nor inside {self.source.payload_column}")
        return lambda cols, i, payload: cols[path][i]

    def compile(self) -> "Transformer":
        g = self._getter
        self._rules = [(r.name, [g(p) for p in r.paths], r.need == "any") for r in self.mapping.rules]
        self._fields = [(name, [g(p) for p in paths]) for name, paths in self.mapping.fields.items()]
        self._objects = [(name, [(k, [g(p) for p in paths]) for k, paths in obj.items()]) for name, obj in self.mapping.objects.items()]
        return self

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

    def run(self, rows: pa.Table, first_no: int) -> tuple[pa.Table, list[tuple], Counter, Counter]:
        """(events, quarantine rows, dropped by rule, errors by reason) for one batch; quarantine
        rows follow QUARANTINE_SCHEMA, `line_no` being the row's position in the day's read order."""
        if not hasattr(self, "_rules"):
            self.compile()
        s = self.source
        cols = {c: rows.column(c).to_pylist() for c in s.columns}
        payloads, ids = cols[s.payload_column], cols[s.id_column]
        out = {f.name: [] for f in self.schema.fields}
        refs, nos, quarantine = [], [], []
        dropped, errors = Counter(), Counter()
        constants = self.mapping.constants
        for i in range(rows.num_rows):
            reason = detail = None
            raw = payloads[i]
            try:
                payload = self._decode(raw) if raw is not None else None
                if not isinstance(payload, dict):
                    raise TypeError
            except (msgspec.DecodeError, UnicodeDecodeError, TypeError) as exc:
                reason = "not_an_object" if isinstance(exc, TypeError) else "malformed_json"
                detail = f"{s.payload_column}: {exc}" if reason == "malformed_json" else f"{s.payload_column} is not a JSON object"
                payload = None
            if reason is None:
                for name, getters, any_ in self._rules:
                    present = [_has(get(cols, i, payload)) for get in getters]
                    if not (any(present) if any_ else all(present)):
                        reason, detail = name, f"validation rule {name} failed"
                        dropped[name] += 1
                        break
            event = {}
            if reason is None:
                try:
                    for name, getters in self._fields:
                        v = next((x for x in (get(cols, i, payload) for get in getters) if _has(x)), None)
                        if v is None:
                            if name in self.required:
                                raise _Missing(name)
                            event[name] = None
                        else:
                            event[name] = self._coerce(name, v)
                    for name, members in self._objects:
                        obj = {}
                        for key, getters in members:
                            v = next((x for x in (get(cols, i, payload) for get in getters) if _has(x)), None)
                            if v is not None:
                                obj[key] = v
                        event[name] = self._encode(obj).decode()
                    for name, value in constants.items():
                        event[name] = value
                    if not SAFE_TYPE_VALUE.fullmatch(str(event[self.schema.type_field])):
                        reason, detail = "unsafe_type", f"{self.schema.type_field} {str(event[self.schema.type_field])[:80]!r} cannot name a directory"
                except _Missing as exc:
                    reason, detail = "missing_field", f"no value for required field {exc.args[0]}"
                except TypeError as exc:
                    reason, detail = "wrong_type", str(exc)
                if reason is not None:
                    errors[reason] += 1
            elif reason in ("malformed_json", "not_an_object"):
                errors[reason] += 1
            ref = f"clickhouse:{s.table}?{s.id_column}={ids[i]}"
            if reason is not None:
                sample = self._encode({c: (v.isoformat() if isinstance(v, datetime) else v) for c, v in ((c, cols[c][i]) for c in s.columns)})
                quarantine.append((ref, first_no + i, reason, detail, sample, 1))
                continue
            for name in out:
                out[name].append(event.get(name))
            refs.append(ref)
            nos.append(first_no + i)
        arrays = [pa.array(out[f.name], self.arrow_schema.field(f.name).type) for f in self.schema.fields]
        arrays += [pa.array(refs, pa.string()), pa.array(nos, pa.int64())]
        return pa.Table.from_arrays(arrays, schema=self.arrow_schema), quarantine, dropped, errors


# ---- a day -------------------------------------------------------------------------------------


def parse_table_day(ch: ClickHouse, spec: PipelineSpec, day: str, selection: Selection, batch_size: int, out_root: str,
                    quarantine_path: str, log=None) -> dict:
    """Read the day by keyset, transform it batch by batch, and write `<out_root>/<parsed_prefix>/type=<t>/day=<day>/
    part.parquet` per event type and the quarantine file. Returns the day's counts."""
    t0 = time.monotonic()
    reader = KeysetReader(ch, spec.source, day, selection, batch_size)
    transformer = Transformer(spec).compile()
    writers: dict[str, pq.ParquetWriter] = {}
    qwriter = None
    found = parsed = 0
    dropped, errors, by_type = Counter(), Counter(), Counter()
    type_field = spec.schema.type_field
    last_log = t0
    try:
        for batch in reader.batches():
            events, quarantine, d, e = transformer.run(batch, found + 1)
            found += batch.num_rows
            dropped += d
            errors += e
            if events.num_rows:
                types = events.column(type_field)
                for t in pc.unique(types).to_pylist():
                    part = events.filter(pc.equal(types, t))
                    if t not in writers:
                        path = os.path.join(out_root, spec.parsed_prefix, f"type={t}", f"day={day}", "part.parquet")
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        writers[t] = pq.ParquetWriter(path, transformer.arrow_schema, compression="zstd")
                    writers[t].write_table(part)
                    by_type[t] += part.num_rows
                parsed += events.num_rows
            if quarantine:
                if qwriter is None:
                    os.makedirs(os.path.dirname(quarantine_path), exist_ok=True)
                    qwriter = pq.ParquetWriter(quarantine_path, QUARANTINE_SCHEMA, compression="zstd")
                qwriter.write_table(pa.Table.from_arrays([pa.array(c, t) for c, t in zip(zip(*quarantine), QUARANTINE_SCHEMA.types)], schema=QUARANTINE_SCHEMA))
            if log and time.monotonic() - last_log >= 5:
                last_log = time.monotonic()
                log(f"{day}: read {found:,} rows in {reader.queries} keyset queries, {parsed:,} events")
    finally:
        for w in writers.values():
            w.close()
        if qwriter is not None:
            qwriter.close()
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
        "rows_by_type": dict(sorted(by_type.items())),
        "batches": reader.queries,
        "batch_size": batch_size,
        "duration_s": round(seconds, 3),
        "events_per_s": round(found / seconds) if seconds else 0,
    }
