"""Dagster jobs that are operations rather than partitioned assets (launched from the launchpad
or the CLI): the processed-events replays (`processed_events.py`)."""

from jobs.processed_events import JOBS

__all__ = ["JOBS"]
