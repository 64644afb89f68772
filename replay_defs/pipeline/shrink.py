"""When a rebuilt day holds fewer events of a type than its previous version: the shrink baseline's rules."""

from __future__ import annotations


def shrunk_types(before: dict[str, int], after: dict[str, int], tolerance: float) -> list[str]:
    """`type: before -> after` for each type with fewer events after than before (beyond tolerance)."""
    return [
        f"{t}: {n} -> {after.get(t, 0)}" for t, n in sorted(before.items()) if after.get(t, 0) < n * (1 - tolerance)
    ]


def unconsented_shrink(stats: dict, tolerance: float) -> bool:
    """Whether a version shrank against its baseline without the run's consent (its shrink check failed)."""
    previous = stats.get("previous")
    return (
        bool(previous)
        and not stats.get("allow_shrink")
        and bool(shrunk_types(previous["rows_by_type"], stats.get("rows_by_type", {}), tolerance))
    )
