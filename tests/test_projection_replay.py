"""Projection replay against real Redis, PostgreSQL and chDB (one test over the
clickhouse-connect HTTP path): replay twice, dry run, resume after a crash, stuck-marker cleanup,
and a real live consumer running concurrently with a replay."""

import json
import random
import threading
import time
from datetime import date, datetime, timedelta, timezone

import dagster as dg
import pyarrow as pa
import pytest
from conftest import RANGE_TAGS

from replay_defs.projection_replay.engine import (
    EVENT_LOG,
    EVENT_LOG_DDL,
    PROJECTIONS,
    ReplayLog,
    ReplayOptions,
    replay_day,
)
from replay_defs.projection_replay.live import Coordinator, LiveEvent, LiveProjector
from replay_defs.projection_replay.stores import open_store

DAYS = ["2025-06-01", "2025-06-02", "2025-06-03"]
TYPES = ("run.started", "run.step", "run.finished")
AGG, DAILY = PROJECTIONS["aggregate_state"], PROJECTIONS["tenant_daily_event_counts"]


class Log:
    """event_log of a test: events written to ClickHouse and kept here for the Python truth."""

    def __init__(self, ch):
        self.ch, self.events, self.seq = ch, [], 0
        self.lock = threading.Lock()
        ch.command(EVENT_LOG_DDL.replace("{table}", EVENT_LOG))

    def make(self, tenant: str, aggregate: str, when: datetime, rnd: random.Random) -> LiveEvent:
        self.seq += 1
        units = rnd.choice([0, 1, 2, 5])
        payload = json.dumps({"units": units, "note": "x"}) if units else json.dumps({"note": "no units"})
        return LiveEvent(
            tenant, aggregate, f"ev{self.seq:010d}", int(when.timestamp() * 1000), rnd.choice(TYPES), payload
        )

    def insert(self, events: list[LiveEvent]) -> None:
        self.ch.insert(
            EVENT_LOG,
            pa.table(
                {
                    "tenant": [e.tenant for e in events],
                    "aggregate_id": [e.aggregate_id for e in events],
                    "event_id": [e.event_id for e in events],
                    "time": pa.array([e.time_ms for e in events], pa.timestamp("ms", tz="UTC")),
                    "type": [e.type for e in events],
                    "payload": [e.payload for e in events],
                }
            ),
        )
        self.events += events

    def history(self, tenant: str, aggregates: int, per_aggregate: int, seed: int = 1) -> None:
        rnd = random.Random(seed)
        lo = datetime(2025, 5, 31, tzinfo=timezone.utc)  # a day before the window too: whole-aggregate folds reach it
        evs = []
        for a in range(aggregates):
            for _ in range(rnd.randint(1, per_aggregate)):
                evs.append(self.make(tenant, f"agg-{a:04d}", lo + timedelta(seconds=rnd.randrange(4 * 86400)), rnd))
        self.insert(evs)

    # the truth: plain Python folds of the events in memory
    def daily(self, tenant: str) -> dict:
        out = {}
        for e in self.events:
            if e.tenant != tenant:
                continue
            k = (datetime.fromtimestamp(e.time_ms / 1000, timezone.utc).date(), e.type)
            ev, un = out.get(k, (0, 0))
            out[k] = (ev + 1, un + json.loads(e.payload).get("units", 0))
        return out

    def state(self, tenant: str) -> dict:
        out = {}
        for e in sorted((e for e in self.events if e.tenant == tenant), key=lambda e: e.event_id):
            n, first, last, _, _ = out.get(e.aggregate_id, (0, None, None, "", ""))
            t = datetime.fromtimestamp(e.time_ms / 1000, timezone.utc)
            out[e.aggregate_id] = (n + 1, min(first or t, t), max(last or t, t), e.type, e.event_id)
        return out


def in_days(d: dict, days=DAYS) -> dict:
    return {k: v for k, v in d.items() if k[0].isoformat() in days}


@pytest.fixture(scope="module")
def proj_home(tmp_path_factory, chdb_path, redis_url, postgres_dsn):
    """One Dagster instance and one code location for the module (an instance costs ~2 s); the
    per-test settings are env vars the resources resolve at launch (EnvVar)."""
    home = tmp_path_factory.mktemp("proj_home")
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "EVENT_REPLAY_CHDB": chdb_path,
            "CLICKHOUSE_DATABASE": "default",
            "EVENT_REPLAY_REDIS_URL": redis_url,
            "EVENT_REPLAY_POSTGRES_URL": postgres_dsn,
            "EVENT_REPLAY_PROJECTION_PREFIX": "er:test",
            "EVENT_REPLAY_PROJECTION_LOG_DIR": str(home / "logs"),
            "DAGSTER_HOME": str(home),
        }.items():
            mp.setenv(k, v)
        mp.delenv("CLICKHOUSE_URL", raising=False)
        from replay_defs.definitions import build_definitions

        with dg.instance_for_test(temp_dir=str(home)) as instance:
            yield build_definitions(), instance


@pytest.fixture
def proj(proj_home, monkeypatch, tmp_path, chdb_path, ch_database, redis_url, postgres_dsn):
    """The test's chDB database, Redis prefix and log directory; its event_log and stores."""
    from resources import ClickHouseResource

    prefix = f"er:test:{ch_database}:{time.time_ns()}"
    for k, v in {
        "CLICKHOUSE_DATABASE": ch_database,
        "EVENT_REPLAY_PROJECTION_PREFIX": prefix,
        "EVENT_REPLAY_PROJECTION_LOG_DIR": str(tmp_path / "logs"),
    }.items():
        monkeypatch.setenv(k, v)
    defs, instance = proj_home
    res = ClickHouseResource(data_path=chdb_path, database=ch_database)
    ch = res.get()
    stores = {AGG.name: open_store(AGG, res), DAILY.name: open_store(DAILY, res, postgres_dsn)}
    yield {
        "defs": defs,
        "instance": instance,
        "log": Log(ch),
        "ch": ch,
        "res": res,
        "stores": stores,
        "prefix": prefix,
        "redis": redis_url,
        "pg": postgres_dsn,
        "logs": tmp_path / "logs",
        "tenant": f"tenant-{ch_database[-20:]}",
    }
    for s in stores.values():
        s.close()
    ch.close()


def replay(p, projections, first, last, **config):
    keys = [dg.AssetKey(["projection_replay", name]) for name in projections]
    ops = {f"projection_replay__{name}": {"config": {"tenant": p["tenant"], **config}} for name in projections}
    return (
        p["defs"]
        .resolve_job_def("projection_replay")
        .execute_in_process(
            instance=p["instance"],
            tags={RANGE_TAGS[0]: first, RANGE_TAGS[1]: last},
            run_config={"ops": ops},
            asset_selection=keys,
            raise_on_error=False,
        )
    )


class Crash(Exception):
    """Raised by a test between two batches of a replay: the process dies there."""


def crash_after(p, name, day, batches, **options) -> None:
    """Replay `day` of projection `name` for the test's tenant through the engine, as the asset
    does, and crash it after `batches` batches (the engine's `after_batch` seam)."""

    def after_batch(result) -> None:
        if result.batches >= batches:
            raise Crash(f"crash after {result.batches} batch(es)")

    coord = Coordinator(p["redis"], name, prefix=p["prefix"])
    try:
        with pytest.raises(Crash):
            replay_day(
                PROJECTIONS[name],
                p["tenant"],
                day,
                p["res"].get,
                p["stores"][name],
                coord,
                ReplayOptions(**options),
                ReplayLog(None),
                after_batch=after_batch,
            )
    finally:
        coord.close()


def day_meta(result, name) -> dict:
    return {
        m.partition: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node(f"projection_replay__{name}")
    }


def stored_state(p, tenant) -> dict:
    rows = p["stores"][AGG.name].rows(AGG, tenant)
    return {k[0]: v for k, v in rows.items()}


def test_replay_twice_gives_the_same_exact_projections(proj):
    p, log, t = proj, proj["log"], proj["tenant"]
    log.history(t, aggregates=30, per_aggregate=12)
    log.history("other-tenant", aggregates=5, per_aggregate=5, seed=2)
    # wrong state from an earlier, buggy projection version: must be rewritten / removed
    pg = p["stores"][DAILY.name]
    with pg.con.transaction():
        pg.con.execute(
            'INSERT INTO "projection_tenant_daily_event_counts" VALUES (%s, %s, %s, 999, 999), (%s, %s, %s, 7, 7)',
            (t, date(2025, 6, 2), "run.step", "other-tenant", date(2025, 6, 2), "run.step"),
        )
    for _ in range(2):
        result = replay(p, [AGG.name, DAILY.name], DAYS[1], DAYS[1], aggregate_batch=8, batch_size=16, concurrency=3)
        assert result.success
        assert (
            all(e.passed for e in result.get_asset_check_evaluations())
            and len(result.get_asset_check_evaluations()) == 2
        )
        assert pg.rows(DAILY, t) == in_days(log.daily(t), DAYS[1:2]), "increments: exact, not doubled"
        touched = {
            e.aggregate_id
            for e in log.events
            if e.tenant == t and datetime.fromtimestamp(e.time_ms / 1000, timezone.utc).date().isoformat() == DAYS[1]
        }
        assert stored_state(p, t) == {a: s for a, s in log.state(t).items() if a in touched}
    assert pg.rows(DAILY, "other-tenant") == {(date(2025, 6, 2), "run.step"): (7, 7)}, "another tenant is never touched"
    meta = day_meta(result, DAILY.name)
    assert sorted(meta) == DAYS[1:2] and all(m["verified"] and m["batches"] >= 2 for m in meta.values())
    lines = [
        json.loads(x)
        for f in p["logs"].glob("projection-replay-tenant_daily_event_counts-*.jsonl")
        for x in f.read_text().splitlines()
    ]
    steps = [x["event"] for x in lines]
    assert steps.count("done") == 2 and {"marked", "drained", "cutoff", "batch", "verified", "unmarked"} <= set(steps)


def test_dry_run_counts_and_writes_nothing(proj):
    p, log, t = proj, proj["log"], proj["tenant"]
    log.history(t, aggregates=12, per_aggregate=6)
    result = replay(p, [AGG.name, DAILY.name], DAYS[0], DAYS[0], dry_run=True)
    assert result.success
    for day in DAYS[:1]:
        window = [
            e for e in log.events if datetime.fromtimestamp(e.time_ms / 1000, timezone.utc).date().isoformat() == day
        ]
        aggs = {e.aggregate_id for e in window}
        daily, state = day_meta(result, DAILY.name)[day], day_meta(result, AGG.name)[day]
        assert (daily["dry_run_aggregates"], daily["dry_run_events_to_fold"]) == (len(aggs), len(window))
        assert state["dry_run_events_to_fold"] == sum(e.aggregate_id in aggs for e in log.events)
    assert p["stores"][DAILY.name].rows(DAILY, t) == {} and stored_state(p, t) == {}
    assert Coordinator(p["redis"], AGG.name, prefix=p["prefix"]).active() == [], "a dry run sets no marker"


def test_resume_after_crash_skips_done_aggregates_and_ends_exact(proj):
    p, log, t = proj, proj["log"], proj["tenant"]
    log.history(t, aggregates=24, per_aggregate=10)
    crash_after(p, DAILY.name, DAYS[0], batches=2, aggregate_batch=5)
    prog = p["stores"][DAILY.name].progress(DAILY, t, DAYS[0])
    assert prog.status == "running" and prog.aggregates == 10
    coord = Coordinator(p["redis"], DAILY.name, prefix=p["prefix"])
    assert [r["replay_id"] for r in coord.active(t)] == [prog.replay_id], (
        "markers stay up: live events keep being deferred"
    )
    resumed = replay(p, [DAILY.name], DAYS[0], DAYS[0], aggregate_batch=5)
    assert resumed.success
    m = day_meta(resumed, DAILY.name)[DAYS[0]]
    window_aggs = {
        e.aggregate_id
        for e in log.events
        if datetime.fromtimestamp(e.time_ms / 1000, timezone.utc).date().isoformat() == DAYS[0]
    }
    assert m["resumed"] and m["skipped_aggregates"] == 10 and m["aggregates"] == len(window_aggs) - 10
    assert m["replay_id"] == prog.replay_id and m["cutoff"] == prog.cutoff
    assert p["stores"][DAILY.name].rows(DAILY, t) == in_days(log.daily(t), DAYS[:1]), (
        "no double count of the first two batches"
    )
    assert coord.active(t) == []


def test_cleanup_markers_after_crash_releases_deferred_events(proj, capsys):
    from replay_defs.cli import main

    p, log, t = proj, proj["log"], proj["tenant"]
    log.history(t, aggregates=10, per_aggregate=6)
    crash_after(p, AGG.name, DAYS[1], batches=1, aggregate_batch=3)
    stores = p["stores"]
    live = LiveProjector(
        p["redis"],
        {AGG.name: AGG.scope},
        lambda name, e: stores[name].apply_live(PROJECTIONS[name], e.tenant, e),
        prefix=p["prefix"],
    )
    rnd = random.Random(5)
    marked = sorted(
        {
            e.aggregate_id
            for e in log.events
            if datetime.fromtimestamp(e.time_ms / 1000, timezone.utc).date().isoformat() == DAYS[1]
        }
    )
    late = log.make(t, marked[-1], datetime(2025, 6, 2, 12, tzinfo=timezone.utc), rnd)
    log.insert([late])
    assert live.handle(late) == {AGG.name: "defer"}, "the crashed replay's marker still holds the aggregate"
    assert live.resume_ready() == 0 and live.pending() == 1
    main(["projections", "cleanup-markers", "--projection", AGG.name, "--tenant-id", t])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "SUCCESS" and out["replays_cleaned"] == 1 and out["markers_removed"] == len(marked)
    assert out["progress_abandoned"] == 1 and out["aggregates_released"] == 1
    assert live.resume_ready() == 1 and live.pending() == 0, "the deferred event (> cutoff) is applied once released"
    assert stored_state(p, t)[marked[-1]][4] == late.event_id
    again = replay(p, [AGG.name], DAYS[1], DAYS[1])
    assert again.success and not day_meta(again, AGG.name)[DAYS[1]]["resumed"], "an abandoned replay starts afresh"
    assert {a: stored_state(p, t)[a] for a in marked} == {a: log.state(t)[a] for a in marked}
    live.close()


def test_live_consumer_during_replay_ends_equal_to_a_fold_of_all_events(proj):
    """A real live consumer (a thread: appends events to event_log, then handles them through
    LiveProjector into the same stores) runs before, during and after a replay of both projections."""
    p, log, t = proj, proj["log"], proj["tenant"]
    log.history(t, aggregates=30, per_aggregate=12)
    stores = {AGG.name: open_store(AGG, p["res"]), DAILY.name: open_store(DAILY, p["res"], p["pg"])}
    live = LiveProjector(
        p["redis"],
        {n: PROJECTIONS[n].scope for n in stores},
        lambda name, e: stores[name].apply_live(PROJECTIONS[name], e.tenant, e),
        prefix=p["prefix"],
    )
    stop, handled, errors = threading.Event(), [0], []

    def consumer():
        rnd = random.Random(9)
        try:
            while not stop.is_set():
                agg = f"agg-{rnd.randrange(36):04d}"  # some aggregates are new
                when = datetime(2025, 6, 1, tzinfo=timezone.utc) + timedelta(seconds=rnd.randrange(3 * 86400))
                with log.lock:
                    ev = log.make(t, agg, when, rnd)
                    log.insert([ev])  # in event_log before a consumer sees it
                live.handle(ev)
                live.resume_ready()
                handled[0] += 1
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    th = threading.Thread(target=consumer, daemon=True)
    th.start()
    while handled[0] < 20 and not errors and th.is_alive():
        time.sleep(0.01)
    result = replay(p, [AGG.name, DAILY.name], DAYS[0], DAYS[-1], aggregate_batch=12, batch_size=25, concurrency=2)
    during = dict(live.counts)
    time.sleep(0.3)
    stop.set()
    th.join(30)
    assert not errors, errors
    for _ in range(50):
        live.resume_ready()
        if live.pending() == 0:
            break
    assert result.success and all(e.passed for e in result.get_asset_check_evaluations())
    per_day = {(e.asset_key.path[-1], e.partition) for e in result.get_asset_check_evaluations() if e.partition}
    assert per_day == {(n, d) for n in (AGG.name, DAILY.name) for d in DAYS}, "a verdict per day and projection"
    assert during["deferred"] + during["skipped"] > 0, f"the protocol was exercised: {during}"
    assert live.counts["applied"] > 20 and live.pending() == 0
    assert p["stores"][DAILY.name].rows(DAILY, t) == in_days(log.daily(t)), "increments: no double count, nothing lost"
    assert stored_state(p, t) == log.state(t), "every aggregate equals its from-scratch fold"
    live.close()
    for s in stores.values():
        s.close()


def test_replay_over_clickhouse_http(proj, clickhouse_http, monkeypatch, capsys):
    """The clickhouse-connect path (CLICKHOUSE_URL) against the chDB-backed HTTP fixture, from the CLI."""
    from replay_defs.cli import main

    p, log, t = proj, proj["log"], proj["tenant"]
    log.history(t, aggregates=15, per_aggregate=8)
    monkeypatch.setenv("CLICKHOUSE_URL", clickhouse_http.url())
    n0 = len(clickhouse_http.requests)
    main(
        [
            "projections",
            "replay",
            "--projection",
            AGG.name,
            "--tenant-id",
            t,
            "--since",
            DAYS[1],
            "--until",
            DAYS[2],
            "--batch-size",
            "10",
            "--aggregate-batch",
            "6",
        ]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "SUCCESS" and out["check_passed"] and out["events"] > 0
    touched = {
        e.aggregate_id
        for e in log.events
        if datetime.fromtimestamp(e.time_ms / 1000, timezone.utc).date().isoformat() in DAYS[1:]
    }
    assert stored_state(p, t) == {a: s for a, s in log.state(t).items() if a in touched}
    sent = clickhouse_http.requests[n0:]
    pages = [r for r in sent if "(aggregate_id, event_id) > ({ka:String}, {ke:String})" in r["sql"]]
    assert len(pages) > 3 and all(r["params"]["tenant"] == t for r in pages), "keyset pages, the tenant as a parameter"
    assert t not in " ".join(r["sql"] for r in sent), "no value is formatted into SQL"
    assert any(
        r["sql"].lstrip().upper().startswith("INSERT INTO") and "projection_aggregate_state" in r["sql"] for r in sent
    )
    main(["projections", "list", "--json"])
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert (
        listed.keys() == PROJECTIONS.keys()
        and listed[DAILY.name]["kind"] == "increment"
        and listed[AGG.name]["kind"] == "latest"
    )


def test_live_protocol_decisions(redis_url):
    """The live side step by step (Redis only): in-flight handlers hold up the drain; covered events
    <= cutoff are skipped, > cutoff deferred and resumed in order after the unmark; a lagging
    consumer's event <= the recorded through-cutoff is skipped; stale in-flight entries are cleared."""
    prefix = f"er:test:protocol:{time.time_ns()}"
    applied: list[str] = []
    coord = Coordinator(redis_url, "p", prefix=prefix)
    day_ms = int(datetime(2025, 6, 2, tzinfo=timezone.utc).timestamp() * 1000)
    ev = lambda i, agg="a1", t=day_ms + 1000: LiveEvent("t1", agg, f"ev{i:04d}", t, "x", "{}")  # noqa: E731

    def slow_apply(name, e):
        applied.append(e.event_id)
        time.sleep(0.3 if e.event_id == "ev0001" else 0)

    live = LiveProjector(redis_url, {"p": "day"}, slow_apply, prefix=prefix)
    th = threading.Thread(target=live.handle, args=(ev(1),))
    th.start()
    time.sleep(0.1)  # ev0001 is being applied when the replay marks its window
    coord.register("r1", "t1", "2025-06-02", day_ms, day_ms + 86_400_000, "day")
    coord.mark_window("r1", "t1", day_ms, day_ms + 86_400_000)
    waited, secs = coord.drain("t1")
    th.join()
    assert waited == 1 and secs >= 0.1 and applied == ["ev0001"], "the drain waited for the in-flight handler"
    assert live.handle(ev(2)) == {"p": "defer"}, "cutoff not known yet: deferred"
    coord.set_cutoff("r1", "ev0003")
    assert live.handle(ev(3)) == {"p": "skip"} and live.handle(ev(4)) == {"p": "defer"}
    assert live.handle(ev(5, agg="a3", t=day_ms - 1)) == {"p": "apply"}, "outside the window: not this replay's rows"
    assert live.resume_ready() == 0, "nothing resumes while the marker is up"
    assert coord.unmark("r1")["aggregates_ready"] == 1
    assert live.handle(ev(6)) == {"p": "defer"}, "queued behind the deferred events (order)"
    assert live.resume_ready() == 2 and applied == ["ev0001", "ev0005", "ev0004", "ev0006"], "ev0002 <= cutoff skipped"
    assert live.handle(ev(3, agg="a2")) == {"p": "skip"}, "a lagging event <= the through-cutoff is already folded"
    assert live.handle(ev(7)) == {"p": "apply"} and live.pending() == 0
    coord.r.hset(coord.k.inflight("t1"), "dead-consumer", int(time.time() * 1000) - 600_000)
    assert coord.clear_stale_inflight() == 1 and coord.drain("t1", timeout_s=1)[0] == 0
    # one replay per (projection, tenant, day): a second one is refused until the first releases
    assert coord.acquire("t1", "2025-06-02", "run-a") is None and coord.acquire("t1", "2025-06-02", "run-b") == "run-a"
    coord.release("t1", "2025-06-02", "run-b")  # not the holder: no effect
    assert coord.acquire("t1", "2025-06-02", "run-c") == "run-a"
    coord.release("t1", "2025-06-02", "run-a")
    assert coord.acquire("t1", "2025-06-02", "run-c") is None
    coord.release("t1", "2025-06-02", "run-c")
    live.close()
    coord.close()


def test_blocking_check_fails_the_run_when_rows_differ_from_the_fold(proj):
    """An event written to event_log late with an old id (breaking the cutoff's assumption) while a
    replay is interrupted: the resumed replay cannot have folded it, and the check catches it."""
    p, log, t = proj, proj["log"], proj["tenant"]
    log.history(t, aggregates=12, per_aggregate=6)
    crash_after(p, DAILY.name, DAYS[0], batches=1, aggregate_batch=4)
    done = p["stores"][DAILY.name].progress(DAILY, t, DAYS[0]).last_aggregate
    late = LiveEvent(
        t, done, "ev0000000000", int(datetime(2025, 6, 1, 8, tzinfo=timezone.utc).timestamp() * 1000), "run.step", "{}"
    )
    log.insert([late])
    result = replay(p, [DAILY.name], DAYS[0], DAYS[0], aggregate_batch=4)
    assert not result.success, "the blocking check fails the run"
    [ev] = result.get_asset_check_evaluations()
    assert ev.check_name == "matches_from_scratch_fold" and not ev.passed
    m = day_meta(result, DAILY.name)[DAYS[0]]
    assert m["verified"] is False and m["verify_mismatched_rows"] == 1 and m["resumed"]
    assert Coordinator(p["redis"], DAILY.name, prefix=p["prefix"]).active(t) == [], "markers come down even so"
