"""Imported first by the moto server the tests start (`services.MotoProcess`): moto's `unix_time()`
with no argument becomes `time.time()`, the same number. moto asks for it for every message on a
queue, twice, at every SQS call (is it visible? delayed?), through two datetimes and an import
each time: 70% of the server's CPU in the SQS fault tests. Nothing else changes: every answer is
moto's own."""

import time

import moto.core.utils

_unix_time = moto.core.utils.unix_time


def unix_time(dt=None) -> float:
    return time.time() if dt is None else _unix_time(dt)


moto.core.utils.unix_time = unix_time
