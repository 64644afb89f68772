"""event-replay: replays, redrives and backfills of event pipelines as Dagster partition backfills.

Kept free of imports: parse worker processes import submodules of this package.
"""
