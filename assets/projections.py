"""projections: folds of a day's parsed events into the projection store (DuckDB by default)."""

import dagster as dg

from assets.common import asset_key, pipeline_asset, verified_day
from replay_defs.core.naming import PARSED, PROJECTIONS
from replay_defs.pipeline.committed import events_dataset
from replay_defs.pipeline.spec import PipelineSpec
from resources import LakeResource, StoreResource


def build_projections(spec: PipelineSpec) -> dg.AssetsDefinition:
    names = ", ".join(f"`{p.name}` ({p.kind})" for p in spec.projections)

    @pipeline_asset(
        spec,
        PROJECTIONS,
        deps=[asset_key(spec, PARSED)],
        kinds={"duckdb"},
        description=(
            f"Projections {names} folded from the day's committed parsed events (refused if their bytes changed). "
            "increment: the day's rows are replaced in one transaction; replace: the day's latest row per key is "
            "replaced and every key it touched is recomputed from all days, so a replay or rollback leaves no trace of "
            "the version it replaced."
        ),
    )
    def projections(
        context: dg.AssetExecutionContext, lake: LakeResource, store: StoreResource
    ) -> dg.MaterializeResult:
        the_lake, the_store = lake.get(), store.get()
        for day in context.partition_keys:
            events = events_dataset(the_lake, spec, verified_day(the_lake, spec, day))
            md = {}
            for p in spec.projections:
                rows = the_store.fold(spec.name, p, spec.schema, day, events)
                md[f"{p.name}_rows"] = rows
                if p.kind == "increment":
                    md[f"{p.name}_{p.count_column}"] = the_store.increment_total(spec.name, p, day)
            context.log.info(f"{day}: folded {md}")
            context.add_asset_metadata(md, partition_key=day)
        return dg.MaterializeResult()

    return projections
