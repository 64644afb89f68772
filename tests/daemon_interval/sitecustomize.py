"""Put on PYTHONPATH by the tests that start a Dagster daemon (services.daemon_env): in the daemon's
process only, the interval between its backfill iterations (a constant, 30 s, with no setting)
becomes EVENT_REPLAY_TEST_DAEMON_INTERVAL_S. A backfill takes two iterations (launch its runs, then
see them done), so the tests wait for what the daemon does, not for its idle 30 s. Nothing else
changes: the daemon, its runs and what the tests read back are Dagster's own."""

import os
import sys

_interval = os.environ.get("EVENT_REPLAY_TEST_DAEMON_INTERVAL_S")
_argv = " ".join(getattr(sys, "orig_argv", []))
if _interval and ("dagster._daemon" in _argv or "dagster-daemon" in _argv):
    import dagster._daemon.controller

    dagster._daemon.controller.DEFAULT_DAEMON_INTERVAL_SECONDS = float(_interval)
