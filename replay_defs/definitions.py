"""The code location: Definitions built from the pipeline specs in `replay_defs/pipelines.py`.

Storage locations come from env vars, with an embedded default under ./data:
EVENT_REPLAY_LAKE (lake root), EVENT_REPLAY_DUCKDB (projections and ledger),
EVENT_REPLAY_OUTBOX (outbox sink).
"""

import os

import dagster as dg

from assets import build_pipeline
from replay_defs.pipelines import PIPELINES
from resources import LakeResource, OutboxResource, StoreResource


def _setting(env: str, default: str):
    # EnvVar when set, so the value resolves at launch and stays out of the UI's config.
    return dg.EnvVar(env) if env in os.environ else default


def build_definitions(pipelines=PIPELINES) -> dg.Definitions:
    assets, checks, jobs = [], [], []
    for spec in pipelines:
        built = build_pipeline(spec)
        assets += built.assets
        checks += built.checks
        jobs.append(built.job)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        resources={
            "lake": LakeResource(root=_setting("EVENT_REPLAY_LAKE", "data/lake")),
            "store": StoreResource(path=_setting("EVENT_REPLAY_DUCKDB", "data/event_replay.duckdb")),
            "outbox": OutboxResource(root=_setting("EVENT_REPLAY_OUTBOX", "data/outbox")),
        },
    )


defs = build_definitions()
