"""Sensors: DLQ-growth sensors that launch backfills of the affected partitions (or a replay of
the failed processed events), and raw-listing sensors that re-check days whose raw files changed
after they were built."""

from sensors.dead_letters import build_dead_letter_sensor
from sensors.raw_files import build_raw_files_sensor

__all__ = ["build_dead_letter_sensor", "build_raw_files_sensor"]
