"""`event-replay`: demo data, the demo backfill, per-partition status and rollback, and the seed
systems: ingestion refill (`refill`), processed-events replays (`processed-events`), billing
reprocessing (`billing`) and projection replay (`projections`); `<command> --help` for each.

Everything here goes through the same Dagster definitions the UI and `dagster asset materialize`
use, against the instance in $DAGSTER_HOME (default: ./.dagster_home, SQLite).
"""

from __future__ import annotations

import argparse

from replay_defs.clickhouse_table import cli as billing
from replay_defs.core.redact import secrets_masked
from replay_defs.ingestion_refill import cli as ingestion_refill
from replay_defs.pipeline import cli as pipeline
from replay_defs.processed_events import cli as processed_events
from replay_defs.projection_replay import cli as projection_replay

# Each system adds its commands, in the order `event-replay --help` lists them.
SYSTEMS = (pipeline, ingestion_refill, processed_events, billing, projection_replay)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="event-replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for system in SYSTEMS:
        system.register(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    import warnings

    # Dagster flags the partitioned-check and backfill-policy APIs as beta/preview; we pin the version.
    warnings.filterwarnings("ignore", module="dagster")
    warnings.filterwarnings("ignore", message=".*(beta|preview).*")
    args = build_parser().parse_args(argv)
    from replay_defs.pipeline.declared import DeclarationError

    with secrets_masked():  # an error that escapes prints without the passwords it may quote
        try:
            args.fn(args)
        except DeclarationError as exc:  # the user's pipelines or sink settings: their message says where
            raise SystemExit(f"event-replay: {exc}") from None


if __name__ == "__main__":
    main()
