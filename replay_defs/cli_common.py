"""What every system's `event-replay` commands share: the Dagster instance in $DAGSTER_HOME, running a
job of the code location on it in this process or queueing one for the daemon, a run's outcome,
ranges of days, and connection URLs read from files (never from the command line).

Dagster is imported inside the functions, so `event-replay --help` starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date, timedelta
from pathlib import Path

DEFAULT_HOME = ".dagster_home"
INITIALIZED = ".event-replay-initialized"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


# The embedded default's instance config. The pools get a limit as in production (deploy/dagster.yaml),
# so the UI shows it instead of warning that a pool has no slots; at run granularity it is applied
# when the daemon dequeues a UI launch, and a CLI run in this process claims no slot, so a run killed
# hard (which never frees its slots on SQLite without run monitoring) cannot block the next command.
EMBEDDED_DAGSTER_YAML = """\
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
    granularity: run
"""


def ensure_dagster_home() -> Path:
    """A project-local SQLite instance unless DAGSTER_HOME says otherwise, its storage created
    once, under a lock: two first commands at once on a fresh home would otherwise both create
    the SQLite schemas and leave the schedule storage with two migration heads."""
    from filelock import FileLock

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(DEFAULT_HOME).resolve())))
    home.mkdir(parents=True, exist_ok=True)
    if (home / INITIALIZED).exists():
        return home
    with FileLock(str(home / ".init.lock")):
        if not (home / INITIALIZED).exists():
            cfg = home / "dagster.yaml"
            if not cfg.exists():
                cfg.write_text(EMBEDDED_DAGSTER_YAML)
            import dagster as dg

            instance = dg.DagsterInstance.get()  # creates the run, event log and schedule storage
            try:
                instance.get_runs(limit=1)
                instance.all_instigator_state()
            finally:
                instance.dispose()
            (home / INITIALIZED).touch()
    return home


def days_between(start: str, end: str) -> list[str]:
    """The days start..end, both included, validated as partition keys."""
    from replay_defs.core.lake import check_partition

    try:
        a, b = date.fromisoformat(check_partition(start)), date.fromisoformat(check_partition(end))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if b < a:
        raise SystemExit(f"end {end} is before start {start}")
    return [(a + timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]


def find_spec(name: str, refills: bool = False):
    """The served pipeline spec (or, with `refills`, also the refill spec) called `name`: shipped
    or declared in EVENT_REPLAY_PIPELINES (`replay_defs.pipelines.served`)."""
    from replay_defs.pipelines import served

    pipelines, refill_specs = served()
    specs = (*pipelines, *refill_specs) if refills else pipelines
    for spec in specs:
        if spec.name == name:
            return spec
    raise SystemExit(f"no pipeline {name!r}; known: {', '.join(p.name for p in specs)}")


def resolve(value) -> str:
    """A resource field may hold an EnvVar; resolve it the way a run would."""
    import dagster as dg

    if isinstance(value, dg.EnvVar):
        return value.get_value()
    return value


# ---- runs ---------------------------------------------------------------------------------------


def run_in_process(
    job_name: str,
    run_config: dict | None = None,
    *,
    days: list[str] | None = None,
    tags: dict | None = None,
    log_level: str = "WARNING",
    defs=None,
    instance=None,
    **execute_kwargs,
):
    """Run a job of the code location (`defs`, default the module's) in this process, on the
    instance in $DAGSTER_HOME, so it shows in the UI's runs. `days` makes it a run over the range
    days[0]..days[-1]. A failed run is returned, not raised."""
    import dagster as dg

    if defs is None:
        from replay_defs.definitions import defs
    range_tags = {RANGE_START: days[0], RANGE_END: days[-1]} if days else {}
    # The console shows warnings only; the full run log is in the instance (and the UI).
    config = {"loggers": {"console": {"config": {"log_level": log_level}}}, **(run_config or {})}
    return defs.resolve_job_def(job_name).execute_in_process(
        instance=instance or dg.DagsterInstance.get(),
        tags={**range_tags, **(tags or {})},
        run_config=config,
        raise_on_error=False,
        **execute_kwargs,
    )


def submit_run(job_name: str, run_config: dict, *, days: list[str], workspace: str | None = None) -> tuple[str, str]:
    """Queue a run of a job for the daemon and return (run id, QUEUED) without waiting: the
    run is created on the instance in $DAGSTER_HOME and submitted to its run coordinator (queued:
    the daemon launches it in a process of its own, within the instance's concurrency limits).
    Done by `dagster job launch`, Dagster's public way to submit a run of a workspace's code
    location; `workspace` is the workspace file naming the location the daemon serves (default:
    the project's workspace.yaml)."""
    import subprocess
    import uuid

    import dagster as dg

    root = Path(__file__).resolve().parent.parent
    workspace_file = Path(workspace).resolve() if workspace else root / "workspace.yaml"
    if not workspace_file.is_file():
        raise SystemExit(f"--workspace: no workspace file {workspace_file}")
    run_id = str(uuid.uuid4())
    tags = {RANGE_START: days[0], RANGE_END: days[-1]}
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "job",
            "launch",
            "-w",
            str(workspace_file),
            "-j",
            job_name,
            "--config-json",
            json.dumps(run_config),
            "--tags",
            json.dumps(tags),
            "--run-id",
            run_id,
        ],
        cwd=workspace_file.parent,  # the workspace's relative paths and module imports start there
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"submitting the run failed (dagster job launch):\n{(done.stderr or done.stdout)[-3000:]}")
    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_by_id(run_id)
        if run is None:
            raise SystemExit(f"dagster job launch reported success but run {run_id} is not in the instance")
        # What the submission did: queued it (the daemon may have dequeued it since), or, on an
        # instance without a run queue, started it.
        if instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED):
            return run_id, "QUEUED"
        return run_id, run.status.value


def run_status(result) -> str:
    return "SUCCESS" if result.success else "FAILURE"


def failed_steps(result) -> list:
    """The run's step-failure events, in order."""
    return [event for event in result.all_events if event.is_step_failure]


def exit_if_failed(result) -> None:
    if not result.success:
        sys.exit(1)


def print_run_json(result, **fields) -> None:
    """One JSON line: the run id, SUCCESS or FAILURE, then `fields`; exit 1 if the run failed."""
    print(json.dumps({"run_id": result.run_id, "status": run_status(result), **fields}))
    exit_if_failed(result)


# ---- connection URLs ----------------------------------------------------------------------------


class RefusedSecretFlag(argparse.Action):
    """A flag that used to take a URL with its password: `ps` shows every process's arguments to
    every user of the machine, so it is refused (without echoing the value) in favour of the
    environment variable or a `--...-url-file`."""

    def __init__(self, option_strings, dest, env: str = "", **kwargs):
        self.env = env
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        stem = option_string.removeprefix("--")
        parser.error(
            f"{option_string} is no longer accepted: a URL on the command line (with its password) is visible to "
            f"every user through `ps`. Set {self.env} in the environment, or pass --{stem}-file PATH "
            f"(a file holding the URL, readable only by you)."
        )


def url_file_options(connections) -> argparse.ArgumentParser:
    """A parent parser with `--<stem>-url-file PATH` per (stem, environment variable, what it is
    for) of `connections`, and the refused `--<stem>-url`."""
    parent = argparse.ArgumentParser(add_help=False)
    for stem, env, what in connections:
        parent.add_argument(
            f"--{stem}-url-file",
            metavar="PATH",
            help=f"{what}: read its URL from this file instead of {env} (never put a URL with a password on the command line)",
        )
        parent.add_argument(f"--{stem}-url", action=RefusedSecretFlag, env=env, help=argparse.SUPPRESS)
    return parent


def read_url_file(flag: str, path: str) -> str:
    try:
        url = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SystemExit(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    if not url or "\n" in url:
        raise SystemExit(f"{flag}: {path} must hold exactly one URL on one line")
    return url


def url_files_to_env(args, connections) -> None:
    """A `--...-url-file` wins over the environment; call it before the definitions load. Its
    secrets are registered for masking at once."""
    from replay_defs.core.redact import register_url

    for stem, env, _ in connections:
        path = getattr(args, f"{stem}_url_file", None)
        if path:
            os.environ[env] = register_url(read_url_file(f"--{stem}-url-file", path))
