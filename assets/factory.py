"""Turn a `PipelineSpec` into its assets, checks and replay job."""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from assets.checks import CHECKS, build_checks
from assets.projections import build_projections
from assets.redrive import build_redrive
from assets.sources import source_kind
from replay_defs.pipeline.spec import PipelineSpec


@dataclass(frozen=True)
class PipelineDefs:
    assets: list[dg.AssetsDefinition]
    checks: list[dg.AssetChecksDefinition]
    job: dg.UnresolvedAssetJobDefinition

    @property
    def verify_job(self) -> dg.UnresolvedAssetJobDefinition:
        """`<name>_verify`: every check of the days, nothing rebuilt (what `event-replay verify` runs)."""
        name = self.job.name.removesuffix("_replay")
        return dg.define_asset_job(
            name=f"{name}_verify",
            selection=dg.AssetSelection.checks(*self.checks),
            description=f"Run every check of {name}'s days without rebuilding anything: a verdict per day and check.",
        )


def build_pipeline(spec: PipelineSpec) -> PipelineDefs:
    source = source_kind(spec)
    assets = [source.raw_events(spec), source.parsed_events(spec)]
    if spec.projections:
        assets.append(build_projections(spec))
    assets.append(build_redrive(spec, source.redrive_figures))
    checks = build_checks(spec, (*CHECKS, *source.checks))
    job = dg.define_asset_job(
        name=f"{spec.name}_replay",
        selection=dg.AssetSelection.groups(spec.name),
        description=f"Replay {spec.name}: {source.replay_steps}and verify every day with blocking checks.",
    )
    return PipelineDefs(assets, checks, job)
