"""Pipeline specs: what a pipeline is, declared as data.

The asset factory (`assets/factory.py`) turns one `PipelineSpec` into that pipeline's assets,
checks and job. Adding a pipeline means writing a spec, not code: in the user's own YAML file or
module (`replay_defs/pipeline/declared.py`), or among the shipped ones in `replay_defs/pipelines.py`.
This module imports nothing heavy so parse workers can load it quickly.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from replay_defs.sinks import dead_letter_readers, sink_type  # the registry loads sink modules when first asked
from replay_defs.sinks.base import SinkSpec

FieldType = Literal["string", "int", "float", "bool", "timestamp", "json"]

# Names that end up in SQL identifiers or lake paths must match this.
SAFE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
# Event type values become `type=<value>` directories, so they are restricted too.
SAFE_TYPE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A field's path has at most this many keys (`a.b.c` has 3).
MAX_PATH_DEPTH = 8


@dataclass(frozen=True)
class Field:
    """One field of a JSON event: column `name` (a safe identifier), read from the dotted `path`
    of keys into the JSON object (default: the top-level key `name`), e.g.
    `Field("event_time", "timestamp", path="envelope.event_time")`. `json` keeps the value as raw
    JSON text. A required field whose path goes through an absent object is missing; through a
    value that is not an object, of the wrong type."""

    name: str
    type: FieldType
    required: bool = True
    path: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            object.__setattr__(self, "path", self.name)
        keys = self.path.split(".")
        if not all(keys):
            raise ValueError(f"field {self.name!r}: path {self.path!r} has an empty key (keys are separated by '.')")
        if len(keys) > MAX_PATH_DEPTH:
            raise ValueError(f"field {self.name!r}: path {self.path!r} is more than {MAX_PATH_DEPTH} keys deep")

    @property
    def keys(self) -> tuple[str, ...]:
        """The path's keys, outermost first."""
        return tuple(self.path.split("."))


@dataclass(frozen=True)
class EventSchema:
    """How a raw line becomes a typed event, and what makes it invalid."""

    fields: tuple[Field, ...]
    id_field: str = "event_id"
    time_field: str = "ts"
    type_field: str = "type"
    # Events of other types are quarantined as `unknown_type`.
    known_types: tuple[str, ...] = ()
    max_line_bytes: int = 1 << 20
    # Per raw file, so no single file can take hours: past either size the file is rejected whole
    # (quarantined as `file_too_large` with its line count), and past this many quarantined lines
    # of one reason the rest are counted in one record instead of one record each.
    max_file_bytes: int = 16 << 30  # uncompressed
    max_file_lines: int = 50_000_000
    max_quarantine_rows_per_reason: int = 1_000

    def __post_init__(self) -> None:
        for limit in ("max_line_bytes", "max_file_bytes", "max_file_lines", "max_quarantine_rows_per_reason"):
            if getattr(self, limit) < 1:
                raise ValueError(f"{limit} must be at least 1")
        names = [f.name for f in self.fields]
        for name in names:
            if not SAFE_NAME.fullmatch(name):
                raise ValueError(f"field name {name!r} is not a safe identifier")
        if len(set(names)) != len(names):
            raise ValueError(f"field names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
        _check_paths(self.fields)
        by_name = {f.name: f for f in self.fields}
        for role, name, want in (
            ("id_field", self.id_field, "string"),
            ("time_field", self.time_field, "timestamp"),
            ("type_field", self.type_field, "string"),
        ):
            f = by_name.get(name)
            if f is None or f.type != want or not f.required:
                raise ValueError(f"{role} {name!r} must be a required {want} field")
        for value in self.known_types:
            if not SAFE_TYPE_VALUE.fullmatch(value):
                raise ValueError(f"known type {value!r} is not safe in a path")


def _check_paths(fields: tuple[Field, ...]) -> None:
    """Each value has one place: no two fields read the same path, and no field reads an object
    that another field's path goes through (`a` and `a.b`)."""
    by_path = {}
    for f in fields:
        if f.path in by_path:
            raise ValueError(f"fields {by_path[f.path].name!r} and {f.name!r} both read path {f.path!r}")
        by_path[f.path] = f
    for f in fields:
        for depth in range(1, len(f.keys)):
            outer = by_path.get(".".join(f.keys[:depth]))
            if outer is not None:
                raise ValueError(
                    f"field {outer.name!r} reads {outer.path!r}, which field {f.name!r} (path {f.path!r}) "
                    "needs to be an object"
                )


@dataclass(frozen=True)
class JsonlSourceSpec:
    """Gzipped (or plain) JSONL files under `<prefix>/year=YYYY/month=MM/day=DD/hour=HH/`."""

    prefix: str
    suffixes: tuple[str, ...] = (".gz", ".jsonl", ".json")
    kind: Literal["jsonl"] = "jsonl"


@dataclass(frozen=True)
class ClickHouseSourceSpec:
    """Rows of a ClickHouse table (resource `clickhouse`), one partition per UTC day of
    `time_column`. A day is read by keyset pagination on `order_by` (the table's ORDER BY tuple:
    `WHERE (k1, ..., kn) > (last row's keys) ORDER BY k1, ..., kn LIMIT batch`, never OFFSET), with
    FINAL so a ReplacingMergeTree yields the latest version of each row only.

    `filters`: the run-config filter names a replay may set, each an equality on a column
    (e.g. {"tenant": "tenant_id"}); a time window narrows the day further.
    """

    table: str
    order_by: tuple[str, ...]
    time_column: str
    id_column: str
    payload_column: str
    filters: dict[str, str] = field(default_factory=dict)
    final: bool = True
    kind: Literal["clickhouse"] = "clickhouse"

    def __post_init__(self) -> None:
        for name in (
            self.table,
            *self.order_by,
            self.time_column,
            self.id_column,
            self.payload_column,
            *self.filters,
            *self.filters.values(),
        ):
            if not SAFE_NAME.fullmatch(name):
                raise ValueError(f"ClickHouse source: {name!r} is not a safe identifier")
        for role, name in (("time_column", self.time_column), ("id_column", self.id_column)):
            if name not in self.order_by:
                raise ValueError(f"{role} {name!r} must be part of order_by")

    @property
    def columns(self) -> tuple[str, ...]:
        """What a read selects: the key columns, then the payload."""
        return (*self.order_by, *((self.payload_column,) if self.payload_column not in self.order_by else ()))


@dataclass(frozen=True)
class Rule:
    """A named validation rule of a `Mapping`: a row is dropped with reason `name` unless its
    `paths` hold a value (`need="all"`: every one of them; `"any"`: at least one)."""

    name: str
    paths: tuple[str, ...]
    need: Literal["all", "any"] = "all"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,62}", self.name):
            raise ValueError(f"rule name {self.name!r} must be an identifier (it names a drop reason)")
        if self.need not in ("all", "any") or not self.paths:
            raise ValueError(f"rule {self.name!r}: need 'all' or 'any' of at least one path")


@dataclass(frozen=True)
class Mapping:
    """A declarative transform of a source row into an event of the pipeline's schema.

    A path is a source column (`event_name`) or a place inside the JSON payload column
    (`payload.data.modelName`). `fields`: schema field -> paths, the first that holds a value
    wins; `objects`: a `json` schema field built as an object of key -> paths (keys without a value
    are left out); `constants`: schema field -> fixed value. `rules` run first, in order: the first
    that fails drops the row with its name as the reason.
    """

    fields: dict[str, tuple[str, ...]]
    rules: tuple[Rule, ...] = ()
    objects: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    constants: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        for target in (*self.fields, *self.objects, *self.constants):
            if not SAFE_NAME.fullmatch(target):
                raise ValueError(f"mapping target {target!r} is not a safe identifier")


@dataclass(frozen=True)
class RateThresholds:
    """A table source's alert thresholds per day (seed 002's "Alerts to configure"), in percent of
    the rows found: its `success_rate_within_threshold`, `transformation_error_rate_within_threshold`
    and `publish_failure_rate_within_threshold` checks fail a day past them."""

    min_success_rate: float = 90.0  # events the sink has / rows found
    max_transformation_error_rate: float = 5.0  # rows that could not be transformed / rows found
    max_publish_failure_rate: float = 1.0  # messages the sink refused after retries / rows found

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{f.name} {value!r} must be a percentage in [0, 100]")


@dataclass(frozen=True)
class Lateness:
    """How far an event's arrival may be from its event-time day.

    Parsed partition D scans raw files that arrived in [D - early, D+1 + late). An event outside
    that window of its own day is quarantined (`outside_lateness_window`), never dropped.
    """

    early: timedelta = timedelta(hours=1)
    late: timedelta = timedelta(hours=3)

    def __post_init__(self) -> None:
        if not (timedelta(0) <= self.early <= timedelta(days=1)):
            raise ValueError("early must be between 0 and 1 day")
        if not (timedelta(0) <= self.late <= timedelta(days=1)):
            raise ValueError("late must be between 0 and 1 day")


@dataclass(frozen=True)
class ProjectionSpec:
    """A fold of parsed events into a table of the projection store.

    kind="increment": rows are per (day, *key); the partition's rows are deleted before the
    fold is inserted, in one transaction, so a re-run never double counts. `values` are SQL
    aggregates over the partition's events; `count_column` must hold count(*) so the totals check
    can compare it with the parsed row count.

    kind="replace": one row per key, the event with the latest `order_by` wins (an upsert), so
    re-running any partition is safe. `values` maps each output column to the event field kept.
    """

    name: str
    kind: Literal["increment", "replace"]
    key: tuple[str, ...]
    values: dict[str, str] = field(default_factory=dict)
    count_column: str | None = None
    order_by: str | None = None

    def __post_init__(self) -> None:
        for name in (self.name, *self.key, *self.values, *filter(None, [self.order_by])):
            if not SAFE_NAME.fullmatch(name):
                raise ValueError(f"projection {self.name!r}: {name!r} is not a safe identifier")
        if self.kind == "increment" and self.count_column not in self.values:
            raise ValueError(f"increment projection {self.name!r} needs a count_column in values")
        if self.kind == "replace" and not self.order_by:
            raise ValueError(f"replace projection {self.name!r} needs order_by")


def _outbox() -> SinkSpec:
    # The default sink. Sink modules import Dagster (their resource), so only when it is used.
    from replay_defs.sinks.outbox import OutboxSinkSpec

    return OutboxSinkSpec()


@dataclass(frozen=True)
class RedriveSpec:
    """What a redrive delivers and where to.

    unit="raw_file": one `redrive_raw_file` message per source file (telemetry's format), for consumers that
    re-ingest files. unit="event": one message per parsed event (its schema fields as JSON), keyed
    by `key_field` (the Kafka partition key; default the event id).
    """

    unit: Literal["raw_file", "event"] = "raw_file"
    # A sink's `<X>SinkSpec` (from its module in `replay_defs/sinks/`), e.g. `KafkaSinkSpec("topic")`.
    sink: SinkSpec = field(default_factory=_outbox)
    key_field: str | None = None

    def __post_init__(self) -> None:
        sink_type(self.sink)  # a ValueError unless it is a registered sink's spec
        if self.unit not in ("raw_file", "event"):
            raise ValueError(f"unknown redrive unit {self.unit!r}: use raw_file or event")
        if self.key_field is not None and self.unit != "event":
            raise ValueError("key_field applies to unit='event' only")


@dataclass(frozen=True)
class DeadLettersSpec:
    """A dead-letter source a sensor watches (`sensors/`), declared in a spec or set in the
    environment (`EVENT_REPLAY_DEAD_LETTERS__<SYSTEM>`). When its depth grows by more than
    `growth` within `window_s`, the sensor peeks at up to `peek` dead letters (without consuming
    them), finds their days and launches one backfill of the pipeline for those days.

    kind / name: `sqs` queue (ApproximateNumberOfMessages), `bullmq` queue (its failed jobs),
    `kafka` topic (end offsets), `rabbitmq` queue (message count) — each read by its sink's module
    (`replay_defs/sinks/`) — or `postgres` table (rows whose `status_column` is `error_value`). A
    dead letter's day comes from the event-time field `time_field` of its JSON body (default: the
    schema's time field), or for raw-file messages from the `day=` of their key; for `postgres`
    from the column `time_field`.
    """

    kind: str  # "postgres" or a dead-letter kind of a sink module: "sqs", "bullmq", "kafka", "rabbitmq"
    name: str
    growth: int = 100
    window_s: int = 600
    peek: int = 200
    time_field: str | None = None
    status_column: str = "status"
    error_value: str = "error"
    prefix: str = "bull"  # bullmq key prefix
    interval_s: int = 30  # how often the daemon evaluates the sensor
    running: bool = False  # on from the start (else turned on in the UI)

    def __post_init__(self) -> None:
        if self.kind != "postgres" and self.kind not in dead_letter_readers():
            kinds = ", ".join(sorted(["postgres", *dead_letter_readers()]))
            raise ValueError(f"unknown dead-letter kind {self.kind!r} (kinds: {kinds})")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", self.name):
            raise ValueError(f"{self.name!r} is not a valid dead-letter source name")
        if self.kind == "postgres":
            for ident_ in (self.name, self.status_column, self.time_field or "x"):
                if not SAFE_NAME.fullmatch(ident_):
                    raise ValueError(f"{ident_!r} is not a safe SQL identifier")
        if self.growth < 0 or self.window_s <= 0 or self.peek <= 0 or self.interval_s <= 0:
            raise ValueError("growth must be >= 0, window_s, peek and interval_s > 0")

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    start_date: str
    source: JsonlSourceSpec | ClickHouseSourceSpec
    schema: EventSchema
    # Lake prefix of the parsed Parquet: `<parsed_prefix>/type=<t>/day=<d>/`.
    parsed_prefix: str
    projections: tuple[ProjectionSpec, ...] = ()
    redrive: RedriveSpec = field(default_factory=RedriveSpec)
    lateness: Lateness = Lateness()
    dead_letters: tuple[DeadLettersSpec, ...] = ()
    # How a table source's rows become events (ClickHouse sources only).
    mapping: Mapping | None = None
    # A table source's per-day alert thresholds (ClickHouse sources only; defaults: seed 002's).
    rate_thresholds: RateThresholds = RateThresholds()
    description: str = ""
    # Dagster owners of the assets (emails or "team:<name>"), shown in the UI and used by its filters.
    owners: tuple[str, ...] = ()
    # A new version of a day may hold at most this fraction fewer events of a type than the
    # version it replaces before the `no_unconsented_shrink` check fails (run config
    # `allow_shrink: true` consents to any shrink). 0: any loss needs consent.
    shrink_tolerance: float = 0.0

    def __post_init__(self) -> None:
        if not SAFE_NAME.fullmatch(self.name):
            raise ValueError(f"pipeline name {self.name!r} is not a safe identifier")
        if not 0.0 <= self.shrink_tolerance < 1.0:
            raise ValueError(f"shrink_tolerance {self.shrink_tolerance!r} must be a fraction in [0, 1)")
        fields = {f.name for f in self.schema.fields}
        for p in self.projections:
            used = set(p.key) | ({p.order_by} if p.order_by else set())
            if p.kind == "replace":
                used |= set(p.values.values())
            missing = used - fields
            if missing:
                raise ValueError(f"projection {p.name!r} uses unknown fields {sorted(missing)}")
        if self.redrive.key_field is not None and self.redrive.key_field not in fields:
            raise ValueError(f"redrive key_field {self.redrive.key_field!r} is not a field of the schema")
        if isinstance(self.source, ClickHouseSourceSpec):
            nested = [f.name for f in self.schema.fields if f.path != f.name]
            if nested:
                raise ValueError(f"fields {nested} have a path: a ClickHouse source maps its columns with `mapping`")
            if self.mapping is None:
                raise ValueError("a ClickHouse source needs a mapping")
            targets = set(self.mapping.fields) | set(self.mapping.objects) | set(self.mapping.constants)
            if targets - fields:
                raise ValueError(f"mapping targets unknown fields {sorted(targets - fields)}")
            unmapped = {f.name for f in self.schema.fields if f.required} - targets
            if unmapped:
                raise ValueError(f"mapping leaves required fields {sorted(unmapped)} without a source")
            if self.projections:
                raise ValueError("projections of table sources are not supported yet")
