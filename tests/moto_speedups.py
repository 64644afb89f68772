"""Imported first by the moto server the tests start (`services.MotoProcess`). Two of moto's
helpers, called on every request, return what they returned before, at a fraction of the CPU;
every answer is still moto's own.

- `unix_time()` with no argument becomes `time.time()`, the same number. moto asks for it for
  every message on a queue, twice, at every SQS call (is it visible? delayed?), through two
  datetimes and an import each time: 70% of the server's CPU in the SQS fault tests.
- `list_of_moto_modules()` (the names of moto's service packages, which every request's host is
  matched against) is listed once, not with a directory listing and a stat per service per
  request: a fifth of the server's CPU for S3 puts and gets.
"""

import time

import moto.backends
import moto.core.utils

_unix_time = moto.core.utils.unix_time


def unix_time(dt=None) -> float:
    return time.time() if dt is None else _unix_time(dt)


moto.core.utils.unix_time = unix_time

_modules = tuple(moto.backends.list_of_moto_modules())
moto.backends.list_of_moto_modules = lambda: _modules
