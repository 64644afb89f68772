"""Pacing a stream of work: computing the next item while this one is used, and holding a rate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

_END = object()


def read_ahead(items: Iterator):
    """Yields `items`, computing the next one on a thread while the caller works on this one
    (reading Parquet and looking up the ledger mostly run outside the GIL)."""
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        upcoming = pool.submit(next, items, _END)
        while (item := upcoming.result()) is not _END:
            upcoming = pool.submit(next, items, _END)
            yield item


class Pacer:
    """Holds a rate: `wait(n)` sleeps until `n` more items may go at `per_second` (0 or None: no limit).

    Time lost to a stall is not made up by a burst afterwards: the rate holds from the moment work
    resumes, which is what a consumer that was protected by the limit expects."""

    def __init__(self, per_second: float | None):
        if per_second is not None and per_second < 0:
            raise ValueError("a rate limit must be >= 0 (0: unlimited)")
        self.per_second = per_second or 0.0
        self._next = time.monotonic()

    def wait(self, n: int = 1) -> None:
        if not self.per_second:
            return
        now = time.monotonic()
        self._next = max(self._next, now)
        if self._next > now:
            time.sleep(self._next - now)
        self._next += n / self.per_second
