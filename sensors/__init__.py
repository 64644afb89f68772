"""DLQ-growth sensors that launch backfills of the affected partitions (not built yet)."""
