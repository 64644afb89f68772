"""DLQ-growth sensors that launch backfills of the affected partitions."""

from sensors.dead_letters import build_dead_letter_sensor

__all__ = ["build_dead_letter_sensor"]
