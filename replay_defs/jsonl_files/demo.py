"""Demo data: hourly JSONL.gz telemetry files with the faults real pipelines have.

Writes `<lake>/raw/json_telemetry/year=YYYY/month=MM/day=DD/hour=HH/telemetry-...-gen<first day>.gz` and a
ground truth `<lake>/_demo/truth/day=<D>.json` (distinct valid events per type and event day) so
the demo can tell a right partition from a wrong one. Faults, all reproducible from the seed:

- at-least-once duplicates: ~1% of events are written again, often in a later file;
- late and early arrivals across midnight (event time vs. the hour the file arrived);
- a few very late events beyond the lateness window (they must be quarantined, not lost);
- per day one of each bad line: truncated JSON, wrong type, missing field, invalid UTF-8, a lone
  surrogate, NUL bytes, a non-object, an empty line, an unknown event type, an oversize line;
- per day one truncated gzip file (its events are never in the truth: the file is rejected).

`PacificClockDecoder` is the parser bug the demo deploys and rolls back (run config
`simulate_parser_bug`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from isal import igzip

from replay_defs.jsonl_files.parsing import EventDecoder

TYPES = ("lock", "bridge", "video_doorbell")
RAW_PREFIX = "raw/json_telemetry"
HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class DemoConfig:
    start: date
    days: int = 3
    events_per_day: int = 100_000
    files_per_hour: int = 1
    devices: int = 2_000
    seed: int = 7
    duplicate_rate: float = 0.01
    late_rate: float = 0.01
    early_rate: float = 0.005
    bad_lines: bool = True
    # Events beyond this lateness are "very late" and must land in quarantine.
    lateness_hours: int = 3
    compresslevel: int = 1
    # Extra payload text per event, to match a target event size (the benchmark uses ~380 bytes).
    payload_pad: int = 0


class PacificClockDecoder(EventDecoder):
    """A parser with a bug, for the demo: it reads UTC event times as US/Pacific (8 h late), so
    events land in the wrong partition. Parse workers import it by name, like `EventDecoder`."""

    def event_times(self, vals: list) -> pa.Array:
        return pc.add(super().event_times(vals), pa.scalar(timedelta(hours=8), pa.duration("us")))


def hour_dir(lake: Path, hour: datetime) -> Path:
    return lake / RAW_PREFIX / f"year={hour:%Y}/month={hour:%m}/day={hour:%d}/hour={hour:%H}"


def _bad_lines(day: date) -> list[bytes]:
    ts = f"{day.isoformat()}T12:00:00.000Z"
    return [
        b'{"event_id": "broken", "ts": "' + ts.encode() + b'", "type": "lock"',  # truncated JSON
        msgspec.json.encode(
            {"event_id": f"bad-type-{day}", "ts": ts, "type": "lock", "device_id": "d", "seq": "three", "payload": {}}
        ),
        msgspec.json.encode({"ts": ts, "type": "lock", "device_id": "d", "seq": 1, "payload": {}}),  # no id
        b'{"event_id": "utf8-\xff\xfe", "ts": "'
        + ts.encode()
        + b'", "type": "lock", "device_id": "d", "seq": 1, "payload": {}}',
        b'{"event_id": "surrogate-\\ud800", "ts": "'
        + ts.encode()
        + b'", "type": "lock", "device_id": "d", "seq": 1, "payload": {}}',
        b'{"event_id": "nul\x00", "ts": "' + ts.encode() + b'"}',
        b"[1,2,3]",
        b"",
        msgspec.json.encode(
            {"event_id": f"unknown-{day}", "ts": ts, "type": "toaster", "device_id": "d", "seq": 1, "payload": {}}
        ),
        msgspec.json.encode(
            {
                "event_id": f"huge-{day}",
                "ts": ts,
                "type": "lock",
                "device_id": "d",
                "seq": 1,
                "payload": {"blob": "x" * (3 << 20)},
            }
        ),
    ]


def generated_days(lake: str | Path, days: list[str]) -> list[str]:
    """The days among `days` a finished generation wrote (their truth is there)."""
    return [d for d in days if read_truth(lake, d) is not None]


def generate_missing(lake: str | Path, cfg: DemoConfig) -> list[list[str]]:
    """Generate the days of `cfg` that no earlier generation wrote, each run of consecutive missing
    days as one generation; the days already there are kept as they are (other options included).
    Returns the runs generated."""
    days = [(cfg.start + timedelta(days=i)).isoformat() for i in range(cfg.days)]
    have = set(generated_days(lake, days))
    runs: list[list[str]] = []
    for i, day in enumerate(days):
        if day in have:
            continue
        if runs and runs[-1][-1] == days[i - 1]:
            runs[-1].append(day)
        else:
            runs.append([day])
    for run in runs:
        generate(lake, replace(cfg, start=date.fromisoformat(run[0]), days=len(run)))
    return runs


def generate(lake: str | Path, cfg: DemoConfig) -> dict[str, Counter]:
    """Write the demo raw files; returns the ground truth per event day and type.

    Arrivals spill into the neighbouring days' hours (early, late, very late events), where other
    generations have files too: so a generation's files are named after its first day
    (`...-gen20251124.gz`) and never replace a file; they are written to `_demo/staging/` and moved
    into place at the end, then the truth is written. Files of a generation whose truth is missing
    (one that stopped before its end) belong to no truth: they are removed first."""
    lake = Path(lake)
    tag = f"gen{cfg.start:%Y%m%d}"
    _remove_unfinished(lake)
    staging = lake / "_demo" / "staging" / tag
    shutil.rmtree(staging, ignore_errors=True)
    rng = random.Random(cfg.seed)
    # Two generations with the same seed draw the same ids: the salt keeps them apart.
    salt = cfg.start.toordinal()
    enc = msgspec.json.Encoder()
    buffers: dict[datetime, list[bytes]] = defaultdict(list)
    truth: dict[str, Counter] = defaultdict(Counter)
    first = datetime(cfg.start.year, cfg.start.month, cfg.start.day, tzinfo=timezone.utc)
    seq = 0
    pad = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(cfg.payload_pad))

    def flush(until: datetime):
        for hour in sorted(h for h in buffers if h < until):
            lines = buffers.pop(hour)
            rng.shuffle(lines)
            _write_hour(staging, hour, lines, cfg, tag)

    for h in range(cfg.days * 24):
        event_hour = first + h * HOUR
        day = event_hour.date()
        for _ in range(cfg.events_per_day // 24):
            seq += 1
            ts, event = _event(rng, event_hour, seq, cfg, pad, salt)
            line = enc.encode(event)
            arrival = _arrival(rng, ts, cfg)
            arrival_hour = arrival.replace(minute=0, second=0, microsecond=0)
            buffers[arrival_hour].append(line)
            if arrival - ts < timedelta(days=1):
                truth[day.isoformat()][event["type"]] += 1
            if rng.random() < cfg.duplicate_rate:  # at-least-once: the same line again
                buffers[arrival_hour + HOUR * rng.randrange(0, 2)].append(line)
        if cfg.bad_lines and event_hour.hour == 12:
            buffers[event_hour].extend(_bad_lines(day))
            _write_truncated(staging, event_hour, rng, enc, cfg, tag)
        flush(event_hour)
    flush(datetime.max.replace(tzinfo=timezone.utc))
    _move_into_place(staging, lake)
    truth_dir = lake / "_demo" / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    for day, counts in truth.items():
        (truth_dir / f"day={day}.json").write_text(json.dumps(dict(sorted(counts.items()))))
    return truth


def _remove_unfinished(lake: Path) -> None:
    """Remove the raw files of generations that have no truth for their first day (stopped
    before their end, or while moving their files into place)."""
    for path in (lake / RAW_PREFIX).rglob("*-gen*.gz"):
        first = re.search(r"-gen(\d{8})\.gz$", path.name)
        if first and read_truth(lake, datetime.strptime(first[1], "%Y%m%d").date().isoformat()) is None:
            path.unlink()


def _move_into_place(staging: Path, lake: Path) -> None:
    """Each staged file to its place in the lake; an existing file is never replaced (checked for
    all first, so a refused generation adds nothing either)."""
    moves = [(src, lake / src.relative_to(staging)) for src in sorted(staging.rglob("*.gz"))]
    clash = next((dst for _, dst in moves if dst.exists()), None)
    if clash is not None:
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(f"{clash} exists already: the demo generator never replaces a raw file")
    for src, dst in moves:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)  # fails when `dst` exists, unlike a rename
        src.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.parent.rmdir()  # `_demo/staging`, when no other generation is staging
    except OSError:
        pass


def _event(
    rng: random.Random, event_hour: datetime, seq: int, cfg: DemoConfig, pad: str, salt: int = 0
) -> tuple[datetime, dict]:
    """One event of the hour: (its event time, the event)."""
    ms = rng.randrange(3_600_000)
    ts = event_hour + timedelta(milliseconds=ms)
    etype = rng.choice(TYPES)  # drawn before the id: the seed's data stays the same
    event = {
        "event_id": f"{rng.getrandbits(128) ^ salt:032x}",
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z",
        "type": etype,
        "device_id": f"dev-{rng.randrange(cfg.devices):05d}",
        "seq": seq,
        "payload": {
            "battery": rng.randrange(100),
            "rssi": -rng.randrange(30, 90),
            "fw": "4.2.1",
            "state": rng.choice(("locked", "unlocked", "idle")),
        },
    }
    if cfg.payload_pad:
        event["payload"]["note"] = pad
    return ts, event


def _arrival(rng: random.Random, ts: datetime, cfg: DemoConfig) -> datetime:
    """When an event stamped `ts` arrives: mostly at once; some late, some early (clock skew),
    a very few beyond the lateness window."""
    r = rng.random()
    if r < cfg.late_rate:
        return ts + timedelta(minutes=rng.randrange(1, cfg.lateness_hours * 60 - 5))
    if r < cfg.late_rate + cfg.early_rate:
        return ts - timedelta(minutes=rng.randrange(1, 50))
    if r < cfg.late_rate + cfg.early_rate + 0.0002:
        return ts + timedelta(days=2)  # very late: outside the lateness window
    return ts


def _write_hour(lake: Path, hour: datetime, lines: list[bytes], cfg: DemoConfig, tag: str) -> None:
    d = hour_dir(lake, hour)
    d.mkdir(parents=True, exist_ok=True)
    n = cfg.files_per_hour
    size = -(-len(lines) // n) if lines else 0
    for i in range(n):
        chunk = lines[i * size : (i + 1) * size]
        if not chunk:
            continue
        with igzip.open(
            d / f"telemetry-firehose-{hour:%Y-%m-%d-%H}-{i:03d}-{tag}.gz", "wb", compresslevel=cfg.compresslevel
        ) as f:
            f.write(b"\n".join(chunk) + b"\n")


def _write_truncated(lake: Path, hour: datetime, rng: random.Random, enc, cfg: DemoConfig, tag: str) -> None:
    """A file cut at 70%: readers see its first lines, then the stream ends early."""
    lines = []
    for i in range(2_000):
        ts = hour + timedelta(milliseconds=rng.randrange(3_600_000))
        lines.append(
            enc.encode(
                {
                    "event_id": f"trunc-{hour:%Y%m%d%H}-{i}",
                    "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                    "type": "lock",
                    "device_id": "dev-t",
                    "seq": i,
                    "payload": {},
                }
            )
        )
    d = hour_dir(lake, hour)
    d.mkdir(parents=True, exist_ok=True)
    data = igzip.compress(b"\n".join(lines) + b"\n", compresslevel=cfg.compresslevel)
    (d / f"telemetry-firehose-{hour:%Y-%m-%d-%H}-truncated-{tag}.gz").write_bytes(data[: int(len(data) * 0.7)])


def read_truth(lake: str | Path, day: str) -> dict[str, int] | None:
    path = Path(lake) / "_demo" / "truth" / f"day={day}.json"
    return json.loads(path.read_text()) if path.exists() else None
