"""`event-replay projections`: the projection replay's commands (list, replay, cleanup-markers,
generate). Connections come from the environment or from `--...-url-file`s, never from arguments."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone

from replay_defs.cli_common import (
    days_between,
    ensure_dagster_home,
    failed_steps,
    print_run_json,
    resolve,
    run_in_process,
    url_file_options,
    url_files_to_env,
)
from replay_defs.core.redact import redact

# The connections of the projection commands: (flag stem, environment variable, what it is for).
PROJECTION_CONNECTIONS = (
    ("clickhouse", "CLICKHOUSE_URL", "ClickHouse server (unset: chDB in EVENT_REPLAY_CHDB)"),
    ("redis", "EVENT_REPLAY_REDIS_URL", "Redis for the markers"),
    ("postgres", "EVENT_REPLAY_POSTGRES_URL", "PostgreSQL of the increment stores"),
)
REPLAY_TOTALS = ("aggregates", "events", "keys_written", "skipped_aggregates")


def register(sub) -> None:
    """Add this system's commands to `event-replay`'s subparsers."""
    conn = url_file_options(PROJECTION_CONNECTIONS)
    pr = sub.add_parser(
        "projections",
        help="projection replay: list, replay, cleanup-markers, generate",
        description="Replay fold projections from ClickHouse event_log for a tenant since a day, coordinated with live "
        "consumers through Redis markers (see README, 'Projection replay'). Connections come from CLICKHOUSE_URL, "
        "EVENT_REPLAY_REDIS_URL and EVENT_REPLAY_POSTGRES_URL, or from files (--clickhouse-url-file, --redis-url-file, "
        "--postgres-url-file); URLs are not accepted as arguments, where `ps` would show their passwords.",
    ).add_subparsers(dest="projections_cmd", required=True)
    ls = pr.add_parser("list", help="the registered projections, their stores and keys")
    ls.add_argument("--json", action="store_true", help="as JSON")
    ls.set_defaults(fn=cmd_projections_list)
    _add_replay(pr, conn)
    _add_cleanup_and_generate(pr, conn)


def _add_replay(pr, conn) -> None:
    rp = pr.add_parser(
        "replay",
        parents=[conn],
        help="replay a projection for a tenant since a day (a run over the day partitions)",
        description="Runs the projection_replay job on the local Dagster instance ($DAGSTER_HOME) over the days "
        "[--since, --until]: per day mark, drain, cutoff, fold in batches, verify, unmark. An interrupted replay "
        "resumes when run again. Prints one line per day on stderr and a JSON summary on stdout; exits 1 if a day "
        "does not match the from-scratch fold.",
    )
    rp.add_argument("--projection", required=True, help="projection name (see `projections list`)")
    rp.add_argument("--tenant-id", "--tenant", dest="tenant_id", required=True, help="tenant whose events are replayed")
    rp.add_argument("--since", required=True, help="first day, YYYY-MM-DD (UTC day of event time)")
    rp.add_argument("--until", help="last day, YYYY-MM-DD (default: today, UTC)")
    rp.add_argument("--batch-size", type=int, default=5000, help="events per ClickHouse page (default 5000)")
    rp.add_argument(
        "--aggregate-batch",
        type=int,
        default=1000,
        help="aggregates per batch; each key written once per batch (default 1000)",
    )
    rp.add_argument("--concurrency", type=int, default=4, help="aggregate streams folded in parallel (default 4)")
    rp.add_argument(
        "--dry-run", action="store_true", help="count aggregates and events per day; write nothing, set no marker"
    )
    rp.add_argument("--quiet", action="store_true", help="only the JSON summary")
    rp.set_defaults(fn=cmd_projections_replay)


def _add_cleanup_and_generate(pr, conn) -> None:
    cl = pr.add_parser(
        "cleanup-markers",
        parents=[conn],
        help="remove markers left by a crashed replay; release deferred live events",
        description="For replays that crashed and will not be resumed: removes their Redis markers (live consumers "
        "then resume the deferred events) and marks their progress abandoned, so the next replay of those days starts "
        "afresh. To resume instead, just run the same replay again.",
    )
    cl.add_argument("--projection", required=True)
    cl.add_argument("--tenant-id", "--tenant", dest="tenant_id", help="only this tenant's replays")
    cl.add_argument(
        "--older-than-minutes", type=float, default=0.0, help="only replays started longer ago (default 0: all)"
    )
    cl.set_defaults(fn=cmd_projections_cleanup)
    gn = pr.add_parser("generate", parents=[conn], help="write demo events into event_log (to try a replay)")
    gn.add_argument("--tenant-id", "--tenant", dest="tenant_id", default="project_demo")
    gn.add_argument("--events", type=int, default=100_000)
    gn.add_argument("--per-aggregate", type=int, default=25, help="events per aggregate (default 25)")
    gn.add_argument("--start", default="2025-06-01", help="first day (default 2025-06-01)")
    gn.add_argument("--days", type=int, default=3)
    gn.set_defaults(fn=cmd_projections_generate)


def _definitions():
    """The code location built now, after `url_files_to_env`: its resources read the environment."""
    from replay_defs.definitions import build_definitions

    return build_definitions()


def _require_redis(defs, args, used: bool = True) -> None:
    """Say on stderr which Redis holds the markers (password masked); when the command uses it,
    fail at once if it does not answer, saying what to set."""
    from replay_defs.core import connect

    url = resolve(defs.resources["projection_replay"].redis_url)
    if getattr(args, "redis_url_file", None):
        source = f"from {args.redis_url_file}"
    elif os.environ.get("EVENT_REPLAY_REDIS_URL"):
        source = "EVENT_REPLAY_REDIS_URL"
    else:
        source = "the default: EVENT_REPLAY_REDIS_URL is unset"
    print(
        redact(f"Redis for the markers: {url} ({source}){'' if used else '; a dry run does not use it'}"),
        file=sys.stderr,
    )
    if not used:
        return
    try:
        with connect.redis(url, socket_connect_timeout=3, socket_timeout=3) as r:
            r.ping()
    except Exception as exc:  # noqa: BLE001 - any failure to answer: say which Redis and what to set
        raise SystemExit(
            redact(
                f"Redis at {url} does not answer ({type(exc).__name__}: {exc}): set EVENT_REPLAY_REDIS_URL, or "
                "--redis-url-file PATH (a file holding the URL), to the Redis your live consumers use for the markers"
            )
        ) from None


def _projection(name: str):
    from replay_defs.projection_replay.engine import get_projection

    try:
        return get_projection(name)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


# ---- commands -----------------------------------------------------------------------------------


def cmd_projections_list(args) -> None:
    import json

    from replay_defs.projection_replay.engine import PROJECTIONS

    if args.json:
        print(json.dumps([p.summary() for p in PROJECTIONS.values()], indent=2))
        return
    print(f"{'projection':28} {'store':11} {'kind':10} {'scope':10} key")
    for p in PROJECTIONS.values():
        print(f"{p.name:28} {p.store:11} {p.kind:10} {p.scope:10} {', '.join(c for c, _ in p.key_columns)}")
        print(f"{'':28} {p.description}")


def cmd_projections_replay(args) -> None:
    """Replay a projection for a tenant since a day: a run of the projection_replay job over the
    partition range [since, until] on the local instance."""
    url_files_to_env(args, PROJECTION_CONNECTIONS)
    ensure_dagster_home()
    from assets.projection_replay import projection_key

    defs = _definitions()
    p = _projection(args.projection)
    _require_redis(defs, args, used=not args.dry_run)
    until = args.until or datetime.now(timezone.utc).date().isoformat()
    days = days_between(args.since, until)
    config = {
        "tenant": args.tenant_id,
        "dry_run": args.dry_run,
        "batch_size": args.batch_size,
        "aggregate_batch": args.aggregate_batch,
        "concurrency": args.concurrency,
    }
    result = run_in_process(
        "projection_replay",
        {"ops": {f"projection_replay__{p.name}": {"config": config}}},
        days=days,
        tags={"event_replay/tenant": args.tenant_id},
        defs=defs,
        asset_selection=[projection_key(p)],
    )
    mats = result.asset_materializations_for_node(f"projection_replay__{p.name}")
    per_day = {m.partition: {k: v.value for k, v in m.metadata.items()} for m in mats if m.partition}
    if not args.quiet:
        _print_days(per_day, args.dry_run)
    print_run_json(result, **_replay_summary(result, p.name, days, per_day, args))


def _replay_summary(result, projection: str, days: list[str], per_day: dict, args) -> dict:
    """The JSON summary's fields after the run id and status: the request, the verdict, the totals
    over the days and the error, if any."""
    checks = list(result.get_asset_check_evaluations())
    out = {
        "projection": projection,
        "tenant": args.tenant_id,
        "since": days[0],
        "until": days[-1],
        "dry_run": args.dry_run,
        "check_passed": all(e.passed for e in checks) if checks else None,
    }
    for k in REPLAY_TOTALS:
        out[k] = sum(int(d.get(k, 0) or 0) for d in per_day.values())
    errors = [e.step_failure_data.error for e in failed_steps(result) if e.step_failure_data.error]
    if errors:  # the last line of the cause: e.g. ReplayBusy, a ClickHouse error (passwords masked)
        err = errors[0].cause or errors[0]
        out["error"] = redact(err.message.strip().splitlines()[-1])[:500]
    return out


def _print_days(per_day: dict, dry_run: bool) -> None:
    """One line per day on stderr: what it folded (or would fold) and its verdict."""
    for day in sorted(per_day):
        d = per_day[day]
        extra = (
            f"would fold {d.get('dry_run_events_to_fold', 0):,} events of {d.get('dry_run_aggregates', 0):,} aggregates"
            if dry_run
            else f"{d.get('aggregates', 0):,} aggregates, {d.get('events', 0):,} events, "
            f"{d.get('keys_written', 0):,} keys, cutoff {d.get('cutoff') or '-'}, "
            f"{'verified' if d.get('verified') else 'MISMATCH'}{', resumed' if d.get('resumed') else ''}"
        )
        print(f"{day}  {extra}", file=sys.stderr)


def cmd_projections_cleanup(args) -> None:
    """Remove markers of crashed replays (a run of projection_replay_cleanup_markers)."""
    url_files_to_env(args, PROJECTION_CONNECTIONS)
    ensure_dagster_home()
    defs = _definitions()
    _projection(args.projection)
    _require_redis(defs, args)
    config = {
        "projection": args.projection,
        "tenant": args.tenant_id or "",
        "older_than_minutes": args.older_than_minutes,
    }
    result = run_in_process(
        "projection_replay_cleanup_markers", {"ops": {"cleanup_projection_markers": {"config": config}}}, defs=defs
    )
    print_run_json(result, **(result.output_for_node("cleanup_projection_markers") if result.success else {}))


def cmd_projections_generate(args) -> None:
    """Demo data: an event_log in the configured ClickHouse (chDB by default)."""
    url_files_to_env(args, PROJECTION_CONNECTIONS)
    from replay_defs.core.clickhouse import connect
    from replay_defs.projection_replay.engine import generate_event_log

    res = _definitions().resources["clickhouse"]
    t0 = time.time()
    with connect(resolve(res.url), resolve(res.data_path), resolve(res.database)) as ch:
        generate_event_log(ch, args.tenant_id, args.events, args.per_aggregate, args.start, args.days)
    print(
        f"wrote {args.events:,} events ({args.tenant_id}, {args.days} days from {args.start}) to event_log at {ch.where} "
        f"in {time.time() - t0:.1f}s"
    )
