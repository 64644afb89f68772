"""What the benches that run each method in a process of its own share: the CPU a method's
processes used, and the run of a method that counts."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager

# Printed under a table with CPU columns.
CPU_NOTE = (
    "(CPU: the method's processes, start-up included; kernel time is mostly page faults, which on a VM "
    "that hands freed memory back to its host cost ~2 s per GB first touched)"
)
REPEAT_HELP = "runs of each method, taking turns; the fastest counts"


@contextmanager
def children_cpu() -> Iterator[dict]:
    """Yields a dict that gets `user_s` and `kernel_s`: the CPU of the child processes that ended
    and were reaped inside (with the processes they reaped: a method's whole tree)."""
    before, out = resource.getrusage(resource.RUSAGE_CHILDREN), {}
    yield out
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.update(user_s=after.ru_utime - before.ru_utime, kernel_s=after.ru_stime - before.ru_stime)


def fastest(runs: list[dict], largest: tuple[str, ...]) -> dict:
    """A method's fastest run (by `seconds`), with the largest value of each `largest` figure (its
    memory) over all its runs."""
    return {**min(runs, key=lambda r: r["seconds"]), **{k: max(r[k] for r in runs) for k in largest}}
