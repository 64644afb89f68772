"""When a rebuilt day holds fewer events of a type than its previous version: the shrink baseline's rules."""

from __future__ import annotations


def shrunk_types(before: dict[str, int], after: dict[str, int], tolerance: float) -> list[str]:
    """`type: before -> after` for each type with fewer events after than before (beyond tolerance)."""
    return [
        f"{t}: {n} -> {after.get(t, 0)}" for t, n in sorted(before.items()) if after.get(t, 0) < n * (1 - tolerance)
    ]


def unconsented_shrink(stats: dict, tolerance: float) -> bool:
    """Whether a version shrank against its baseline without the run's consent (its shrink check failed)."""
    from replay_defs.pipeline.committed import out_rows_by_type

    previous = stats.get("previous")
    if not previous or stats.get("allow_shrink"):
        return False
    # Rows a parquet-mode redrive took out are waiting for re-ingest, not lost.
    now, out = stats.get("rows_by_type", {}), out_rows_by_type(stats)
    return bool(
        shrunk_types(previous["rows_by_type"], {t: now.get(t, 0) + out.get(t, 0) for t in {*now, *out}}, tolerance)
    )
