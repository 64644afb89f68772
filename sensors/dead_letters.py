"""DLQ-growth sensors: one per dead-letter source (`DeadLettersSpec`) of a system, declared in a
pipeline spec or set in the environment (`EVENT_REPLAY_DEAD_LETTERS__<SYSTEM>`, README
"Dead-letter sensors").

Each tick reads the source's depth. The cursor keeps the depths seen within the window; when
depth - (lowest depth in the window) exceeds `growth`, the sensor peeks at the newest dead letters
without consuming them and acts on them:

- a pipeline or a refill: maps each letter to its day (event time) and adds one backfill of the
  system's assets for those days, minus days a backfill in progress already covers — one per
  (tenant, environment) of the letters for a table source filtered by them (billing), with that
  selection as run config; a refill's with the key source of the sensor's options as run config;
- processed events: requests a run of `processed_events_replay_failed` for the window of the
  peeked rows' times.

Every tick says why it did or did not fire and what it launched (the tick's reason and the log).
"""

import dataclasses
import json
import re
import time
from datetime import datetime, timedelta, timezone

import dagster as dg

from assets.common import asset_key
from partitions import daily_partitions
from replay_defs.core import connect
from replay_defs.core.naming import EVENT_KEYS, RAW, REDRIVE
from replay_defs.core.redact import secrets_masked
from replay_defs.ingestion_refill.spec import RefillSpec
from replay_defs.pipeline.declared import REQUIRED
from replay_defs.pipeline.spec import ClickHouseSourceSpec, DeadLettersSpec, PipelineSpec
from replay_defs.sinks import dead_letter_readers
from replay_defs.sinks.base import DeadLetterProbe
from sensors.launch import days_being_backfilled, submit_backfill

_KEY_DAY = re.compile(r"year=(\d{4})/month=(\d{2})/day=(\d{2})|day=(\d{4}-\d{2}-\d{2})")


# ---- depth and peek, per kind: (depth, the newest dead letters as JSON text or timestamps) ----
# A sink's dead-letter sources are read by its module (`SinkType.dead_letters`); Postgres rows here.


def _postgres(source: DeadLettersSpec, postgres, peek: bool):
    from psycopg import sql

    table, status = sql.Identifier(source.name), sql.Identifier(source.status_column)
    with connect.postgres(postgres.url, connect_timeout=10) as con:
        depth = con.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {} = %s").format(table, status), (source.error_value,)
        ).fetchone()[0]
        letters = []
        if peek:
            column = sql.Identifier(source.time_field or "created_at")
            rows = con.execute(
                sql.SQL("SELECT {col} FROM {t} WHERE {s} = %s ORDER BY {col} DESC NULLS LAST LIMIT %s").format(
                    col=column, t=table, s=status
                ),
                (source.error_value, source.peek),
            ).fetchall()
            letters = [r[0] for r in rows]
        return depth, letters


def dead_letter_reader(kind: str) -> tuple[str, DeadLetterProbe]:
    """The resource key a dead-letter kind is read through, and its probe."""
    return {"postgres": ("postgres", _postgres), **dead_letter_readers()}[kind]


def _utc(t: datetime) -> datetime:
    """A naive time (a Postgres `timestamp` column) is taken as UTC."""
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


# ---- from dead letters to days --------------------------------------------------------------


def day_of(letter, time_field: str) -> str | None:
    """The UTC day a dead letter belongs to: its event time, or the `day=` of a raw file's key."""
    if isinstance(letter, datetime):
        return _utc(letter).date().isoformat()
    try:
        body = json.loads(letter)
    except (TypeError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    if isinstance(body.get(time_field), str):
        try:
            return day_of(datetime.fromisoformat(body[time_field].replace("Z", "+00:00")), time_field)
        except ValueError:
            pass
    match = _KEY_DAY.search(str(body.get("key", "")))
    if match:
        y, m, d, iso = match.groups()
        return iso or f"{y}-{m}-{d}"
    return None


def grown(samples: list[list[float]], now: float, depth: int, window_s: int) -> int:
    """How much depth rose above its lowest point within the window."""
    return depth - min([d for t, d in samples if now - t <= window_s] + [depth])


# ---- the systems a sensor serves, and the options their launches take ---------------------------

PROCESSED_EVENTS = "processed_events"  # the processed-events jobs (`jobs/processed_events.py`)
REPLAY_FAILED_JOB = "processed_events_replay_failed"
# A table source's filters that split a backfill: one backfill per value pair found in the letters.
SPLIT_FILTERS = ("tenant", "environment")


def launch_options(system) -> dict[str, tuple[type, object]]:
    """The options an env-set source of `system` takes beyond `DeadLettersSpec`'s: option ->
    (type, default or REQUIRED). They become the run config of what the sensor launches."""
    if system == PROCESSED_EVENTS:
        return {"exchange": (str, "habitat-events"), "rate_limit": (float, 50.0)}
    if isinstance(system, RefillSpec):
        return {"source": (str, "csv"), "location": (str, REQUIRED), "force": (bool, False)}
    return {}


def sensor_name(system_name: str, source: DeadLettersSpec) -> str:
    return f"{system_name}__dlq_{source.kind}_{re.sub(r'[^A-Za-z0-9_]', '_', source.name)}"


# long: the tick is one closure over its source, system and launch options
def build_dead_letter_sensor(system, source: DeadLettersSpec, options: dict | None = None) -> dg.SensorDefinition:
    """The DLQ sensor of `source` for `system`: a PipelineSpec, a RefillSpec or PROCESSED_EVENTS.
    `options`: its launch options (`launch_options`); raises ValueError for what cannot work."""
    options = {key: default for key, (_, default) in launch_options(system).items()} | (options or {})
    if REQUIRED in options.values():
        missing = [k for k, v in options.items() if v is REQUIRED]
        raise ValueError(f"{source.label}: option {missing[0]!r} is required for {getattr(system, 'name', system)}")
    if system == PROCESSED_EVENTS:
        if source.kind != "postgres":
            raise ValueError(
                f"{source.label}: processed events have rows in error (postgres:<table>), not {source.kind}"
            )
        source = dataclasses.replace(source, time_field=source.time_field or "processed_at")
        name = sensor_name(PROCESSED_EVENTS, source)
        act, target = _replay_failed(name, source, options), {"job_name": REPLAY_FAILED_JOB}
        what = f"a run of {REPLAY_FAILED_JOB} for the window of the rows in error of {source.label}"
    else:
        if isinstance(system, RefillSpec):
            from assets.refill import KeySourceConfig

            try:  # the asset's own config checks the key source now, not in the first launched run
                KeySourceConfig(source=options["source"], location=options["location"])
            except Exception as exc:  # pydantic's ValidationError: one line per bad field
                bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"{source.label}: {bad}") from None
        name = sensor_name(system.name, source)
        selection = dg.AssetSelection.groups(system.name)
        act, target = _backfill(name, system, source, options, selection), {"asset_selection": selection}
        what = f"a backfill of {system.name} for the days of the dead letters in {source.label}"
    resource_key, probe = dead_letter_reader(source.kind)

    @dg.sensor(
        name=name,
        **target,
        minimum_interval_seconds=source.interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING if source.running else dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={resource_key},
        description=f"Launches {what} when its depth grows by more than {source.growth} within {source.window_s} s.",
    )
    def dlq_sensor(context: dg.SensorEvaluationContext, **_resources):  # direct invocation also passes them by name
        now = time.time()
        state = json.loads(context.cursor) if context.cursor else {"samples": []}
        samples = [s for s in state["samples"] if now - s[0] <= source.window_s]
        resource = getattr(context.resources, resource_key)
        with secrets_masked():  # a failing probe's error reaches the sensor's log and the UI: no secret in it
            depth, _ = probe(source, resource, peek=False)
        rise = grown(samples, now, depth, source.window_s)
        samples.append([now, depth])

        def skip(reason: str) -> dg.SensorResult:
            context.log.info(reason)
            return dg.SensorResult(skip_reason=reason, cursor=json.dumps({"samples": samples}))

        if rise <= source.growth:
            return skip(
                f"{source.label}: depth {depth}, grew {rise} within {source.window_s}s (threshold {source.growth}): not firing"
            )
        with secrets_masked():
            _, letters = probe(source, resource, peek=True)
        grew = f"{source.label}: depth {depth} grew {rise} within {source.window_s}s"
        requests, launched, notes = act(context, letters, depth, grew)
        said = f" ({'; '.join(notes)})" if notes else ""
        if not requests and not launched:
            return skip(f"{grew}, but nothing to launch{said}")
        context.log.info(f"{grew}; {'; '.join(launched) or 'requested a run'}{said}")
        # The rise has been acted on: measure the next one from here.
        cursor = json.dumps({"samples": [[now, depth]]})
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        # Backfills are added by the sensor itself (sensors/launch.py): the tick's reason names them.
        return dg.SensorResult(skip_reason=f"{grew}; {'; '.join(launched)}{said}", cursor=cursor)

    return dlq_sensor


# ---- what a sensor launches -------------------------------------------------------------------


def _backfill(name: str, spec, source: DeadLettersSpec, options: dict, selection: dg.AssetSelection):
    """Backfills of `spec`'s assets for the peeked letters' days: (no run requests, what was added, notes)."""
    time_field = source.time_field or (spec.schema.time_field if isinstance(spec, PipelineSpec) else "timestamp")
    partitions = daily_partitions(spec)
    split = (
        {f: spec.source.filters[f] for f in SPLIT_FILTERS if f in spec.source.filters}
        if isinstance(spec, PipelineSpec) and isinstance(spec.source, ClickHouseSourceSpec)
        else {}
    )
    run_config, refill_note = _refill_run_config(spec, options) if isinstance(spec, RefillSpec) else ({}, None)

    def act(context, letters: list, depth: int, grew: str):
        asset_graph = context.repository_def.asset_graph
        keys = set(selection.resolve(asset_graph))
        known = set(partitions.get_partition_keys())
        groups, notes = _split(letters, split)
        launched = []
        for chosen, group in groups.items():
            config = _selection_run_config(spec, dict(chosen)) if split else run_config
            days, group_notes = _days_to_backfill(context.instance, asset_graph, keys, known, group, time_field, config)
            which = ", ".join(f"{k}={v}" for k, v in chosen)
            notes += [f"{which}: {n}" if which else n for n in group_notes]
            if not days:
                continue
            tags = {
                "dagster/sensor_name": name,
                "event_replay/trigger": source.label,
                "event_replay/dead_letter_depth": str(depth),
                **{f"event_replay/{k}": v for k, v in chosen},
            }
            if isinstance(spec, RefillSpec):
                tags["event_replay/force"] = str(options["force"]).lower()
            backfill_id = submit_backfill(context.instance, asset_graph, keys, days, tags, config)
            launched.append(f"backfill {backfill_id}{' of ' + which if which else ''} for {', '.join(days)}")
        if launched and refill_note:
            notes.append(refill_note)
        return [], launched, notes

    return act


def _refill_run_config(spec: RefillSpec, options: dict) -> tuple[dict, str]:
    """A refill backfill's run config (the key source; `force` for the redrive), and what it will do."""
    config = {
        "ops": {
            asset_key(spec, EVENT_KEYS).to_python_identifier(): {
                "config": {"source": options["source"], "location": options["location"]}
            }
        }
    }
    if options["force"]:
        config["ops"][asset_key(spec, REDRIVE).to_python_identifier()] = {"config": {"force": True}}
        return config, (
            "force=true: every key of these days is enqueued again as a new job (its id salted with the run id), "
            "the keys already ingested included"
        )
    return config, (
        "force=false: the keys are re-read and the deliveries re-verified, but no key the ledger records as "
        "delivered is sent again (BullMQ still holds the failed job ids); set force=true to re-enqueue them"
    )


def _selection_run_config(spec: PipelineSpec, chosen: dict) -> dict:
    """The run config of a table source's raw_events selecting `chosen` filter values."""
    return {"ops": {asset_key(spec, RAW).to_python_identifier(): {"config": chosen}}}


def _split(letters: list, split: dict[str, str]) -> tuple[dict[tuple, list], list[str]]:
    """The letters by the values of the `split` filters (filter -> the letter's field), and a note
    on the letters that name none (a backfill of every tenant is never launched for them)."""
    if not split:
        return {(): letters}, []
    first = next(iter(split))
    groups: dict[tuple, list] = {}
    unnamed = 0
    for letter in letters:
        try:
            body = json.loads(letter)
        except (TypeError, ValueError):
            body = None
        if not isinstance(body, dict) or body.get(split[first]) in (None, ""):
            unnamed += 1
            continue
        chosen = tuple((f, str(body[col])) for f, col in split.items() if body.get(col) not in (None, ""))
        groups.setdefault(chosen, []).append(letter)
    notes = [f"{unnamed} of {len(letters)} peeked dead letters name no {first}: left out"] if unnamed else []
    return groups, notes


def _replay_failed(name: str, source: DeadLettersSpec, options: dict):
    """A run of `processed_events_replay_failed` for the window of the peeked rows' times."""
    from jobs.processed_events import REASON_TAG, REQUESTED_BY_TAG

    def act(context, letters: list, depth: int, grew: str):
        times = sorted(_utc(t) for t in letters if isinstance(t, datetime))
        notes = [f"{len(letters) - len(times)} of {len(letters)} peeked rows have no {source.time_field}"]
        notes = notes if len(times) < len(letters) else []
        if not times:
            return [], [], notes
        since, until = times[0].isoformat(), (times[-1] + timedelta(microseconds=1)).isoformat()  # until: exclusive
        reason = f"sensor {name}: {grew} (threshold {source.growth})"
        config = {
            "table": source.name,
            "since": since,
            "until": until,
            "exchange": options["exchange"],
            "rate_limit": options["rate_limit"],
            "reason": reason,
            "requested_by": f"sensor:{name}",
        }
        request = dg.RunRequest(
            job_name=REPLAY_FAILED_JOB,
            # The same rise (window and depth) is launched once, even if a tick is evaluated again.
            run_key=f"{since}..{until}@{depth}",
            run_config={"ops": {"replay_failed_events": {"config": config}}},
            tags={
                "event_replay/trigger": source.label,
                "event_replay/dead_letter_depth": str(depth),
                REASON_TAG: reason,
                REQUESTED_BY_TAG: f"sensor:{name}",
            },
        )
        context.log.info(f"{grew}: replaying the rows in error from {since} to {until} to {options['exchange']!r}")
        return [request], [], notes

    return act


def _days_to_backfill(instance, asset_graph, keys, partitions: set[str], letters: list, time_field: str, run_config):
    """The days of the peeked dead letters that are partitions of the system and not being
    backfilled already with `run_config` (sorted), and notes on what was left out and why."""
    days = {d for d in (day_of(letter, time_field) for letter in letters) if d}
    unknown = len(letters) - sum(1 for letter in letters if day_of(letter, time_field))
    outside = sorted(days - partitions)
    days &= partitions
    busy = days_being_backfilled(instance, asset_graph, keys, run_config) & days
    days -= busy
    notes = []
    if unknown:
        notes.append(f"{unknown} of {len(letters)} peeked dead letters had no readable event time")
    if outside:
        notes.append(f"days outside the partitions skipped: {', '.join(outside)}")
    if busy:
        notes.append(f"already being backfilled: {', '.join(sorted(busy))}")
    return sorted(days), notes
