"""A spec's `Mapping` evaluated with the JSON work done by ClickHouse in the keyset page query,
giving exactly what the Python `Transformer` gives: the same events, quarantine records and counts.

The page query parses each payload once (`JSONExtract` into a tuple of the mapping's paths, each
value as text) and flags the payloads on which the engine's reading and Python's (msgspec) are known
to agree; pyarrow then evaluates the rules, the fields and the object fields column by column. Every
other row goes through the Python `Transformer`, so no verdict depends on which path a row took.

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
number, `true`/`false`, an array or an object is ambiguous. In an object field an integer
(`-?[0-9]+`) is the number it reads as unless the payload has a string of digits or a number with a
fraction or exponent as a member value (the engine prints 1.0 as 1; Python keeps 1.0); any other
ambiguous value sends the row to Python. Rules only ask whether a value is there (not null, not
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
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # keys that can name a tuple element and be counted as `"key"`
_AMBIGUOUS = r"^(-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?|true|false)$|^[\[{]"
_INTEGER = r"^-?[0-9]+$"
_NUMBER_DOUBT = r':\s*("-?[0-9]+"|-?[0-9]+[.eE])'  # a member that is a string of digits, or not an integer


def _present(values: pa.Array) -> np.ndarray:
    """Python's `v is not None and v != ""`, on the values' text."""
    return pc.fill_null(pc.not_equal(values, ""), False).to_numpy(zero_copy_only=False)


def _matches(values: pa.Array, pattern: str) -> np.ndarray:
    return pc.fill_null(pc.match_substring_regex(values, pattern), False).to_numpy(zero_copy_only=False)


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
        self.select, self.params = self._sql(payload_nullable)
        self.rule_details = [(r.name, f"validation rule {r.name} failed") for r in self.mapping.rules]
        self.member_prefixes = {
            name: {k: msgspec.json.encode(k).decode() + ":" for k in members}
            for name, members in self.mapping.objects.items()
        }

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
        return (
            "Tuple("
            + ", ".join(
                f"{quote_ident(k)} " + ("Nullable(String)" if sub is None else self._shape(sub))
                for k, sub in node.items()
            )
            + ")"
        )

    def _sql(self, payload_nullable: bool) -> tuple[str, dict]:
        payload = quote_ident(self.spec.source.payload_column)
        keys = sorted({k for keys in self.paths.values() for k in keys})
        objects = sorted({keys[i] for keys in self.paths.values() for i in range(len(keys) - 1)})
        params = {"em_shape": self._shape(self.tree), "em_backslash": "\\", "em_doubt": _NUMBER_DOUBT}
        plain = [
            f"position({payload}, {{em_backslash:String}}) = 0",
            f"startsWith({payload}, '{{')",
            f"countSubstrings({payload}, '{{') + countSubstrings({payload}, '[') <= {MAX_BRACKETS}",
        ]
        for i, k in enumerate(keys):
            params[f"em_key{i}"] = f'"{k}"'
            plain.append(f"countSubstrings({payload}, {{em_key{i}:String}}) <= 1")
        for i, k in enumerate(objects):
            params[f"em_array{i}"] = f'"{k}"' + r"\s*:\s*\["
            plain.append(f"NOT match({payload}, {{em_array{i}:String}})")
        plain_sql = " AND ".join(plain)
        if payload_nullable:
            plain_sql = f"ifNull({plain_sql}, 0)"
        select = (
            f"JSONExtract({payload}, {{em_shape:String}}) AS __em_doc, ({plain_sql}) AS __em_plain, "
            f"ifNull(match({payload}, {{em_doubt:String}}), 1) AS __em_number_doubt"
        )
        return select, params

    def _leaf(self, doc: pa.Array, keys: tuple[str, ...]) -> pa.Array:
        node, index = self.tree, []
        for k in keys:
            index.append(list(node).index(k))
            node = node[k]
        return pc.struct_field(doc, index)

    def run(self, page: pa.Table, first_no: int) -> tuple[pa.Table, list[tuple], Counter, Counter]:
        """`Transformer.run` on a page read with `select`: the plain rows here, the others by Python."""
        rows = page.select(list(self.spec.source.columns))
        direct = self._direct_columns(rows)
        if direct is None:  # a column of another type than its field's: Python converts it
            return self.python.run(rows, first_no)
        _, present, objects, mapped_here = self._evaluate(page, direct)
        verdicts = self._verdicts(present, direct)
        return self._merge(rows, first_no, mapped_here, verdicts, direct, objects)

    def mapped_here(self, page: pa.Table) -> np.ndarray:
        """Which rows of the page `run` maps itself (the others go through Python)."""
        direct = self._direct_columns(page.select(list(self.spec.source.columns)))
        return np.zeros(page.num_rows, bool) if direct is None else self._evaluate(page, direct)[3]

    def _evaluate(self, page: pa.Table, direct: dict[str, pa.Array]):
        """(values and presence of the paths, object fields, rows mapped here) of a page."""
        doc = page.column("__em_doc").combine_chunks()
        values = {path: self._leaf(doc, keys) for path, keys in self.paths.items()}
        present = {path: _present(v) for path, v in values.items()}
        doubt = page.column("__em_number_doubt").to_numpy().astype(bool)
        objects, writable = self._objects(values, present, doubt)
        parsed = np.logical_or.reduce([pc.is_valid(v).to_numpy(zero_copy_only=False) for v in values.values()])
        mapped_here = (
            page.column("__em_plain").to_numpy().astype(bool)
            & parsed
            & writable
            & _matches(direct[self.spec.schema.type_field], SAFE_TYPE_VALUE.pattern)
        )
        return values, present, objects, mapped_here

    def _direct_columns(self, rows: pa.Table) -> dict[str, pa.Array] | None:
        """The fields copied from a column, as their field's Arrow type (None: one needs converting)."""
        out = {}
        for name, (column,) in self.mapping.fields.items():
            col, want = rows.column(column).combine_chunks(), self.arrow_schema.field(name).type
            if not castable_as_is(col.type, want):
                return None
            out[name] = col.cast(want)
        return out

    def _verdicts(self, present: dict[str, np.ndarray], direct: dict[str, pa.Array]) -> np.ndarray:
        """Per row, 0 (kept) or 1 + the index in `outcomes()` of the first reason that holds."""
        n = len(next(iter(direct.values())))
        verdict = np.zeros(n, np.int32)
        failures = []
        for rule in self.mapping.rules:
            has = [present[p] for p in rule.paths]
            failures.append(~(np.logical_or.reduce(has) if rule.need == "any" else np.logical_and.reduce(has)))
        for name in self.mapping.fields:
            if name in self.python.required:
                failures.append(_missing(direct[name], self.python.types[name]))
        for i, failed in enumerate(failures, 1):
            verdict[(verdict == 0) & failed] = i
        return verdict

    def outcomes(self) -> list[tuple[str, str]]:
        """(reason, detail) of each verdict after 0, in the order they are tested."""
        return [
            *self.rule_details,
            *(
                ("missing_field", f"no value for required field {name}")
                for name in self.mapping.fields
                if name in self.python.required
            ),
        ]

    def _objects(
        self, values: dict[str, pa.Array], present: dict[str, np.ndarray], doubt: np.ndarray
    ) -> tuple[dict[str, pa.Array], np.ndarray]:
        """The object fields' JSON per row, and whether every member's value could be written here."""
        n, encodable = len(doubt), np.ones(len(doubt), bool)
        json_text, writable = {}, {}
        for path in {p for obj in self.mapping.objects.values() for ps in obj.values() for p in ps}:
            v = values[path]
            ambiguous = _matches(v, _AMBIGUOUS)
            quoted = pc.binary_join_element_wise(pa.repeat('"', n), v, pa.repeat('"', n), pa.repeat("", n))
            json_text[path] = pc.if_else(pa.array(ambiguous), v, quoted)
            writable[path] = ~ambiguous | (_matches(v, _INTEGER) & ~doubt)
        out = {}
        for name, members in self.mapping.objects.items():
            parts = []
            for key, member_paths in members.items():
                value, taken = pa.nulls(n, pa.string()), np.zeros(n, bool)
                for path in member_paths:  # the first path with a value
                    use = ~taken & present[path]
                    value = pc.if_else(pa.array(use), json_text[path], value)
                    encodable &= ~use | writable[path]
                    taken |= use
                # `,"key":value`, or "" without a value (joining with null_handling="skip" loses
                # the rows where every member is null, in pyarrow 26)
                prefix = pa.repeat("," + self.member_prefixes[name][key], n)
                parts.append(pc.fill_null(pc.binary_join_element_wise(prefix, value, pa.repeat("", n)), ""))
            members_json = pc.utf8_slice_codeunits(pc.binary_join_element_wise(*parts, pa.repeat("", n)), 1)
            out[name] = pc.binary_join_element_wise(
                pa.repeat("{", n), members_json, pa.repeat("}", n), pa.repeat("", n)
            )
        return out, encodable

    def _merge(
        self,
        rows: pa.Table,
        first_no: int,
        mapped_here: np.ndarray,
        verdicts: np.ndarray,
        direct: dict[str, pa.Array],
        objects: dict[str, pa.Array],
    ) -> tuple[pa.Table, list[tuple], Counter, Counter]:
        """The events and quarantine records of the rows mapped here, and of the others by Python, in row order."""
        keep = np.flatnonzero(mapped_here & (verdicts == 0))
        events = self._events(rows, keep, first_no, direct, objects)
        bad = np.flatnonzero(mapped_here & (verdicts > 0))
        outcomes = self.outcomes()
        verdicts_of_bad = [outcomes[v - 1] for v in verdicts[bad]]
        quarantine = quarantine_records(self.python, rows, bad.tolist(), (bad + first_no).tolist(), verdicts_of_bad)
        rule_names = {r.name for r in self.mapping.rules}
        dropped = Counter(reason for reason, _ in verdicts_of_bad if reason in rule_names)
        others = np.flatnonzero(~mapped_here)
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

    def _events(
        self, rows: pa.Table, keep: np.ndarray, first_no: int, direct: dict[str, pa.Array], objects: dict[str, pa.Array]
    ) -> pa.Table:
        schema, take = self.arrow_schema, pa.array(keep, pa.int64())
        arrays = []
        for f in self.spec.schema.fields:
            if f.name in direct:
                arrays.append(direct[f.name].take(take))
            elif f.name in objects:
                arrays.append(objects[f.name].take(take))
            else:
                arrays.append(pa.array([self.mapping.constants[f.name]] * len(keep), schema.field(f.name).type))
        ids = rows.column(self.spec.source.id_column).take(take).cast(pa.string())
        arrays += [prefixed(self.python.ref_prefix, ids), pa.array(keep + first_no, pa.int64())]
        return pa.Table.from_arrays(arrays, schema=schema)


def _missing(column: pa.Array, field_type: str) -> np.ndarray:
    """Python's missing value of a field copied from a column: null, or an empty string."""
    missing = (
        pc.is_null(column) if field_type == "timestamp" else pc.or_kleene(pc.is_null(column), pc.equal(column, ""))
    )
    return pc.fill_null(missing, True).to_numpy(zero_copy_only=False)
