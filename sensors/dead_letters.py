"""DLQ-growth sensors: one per dead-letter source declared in a pipeline spec (`DeadLettersSpec`).

Each tick reads the source's depth. The cursor keeps the depths seen within the window; when
depth - (lowest depth in the window) exceeds `growth`, the sensor peeks at the newest dead letters
without consuming them, maps each to its day (event time), and launches one backfill of the
pipeline's assets for those days — minus days a backfill in progress already covers. Every tick
says why it did or did not fire (the tick's skip reason and the sensor log).
"""

import json
import re
import time
from datetime import datetime, timezone

import dagster as dg

from partitions import daily_partitions
from replay_defs.core import connect
from replay_defs.core.redact import secrets_masked
from replay_defs.pipeline.spec import DeadLettersSpec, PipelineSpec
from replay_defs.sinks import dead_letter_readers
from replay_defs.sinks.base import DeadLetterProbe
from sensors.launch import backfill_request, days_being_backfilled

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


# ---- from dead letters to days --------------------------------------------------------------


def day_of(letter, time_field: str) -> str | None:
    """The UTC day a dead letter belongs to: its event time, or the `day=` of a raw file's key."""
    if isinstance(letter, datetime):
        return (
            (letter if letter.tzinfo else letter.replace(tzinfo=timezone.utc))
            .astimezone(timezone.utc)
            .date()
            .isoformat()
        )
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


# ---- the sensor -----------------------------------------------------------------------------


def build_dead_letter_sensor(spec: PipelineSpec, source: DeadLettersSpec) -> dg.SensorDefinition:
    resource_key, probe = dead_letter_reader(source.kind)
    selection = dg.AssetSelection.groups(spec.name)
    time_field = source.time_field or spec.schema.time_field

    @dg.sensor(
        name=f"{spec.name}__dlq_{source.kind}_{re.sub(r'[^A-Za-z0-9_]', '_', source.name)}",
        asset_selection=selection,
        minimum_interval_seconds=source.interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING if source.running else dg.DefaultSensorStatus.STOPPED,
        required_resource_keys={resource_key},
        description=(
            f"Launches a backfill of {spec.name} for the days of the dead letters in {source.label} when its depth "
            f"grows by more than {source.growth} within {source.window_s} s."
        ),
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
        asset_graph = context.repository_def.asset_graph
        keys = set(selection.resolve(asset_graph))
        days, notes = _days_to_backfill(context.instance, asset_graph, keys, spec, letters, time_field)
        said = f" ({'; '.join(notes)})" if notes else ""
        if not days:
            return skip(f"{source.label}: depth {depth} grew {rise}, but no day to backfill{said}")
        context.log.info(
            f"{source.label}: depth {depth} grew {rise} within {source.window_s}s; backfilling {', '.join(days)}{said}"
        )
        tags = {"event_replay/trigger": source.label, "event_replay/dead_letter_depth": str(depth)}
        request = backfill_request(asset_graph, keys, days, tags)
        # The rise has been acted on: measure the next one from here.
        return dg.SensorResult(run_requests=[request], cursor=json.dumps({"samples": [[now, depth]]}))

    return dlq_sensor


def _days_to_backfill(instance, asset_graph, keys, spec: PipelineSpec, letters: list, time_field: str):
    """The days of the peeked dead letters that are partitions of the pipeline and not being
    backfilled already (sorted), and notes on what was left out and why."""
    days = {d for d in (day_of(letter, time_field) for letter in letters) if d}
    unknown = len(letters) - sum(1 for letter in letters if day_of(letter, time_field))
    partitions = set(daily_partitions(spec).get_partition_keys())
    outside = sorted(days - partitions)
    days &= partitions
    busy = days_being_backfilled(instance, asset_graph, keys) & days
    days -= busy
    notes = []
    if unknown:
        notes.append(f"{unknown} of {len(letters)} peeked dead letters had no readable event time")
    if outside:
        notes.append(f"days outside the partitions skipped: {', '.join(outside)}")
    if busy:
        notes.append(f"already being backfilled: {', '.join(sorted(busy))}")
    return sorted(days), notes
