"""A spec's `Mapping` evaluated with the JSON work done by ClickHouse in the keyset page query,
giving exactly what the Python `Transformer` gives: the same events, quarantine records and counts.

The page query parses each payload once (`JSONExtract` into a tuple of the mapping's paths, each
value as text), and for the payloads on which the engine's reading and Python's (msgspec) are known
to agree it evaluates the rules and the required fields (`__em_verdict`: 0 kept, i the i-th outcome)
and writes the object fields' JSON; Python only assembles the events. Every other row (verdict
PYTHON) goes through the Python `Transformer`, so no result depends on which path a row took.

A payload is *plain* when:
- it has no backslash: nothing is escaped, so a string's text is its value and its JSON is the text
  in quotes, and a key is spelled as it is;
- it starts with `{` (Python refuses a byte-order mark the engine skips) and has at most
  MAX_BRACKETS `{`/`[` (msgspec gives up on deep nesting; the engine goes deeper);
- each key of the mapping's paths occurs at most once (with a duplicate key the engine reads the
  first value, Python the last);
- no object on a path is an array (the engine reads a tuple from an array by position);
and the engine parsed it: some path has a value (from invalid JSON the engine reads nothing).

A value arrives as text: a string as it is, anything else as JSON. So a value that reads like a
number, `true`/`false`, an array or an object is ambiguous. In an object field a 64-bit integer
written canonically is the number it reads as unless the payload has a string of digits or a number
with a fraction or exponent as a member value (the engine prints 1.0 as 1; Python keeps 1.0); any
other ambiguous value sends the row to Python. Rules only ask whether a value is there (not null, not
""), which the text answers for every kind of value.
"""

from __future__ import annotations

import re
from collections import Counter

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from replay_defs.clickhouse_table.parsing import Transformer, castable_as_is, prefixed, quarantine_records
from replay_defs.core.clickhouse import quote_ident
from replay_defs.pipeline.spec import SAFE_TYPE_VALUE, PipelineSpec

MAX_BRACKETS = 256
PYTHON = 255  # the verdict of a row the Python transformer maps
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # keys that can name a tuple element and be counted as `"key"`
_NUMBER_DOUBT = r':\s*("-?[0-9]+"|-?[0-9]+[.eE])'  # a member that is a string of digits, or not an integer
# Among values separated by newlines (which no parsed JSON string holds raw): true/false, an array or
# object, a number with a fraction or exponent, or a string that reads like one of them.
_NOT_TEXT = r"\n(true\n|false\n|[\[{]|-?[0-9]+[.eE])"


class EngineMapping:
    """`of(spec, column types)` compiles the spec's mapping, or says None when the mapping uses
    what only the Python transformer does (a field from the payload, a rule on a column, a key that
    is not an identifier...). `select`/`params` go into the page query; `run(page, first_no)` is
    `Transformer.run` on such pages."""

    def __init__(self, spec: PipelineSpec, paths: dict[str, tuple[str, ...]], payload_nullable: bool):
        self.spec, self.mapping, self.python = spec, spec.mapping, Transformer(spec)
        self.arrow_schema = self.python.arrow_schema
        self.paths = paths  # mapping path -> keys inside the payload
        self.tree: dict = {}
        for keys in paths.values():
            node = self.tree
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = None
        # (reason, detail) of each verdict after 0, in the order they are tested
        self.outcomes = [(r.name, f"validation rule {r.name} failed") for r in self.mapping.rules] + [
            ("missing_field", f"no value for required field {name}")
            for name in self.mapping.fields
            if name in self.python.required
        ]
        self.select, self.params = self._sql(payload_nullable)

    @staticmethod
    def of(spec: PipelineSpec, column_types: dict[str, str]) -> "EngineMapping | None":
        m, schema, python = spec.mapping, spec.schema, Transformer(spec)
        payload_type = column_types.get(spec.source.payload_column)
        if payload_type not in ("String", "Nullable(String)"):
            return None
        fields = {f.name: f for f in schema.fields}
        if set(fields) != {*m.fields, *m.objects, *m.constants} or schema.type_field not in m.fields:
            return None
        for name, field_paths in m.fields.items():
            if len(field_paths) != 1 or python._path(field_paths[0])[0] != "column":
                return None
            if fields[name].type not in ("string", "timestamp"):
                return None
        if fields[schema.type_field].type != "string":
            return None
        paths = {}
        members = (p for obj in m.objects.values() for ps in obj.values() for p in ps)
        for path in (*(p for r in m.rules for p in r.paths), *members):
            kind, keys = python._path(path)
            if kind != "payload" or not all(_KEY.fullmatch(k) for k in keys):
                return None
            paths[path] = keys
        prefixes = {keys[:i] for keys in paths.values() for i in range(1, len(keys))}
        if any(keys in prefixes for keys in paths.values()):
            return None  # a path's value is also an object another path reads into
        return EngineMapping(spec, paths, payload_type.startswith("Nullable"))

    def _shape(self, node: dict) -> str:
        members = (
            f"{quote_ident(k)} " + ("Nullable(String)" if v is None else self._shape(v)) for k, v in node.items()
        )
        return "Tuple(" + ", ".join(members) + ")"

    def _leaf(self, keys: tuple[str, ...]) -> str:
        """A path's value as text (NULL: missing or null), from the payload parsed once per row."""
        expr, node = self._doc, self.tree
        for k in keys:
            expr, node = f"tupleElement({expr}, {list(node).index(k) + 1})", node[k]
        return expr

    def _present(self, path: str) -> str:
        """Python's `v is not None and v != ""`, on the value's text."""
        return f"ifNull({self._leaf(self.paths[path])} != '', 0)"

    def _text(self, path: str) -> str:
        return f"ifNull({self._leaf(self.paths[path])}, '')"

    def _member(self, paths: tuple[str, ...]) -> str:
        """The JSON of the first of `paths` with a value (NULL: none has one), on a row whose member
        values are strings or integers (`_sql`'s `plain`): an integer as it is, a string quoted."""
        json_of = []
        for path in paths:
            v = self._text(path)
            json_of += [self._present(path), f"if(match({v}, {{em_integer:String}}), {v}, concat('\"', {v}, '\"'))"]
        return f"multiIf({', '.join(json_of)}, NULL)"

    def _text_guards(self, payload: str, params: dict) -> list[str]:
        """The conditions on the payload's text that make it plain (see the module's docstring)."""
        keys = sorted({k for keys in self.paths.values() for k in keys})
        objects = sorted({keys[i] for keys in self.paths.values() for i in range(len(keys) - 1)})
        guards = [
            f"position({payload}, {{em_backslash:String}}) = 0",
            f"startsWith({payload}, '{{')",
            f"countSubstrings({payload}, '{{') + countSubstrings({payload}, '[') <= {MAX_BRACKETS}",
        ]
        for i, k in enumerate(keys):
            params[f"em_key{i}"] = f'"{k}"'
            guards.append(f"countSubstrings({payload}, {{em_key{i}:String}}) <= 1")
        for i, k in enumerate(objects):
            params[f"em_array{i}"] = f'"{k}"' + r"\s*:\s*\["
            guards.append(f"NOT match({payload}, {{em_array{i}:String}})")
        return guards

    def _failures(self) -> list[str]:
        """The condition of each outcome (`outcomes`), in order: the rules, then the required fields."""
        failures = []
        for rule in self.mapping.rules:
            has = f" {'OR' if rule.need == 'any' else 'AND'} ".join(self._present(p) for p in rule.paths)
            failures.append(f"NOT ({has})")
        for name in self.mapping.fields:
            if name in self.python.required:
                column = quote_ident(self.mapping.fields[name][0])
                timestamp = self.python.types[name] == "timestamp"
                failures.append(f"isNull({column})" if timestamp else f"ifNull({column}, '') = ''")
        return failures

    def _sql(self, payload_nullable: bool) -> tuple[str, dict]:
        """The page query's select items: `__em_verdict` (0: kept, i: outcome i, 255: Python maps
        the row) and `__em_object_<i>`, the object fields' JSON."""
        payload = quote_ident(self.spec.source.payload_column)
        self._doc = f"JSONExtract({payload}, {{em_shape:String}})"
        self._doubt = f"ifNull(match({payload}, {{em_doubt:String}}), 1)"
        params = {
            "em_shape": self._shape(self.tree),
            "em_backslash": "\\",
            "em_doubt": _NUMBER_DOUBT,
            "em_safe_type": SAFE_TYPE_VALUE.pattern,
            "em_integer": r"^-?[0-9]+$",
            "em_not_text": _NOT_TEXT,
        }
        plain = self._text_guards(payload, params)
        parsed = " OR ".join(f"isNotNull({self._leaf(keys)})" for keys in self.paths.values())
        type_column = quote_ident(self.mapping.fields[self.spec.schema.type_field][0])
        plain += [f"({parsed})", f"match(ifNull({type_column}, ''), {{em_safe_type:String}})"]
        # The object members' values are strings or integers: one regex over them all, one row at a time.
        member_paths = list(
            dict.fromkeys(p for obj in self.mapping.objects.values() for ps in obj.values() for p in ps)
        )
        if member_paths:
            values = ", '\\n', ".join(self._text(p) for p in member_paths)
            plain += [f"NOT match(concat('\\n', {values}, '\\n'), {{em_not_text:String}})", f"NOT {self._doubt}"]
        objects_sql = []
        for i, (name, members) in enumerate(self.mapping.objects.items()):
            parts = []
            for j, (key, paths) in enumerate(members.items()):
                params[f"em_member{i}_{j}"] = "," + msgspec.json.encode(key).decode() + ":"
                parts.append(f"ifNull(concat({{em_member{i}_{j}:String}}, {self._member(paths)}), '')")
            # `,"k":v` per member with a value; the first comma dropped
            objects_sql.append(f"concat('{{', substring(concat({', '.join(parts)}), 2), '}}') AS __em_object_{i}")
        failures = self._failures()
        verdicts = ", ".join(f"{f}, {i}" for i, f in enumerate(failures, 1))
        plain_sql = " AND ".join(plain)
        if payload_nullable:
            plain_sql = f"ifNull({plain_sql}, 0)"
        verdict = (
            f"if({plain_sql}, multiIf({verdicts}, 0), {PYTHON}) AS __em_verdict"
            if failures
            else f"if({plain_sql}, 0, {PYTHON}) AS __em_verdict"
        )
        return ", ".join([verdict, *objects_sql]), params

    def run(self, page: pa.Table, first_no: int) -> tuple[pa.Table, list[tuple], Counter, Counter]:
        """`Transformer.run` on a page read with `select`: the plain rows here, the others by Python."""
        rows = page.select(list(self.spec.source.columns))
        direct = self._direct_columns(rows)
        if direct is None:  # a column of another type than its field's: Python converts it
            return self.python.run(rows, first_no)
        verdicts = page.column("__em_verdict").to_numpy()
        keep = np.flatnonzero(verdicts == 0)
        events = self._events(page, keep, first_no, direct)
        bad = np.flatnonzero((verdicts > 0) & (verdicts < PYTHON))
        verdicts_of_bad = [self.outcomes[v - 1] for v in verdicts[bad]]
        quarantine = quarantine_records(self.python, rows, bad.tolist(), (bad + first_no).tolist(), verdicts_of_bad)
        rule_names = {r.name for r in self.mapping.rules}
        dropped = Counter(reason for reason, _ in verdicts_of_bad if reason in rule_names)
        others = np.flatnonzero(verdicts == PYTHON)
        if len(others):
            py_events, py_quarantine, py_dropped, _ = self.python.run(
                rows.take(others), first_no, (others + first_no).tolist()
            )
            events = pa.concat_tables([events, py_events])
            events = events.take(pc.sort_indices(events.column("line_no")))
            quarantine = sorted(quarantine + py_quarantine, key=lambda q: q[1])
            dropped += py_dropped
        errors = Counter(q[2] for q in quarantine if q[2] not in dropped)
        return events, quarantine, dropped, errors

    def mapped_here(self, page: pa.Table) -> np.ndarray:
        """Which rows of the page `run` maps itself (the others go through Python)."""
        if self._direct_columns(page.select(list(self.spec.source.columns))) is None:
            return np.zeros(page.num_rows, bool)
        return page.column("__em_verdict").to_numpy() != PYTHON

    def _direct_columns(self, rows: pa.Table) -> dict[str, pa.Array] | None:
        """The columns copied to fields (None: one is not of its field's Arrow type as it is)."""
        out = {}
        for name, (column,) in self.mapping.fields.items():
            col, want = rows.column(column), self.arrow_schema.field(name).type
            if not castable_as_is(col.type, want):
                return None
            out[name] = col
        return out

    def _events(self, page: pa.Table, keep: np.ndarray, first_no: int, direct: dict[str, pa.Array]) -> pa.Table:
        """The kept rows as events of the schema, with their source reference and row number."""
        schema, take = self.arrow_schema, pa.array(keep, pa.int64())
        objects = {name: f"__em_object_{i}" for i, name in enumerate(self.mapping.objects)}
        needed = {*(c for (c,) in self.mapping.fields.values()), *objects.values(), self.spec.source.id_column}
        kept = page.select(sorted(needed)).take(take)  # not the payloads
        arrays = []
        for f in self.spec.schema.fields:
            want = schema.field(f.name).type
            if f.name in direct:
                arrays.append(kept.column(self.mapping.fields[f.name][0]).cast(want))
            elif f.name in objects:
                arrays.append(kept.column(objects[f.name]).cast(want))
            else:
                arrays.append(pa.array([self.mapping.constants[f.name]] * len(keep), want))
        ids = kept.column(self.spec.source.id_column).cast(pa.string())
        arrays += [prefixed(self.python.ref_prefix, ids), pa.array(keep + first_no, pa.int64())]
        return pa.Table.from_arrays(arrays, schema=schema)
