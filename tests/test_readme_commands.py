"""Every command of the README's ```bash blocks, walked as a new user would.

Each command line (continuations joined, comments dropped) is either in RUN, run as written with
`bash -c` in a fresh working copy of the project (its `dev`, `pyproject.toml`, `workspace.yaml`,
`examples/`, and the project's `.venv`), with no EVENT_REPLAY_*/DAGSTER_HOME/CLICKHOUSE_* settings,
so the embedded defaults apply (data/ and .dagster_home in the copy); or in NOT_RUN, with the reason
it cannot run here (an outside service, a server that runs until stopped, a benchmark). A README
command in neither list fails the test, as does a listed command the README no longer has.

Heavy commands run with smaller sizes (`run_as`; the test says so): the demo at 3,000 and 6,000
events a day instead of 100,000 and 500,000.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"


def readme_commands() -> list[str]:
    """The command lines of the README's ```bash blocks, in order: `\\` continuations joined,
    whitespace collapsed, comment lines and trailing `  # ...` comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


# README command -> (what runs instead, or None: as written; a line its output must hold).
# In this order: later commands use what earlier ones made (the demo's days, the billing rows).
RUN = {
    "./dev demo": ("./dev demo --events-per-day 3000", "| truth: match"),
    "./dev dagster asset materialize -m replay_defs.definitions --select "
    "'telemetry/raw_events,telemetry/parsed_events,telemetry/projections,telemetry/redrive' "
    "--partition-range 2025-11-24...2025-11-26": (None, "RUN_SUCCESS"),
    "./dev event-replay verify telemetry 2025-11-24 2025-11-26": (None, "checks passed over 3 day(s)"),
    "./dev event-replay rollback telemetry 2025-11-25": (None, "telemetry 2025-11-25: parsed_events now holds version"),
    # After the rollback: its run adds days next to the first demo's, whose files it must keep.
    "./dev demo --days 5 --events-per-day 500000 --start 2025-11-20": (
        "./dev demo --days 5 --events-per-day 6000 --start 2025-11-20 --no-bug-story",
        "demo data for 2025-11-24 already in",
    ),
    "./dev event-replay billing generate --days 2 --rows-per-day 100000": (
        None,
        "2024-03-05: 102,000 rows into raw_events",
    ),
    "./dev event-replay billing reprocess --start 2024-03-04T00:00:00Z --end 2024-03-05 --tenant acme "
    "--environment prod --dry-run": (None, '"dry_run": true, "found": 200000, "published": 0'),
    "./dev event-replay refill --location events.csv --start 2025-07-09 --dry-run": (None, "2025-07-09"),
    "./dev event-replay projections generate --tenant-id project_abc123 --events 100000": (
        None,
        "wrote 100,000 events (project_abc123",
    ),
    "./dev event-replay projections list": (None, "tenant_daily_event_counts"),
    "./dev event-replay projections replay --projection tenant_daily_event_counts --tenant-id project_abc123 "
    "--since 2025-06-01 --until 2025-06-03 --dry-run": (None, "a dry run does not use it"),
}

KAFKA = "publishes to Kafka (EVENT_REPLAY_KAFKA_BOOTSTRAP)"
PROCESSED_EVENTS = (
    "needs the events' PostgreSQL and RabbitMQ (tests/test_processed_events.py, tests/test_readme_fixes.py)"
)
BENCH = "a benchmark: minutes of CPU, brokers for redrive (run by hand, figures in the README)"
SETTING = "sets a variable of your own deployment (paths, URLs); nothing to run"

NOT_RUN = {
    "./dev test": "the test suite itself",
    "./dev ui": "a server that runs until stopped (tests/test_browser.py drives it)",
    "export EVENT_REPLAY_LAKE=/data/lake": SETTING,
    "export EVENT_REPLAY_DUCKDB=/data/replay.duckdb": SETTING,
    "export EVENT_REPLAY_OUTBOX=/data/outbox": SETTING,
    "export EVENT_REPLAY_PIPELINES=/etc/event-replay/pipelines.yaml": SETTING,
    "EVENT_REPLAY_SINK__ORDERS=outbox": SETTING,
    "EVENT_REPLAY_SINK__ORDERS='redis:orders-replay?mode=list'": SETTING,
    "EVENT_REPLAY_SINK__TELEMETRY='sqs:telemetry-redrive?max_visible=1000'": SETTING,
    "EVENT_REPLAY_SINK__BILLING_REPROCESSING='rabbitmq:billing?routing_key=replay.{type}'": SETTING,
    "export EVENT_REPLAY_REDIS_URL=redis://:secret@redis.internal:6379/0": SETTING,
    "./dev event-replay billing reprocess --start 2024-03-04T00:00:00Z --end 2024-03-05 --tenant acme "
    "--environment prod --customer cust-2 --event-name api_request --batch-size 10000": KAFKA,
    "./dev event-replay refill --location events.csv --start 2025-07-09": "enqueues into Redis (BullMQ)",
    "./dev event-replay refill --source access_logs --location s3://my-logs/langfuse/ --start 2025-07-08 "
    "--end 2025-07-09": "reads S3 and enqueues into Redis",
    "./dev event-replay refill --source listing --location s3://langfuse-events/ --start 2025-07-09 "
    "--rate-limit 500": "lists S3 and enqueues into Redis",
    "./dev event-replay processed-events create-table": PROCESSED_EVENTS,
    "rabbitmqadmin declare exchange name=habitat-events type=topic durable=true": PROCESSED_EVENTS,
    './dev event-replay processed-events replay-one evt_123456 --reason "INC-42"': PROCESSED_EVENTS,
    './dev event-replay processed-events replay-failed --hours 24 --rate-limit 20 --reason "INC-42"': PROCESSED_EVENTS,
    "./dev event-replay processed-events replay-range contribution.submitted 2025-11-01 2025-11-30 --dry-run": (
        PROCESSED_EVENTS
    ),
    './dev event-replay processed-events reset-stuck --older-than-minutes 5 --reason "worker crashed"': (
        PROCESSED_EVENTS
    ),
    './dev event-replay processed-events undo "$RUN_ID" --reason "wrong window"': PROCESSED_EVENTS,
    "./dev event-replay processed-events replay-payload --payload "
    "contribution_id=123e4567-e89b-12d3-a456-426614174000 --dry-run": PROCESSED_EVENTS,
    "./dev event-replay processed-events replay-failed --payload contribution_id=123e4567-e89b-12d3-a456-426614174000 "
    '--watch-queue habitat-worker --reason "INC-42"': PROCESSED_EVENTS,
    './dev event-replay processed-events purge "$RUN_ID" --queue habitat-worker --yes --reason "INC-43: bad replay"': (
        PROCESSED_EVENTS
    ),
    './dev event-replay billing status "$RUN_ID" --wait --timeout 3600': (
        "follows a run `billing reprocess --submit` queued for a daemon (tests/test_billing_operations.py)"
    ),
    "./dev event-replay refill --source access_logs --location s3://my-logs/langfuse/ "
    "--start 2025-07-09T00:30:00 --end 2025-07-09T07:45:00": "reads S3 and enqueues into Redis",
    "./dev event-replay projections replay --projection aggregate_state --tenant-id project_abc123 "
    "--since 2025-06-01 --until 2025-06-03 --batch-size 10000 --aggregate-batch 2000 --concurrency 4": (
        "needs Redis for the markers (tests/test_projection_replay.py)"
    ),
    "./dev event-replay projections cleanup-markers --projection aggregate_state": "needs Redis for the markers",
    "./dev bench": BENCH,
    "./dev bench --events 500000 --no-naive --repeat 1": BENCH,
    "./dev bench redrive": BENCH,
    "./dev bench redrive --events 200000 --sinks kafka,redis-list --ledgers duckdb": BENCH,
    "./dev bench refill": BENCH,
    "./dev bench clickhouse": BENCH,
    "./dev bench clickhouse --rows 1000000 --batch 10000": BENCH,
    "./dev bench projection": BENCH,
    "./dev bench projection --rows 1000000 --skip-replay": BENCH,
    "./dev bench dagster": BENCH,
    "./dev bench dagster --days 10 --events 50000": BENCH,
}

# The refill's dry run reads `events.csv` in the working directory: a small one in the seed's format.
EVENTS_CSV = (
    '"operation","key"\n'
    '"REST.PUT.OBJECT","project-1/trace/body-1/event-1.json"\n'
    '"REST.PUT.OBJECT","project-1/observation/body-2/event-2.json"\n'
    '"REST.GET.OBJECT","project-1/trace/body-1/event-1.json"\n'
)


def test_every_readme_command_is_run_or_listed_with_a_reason():
    commands = readme_commands()
    assert "./dev demo" in commands and "./dev test" in commands  # the two at the top
    unknown = [c for c in commands if c not in RUN and c not in NOT_RUN]
    assert not unknown, f"README commands neither run nor listed here (add them to RUN or NOT_RUN): {unknown}"
    gone = [c for c in (*RUN, *NOT_RUN) if c not in commands]
    assert not gone, f"listed here but no longer in the README: {gone}"
    assert not set(RUN) & set(NOT_RUN)


@pytest.fixture(scope="module")
def working_copy(tmp_path_factory) -> Path:
    """A fresh checkout as a new user has it: the files `./dev` and the commands read, the
    project's venv (the package is installed from the project in editable mode)."""
    copy = tmp_path_factory.mktemp("readme") / "event-replay"
    copy.mkdir()
    for name in ("dev", "pyproject.toml", "workspace.yaml"):
        shutil.copy2(PROJECT_ROOT / name, copy / name)  # keeps the mtime: `.venv/.installed` stays newer
    shutil.copytree(PROJECT_ROOT / "examples", copy / "examples")
    (copy / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    (copy / "events.csv").write_text(EVENTS_CSV)
    return copy


def _environment() -> dict:
    """This process's environment without the settings the README's commands should default."""
    drop = ("EVENT_REPLAY_", "DAGSTER_", "CLICKHOUSE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.mark.parametrize("command", list(RUN))
def test_readme_command_runs(working_copy, command):
    run_as, expected = RUN[command]
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", run_as or command],
        cwd=working_copy,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    shown = f"$ {run_as or command}\n(exit {proc.returncode}, {time.monotonic() - t0:.0f}s)\n{output[-4000:]}"
    assert proc.returncode == 0, shown
    assert expected in output, shown
    if "demo" in command:  # every day, as the demo leaves it, matches what the generator wrote
        last = {line[:10]: line for line in proc.stdout.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)}
        assert last and all(line.endswith("| truth: match") for line in last.values()), shown
    if "billing reprocess" in command:  # a dry run opens no Kafka producer
        assert "rdkafka" not in output and "9092" not in output, shown
