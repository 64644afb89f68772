"""Where a deployment keeps its data: the settings that decide where runs write, each an
environment variable with its default. A run's config may not move them — anyone who can launch a
run could otherwise point the lake or a store at any directory — so a resource checks the value it
was given against the deployment's own before it writes anywhere."""

import os
from pathlib import Path

import dagster as dg

LAKE = ("EVENT_REPLAY_LAKE", "data/lake")
DUCKDB = ("EVENT_REPLAY_DUCKDB", "data/event_replay.duckdb")
STORE_URL = ("EVENT_REPLAY_STORE_URL", None)  # a Postgres projection store instead of the DuckDB file
CHDB = ("EVENT_REPLAY_CHDB", "data/chdb")
PROJECTION_LOGS = ("EVENT_REPLAY_PROJECTION_LOG_DIR", "data/projection_replay")


def deployed(setting: tuple[str, object]):
    """The setting for a resource: an `EnvVar` when set (resolved at launch, kept out of the UI's
    config; an integer when the default is one), else its default. A float (a timeout) is read
    now: Dagster has no float `EnvVar`."""
    env, default = setting
    if env not in os.environ:
        return default
    if isinstance(default, float):
        try:
            return float(os.environ[env])
        except ValueError:
            raise ValueError(f"{env} must be a number of seconds, not {os.environ[env]!r}") from None
    return dg.EnvVar.int(env) if isinstance(default, int) else dg.EnvVar(env)


def deployed_path(value: str, setting: tuple[str, str]) -> str:
    """`value`, if it is where the deployment says this data lives; a run config that points it
    elsewhere is refused."""
    env, default = setting
    expected = os.environ.get(env, default)
    if _where(value) != _where(expected):
        raise dg.Failure(
            f"{env} is {expected!r} for this deployment, but the run's config points it at {value!r}: where data is "
            "written is the deployment's setting (set the environment variable), not a run's"
        )
    return value


def _where(location: str) -> str:
    """A location compared as the place it names: an s3:// URI as written, a path resolved."""
    return location.rstrip("/") if location.startswith("s3://") else str(Path(location).resolve())
