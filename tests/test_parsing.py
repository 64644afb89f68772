"""Tests of the parse path (`replay_defs/jsonl_files/parsing.py`) on real raw files built in tmp_path.

Files are written with the TELEMETRY schema; every test parses real bytes (plain JSONL or gzip)
through `parse_file` / `parse_day` and checks the Parquet they write, not internals.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import os
import random
import tracemalloc
import zlib
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from isal import igzip

from replay_defs.jsonl_files import parsing
from replay_defs.jsonl_files.parsing import (
    ID_CRC32,
    READ_CHUNK,
    SAMPLE_BYTES,
    FileResult,
    FileTask,
    ParseJob,
    count_lines,
    parse_day,
    parse_file,
)
from replay_defs.pipelines import TELEMETRY

SCHEMA = TELEMETRY.schema
MAX_LINE = SCHEMA.max_line_bytes
DAY = date(2025, 11, 24)
UTC = timezone.utc
ARRIVAL = datetime(2025, 11, 24, 10, tzinfo=UTC)  # mid-day: only DAY owns this file's events
EARLY, LATE = timedelta(hours=1), timedelta(hours=3)
TYPES = ("lock", "bridge", "video_doorbell")


# --------------------------------------------------------------------------------------------
# Data-building helpers


def event(i, ts="2025-11-24T10:00:00.000Z", type="lock", **over) -> dict:
    e = {
        "event_id": f"e{i:06d}",
        "ts": ts,
        "type": type,
        "device_id": f"dev-{i % 17:03d}",
        "seq": i,
        "payload": {"battery": i % 100, "state": "locked", "note": "ünïcødé ✓"},
    }
    e.update(over)
    return {k: v for k, v in e.items() if v is not ...}


def line(i, **kw) -> bytes:
    return msgspec.json.encode(event(i, **kw))


def write_file(
    path: Path, lines: list[bytes], *, gz: bool | None = None, sep: bytes = b"\n", trailing: bool = True
) -> str:
    path = Path(path)
    data = sep.join(lines) + (sep if trailing and lines else b"")
    if gz is None:
        gz = path.name.endswith(".gz")
    path.write_bytes(igzip.compress(data, compresslevel=1) if gz else data)
    return str(path)


_counter = itertools.count()


def make_job(tmp_path: Path, *, day: date = DAY, buckets: int = 2) -> ParseJob:
    stage = tmp_path / f"stage-{next(_counter)}"
    return ParseJob(schema=SCHEMA, day=day, early=EARLY, late=LATE, buckets=buckets, stage_dir=str(stage))


def make_task(
    path: str, *, source_ref: str | None = None, arrival: datetime = ARRIVAL, home: bool = True, index: int = 0
) -> FileTask:
    return FileTask(
        path=path,
        source_ref=source_ref or f"s3://lake/raw/{Path(path).name}",
        arrival=arrival,
        home=home,
        file_index=index,
    )


def parse(tmp_path: Path, path: str, **task_kw) -> FileResult:
    job_kw = {k: task_kw.pop(k) for k in ("day", "buckets") if k in task_kw}
    return parse_file(make_job(tmp_path, **job_kw), make_task(path, **task_kw))


def quarantine_rows(result: FileResult) -> list[dict]:
    if result.quarantine_file is None:
        return []
    return sorted(
        pq.read_table(result.quarantine_file).to_pylist(), key=lambda r: (r["line_no"] is not None, r["line_no"] or 0)
    )


def staged_rows(result: FileResult) -> list[dict]:
    """The file's staged rows, each with the file's source_ref (stage 2 adds it: it is not staged)."""
    rows = []
    for path, n in result.staged.values():
        t = pa.ipc.open_file(path).read_all()
        assert t.num_rows == n and "source_ref" not in t.schema.names
        rows.extend({**r, "source_ref": result.source_ref} for r in t.to_pylist())
    return sorted(rows, key=lambda r: r["line_no"])


def assert_accounted(result: FileResult, path: str) -> None:
    """Every line is kept, quarantined, routed out or (for a neighbour's file) skipped, exactly once,
    and the parser's line count matches the independent count."""
    total = result.kept + sum(result.quarantined.values()) + sum(result.routed_out.values()) + result.neighbour_skipped
    assert result.lines == total, (result.lines, result)
    if result.home:
        assert result.neighbour_skipped == 0
    assert count_lines(path)[0] == result.lines
    assert sum(n for _, n in result.staged.values()) == result.kept


def output_rows(out_dir: str | Path, drop=()) -> list[tuple]:
    files = sorted(Path(out_dir).glob("type=*/day=*/*.parquet"))
    if not files:
        return []
    t = pa.concat_tables([pq.read_table(f) for f in files])
    cols = [c for c in t.column_names if c not in drop]
    return sorted(tuple(r[c] for c in cols) for r in t.select(cols).to_pylist())


def good_ids(result: FileResult) -> list[str]:
    return [r["event_id"] for r in staged_rows(result)]


# --------------------------------------------------------------------------------------------
# 1. Bad lines: each kind gets its reason, the run does not raise

_TS = b'"ts":"2025-11-24T10:00:00Z"'
_REST = b'"type":"lock","device_id":"d","seq":2'


BAD_LINES = {
    # id: (line, accepted reasons)
    "malformed_truncated_json": (b'{"event_id":"x2","ts":"2025-11-24T10:00:00Z","type":"lock"', {"malformed_json"}),
    "malformed_unquoted": (b"{event_id: x2}", {"malformed_json"}),
    "seq_is_string": (line(2, seq="three"), {"wrong_type"}),
    "ts_is_int": (line(2, ts=1764000000), {"wrong_type"}),
    "type_is_null": (line(2, type=None), {"wrong_type"}),
    "missing_event_id": (line(2, event_id=...), {"missing_field"}),
    "missing_ts": (line(2, ts=...), {"missing_field"}),
    "unknown_type": (line(2, type="toaster"), {"unknown_type"}),
    "unsafe_type": (line(2, type="../../etc"), {"unknown_type"}),
    "nul_byte": (
        b'{"event_id":"nul\x00","ts":"2025-11-24T10:00:00Z","type":"lock","device_id":"d","seq":2}',
        {"malformed_json"},
    ),
    "leading_nul": (b"\x00" + line(2), {"malformed_json"}),
    "array": (b"[1,2,3]", {"not_an_object"}),
    "string": (b'"just a string"', {"not_an_object"}),
    "two_objects": (line(2) + line(3), {"malformed_json"}),
    "two_objects_comma": (line(2) + b"," + line(3), {"malformed_json"}),
    "int_beyond_int64": (line(2, seq=2**63), {"wrong_type", "invalid_value"}),
    "int_beyond_uint64": (
        b'{"event_id":"x2",' + _TS + b',"type":"lock","device_id":"d","seq":123456789012345678901234567890}',
        {"wrong_type", "invalid_value"},
    ),
    "ts_without_offset": (line(2, ts="2025-11-24T10:00:00"), {"wrong_type", "invalid_value"}),
    "ts_not_a_date": (line(2, ts="yesterday"), {"invalid_value"}),
    "ts_feb_30": (line(2, ts="2025-02-30T00:00:00Z"), {"invalid_value"}),
    "invalid_utf8_in_value": (b'{"event_id":"utf8-\xff\xfe",' + _TS + b"," + _REST + b"}", {"invalid_utf8"}),
    "lone_surrogate_in_id": (b'{"event_id":"surrogate-\\ud800",' + _TS + b"," + _REST + b"}", {"invalid_unicode"}),
    "lone_surrogate_in_device": (
        b'{"event_id":"x2",' + _TS + b',"type":"lock","device_id":"\\udc00","seq":2}',
        {"invalid_unicode"},
    ),
    "empty_event_id": (line(2, event_id=""), {"wrong_type", "invalid_value"}),
    "whitespace_only": (b"   \t ", {"empty_line"}),
}


@pytest.mark.parametrize("bad,reasons", list(BAD_LINES.values()), ids=list(BAD_LINES))
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_bad_line_is_quarantined_with_its_reason(tmp_path, bad, reasons, gz):
    path = write_file(tmp_path / ("f.jsonl.gz" if gz else "f.jsonl"), [line(1), bad, line(3)])
    result = parse(tmp_path, path)

    assert result.kept == 2
    assert good_ids(result) == ["e000001", "e000003"]
    assert [r["line_no"] for r in staged_rows(result)] == [1, 3]
    assert sum(result.quarantined.values()) == 1
    (reason,) = result.quarantined
    assert reason in reasons
    (row,) = quarantine_rows(result)
    assert row["reason"] == reason
    assert row["line_no"] == 2
    assert row["sample"] == bad[:SAMPLE_BYTES]
    assert row["lines"] == 1
    assert row["source_ref"] == f"s3://lake/raw/{Path(path).name}"
    assert row["detail"]
    assert_accounted(result, path)


@pytest.mark.parametrize("idx", [0, 1, 2], ids=["first", "middle", "last"])
def test_empty_line(tmp_path, idx):
    lines = [line(1), line(2)]
    lines.insert(idx, b"")  # idx 2: the file ends with "\n\n"
    path = write_file(tmp_path / "f.jsonl", lines)
    result = parse(tmp_path, path)
    assert result.quarantined == Counter({"empty_line": 1})
    assert [r["line_no"] for r in quarantine_rows(result)] == [idx + 1]
    assert good_ids(result) == ["e000001", "e000002"]
    assert_accounted(result, path)


INVALID_UTF8_ELSEWHERE = {
    # JSON text must be UTF-8 (RFC 8259): a line with invalid bytes anywhere is not valid JSON.
    "in_extra_key": b'{"event_id":"x2",' + _TS + b"," + _REST + b',"n\xffote":1}',
    "in_known_key": b'{"event_id":"x2",' + _TS + b',"type":"lock","device\xff_id":"d","seq":2}',
    "in_extra_value": b'{"event_id":"x2",' + _TS + b"," + _REST + b',"note":"\xff\xfe"}',
    "in_payload_value": b'{"event_id":"x2",' + _TS + b"," + _REST + b',"payload":{"k":"\xff\xfe"}}',
}


@pytest.mark.parametrize("bad", list(INVALID_UTF8_ELSEWHERE.values()), ids=list(INVALID_UTF8_ELSEWHERE))
def test_invalid_utf8_in_key_or_any_value_is_quarantined(tmp_path, bad):
    path = write_file(tmp_path / "f.jsonl.gz", [line(1), bad, line(3)])
    result = parse(tmp_path, path)  # must not raise
    assert good_ids(result) == ["e000001", "e000003"]
    assert result.quarantined == Counter({"invalid_utf8": 1})
    assert [(r["line_no"], r["reason"]) for r in quarantine_rows(result)] == [(2, "invalid_utf8")]
    assert_accounted(result, path)


def test_lone_surrogate_in_payload_is_invalid_unicode(tmp_path):
    bad = b'{"event_id":"x2",' + _TS + b"," + _REST + b',"payload":{"k":"\\ud800"}}'
    path = write_file(tmp_path / "f.jsonl", [line(1), bad, line(3)])
    result = parse(tmp_path, path)
    assert good_ids(result) == ["e000001", "e000003"]
    assert result.quarantined == Counter({"invalid_unicode": 1})


@pytest.mark.parametrize("ts", ["0000-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00"])
def test_timestamp_before_year_1_is_quarantined_not_raised(tmp_path, ts):
    path = write_file(tmp_path / "f.jsonl", [line(1), line(2, ts=ts), line(3)])
    result = parse(tmp_path, path)  # must not raise
    assert good_ids(result) == ["e000001", "e000003"]
    assert sum(result.quarantined.values()) == 1
    assert set(result.quarantined) <= {"invalid_value", "outside_lateness_window"}
    assert_accounted(result, path)


def test_go_zero_time_is_an_invalid_value(tmp_path):
    """Go's zero time marks an unset timestamp; it is outside the accepted years (1677-2262)."""
    path = write_file(tmp_path / "f.jsonl", [line(1), line(2, ts="0001-01-01T00:00:00Z"), line(3)])
    result = parse(tmp_path, path)
    assert result.quarantined == Counter({"invalid_value": 1})
    (row,) = quarantine_rows(result)
    assert (row["line_no"], row["sample"]) == (2, line(2, ts="0001-01-01T00:00:00Z"))
    assert_accounted(result, path)


def test_many_bad_kinds_in_one_gzip_file(tmp_path):
    """Bad lines of every kind among 3,000 good ones in one .gz: exact counts and line numbers."""
    lines, expected_bad = [], {}
    rng = random.Random(5)
    good = [line(i) for i in range(3000)]
    bad_items = list(BAD_LINES.items())
    slots = sorted(rng.sample(range(1, 3000), len(bad_items)))
    it = iter(zip(slots, bad_items))
    nxt = next(it, None)
    for i, g in enumerate(good):
        if nxt and nxt[0] == i:
            lines.append(nxt[1][1][0])
            expected_bad[len(lines)] = nxt[1][1][1]
            nxt = next(it, None)
        lines.append(g)
    big = line(99999, payload={"blob": "x" * (MAX_LINE + 10)})
    lines.append(big)
    expected_bad[len(lines)] = {"oversize_line"}
    lines.append(b"")
    expected_bad[len(lines)] = {"empty_line"}
    lines.append(line(3000))
    path = write_file(tmp_path / "mixed.jsonl.gz", lines)

    result = parse(tmp_path, path)
    rows = quarantine_rows(result)
    assert {r["line_no"] for r in rows} == set(expected_bad)
    for r in rows:
        assert r["reason"] in expected_bad[r["line_no"]], r
        assert r["sample"] == lines[r["line_no"] - 1][:SAMPLE_BYTES]
    assert Counter(r["reason"] for r in rows) == result.quarantined
    kept = staged_rows(result)
    assert len(kept) == 3001 == result.kept
    for r in kept:  # every kept row points at its own line
        assert msgspec.json.decode(lines[r["line_no"] - 1])["event_id"] == r["event_id"]
    assert_accounted(result, path)


# --- whole-file faults


def _valid_gz(tmp_path, n=5000) -> tuple[bytes, list[bytes]]:
    lines = [line(i, payload={"r": os.urandom(6).hex()}) for i in range(n)]
    return gzip.compress(b"\n".join(lines) + b"\n"), lines


def test_a_line_nested_too_deep_is_quarantined_and_the_rest_of_the_file_kept(tmp_path):
    """JSON nested deeper than the decoder's stack allows raises RecursionError in msgspec; it must
    cost that line alone (reason nesting_too_deep), never the run."""
    deep = line(1, payload=None)[:-1] + b',"payload":' + b"[" * 1000 + b"]" * 1000 + b"}"
    deep = deep.replace(b',"payload":null', b"")
    path = write_file(tmp_path / "deep.jsonl", [line(0), deep, line(2)])
    result = parse(tmp_path, path)
    assert result.kept == 2
    assert result.quarantined == Counter({"nesting_too_deep": 1})
    (row,) = quarantine_rows(result)
    assert row["line_no"] == 2 and row["reason"] == "nesting_too_deep"
    assert_accounted(result, path)


def _parse_with(tmp_path, path: str, **limits) -> FileResult:
    job = dataclasses.replace(make_job(tmp_path), schema=dataclasses.replace(SCHEMA, **limits))
    return parse_file(job, make_task(path))


def test_past_the_per_reason_limit_quarantined_lines_are_counted_in_one_record(tmp_path):
    """A tiny gzip of 5,000 blank lines: 100 records one by one, then one record holding the count
    of the rest, so such a file costs a count, not a record per line."""
    path = tmp_path / "blank.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n" * 5000 + line(1) + b"\n"))
    result = _parse_with(tmp_path, str(path), max_quarantine_rows_per_reason=100)
    assert result.kept == 1 and result.quarantined == Counter({"empty_line": 5000})
    rows = quarantine_rows(result)
    assert len(rows) == 101
    (summary,) = [r for r in rows if r["line_no"] is None]
    assert summary["reason"] == "empty_line" and summary["lines"] == 4900
    assert "max_quarantine_rows_per_reason" in summary["detail"]
    assert sum(r["lines"] for r in rows) == 5000
    assert_accounted(result, str(path))


@pytest.mark.parametrize("limit", [{"max_file_lines": 1000}, {"max_file_bytes": 50_000}])
def test_a_file_past_its_size_limit_is_rejected_whole_with_its_line_count(tmp_path, limit):
    path = write_file(tmp_path / "big.jsonl", [line(i) for i in range(3000)])
    result = _parse_with(tmp_path, path, **limit)
    assert result.kept == 0 and result.staged == {}
    assert result.quarantined == Counter({"file_too_large": 3000})
    (row,) = quarantine_rows(result)
    assert row["reason"] == "file_too_large" and row["lines"] == 3000 and next(iter(limit)) in row["detail"]
    assert_accounted(result, path)


def test_truncated_gzip_is_rejected_whole(tmp_path):
    gz, lines = _valid_gz(tmp_path)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gz[: int(len(gz) * 0.7)])
    n, _, err = count_lines(str(path))
    assert err is not None and err.reason == "truncated_gzip"
    assert 0 < n < len(lines)

    result = parse(tmp_path, str(path))
    assert result.lines == n
    assert result.kept == 0 and result.staged == {} and not result.routed_out
    assert result.quarantined == Counter({"truncated_gzip": n})
    (row,) = quarantine_rows(result)
    assert row["reason"] == "truncated_gzip" and row["line_no"] is None and row["lines"] == n
    assert_accounted(result, str(path))
    # nothing staged is left behind
    assert not [p for p in Path(tmp_path).rglob("bucket*/*") if p.is_file()]


def test_a_small_truncated_gzip_reports_the_lines_before_the_break(tmp_path):
    """A file smaller than one read: a file reader raises before returning what it decompressed.
    The count must still be every line readable before the break, as Python's own zlib sees it."""
    gz, lines = _valid_gz(tmp_path, n=300)
    cut = gz[: int(len(gz) * 0.6)]
    path = tmp_path / "small-cut.jsonl.gz"
    path.write_bytes(cut)
    readable = zlib.decompressobj(wbits=31).decompress(cut)  # independent of the project's reader
    n, size, err = count_lines(str(path))
    assert err is not None and err.reason == "truncated_gzip"
    # isal's decompressor may hold back the last few bytes before the break (zlib does not); those
    # are inside the final, partial line, which counts as one line either way.
    assert 0 <= len(readable) - size <= 8 and size > 0
    assert n == readable.count(b"\n") + (not readable.endswith(b"\n")) > 0
    result = parse(tmp_path, str(path))
    assert result.quarantined == Counter({"truncated_gzip": n})
    assert_accounted(result, str(path))


def test_truncated_gzip_of_a_neighbour_is_skipped_not_quarantined(tmp_path):
    gz, _ = _valid_gz(tmp_path)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gz[: int(len(gz) * 0.7)])
    result = parse(tmp_path, str(path), home=False, arrival=datetime(2025, 11, 25, 1, tzinfo=UTC))
    n = count_lines(str(path))[0]
    assert result.lines == n == result.neighbour_skipped
    assert result.kept == 0 and not result.quarantined and result.quarantine_file is None
    assert_accounted(result, str(path))


def test_truncated_gzip_with_many_bad_lines_quarantines_each_line_once(tmp_path):
    """A rejected file's quarantine rows must add up to the lines it reports.

    Decompressed size > READ_CHUNK, so whole batches (20k lines, >10k bad) are decoded and their
    bad lines flushed to the quarantine file before the truncation is hit."""
    lines = [
        b'[%d, "padding padding padding padding padding padding padding padding padding"]' % i for i in range(200_000)
    ]
    gz = igzip.compress(b"\n".join(lines) + b"\n", compresslevel=1)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gz[: int(len(gz) * 0.7)])
    result = parse(tmp_path, str(path))
    n = count_lines(str(path))[0]
    assert result.quarantined == Counter({"truncated_gzip": n})
    q = pq.read_table(result.quarantine_file)
    assert sum(q.column("lines").to_pylist()) == n
    assert set(q.column("reason").to_pylist()) == {"truncated_gzip"}


def _corrupt(gz: bytes, how: str) -> bytes:
    b = bytearray(gz)
    if how == "crc":
        b[-8] ^= 0xFF
    elif how == "isize":
        b[-4] ^= 0xFF
    elif how == "deflate_block":  # first deflate block header: BTYPE=11 is reserved/invalid
        b[10] = 0xFF
    elif how == "not_gzip":
        return b"this is not gzip at all\n"
    return bytes(b)


@pytest.mark.parametrize("how", ["crc", "isize", "not_gzip", "deflate_block"])
def test_corrupt_gzip_is_rejected_whole(tmp_path, how):
    gz, lines = _valid_gz(tmp_path, n=2000)
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(_corrupt(gz, how))
    n, _, err = count_lines(str(path))  # must not raise
    assert err is not None and err.reason == "corrupt_gzip"

    result = parse(tmp_path, str(path))  # must not raise
    assert result.kept == 0 and result.staged == {}
    assert result.lines == n
    assert result.quarantined == Counter({"corrupt_gzip": n})
    (row,) = quarantine_rows(result)
    assert row["reason"] == "corrupt_gzip" and row["line_no"] is None and row["lines"] == n
    assert_accounted(result, str(path))


# --- oversize lines


def _big_line(total_len: int, i: int = 2) -> bytes:
    head = b'{"event_id":"big%d","ts":"2025-11-24T10:00:00Z","type":"lock","device_id":"d","seq":1,"payload":"' % i
    tail = b'"}'
    return head + b"x" * (total_len - len(head) - len(tail)) + tail


@pytest.mark.parametrize("size_delta,oversize", [(0, False), (1, True)])
def test_max_line_bytes_boundary(tmp_path, size_delta, oversize):
    big = _big_line(MAX_LINE + size_delta)
    assert len(big) == MAX_LINE + size_delta
    path = write_file(tmp_path / "f.jsonl", [line(1), big, line(3)])
    result = parse(tmp_path, path)
    if oversize:
        assert result.quarantined == Counter({"oversize_line": 1})
        (row,) = quarantine_rows(result)
        assert row["line_no"] == 2 and row["sample"] == big[:SAMPLE_BYTES]
        assert good_ids(result) == ["e000001", "e000003"]
    else:
        assert not result.quarantined
        assert good_ids(result) == ["e000001", "big2", "e000003"]
    assert_accounted(result, path)


def _parse_measured(tmp_path, path):
    warm = write_file(tmp_path / "warm.jsonl", [line(1)])
    parse(tmp_path, warm)  # first-call allocations (imports, decoders) are not the line's
    tracemalloc.start()
    try:
        result = parse(tmp_path, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_huge_line_spanning_read_chunks_is_not_held_whole(tmp_path, gz):
    size = 3 * READ_CHUNK - 12345  # ~24 MB: spans several 8 MB reads
    big = _big_line(size)
    lines = [line(1), big, line(3), b"", line(5)]
    path = write_file(tmp_path / ("f.jsonl.gz" if gz else "f.jsonl"), lines)
    del big, lines

    result, peak = _parse_measured(tmp_path, path)
    assert peak < size, f"peak traced memory {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB line"
    assert result.quarantined == Counter({"oversize_line": 1, "empty_line": 1})
    rows = quarantine_rows(result)
    assert [(r["line_no"], r["reason"]) for r in rows] == [(2, "oversize_line"), (4, "empty_line")]
    assert rows[0]["sample"] == _big_line(size)[:SAMPLE_BYTES]
    assert [(r["event_id"], r["line_no"]) for r in staged_rows(result)] == [
        ("e000001", 1),
        ("e000003", 3),
        ("e000005", 5),
    ]
    assert_accounted(result, path)


@pytest.mark.parametrize("newline_at", [READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1, 2 * READ_CHUNK])
def test_oversize_line_ending_at_read_chunk_boundary(tmp_path, newline_at):
    first = line(1)
    size = newline_at - len(first) - 1  # the big line's "\n" is the byte at offset newline_at
    big = _big_line(size)
    path = write_file(tmp_path / "f.jsonl", [first, big, line(3), line(4)])
    assert Path(path).read_bytes()[newline_at : newline_at + 1] == b"\n"
    result = parse(tmp_path, path)
    assert [(r["line_no"], r["reason"]) for r in quarantine_rows(result)] == [(2, "oversize_line")]
    assert [(r["event_id"], r["line_no"]) for r in staged_rows(result)] == [
        ("e000001", 1),
        ("e000003", 3),
        ("e000004", 4),
    ]
    assert_accounted(result, path)


def test_oversize_last_line_without_newline(tmp_path):
    big = _big_line(READ_CHUNK + 100)
    path = write_file(tmp_path / "f.jsonl", [line(1), line(2), big], trailing=False)
    result = parse(tmp_path, path)
    assert [(r["line_no"], r["reason"]) for r in quarantine_rows(result)] == [(3, "oversize_line")]
    assert good_ids(result) == ["e000001", "e000002"]
    assert_accounted(result, path)


# --------------------------------------------------------------------------------------------
# 2. Inputs that must be accepted


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("with_bad", [False, True], ids=["batch_path", "per_line_path"])
def test_bom_crlf_and_missing_final_newline_are_accepted(tmp_path, gz, with_bad):
    lines = [line(1), line(2), line(3)]
    if with_bad:
        lines.insert(1, b"[1,2,3]")
    lines[0] = b"\xef\xbb\xbf" + lines[0]
    path = write_file(tmp_path / ("f.jsonl.gz" if gz else "f.jsonl"), lines, sep=b"\r\n", trailing=False)
    result = parse(tmp_path, path)
    rows = staged_rows(result)
    assert [r["event_id"] for r in rows] == ["e000001", "e000002", "e000003"]
    assert [r["line_no"] for r in rows] == ([1, 3, 4] if with_bad else [1, 2, 3])
    assert result.quarantined == (Counter({"not_an_object": 1}) if with_bad else Counter())
    assert all("\r" not in r["device_id"] for r in rows)
    assert_accounted(result, path)


def test_crlf_blank_line_is_empty_line(tmp_path):
    path = write_file(tmp_path / "f.jsonl", [line(1), b"", line(3)], sep=b"\r\n")
    result = parse(tmp_path, path)
    assert result.quarantined == Counter({"empty_line": 1})
    assert good_ids(result) == ["e000001", "e000003"]
    assert_accounted(result, path)


@pytest.mark.parametrize("with_bad", [False, True], ids=["alone", "with_bad_neighbour"])
def test_nanosecond_timestamp_with_z_is_accepted(tmp_path, with_bad):
    lines = [line(1), line(2, ts="2025-11-24T10:00:00.123456789Z"), line(3)]
    if with_bad:
        lines.append(b"[]")
    path = write_file(tmp_path / "f.jsonl", lines)
    result = parse(tmp_path, path)
    rows = staged_rows(result)
    assert [r["event_id"] for r in rows] == ["e000001", "e000002", "e000003"]
    ts = rows[1]["ts"]
    assert ts.replace(microsecond=0) == datetime(2025, 11, 24, 10, 0, 0, tzinfo=UTC)
    assert ts.microsecond in (123456, 123457)
    assert ts.utcoffset() == timedelta(0)


@pytest.mark.parametrize("with_bad", [False, True], ids=["batch_path", "per_line_path"])
def test_offsets_are_converted_to_utc_and_route_by_utc_day(tmp_path, with_bad):
    lines = [
        line(1, ts="2025-11-25T02:00:00+05:30"),  # 2025-11-24T20:30Z: DAY, though the local date is the 25th
        line(2, ts="2025-11-24T03:00:00.250+05:30"),  # 2025-11-23T21:30:00.25Z: the 23rd
        line(3, ts="2025-11-23T20:00:00-08:00"),  # 2025-11-24T04:00Z: DAY
        line(4, ts="2025-11-24T05:00:00+0000"),
    ]
    if with_bad:
        lines.append(b"{")
    path = write_file(tmp_path / "f.jsonl", lines)
    result = parse(tmp_path, path, arrival=datetime(2025, 11, 24, 0, tzinfo=UTC))  # the 23rd still owns late events
    rows = {r["event_id"]: r for r in staged_rows(result)}
    assert set(rows) == {"e000001", "e000003", "e000004"}
    assert rows["e000001"]["ts"] == datetime(2025, 11, 24, 20, 30, tzinfo=UTC)
    assert rows["e000003"]["ts"] == datetime(2025, 11, 24, 4, 0, tzinfo=UTC)
    assert rows["e000004"]["ts"] == datetime(2025, 11, 24, 5, 0, tzinfo=UTC)
    assert result.routed_out == Counter({"2025-11-23": 1})
    assert_accounted(result, path)


@pytest.mark.parametrize("with_bad", [False, True], ids=["batch_path", "per_line_path"])
def test_missing_or_null_optional_payload_is_accepted(tmp_path, with_bad):
    lines = [line(1, payload=...), line(2, payload=None), line(3, payload=[1, {"a": "b"}]), line(4, payload="s")]
    if with_bad:
        lines.append(b"nope")
    path = write_file(tmp_path / "f.jsonl", lines)
    result = parse(tmp_path, path)
    rows = staged_rows(result)
    assert [r["event_id"] for r in rows] == ["e000001", "e000002", "e000003", "e000004"]
    assert rows[0]["payload"] is None  # missing: NULL
    assert rows[1]["payload"] in (None, "null")  # explicit null: NULL or the raw JSON text
    assert [r["payload"] for r in rows[2:]] == ['[1,{"a":"b"}]', '"s"']
    assert_accounted(result, path)


def test_a_json_column_past_32_bit_offsets_is_split_into_chunks(monkeypatch):
    values = [msgspec.Raw(b'{"a":1}'), None, msgspec.Raw(b'"\xc3\xa9"'), msgspec.Raw(b"null"), None]
    whole = parsing._json_column(values)
    assert whole.to_pylist() == ['{"a":1}', None, '"é"', "null", None]
    monkeypatch.setattr(parsing, "_MAX_CHUNK_BYTES", 8)  # as if each chunk could hold 8 bytes
    split = parsing._json_column(values)
    assert isinstance(split, pa.ChunkedArray) and split.num_chunks > 1
    assert split.to_pylist() == whole.to_pylist()
    for chunk in split.chunks:
        chunk.validate(full=True)


def test_accepted_values_round_trip(tmp_path):
    e = event(
        7,
        ts="2025-11-24T23:59:59.999Z",
        type="video_doorbell",
        device_id='dév-\u2603-\\"q"',
        seq=-(2**63),
        payload={"x": [1, 2.5, None, True], "s": "é"},
    )
    path = write_file(tmp_path / "f.jsonl", [msgspec.json.encode(e)])
    (row,) = staged_rows(parse(tmp_path, path))
    assert row["event_id"] == "e000007"
    assert row["ts"] == datetime(2025, 11, 24, 23, 59, 59, 999000, tzinfo=UTC)
    assert row["type"] == "video_doorbell"
    assert row["device_id"] == e["device_id"]
    assert row["seq"] == -(2**63)
    assert msgspec.json.decode(row["payload"]) == e["payload"]
    assert row["source_ref"] == "s3://lake/raw/f.jsonl" and row["line_no"] == 1


# --------------------------------------------------------------------------------------------
# 3. Accounting per file and count_lines


FILE_SHAPES = {
    "empty_file": (b"", 0),
    "single_newline": (b"\n", 1),
    "no_trailing_newline": (line(1) + b"\n" + line(2), 2),
    "crlf": (line(1) + b"\r\n" + line(2) + b"\r\n", 2),
    "blank_lines": (b"\n\n" + line(1) + b"\n\n", 4),
    "bom_only": (b"\xef\xbb\xbf", 1),
}


@pytest.mark.parametrize("data,n", list(FILE_SHAPES.values()), ids=list(FILE_SHAPES))
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_count_lines_matches_parser_on_file_shapes(tmp_path, data, n, gz):
    path = tmp_path / ("f.jsonl.gz" if gz else "f.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    assert count_lines(str(path))[0] == n
    result = parse(tmp_path, str(path))
    assert result.lines == n
    assert_accounted(result, str(path))


def _mixed_day_lines() -> list[bytes]:
    rng = random.Random(11)
    lines = []
    for i in range(600):
        r = rng.random()
        if r < 0.70:
            ts = f"2025-11-24T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"
        elif r < 0.80:
            ts = f"2025-11-23T23:{rng.randrange(60):02d}:00Z"
        elif r < 0.90:
            ts = f"2025-11-25T00:{rng.randrange(60):02d}:00Z"
        elif r < 0.95:
            ts = "2025-11-22T12:00:00Z"
        else:
            lines.append(rng.choice([b"", b"[1]", line(i, seq="x"), line(i, type="toaster")]))
            continue
        lines.append(line(i, ts=ts, type=rng.choice(TYPES)))
    return lines


@pytest.mark.parametrize(
    "arrival,home",
    [
        (datetime(2025, 11, 24, 0, tzinfo=UTC), True),
        (datetime(2025, 11, 24, 12, tzinfo=UTC), True),
        (datetime(2025, 11, 24, 23, tzinfo=UTC), True),
        (datetime(2025, 11, 23, 23, tzinfo=UTC), False),
        (datetime(2025, 11, 25, 2, tzinfo=UTC), False),
    ],
)
def test_every_line_accounted_once(tmp_path, arrival, home):
    lines = _mixed_day_lines()
    path = write_file(tmp_path / "mixed.jsonl.gz", lines)
    result = parse(tmp_path, path, arrival=arrival, home=home)
    assert result.lines == len(lines)
    assert_accounted(result, path)
    kept = staged_rows(result)
    assert all(r["ts"].date() == DAY for r in kept)
    assert result.kept == sum(
        1 for b in lines if b'"ts":"2025-11-24T' in b and b"toaster" not in b and b'"seq":"x"' not in b
    )
    if home:
        q = quarantine_rows(result)
        assert Counter(r["reason"] for r in q) == result.quarantined
        assert len({r["line_no"] for r in q}) == len(q)
        assert not ({r["line_no"] for r in q} & {r["line_no"] for r in kept})
    else:
        assert result.quarantine_file is None and not result.quarantined and not result.routed_out


# --------------------------------------------------------------------------------------------
# 4. Batch vs per-line equivalence


def _varied_lines(n: int, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ms = rng.randrange(86_400_000)
        base = datetime(2025, 11, 24, tzinfo=UTC) + timedelta(milliseconds=ms)
        if i % 7 == 0:  # same instant written with an offset
            ts = (base.astimezone(timezone(timedelta(hours=5, minutes=30)))).isoformat(timespec="milliseconds")
        else:
            ts = base.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
        payload = ... if i % 11 == 0 else {"battery": rng.randrange(100), "tags": ["a", "é"], "q": 'say "hi"'}
        out.append(line(i, ts=ts, type=TYPES[i % 3], payload=payload, seq=rng.randrange(-(2**62), 2**62)))
    return out


def test_bad_lines_in_large_batches_do_not_lose_good_lines(tmp_path):
    n = 50_000
    good = _varied_lines(n)
    clean = write_file(tmp_path / "clean.jsonl.gz", good)
    dirty_lines = list(good)
    bad = [(5, b"[1,2,3]"), (25_003, line(0, seq="three")), (49_990, b'{"event_id": "broken"')]
    for pos, b in bad:
        dirty_lines.insert(pos, b)
    dirty = write_file(tmp_path / "dirty.jsonl.gz", dirty_lines)

    r_clean = parse(tmp_path, clean, source_ref="s3://same")
    r_dirty = parse(tmp_path, dirty, source_ref="s3://same")
    assert r_clean.kept == r_dirty.kept == n
    assert not r_clean.quarantined
    assert r_dirty.quarantined == Counter({"not_an_object": 1, "wrong_type": 1, "malformed_json": 1})
    assert [r["line_no"] for r in quarantine_rows(r_dirty)] == [6, 25_004, 49_991]

    clean_rows, dirty_rows = staged_rows(r_clean), staged_rows(r_dirty)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "line_no"} for r in rows]

    assert strip(clean_rows) == strip(dirty_rows)
    for r in dirty_rows:  # line numbers refer to the dirty file
        assert dirty_lines[r["line_no"] - 1].startswith(b'{"event_id":"' + r["event_id"].encode())
    assert_accounted(r_dirty, dirty)


def test_lines_that_only_parse_when_joined_are_not_accepted(tmp_path):
    """The fast path joins a batch into one JSON array: an object split over two lines plus a line
    holding two comma-separated objects must not turn into three 'valid' events."""
    a = b'{"event_id":"split","ts":"2025-11-24T10:00:00Z","type":"lock"'
    b = b'"device_id":"d","seq":3}'
    two = line(4) + b"," + line(5)
    path = write_file(tmp_path / "f.jsonl", [line(1), a, b, two, line(6)])
    result = parse(tmp_path, path)
    assert good_ids(result) == ["e000001", "e000006"]
    assert [r["line_no"] for r in staged_rows(result)] == [1, 5]
    assert sum(result.quarantined.values()) == 3
    assert [r["line_no"] for r in quarantine_rows(result)] == [2, 3, 4]
    assert_accounted(result, path)


@pytest.mark.parametrize("ts", ["2025-11-24T10:00Z", "2025-11-24T10:00:00+05", "2025-11-24T10Z"])
def test_timestamp_verdict_does_not_depend_on_neighbouring_lines(tmp_path, ts):
    """A line is accepted or quarantined on its own merits, whichever decoding path its batch took."""
    alone = write_file(tmp_path / "alone.jsonl", [line(1), line(2, ts=ts), line(3)])
    with_bad = write_file(tmp_path / "with_bad.jsonl", [line(1), line(2, ts=ts), line(3), b"[1,2,3]"])
    r1, r2 = parse(tmp_path, alone), parse(tmp_path, with_bad)
    assert ("e000002" in good_ids(r1)) == ("e000002" in good_ids(r2)), (ts, r1.quarantined, r2.quarantined)


# --------------------------------------------------------------------------------------------
# 5. Day routing


def test_home_file_routing_at_start_of_day(tmp_path):
    lines = [
        line(1, ts="2025-11-24T00:10:00Z"),  # DAY: kept
        line(2, ts="2025-11-23T23:50:00Z"),  # late event of the 23rd: its partition still scans this file
        line(3, ts="2025-11-23T01:00:00Z"),  # the 23rd, still owned by it
        line(4, ts="2025-11-22T12:00:00Z"),  # 2 days off: outside every window
        line(5, ts="2025-11-25T12:00:00Z"),  # the 25th: this file is not in its window
        line(6, ts="2025-11-26T00:00:00Z"),
    ]
    path = write_file(tmp_path / "f.jsonl", lines)
    result = parse(tmp_path, path, arrival=datetime(2025, 11, 24, 0, tzinfo=UTC))
    assert good_ids(result) == ["e000001"]
    assert result.routed_out == Counter({"2025-11-23": 2})
    assert result.quarantined == Counter({"outside_lateness_window": 3})
    rows = quarantine_rows(result)
    assert [(r["line_no"], r["reason"]) for r in rows] == [
        (4, "outside_lateness_window"),
        (5, "outside_lateness_window"),
        (6, "outside_lateness_window"),
    ]
    assert rows[0]["sample"] == lines[3]
    assert_accounted(result, path)


def test_home_file_routing_at_end_of_day(tmp_path):
    lines = [
        line(1, ts="2025-11-24T22:59:00Z"),
        line(2, ts="2025-11-25T00:30:00Z"),  # early event of the 25th: its window starts at 23:00 on DAY
        line(3, ts="2025-11-23T23:00:00Z"),  # the 23rd stopped scanning at 03:00 on DAY
    ]
    path = write_file(tmp_path / "f.jsonl", lines)
    result = parse(tmp_path, path, arrival=datetime(2025, 11, 24, 23, tzinfo=UTC))
    assert good_ids(result) == ["e000001"]
    assert result.routed_out == Counter({"2025-11-25": 1})
    assert result.quarantined == Counter({"outside_lateness_window": 1})
    assert [r["line_no"] for r in quarantine_rows(result)] == [3]
    assert_accounted(result, path)


def test_home_file_mid_day_keeps_only_its_day(tmp_path):
    lines = [
        line(1),
        line(2, ts="2025-11-23T23:59:59.999Z"),
        line(3, ts="2025-11-25T00:00:00Z"),
        line(4, ts="2025-11-24T00:00:00Z"),
    ]
    path = write_file(tmp_path / "f.jsonl", lines)
    result = parse(tmp_path, path)
    assert good_ids(result) == ["e000001", "e000004"]
    assert not result.routed_out
    assert result.quarantined == Counter({"outside_lateness_window": 2})
    assert_accounted(result, path)


@pytest.mark.parametrize("arrival", [datetime(2025, 11, 25, 2, tzinfo=UTC), datetime(2025, 11, 23, 23, tzinfo=UTC)])
def test_neighbour_file_keeps_only_the_jobs_day(tmp_path, arrival):
    lines = [
        line(1, ts="2025-11-24T23:00:00Z"),  # DAY: kept
        line(2, ts="2025-11-25T01:00:00Z"),  # the file's own day: left to it
        line(3, ts="2025-11-23T23:30:00Z"),
        line(4, ts="2025-11-20T00:00:00Z"),  # far off: the home partition quarantines it, not us
        b"[1,2,3]",  # bad: quarantined by the home partition
        line(6, type="toaster"),
        b"",
    ]
    path = write_file(tmp_path / "f.jsonl", lines)
    result = parse(tmp_path, path, arrival=arrival, home=False)
    assert good_ids(result) == ["e000001"]
    assert result.kept == 1
    assert result.neighbour_skipped == 6
    assert not result.quarantined and not result.routed_out
    assert result.quarantine_file is None
    assert_accounted(result, path)


# --------------------------------------------------------------------------------------------
# 6-8. parse_day end to end: de-duplication, layout, determinism, workers


def _dedupe_fixture(tmp_path) -> tuple[list[FileTask], dict]:
    """Four files; duplicates across and within files with distinguishable copies."""
    d = tmp_path / "raw"
    d.mkdir()
    files = {
        # source_ref: (arrival, home, lines)
        "s3://lake/raw/c.jsonl": (
            ARRIVAL,
            True,
            [
                line(40, event_id="dup-2", seq=40),
                line(41),
                line(42, event_id="dup-3", type="lock", seq=42),
                line(43, event_id="dup-1", seq=43),
            ],
        ),
        "s3://lake/raw/b.jsonl": (
            ARRIVAL,
            True,
            [
                line(20),
                line(21, event_id="dup-2", seq=21),  # beats c.jsonl line 1: lower source_ref
                line(22),
                line(23),
                line(24, event_id="dup-1", seq=24),
            ],
        ),
        "s3://lake/raw/a.jsonl": (
            ARRIVAL,
            True,
            [
                line(10, event_id="dup-3", type="bridge", seq=10),  # winner: type bridge, not lock
                b"[1,2,3]",
                line(12, event_id="dup-1", seq=12),  # winner of dup-1 (a.jsonl, line 3)
                line(13),
                line(14),
                line(15),
                line(16),
                line(17),
                line(18, event_id="dup-1", seq=18),  # same file, later line
                line(19, event_id="dup-4", type="video_doorbell", seq=19),
                line(99, event_id="dup-4", type="video_doorbell", seq=99),  # same file, later line
            ],
        ),
        "s3://lake/raw/z-late.jsonl": (
            datetime(2025, 11, 25, 1, tzinfo=UTC),
            False,
            [
                line(60, ts="2025-11-24T23:59:00Z"),
                line(61, ts="2025-11-24T23:58:00Z", event_id="dup-2", seq=61),  # loses: highest source_ref
                line(62, ts="2025-11-25T00:30:00Z"),
            ],
        ),
    }
    tasks = []
    for i, (ref, (arrival, home, lines)) in enumerate(files.items()):
        path = write_file(d / ref.rsplit("/", 1)[1], lines)
        tasks.append(FileTask(path, ref, arrival, home, i))
    winners = {
        "dup-1": ("s3://lake/raw/a.jsonl", 3, 12),
        "dup-2": ("s3://lake/raw/b.jsonl", 2, 21),
        "dup-3": ("s3://lake/raw/a.jsonl", 1, 10),
        "dup-4": ("s3://lake/raw/a.jsonl", 10, 19),
    }
    return tasks, winners


@pytest.mark.parametrize("buckets", [1, 3])
def test_parse_day_dedupes_keeping_lowest_source_ref_and_line(tmp_path, buckets):
    tasks, winners = _dedupe_fixture(tmp_path)
    job = make_job(tmp_path, buckets=buckets)
    out = tmp_path / "out"
    result = parse_day(job, tasks, str(out), workers=1)

    t = pa.concat_tables([pq.read_table(f) for f in result.dedupe.files])
    rows = t.to_pylist()
    ids = [r["event_id"] for r in rows]
    assert len(ids) == len(set(ids))
    expected_ids = {
        "dup-1",
        "dup-2",
        "dup-3",
        "dup-4",
        "e000041",
        "e000020",
        "e000022",
        "e000023",
        "e000013",
        "e000014",
        "e000015",
        "e000016",
        "e000017",
        "e000060",
    }
    assert set(ids) == expected_ids
    by_id = {r["event_id"]: r for r in rows}
    for eid, (ref, no, seq) in winners.items():
        assert (by_id[eid]["source_ref"], by_id[eid]["line_no"], by_id[eid]["seq"]) == (ref, no, seq), eid
    assert by_id["dup-3"]["type"] == "bridge"

    kept_total = sum(f.kept for f in result.files)
    assert result.dedupe.rows_in == kept_total == 21
    assert result.dedupe.rows_out == len(expected_ids)
    assert result.duplicates == kept_total - len(expected_ids)
    assert result.quarantined == Counter({"not_an_object": 1})
    assert result.routed_in == 2
    assert len(result.quarantine_files) == 1  # only a.jsonl has a bad line

    # layout: <out>/type=<t>/day=<d>/*.parquet, each file holding only its type
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert files == sorted(Path(f) for f in result.dedupe.files)
    assert not list(out.rglob("*.tmp"))  # every file was written under a temp name, then renamed
    for f in files:
        rel = f.relative_to(out).parts
        assert (
            len(rel) == 3
            and rel[0].startswith("type=")
            and rel[1] == f"day={DAY.isoformat()}"
            and rel[2].endswith(".parquet")
        )
        assert set(pq.read_table(f).column("type").to_pylist()) == {rel[0][len("type=") :]}
    assert result.dedupe.rows_by_type == dict(Counter(r["type"] for r in rows))
    assert {p.relative_to(out).parts[0] for p in files} == {"type=lock", "type=bridge", "type=video_doorbell"}
    # the output types match the input schema
    assert t.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert t.schema.field("seq").type == pa.int64()


def _split_fixture(tmp_path, n_files: int, name: str) -> list[FileTask]:
    """The same 3,000 events (with identical-copy duplicates) split round-robin over n files."""
    rng = random.Random(1)
    events = _varied_lines(3000, seed=9)
    events += [events[rng.randrange(3000)] for _ in range(120)]  # exact duplicates
    events.insert(500, b"[1,2,3]")
    events.insert(1500, line(7, ts="2025-11-22T00:00:00Z"))
    d = tmp_path / name
    d.mkdir()
    tasks = []
    for k in range(n_files):
        path = write_file(d / f"part{k}.jsonl.gz", events[k::n_files])
        tasks.append(FileTask(path, f"s3://lake/{name}/part{k}", ARRIVAL, True, k))
    return tasks


def _run_day(tmp_path, tasks, *, buckets=2, workers=1, tag=""):
    out = tmp_path / f"out-{next(_counter)}{tag}"
    result = parse_day(make_job(tmp_path, buckets=buckets), tasks, str(out), workers=workers)
    return result, out


def test_output_does_not_depend_on_file_split_or_buckets(tmp_path):
    one = _split_fixture(tmp_path, 1, "one")
    four = _split_fixture(tmp_path, 4, "four")
    r1, o1 = _run_day(tmp_path, one, buckets=1)
    r4, o4 = _run_day(tmp_path, four, buckets=1)
    r4b, o4b = _run_day(tmp_path, four, buckets=3)
    r1b, o1b = _run_day(tmp_path, one, buckets=3)
    drop = ("source_ref", "line_no")
    base = output_rows(o1, drop)
    assert len(base) == 3000
    assert output_rows(o4, drop) == base
    assert output_rows(o4b, drop) == base
    assert output_rows(o1b, drop) == base
    # same files, different bucket counts: identical rows including provenance
    assert output_rows(o4) == output_rows(o4b)
    assert output_rows(o1) == output_rows(o1b)
    for r in (r1, r4, r4b, r1b):
        assert r.dedupe.rows_out == 3000
        assert r.dedupe.rows_in == 3120
        assert r.quarantined == Counter({"not_an_object": 1, "outside_lateness_window": 1})
        assert r.dedupe.rows_by_type == r1.dedupe.rows_by_type


def test_a_type_whose_only_rows_lose_gets_no_file(tmp_path):
    """The losing copy is the bucket's only `lock` row: no empty lock file, no lock count."""
    a = write_file(tmp_path / "a.jsonl", [line(1, event_id="same", type="bridge"), line(2, type="video_doorbell")])
    b = write_file(tmp_path / "b.jsonl", [line(3, event_id="same", type="lock")])
    tasks = [make_task(a, index=0), make_task(b, index=1)]
    result, out = _run_day(tmp_path, tasks, buckets=1)
    assert result.dedupe.rows_in == 3 and result.dedupe.rows_out == 2
    assert result.dedupe.rows_by_type == {"bridge": 1, "video_doorbell": 1}
    assert sorted(p.relative_to(out).parts[0] for p in out.rglob("*.parquet")) == ["type=bridge", "type=video_doorbell"]
    rows = {r["event_id"]: r for f in result.dedupe.files for r in pq.read_table(f).to_pylist()}
    assert (rows["same"]["type"], rows["same"]["source_ref"], rows["same"]["line_no"]) == (
        "bridge",
        "s3://lake/raw/a.jsonl",
        1,
    )


@pytest.mark.parametrize("buckets", [1, 3])
def test_ids_whose_crc32s_collide_are_both_kept(tmp_path, buckets):
    """Stage 2 compares by id only the rows whose id's crc32 repeats: two different ids with the
    same crc32 are candidates, and both must stay; a real copy among them still loses."""
    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")  # a known crc32 collision
    a = write_file(tmp_path / "a.jsonl", [line(1, event_id="plumless"), line(2, event_id="other")])
    b = write_file(tmp_path / "b.jsonl", [line(3, event_id="buckeroo"), line(4, event_id="plumless", type="bridge")])
    result, _ = _run_day(tmp_path, [make_task(a, index=0), make_task(b, index=1)], buckets=buckets)
    rows = sorted(
        (r["event_id"], r["source_ref"][-7:], r["line_no"])
        for f in result.dedupe.files
        for r in pq.read_table(f).to_pylist()
    )
    assert rows == [("buckeroo", "b.jsonl", 1), ("other", "a.jsonl", 2), ("plumless", "a.jsonl", 1)]
    assert (result.dedupe.rows_in, result.dedupe.rows_out) == (4, 3)
    assert all(ID_CRC32 not in pq.read_schema(f).names for f in result.dedupe.files)


def test_parse_day_twice_gives_identical_output(tmp_path):
    tasks = _split_fixture(tmp_path, 3, "files")
    ra, oa = _run_day(tmp_path, tasks, buckets=3)
    rb, ob = _run_day(tmp_path, tasks, buckets=3)
    assert output_rows(oa) == output_rows(ob)
    assert [Path(f).relative_to(oa) for f in ra.dedupe.files] == [Path(f).relative_to(ob) for f in rb.dedupe.files]
    assert [(f.lines, f.kept, f.quarantined, f.routed_out) for f in ra.files] == [
        (f.lines, f.kept, f.quarantined, f.routed_out) for f in rb.files
    ]
    # and re-running into the same output directory replaces rather than adds rows
    job = make_job(tmp_path, buckets=3)
    parse_day(job, tasks, str(oa), workers=1)
    assert output_rows(oa) == output_rows(ob)


def test_process_pool_matches_single_process(tmp_path):
    tasks = _split_fixture(tmp_path, 4, "files")
    late = write_file(
        tmp_path / "late.jsonl", [line(900, ts="2025-11-24T23:30:00Z"), line(901, ts="2025-11-25T01:00:00Z"), b"[1]"]
    )
    tasks.append(FileTask(late, "s3://lake/late", datetime(2025, 11, 25, 1, tzinfo=UTC), False, len(tasks)))
    r1, o1 = _run_day(tmp_path, tasks, buckets=3, workers=1)
    r2, o2 = _run_day(tmp_path, tasks, buckets=3, workers=2)
    assert output_rows(o1) == output_rows(o2)

    def summary(r):
        return [
            (f.source_ref, f.home, f.lines, f.kept, dict(f.quarantined), dict(f.routed_out), f.neighbour_skipped)
            for f in r.files
        ]

    assert summary(r1) == summary(r2)
    assert (r1.dedupe.rows_in, r1.dedupe.rows_out, r1.dedupe.rows_by_type) == (
        r2.dedupe.rows_in,
        r2.dedupe.rows_out,
        r2.dedupe.rows_by_type,
    )
    assert r2.routed_in == 1
    for f in r2.files:
        assert_accounted(f, next(t.path for t in tasks if t.source_ref == f.source_ref))
