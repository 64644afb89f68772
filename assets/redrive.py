"""redrive: deliver the partition's raw files (source refs) or events to the pipeline's sink, once per sink."""

from typing import Literal

import dagster as dg
from pydantic import Field

from assets.common import asset_key, pipeline_asset, sink_pool, verified_day
from assets.parsed import log_plan, plan_metadata, replaced_files, take_out_file
from replay_defs.core.naming import PARSED, RAW, REDRIVE, manifest_name, owner, whole_day_marker
from replay_defs.pipeline import delivery as rd
from replay_defs.pipeline.committed import out_for_redrive, parsed_state
from replay_defs.pipeline.spec import PipelineSpec
from replay_defs.sinks import open_sink
from replay_defs.sinks.base import with_destination


class DeliveryConfig(dg.Config):
    """How a redrive delivers, for every pipeline."""

    dry_run: bool = Field(default=False, description="Plan only: count what would be sent, send nothing.")
    limit: int | None = Field(default=None, ge=0, description="Send at most this many messages (sanity-check mode).")
    force: bool = Field(default=False, description="Send again even what the ledger says the sink already has.")
    rate_limit: float | None = Field(default=None, gt=0, description="At most this many messages per second.")
    retries: int = Field(
        default=2, ge=0, description="Retries, with exponential backoff from 1 s, before a message counts as failed."
    )
    batch_size: int = Field(default=10_000, ge=1, description="Messages per ledger lookup.")
    chunk_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Messages per sink call, each chunk recorded in the ledger before it is sent and with its outcome after: a "
            "crash leaves at most two chunks in doubt, which the next run settles with the sink. Default: 500 for a "
            "sink that cannot say what it holds (RabbitMQ, SQS, the outbox: a crash there can leave possible "
            "duplicates), else the whole batch (Kafka, Redis)."
        ),
    )


class RedriveConfig(DeliveryConfig):
    mode: Literal["day", "file", "prefix", "parquet"] = Field(
        default="day",
        description=(
            "day: every source ref of the day's parsed events (surgical day mode); file: one raw file (`uri`); "
            "prefix: raw files of the day under `prefix`; parquet: source refs of one parsed Parquet file (`uri`)."
        ),
    )
    uri: str | None = Field(
        default=None, description="Raw file URI (mode file) or parsed Parquet path/URI (mode parquet)."
    )
    prefix: str | None = Field(default=None, description="Lake-relative prefix or URI (mode prefix).")
    type: str | None = Field(default=None, description="Only source refs of events of this type (modes day, parquet).")
    destination: str | None = Field(
        default=None,
        description=(
            "Deliver to this destination instead of the spec's, same sink kind: a Kafka topic, SQS queue, "
            "RabbitMQ exchange or Redis key (e.g. another topic for this launch). The ledger keeps each "
            "destination's deliveries apart, so nothing is skipped because it went to another one."
        ),
    )
    delete_parquet: bool = Field(
        default=True,
        description=(
            "mode parquet, unit raw_file: take the Parquet file out of the day (a new version recording it as out for "
            "redrive) before sending its source files, so their re-ingest does not duplicate its rows."
        ),
    )


def build_redrive(spec: PipelineSpec, source_figures=None) -> dg.AssetsDefinition:
    """`source_figures`: (lake, spec, day, counts) -> more metadata, from the spec's source kind."""

    @pipeline_asset(
        spec,
        REDRIVE,
        pool=sink_pool(spec),
        deps=[asset_key(spec, RAW), asset_key(spec, PARSED)],
        kinds={spec.redrive.sink.kind},
        # The sink's resource (`outbox`, `kafka`, `sqs`, `rabbitmq` or `redis`) depends on the spec, so resources come by key.
        required_resource_keys={"lake", "ledger", spec.redrive.sink.kind},
        description=(
            f"One message per {'parsed event' if spec.redrive.unit == 'event' else 'source file (`redrive_raw_file`)'} "
            f"to the {spec.redrive.sink.name} sink, recorded in an idempotency ledger so a re-run sends nothing twice unless `force`."
        ),
    )
    def redrive(context: dg.AssetExecutionContext, config: RedriveConfig) -> dg.MaterializeResult:
        the_lake = context.resources.lake.get()
        sink = open_sink(context.resources, run_sink_spec(spec, config), config.dry_run)
        handled: set[str] = set()  # a raw file holding events of two days is sent once per run
        try:
            for day in context.partition_keys:
                with context.resources.ledger.open() as ledger:
                    redrive_day(context, config, spec, the_lake, sink, ledger, day, handled, source_figures)
        finally:
            sink.close()
        return dg.MaterializeResult()

    return redrive


def run_sink_spec(spec: PipelineSpec, config: RedriveConfig):
    """The sink this run delivers to: the spec's, or its kind at the run's `destination`."""
    if config.destination is None:
        return spec.redrive.sink
    try:
        return with_destination(spec.redrive.sink, config.destination)
    except ValueError as exc:
        raise dg.Failure(f"destination {config.destination!r}: {exc}") from exc


def redrive_day(
    context,
    config: RedriveConfig,
    spec: PipelineSpec,
    the_lake,
    sink,
    ledger,
    day: str,
    handled: set[str],
    source_figures=None,
) -> None:
    metadata = {"mode": config.mode, "unit": spec.redrive.unit}

    def batches():
        parsed_files = verified_day(the_lake, spec, day)
        if spec.redrive.unit == "event":
            return rd.event_batches(
                the_lake, spec, parsed_files, config.mode, config.uri, config.prefix, config.type, config.batch_size
            )
        if config.mode == "parquet" and config.delete_parquet:
            return [rd.raw_file_batch(the_lake, parquet_sources(context, config, spec, the_lake, day, metadata))]
        manifest = the_lake.read_json(owner(spec, RAW), manifest_name(day))
        refs = rd.select_source_refs(
            the_lake, spec, day, parsed_files, manifest, config.mode, config.uri, config.prefix, config.type
        )
        return [rd.raw_file_batch(the_lake, refs)]

    deliver_day(
        context,
        config,
        spec,
        the_lake,
        sink,
        ledger,
        day,
        batches,
        handled if spec.redrive.unit == "raw_file" else None,
        metadata,
        whole_day=config.mode == "day" and config.type is None and config.limit is None,
        more_metadata=None if source_figures is None else (lambda counts: source_figures(the_lake, spec, day, counts)),
    )


def parquet_sources(context, config: RedriveConfig, spec, the_lake, day: str, metadata: dict) -> dict:
    """Mode parquet: the Parquet file's source refs, by its type, after taking the file out of the
    day (seed 004: delete the Parquet first, then redrive its sources). A dry run lists what it
    would take out. A file an earlier run already took out (a retry after a failed send) is sent
    from the refs the day's state recorded."""
    if not config.uri:
        raise ValueError("mode 'parquet' needs `uri`: a parsed Parquet file of this partition")
    rel = the_lake.rel_from_uri(config.uri) if "://" in config.uri else config.uri
    state = parsed_state(the_lake, spec, day)
    earlier = next((o for o in out_for_redrive(state.stats) if o["file"] == rel), None) if state else None
    if earlier is None:
        plan = [f for f in replaced_files(state, spec, None) if f["file"] == rel]
        if not plan:
            raise ValueError(f"{config.uri!r} is not a committed Parquet file of this partition")
        if config.type is not None and plan[0]["type"] != config.type:
            raise ValueError(f"{config.uri!r} holds {plan[0]['type']} events, not {config.type}")
        if config.dry_run:
            log_plan(context.log, day, "take out", plan)
            metadata.update(plan_metadata("would_delete", plan))
            refs = [r[0] for r in the_lake.sql([rel], "SELECT DISTINCT source_ref FROM files ORDER BY 1")]
            return {plan[0]["type"]: refs}
        earlier = take_out_file(the_lake, spec, day, rel, context.run.run_id, context.log)
        metadata.update(deleted_file=rel, deleted_rows=earlier["rows"], parsed_version=earlier["version"])
        # The parsed day changed: recorded in Dagster as its materialization (so the day's earlier
        # check verdicts show as stale), as a rollback does.
        context.log_event(
            dg.AssetMaterialization(
                asset_key=asset_key(spec, PARSED),
                partition=day,
                description=f"parquet-mode redrive took {rel} out of the day until its sources are re-ingested",
                metadata={"version": earlier["version"], "deleted_file": rel, "out_for_redrive": earlier["rows"]},
            )
        )
    else:
        context.log.info(f"{day}: {rel} was taken out by run {earlier['run_id']}; sending its source files")
    return {earlier["type"]: earlier["source_refs"]}


def deliver_day(
    context,
    config: DeliveryConfig,
    spec,
    the_lake,
    sink,
    ledger,
    day: str,
    batches,
    handled: set[str] | None,
    metadata: dict,
    whole_day: bool = True,
    more_metadata=None,
) -> None:
    """Deliver one day's messages (`batches()` makes them) and record the outcome: metadata, the
    run log, dead letters, and `last/day=D.json` for the `deliveries_reconcile` check.
    `whole_day`: the selection was the whole day (not a mode, type or limit); `more_metadata`:
    counts -> further metadata (a table source's seed-002 figures)."""
    dead_letters = f"dead_letter/day={day}/{context.run.run_id}.jsonl"
    try:
        counts = rd.redrive(
            sink,
            ledger,
            spec.name,
            day,
            batches(),
            context.run.run_id,
            dry_run=config.dry_run,
            limit=config.limit,
            force=config.force,
            batch_size=config.batch_size,
            chunk_size=config.chunk_size,
            retries=config.retries,
            rate_limit=config.rate_limit,
            log=context.log.info,
            handled_in_run=handled,
            on_failed=lambda rows: the_lake.append_jsonl(
                owner(spec, REDRIVE), dead_letters, [{"sink": sink.name, **r} for r in rows]
            ),
        )
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc
    would_publish = counts.selected - counts.skipped_already_delivered - counts.dropped
    context.log.info(
        f"{day}: selected {counts.selected}, {'would send' if config.dry_run else 'sent'} "
        f"{would_publish if config.dry_run else counts.published}, already delivered {counts.skipped_already_delivered}, "
        f"dropped {counts.dropped} {counts.dropped_reasons or ''}, failed {counts.failed}, "
        f"in doubt {counts.unknown}, reconciled {counts.reconciled}, possible duplicates {counts.possible_duplicates}"
    )
    md = {**metadata, "sink": sink.name, **delivery_metadata(config, counts)}
    if more_metadata is not None:
        md.update(more_metadata(counts))
    context.add_asset_metadata(md, partition_key=day)
    if counts.failed or counts.unknown:
        path = the_lake.uri(f"_replay/{owner(spec, REDRIVE)}/{dead_letters}")
        context.log.error(
            f"{day}: {counts.failed} deliveries failed, {counts.unknown} in doubt (first: {counts.first_error}); "
            f"dead letters in {path}; a re-run reconciles those in doubt with the sink and sends what it lacks"
        )
    record_outcome(the_lake, spec, day, context.run.run_id, config.dry_run, whole_day, counts, sink.name)


def delivery_metadata(config: DeliveryConfig, counts: rd.RedriveCounts) -> dict:
    """A day's delivery counts as asset metadata (with `would_publish` on a dry run)."""
    md = {
        "backpressure_paused_s": counts.paused_s,
        "dry_run": config.dry_run,
        "selected": counts.selected,
        "published": counts.published,
        "skipped_already_delivered": counts.skipped_already_delivered,
        "dropped": counts.dropped,
        "failed": counts.failed,
        "unknown": counts.unknown,
        "reconciled": counts.reconciled,
        "possible_duplicates": counts.possible_duplicates,
        **{f"selected_type_{t}": n for t, n in counts.by_type.items()},
        **{f"dropped_{r}": n for r, n in counts.dropped_reasons.items()},
    }
    if config.dry_run:
        md["would_publish"] = counts.selected - counts.skipped_already_delivered - counts.dropped
    return md


def record_outcome(
    the_lake, spec, day: str, run_id: str, dry_run: bool, whole_day: bool, counts, sink_name: str
) -> None:
    """`last/day=D.json` (the counts the `deliveries_reconcile` check reads), and the whole-day
    marker once the whole day went out without a failure; both name the sink (its ledger name),
    which a run's `destination` may have changed."""
    the_lake.write_json(
        owner(spec, REDRIVE),
        f"last/day={day}.json",
        {"run_id": run_id, "dry_run": dry_run, "whole_day": whole_day, "sink": sink_name, **counts.__dict__},
    )
    if whole_day and not dry_run and not counts.failed and not counts.unknown:
        the_lake.write_json(owner(spec, REDRIVE), whole_day_marker(day), {"run_id": run_id, "sink": sink_name})
