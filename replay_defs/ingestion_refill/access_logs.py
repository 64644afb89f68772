"""Event keys from S3 access logs, and the ingestion jobs they become (the ingestion refill of Langfuse).

Ingestion writes one S3 object per event, `projectId/type/eventBodyId/eventId.json`. When the
processing behind it failed, the keys of the objects written in a window are re-enqueued as
ingestion jobs. The keys come from one of three sources:

- `csv`: an export of the access logs (Athena: `select operation, key ... where operation =
  'REST.PUT.OBJECT'`), header `"operation","key"` (`keys` is accepted too), optionally with a
  `requestdatetime` column (`dd/MMM/yyyy:HH:mm:ss Z`) to split the rows by day and an
  `httpstatus` column. DuckDB streams the file, so its size does not matter; malformed rows are
  quarantined with DuckDB's reason.
- `access_logs`: S3 server access log files in AWS's own format (a local directory, or an
  `s3://bucket/prefix`), in either of AWS's log object key layouts: simple
  `<prefix>YYYY-mm-DD-HH-MM-SS-<id>` or partitioned
  `<prefix><account>/<region>/<bucket>/YYYY/MM/DD/YYYY-mm-DD-HH-MM-SS-<id>`.
- `listing`: the objects of a bucket (under a prefix) last modified on the day.

Only successful `REST.PUT.OBJECT` rows are writes: a PUT whose HTTP status is known and not 2xx
(403 AccessDenied, 503 SlowDown...) wrote nothing and is quarantined as `not_written:<status>`.
Keys of the log and of its Athena export are URL-encoded (AWS's log format: "the key part of the
request, URL encoded", for REST requests twice; Athena's RegexSerDe table copies the field as is),
so both are decoded by the same SQL (`DECODE_KEY`); a listing's keys are the objects' own. An
optional time window [start, end) keeps only the records whose request time (LastModified for a
listing) is inside it. Each key is validated (shape, no path traversal, known type); a bad one is
quarantined with its reason. Keys are de-duplicated per day and written as Parquet sorted by key, which groups them by project and then type (a project's keys share the prefix
`projectId/`), so jobs go out grouped the same way.

Local sources (a CSV, a log directory and every file in it) are read only under the refill roots
(`EVENT_REPLAY_REFILL_ROOTS`, colon-separated; default the lake root and the current directory),
checked after resolving symlinks, before anything of the file is read. Nothing of a source's
content reaches the logs or errors except a short, labelled sample of an offending line (a bad
header); bad rows go to the quarantine with their own sample. A CSV line is a record: a quoted
value never spans lines (no valid key holds a newline), so a line with an unterminated quote is
quarantined alone instead of swallowing the next, and so is a line over 1 MiB.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from replay_defs.pipeline.spec import SAFE_TYPE_VALUE
from replay_defs.sinks.base import Batch

PUT = "REST.PUT.OBJECT"
Source = Literal["csv", "access_logs", "listing"]
# Athena's `requestdatetime` and the access log's own time field: 06/Feb/2019:00:00:38 +0000
LOG_TIME_FORMAT = "%d/%b/%Y:%H:%M:%S %z"
# bucket_owner bucket [time] remote_ip requester request_id operation key "request_uri" http_status ...
# (the rest is not needed). The Request-URI is quoted, or `-` where the operation has none
# (BATCH.DELETE.OBJECT). S3 writes it unescaped, so a request for `/"` logs `"GET /" HTTP/1.1"`: it
# ends at the quote followed by the status (3 digits or `-`), not at the first quote inside it.
# tests/test_access_log_parser.py checks this on real records against AWS's Athena regex.
LOG_LINE = re.compile(
    r'^\S+ \S+ \[([^\]]+)\] \S+ \S+ \S+ (\S+) (\S+) (?:"(?:[^"]|"(?! (?:\d{3}|-) ))*"|-) (\d{3}|-)(?: |$)'
)
ROWS_PER_INSERT = 50_000
# DuckDB's memory cap for key collection; past it, tables, grouping and sorting spill to disk.
MEMORY_LIMIT = "512MB"
MAX_CSV_LINE = 1_048_576  # bytes; a longer line is quarantined (line_size_over_maximum)
SAMPLE_CHARS = 2000  # of a quarantined line, in the quarantine file (never in a log)
LOG_SAMPLE_CHARS = 60  # of an offending line, in an error message

ROOTS_ENV = "EVENT_REPLAY_REFILL_ROOTS"


class OutsideRefillRoots(ValueError):
    """A local source that resolves outside the refill roots: refused before it is opened."""


def refill_roots(lake_root: str | os.PathLike | None = None) -> list[Path]:
    """The directories local refill sources may be read from: `EVENT_REPLAY_REFILL_ROOTS`
    (colon-separated), else the lake root (`lake_root`, else EVENT_REPLAY_LAKE, else data/lake) and
    the current directory (unless that is the filesystem root). Resolved, symlinks included."""
    raw = os.environ.get(ROOTS_ENV, "")
    if raw.strip():
        parts = [r for r in raw.split(":") if r.strip()]
    else:
        parts = [str(lake_root or os.environ.get("EVENT_REPLAY_LAKE") or "data/lake")]
        cwd = Path.cwd().resolve()
        if cwd != Path(cwd.anchor):
            parts.append(str(cwd))
    return [Path(r.strip()).expanduser().resolve() for r in parts]


def confine(path: str | os.PathLike, roots: list[Path], what: str) -> Path:
    """`path` resolved (symlinks followed), if that is under one of `roots`; else OutsideRefillRoots
    naming the path and the setting. Nothing of the file is opened here."""
    resolved = Path(path).expanduser().resolve()
    if any(resolved == r or resolved.is_relative_to(r) for r in roots):
        return resolved
    shown = f"{str(path)!r}" + ("" if str(resolved) == str(path) else f" (resolves to {str(resolved)!r})")
    raise OutsideRefillRoots(
        f"{what} {shown} is outside the refill roots ({', '.join(map(str, roots))}); nothing was read. "
        f"Local sources are read only under {ROOTS_ENV} (colon-separated directories; default: the lake root and the "
        f"current directory): move the file there or add its directory to {ROOTS_ENV}."
    )


def _sample(text: str, n: int = LOG_SAMPLE_CHARS) -> str:
    return repr(text[:n]) + (f" ... ({len(text)} chars)" if len(text) > n else "")


# A key part: no slash, no control character, no backslash.
PART = r"[^/\x00-\x1f\x7f\\]+"
# A part of a key that passes every rule below: a PART without `%` or `+`, not starting with `.`.
CLEAN_PART = r"[^/.%+\x00-\x1f\x7f\\][^/%+\x00-\x1f\x7f\\]*"
# Why a PUT row is refused, first match wins (NULL: accepted). `$types` is the list of known types,
# `$decode` whether the source's keys were URL-encoded (csv, access_logs), `http_status` NULL when
# unknown. The first branch accepts the common, clean key with one regex (`$clean_key`,
# clean_key_pattern: a test per rule costs twice as much); the rest say why not.
CLASSIFY = rf"""
CASE
  WHEN regexp_full_match(key, $clean_key) AND length(key) <= 1024
       AND (http_status IS NULL OR regexp_full_match(http_status, '2\d\d'))
       AND (time_text IS NULL OR request_time IS NOT NULL) THEN NULL
  WHEN http_status IS NOT NULL AND NOT regexp_full_match(http_status, '2\d\d') THEN 'not_written:' || http_status
  WHEN raw_key IS NULL OR raw_key = '' OR raw_key = '-' THEN 'missing_key'
  WHEN key IS NULL THEN 'bad_key_encoding'
  WHEN key LIKE '/%' OR regexp_matches(key, '(^|/)\.\.?(/|$)') OR regexp_matches(key, '[\x00-\x1f\x7f\\]')
       OR regexp_matches(lower(key), '%2e|%2f|%5c') THEN 'path_traversal'
  WHEN $decode AND (contains(key, '%') OR contains(key, '+')) THEN 'ambiguous_key_encoding'
  WHEN NOT regexp_full_match(key, '{PART}/{PART}/{PART}/{PART}\.json') OR length(key) > 1024 THEN 'bad_key_shape'
  WHEN NOT list_contains($types, split_part(key, '/', 2)) THEN 'unknown_type'
  WHEN time_text IS NOT NULL AND request_time IS NULL THEN 'bad_request_time'
END
"""


def clean_key_pattern(known_types: tuple[str, ...]) -> str | None:
    """The regex of a key that every rule of CLASSIFY accepts: four clean parts, the second a known
    type, the last ending in `.json`. Only safe type names go in it (any other takes the slow path,
    which still accepts or refuses it); None, so no key takes the fast path, when there is none."""
    types = [re.escape(t) for t in known_types if SAFE_TYPE_VALUE.fullmatch(t)]
    if not types:
        return None
    return rf"{CLEAN_PART}/(?:{'|'.join(types)})/{CLEAN_PART}/{CLEAN_PART}\.json"


# The object key of a logged PUT. S3 server access logs write the key URL-encoded twice for REST
# operations (a key `"` is logged `%2522`, tests/fixtures/s3_access_log_records.log; Yelp Engineering,
# "S3 server access logs at scale", 2025: only BATCH.DELETE.OBJECT and S3.EXPIRE.OBJECT once), and an
# Athena export copies the field as is: so decode twice, each time RFC 3986 percent-decoding (`+` is
# not a space in a URL path). NULL when a step is not valid UTF-8. A key that still holds `%` or a
# `+` could be one of two objects (single- or double-encoded, form- or path-encoded): quarantined
# as ambiguous_key_encoding above, with its raw text, for an operator to check against a listing.
DECODE_KEY = (
    "CASE WHEN $decode AND contains(raw_key, '%') THEN try(url_decode(try(url_decode(raw_key)))) ELSE raw_key END"
)


@dataclass
class DayKeys:
    """What one day's rows became: counts, and the Parquet files written (if any)."""

    day: str
    put_rows: int = 0
    malformed_rows: int = 0  # unreadable rows of the input, counted on the first day
    keys: int = 0
    duplicates: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    by_project_type: dict[str, int] = field(default_factory=dict)  # "project/type" -> keys
    window: str = "whole day"  # the part of the day collected: [start, end) in UTC
    outside_window: int = 0  # PUT rows of the day whose time is outside the window (not counted in put_rows)
    log_files: int | None = None  # access_logs: the log files dated this day (name, or partition folder)
    missing_logs: str = ""  # access_logs: what was looked for, when no log file is dated this day

    @property
    def quarantined(self) -> int:
        return sum(self.quarantined_by_reason.values())


@dataclass
class KeyCollection:
    rows: int = 0  # every row read, of any operation
    other_operations: int = 0
    other_days: int = 0  # PUT rows whose time falls outside the days collected
    outside_window: int = 0  # PUT rows on the days collected but outside the time window
    malformed: int = 0  # rows the reader could not split into fields (quarantined on the first day)
    days: dict[str, DayKeys] = field(default_factory=dict)


def collect_keys(
    source: Source,
    location: str,
    days: list[str],
    known_types: tuple[str, ...],
    keys_dir: Callable[[str], Path],
    quarantine_dir: Callable[[str], Path],
    work_dir: Path,
    s3=None,
    log: Callable[[str], None] = lambda _m: None,
    roots: list[Path] | None = None,
    window: tuple[datetime, datetime] | None = None,
    warn: Callable[[str], None] | None = None,
) -> KeyCollection:
    """Read `location`, classify its rows and, per day, write `keys_dir(day)/keys.parquet` and
    `quarantine_dir(day)/quarantine.parquet` (each only when there is something to write).
    With a `window` [start, end), only the records whose time is inside it count (`time_window`).

    A local `location` (and every file read under it) must resolve under `roots` (default
    `refill_roots()`), else OutsideRefillRoots. Memory is bounded by DuckDB's limit (it spills to
    `work_dir`), not by the size of the input.
    """
    import duckdb

    if roots is None:
        roots = refill_roots()
    warn = warn or log
    rules = {
        "types": list(known_types),
        "clean_key": clean_key_pattern(known_types),
        "first_day": days[0],
        "decode": source != "listing",  # a listing's keys are the objects' own
        "ws": window[0] if window else None,
        "we": window[1] if window else None,
    }

    work_dir.mkdir(parents=True, exist_ok=True)
    # In memory, spilling to work_dir past the limit: a disk database would write every row twice.
    con = duckdb.connect()
    try:
        con.execute("SET memory_limit = ?", [MEMORY_LIMIT])
        con.execute("SET temp_directory = ?", [str(work_dir / "spill")])
        con.execute("SET preserve_insertion_order = false")
        con.execute("CREATE TABLE malformed (reason VARCHAR, raw VARCHAR)")
        found_logs = _read_source(con, source, location, days, rules, work_dir, s3, roots, log, warn)
        result = _write_days(con, days, keys_dir, quarantine_dir, log, window)
        if found_logs is not None:
            per_day = found_logs.per_day
            for day, stats in result.days.items():
                stats.log_files = per_day.get(day, 0)
                stats.missing_logs = "" if stats.log_files else found_logs.looked_for(day)
        return result
    finally:
        con.close()
        shutil.rmtree(work_dir, ignore_errors=True)


def _read_source(con, source, location, days, rules, work_dir, s3, roots, log, warn) -> LogFiles | None:
    """Read and classify the source's rows into `collected`; for access logs, the files found."""
    if source == "csv":
        path = _local_file(location, work_dir, s3, roots)
        _read_csv(con, path, _csv_rows(con, path, log), rules, work_dir, log)
        return None
    if source not in ("access_logs", "listing"):
        raise ValueError(f"unknown key source {source!r}: use csv, access_logs or listing")
    con.execute(
        "CREATE TABLE rows (operation VARCHAR, key VARCHAR, request_time TIMESTAMPTZ, time_text VARCHAR,"
        " http_status VARCHAR)"
    )
    found_logs = None
    if source == "access_logs":
        found_logs = find_log_files(location, days, s3, roots)
        _report_log_files(found_logs, days, log, warn)
        rows = _access_log_rows(_fetch_log_files(found_logs, work_dir, s3), con)
    else:
        rows = _listing_rows(location, days, s3)
    _load_rows(con, rows, log)
    _classify(con, "SELECT * FROM rows", rules)
    return found_logs


def parse_time(text: str) -> datetime:
    """A time given by an operator: ISO 8601 (`2025-07-09T00:30:00`, or a bare day for its midnight),
    or Athena's `2025-07-09:00:30:00`; UTC unless it carries an offset."""
    for parse in (datetime.fromisoformat, lambda t: datetime.strptime(t, "%Y-%m-%d:%H:%M:%S")):
        try:
            when = parse(text.strip())
            break
        except ValueError:
            continue
    else:
        raise ValueError(f"{text!r} is not a time: use YYYY-MM-DDTHH:MM:SS (UTC unless an offset like +02:00 is given)")
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def time_window(start: str | None, end: str | None, days: list[str]) -> tuple[datetime, datetime] | None:
    """The window [start, end) in UTC (None when neither is set: whole days). A missing bound is the
    start of the first day or the end of the last; the window must overlap the days of the run."""
    if not start and not end:
        return None
    first = datetime.fromisoformat(days[0]).replace(tzinfo=timezone.utc)
    after = datetime.fromisoformat(days[-1]).replace(tzinfo=timezone.utc) + timedelta(days=1)
    window = (parse_time(start) if start else first, parse_time(end) if end else after)
    if window[0] >= window[1]:
        raise ValueError(
            f"the time window's end {window[1].isoformat()} is not after its start {window[0].isoformat()}"
        )
    if window[1] <= first or window[0] >= after:
        raise ValueError(
            f"the time window [{window[0].isoformat()}, {window[1].isoformat()}) does not overlap the days of the run "
            f"({days[0]}..{days[-1]}): select the days the window is in"
        )
    return window


def _local_file(location: str, work_dir: Path, s3, roots: list[Path]) -> Path:
    if location.startswith("s3://"):
        bucket, key = _split_s3(location)
        local = work_dir / "download" / Path(key).name
        local.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(local))  # streamed to disk in parts
        return local
    path = confine(location, roots, "access-log CSV")  # before even asking whether it exists
    if not path.is_file():
        raise ValueError(f"access-log CSV {location!r} does not exist")
    return path


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


def _csv_rows(con, path: Path, log) -> str:
    """The SQL that reads the CSV's rows as (operation, key, request_time, time_text, http_status)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        first = f.readline(64 * 1024)  # bounded: a file with no newline is not read whole
    header = next(csv.reader([first]), [])
    names = [h.strip().lower() for h in header]
    key_col = "key" if "key" in names else "keys" if "keys" in names else None
    if "operation" not in names or key_col is None or len(set(names)) != len(names):
        # Only a short, labelled sample of the offending line: never the file's content.
        raise ValueError(
            f'{path.name}: expected a header "operation","key" (optionally "requestdatetime", "httpstatus"); '
            f"first line (sample): {_sample(first.rstrip(chr(13) + chr(10)))}"
        )
    # Every column as text, named by position: the header's own spelling never reaches the SQL.
    con.execute("SET VARIABLE csv_path = ?", [str(path)])
    con.execute("SET VARIABLE csv_columns = ?", [{f"c{i}": "VARCHAR" for i in range(len(names))}])
    col = {n: f"c{i}" for i, n in enumerate(names)}
    time_sql = col.get("requestdatetime", "NULL")
    if "httpstatus" not in col:
        log(
            'the CSV has no "httpstatus" column: a PUT that failed (403, 503...) cannot be told from a write, so every '
            "PUT row counts; export httpstatus with the keys to leave failed PUTs out"
        )
    return f"""SELECT {col["operation"]} AS operation, {col[key_col]} AS key,
                      try_strptime({time_sql}, '{LOG_TIME_FORMAT}') AS request_time, {time_sql} AS time_text,
                      {col.get("httpstatus", "NULL")} AS http_status
        FROM read_csv(getvariable('csv_path'), header = true, auto_detect = false, delim = ',', quote = '"', escape = '"',
                      columns = getvariable('csv_columns'), ignore_errors = true, store_rejects = true, strict_mode = true,
                      max_line_size = {MAX_CSV_LINE})"""


def _read_csv(con, path: Path, rows_sql: str, rules: dict, work_dir: Path, log) -> None:
    """Classify the CSV's rows. DuckDB reads it in one pass; when a quoted value ran over a line end
    (an unterminated quote: DuckDB then swallows the next line into the bad record) or a line was
    over the maximum (whose reported sample may not be that line's), those lines are set aside
    by a line pass, each quarantined with its own sample, and the rest is read again."""
    import duckdb

    try:
        _classify(con, rows_sql, rules)
        suspect = con.execute(
            "SELECT count(*) FROM reject_errors WHERE error_type IN ('UNQUOTED VALUE', 'LINE SIZE OVER MAXIMUM') OR contains(csv_line, chr(10))"
        ).fetchone()[0]
        if suspect:
            last_scan = con.execute("SELECT coalesce(max(scan_id), -1) FROM reject_scans").fetchone()[0]
            clean = work_dir / "lines-checked.csv"
            set_aside = _set_aside_bad_lines(con, path, clean)
            log(
                f"{set_aside:,} CSV lines with an unterminated quote or over {MAX_CSV_LINE:,} bytes set aside; reading the rest again"
            )
            con.execute("DROP TABLE collected")
            con.execute("SET VARIABLE csv_path = ?", [str(clean)])
            _classify(con, rows_sql, rules)
        else:
            last_scan = -1
        _quarantine_rejected_csv_lines(con, last_scan)
    except duckdb.Error as exc:  # its message may quote the line ("Original Line: ..."): only the first line of it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path.name}: the CSV could not be read: {type(exc).__name__}: {first[:200]}") from None


def _set_aside_bad_lines(con, path: Path, clean: Path) -> int:
    """Copy `path` to `clean` line by line (bounded memory), leaving out the lines DuckDB cannot
    take alone: an odd number of quotes (an unterminated quoted value) or over MAX_CSV_LINE bytes.
    Each goes to `malformed` with its own sample. Returns how many were set aside."""
    bad: list[tuple[str, str]] = []
    with open(path, "rb") as src, open(clean, "wb") as dst:
        dst.write(src.readline(64 * 1024))  # the header, already checked
        while line := src.readline(MAX_CSV_LINE + 3):
            if len(line) == MAX_CSV_LINE + 3 and not line.endswith(b"\n"):  # over the maximum: skip to its end
                sample = line[: SAMPLE_CHARS * 4]
                rest = line
                while rest and not rest.endswith(b"\n"):
                    rest = src.readline(1 << 20)
                bad.append(
                    ("malformed_csv_row: line size over maximum", sample.decode("utf-8", "replace")[:SAMPLE_CHARS])
                )
                continue
            body = line.rstrip(b"\r\n")
            if len(body) > MAX_CSV_LINE:
                bad.append(
                    (
                        "malformed_csv_row: line size over maximum",
                        body[: SAMPLE_CHARS * 4].decode("utf-8", "replace")[:SAMPLE_CHARS],
                    )
                )
            elif body.count(b'"') % 2:
                bad.append(
                    (
                        "malformed_csv_row: unterminated quote",
                        body[: SAMPLE_CHARS * 4].decode("utf-8", "replace")[:SAMPLE_CHARS],
                    )
                )
            else:
                dst.write(line)
    for i in range(0, len(bad), 10_000):
        con.executemany("INSERT INTO malformed VALUES (?, ?)", bad[i : i + 10_000])
    return len(bad)


def _quarantine_rejected_csv_lines(con, after_scan: int = -1) -> None:
    # One quarantine row per rejected line (DuckDB may report several errors for one line), from the
    # scans after `after_scan` (the rejects of a read that was redone are not counted twice).
    con.execute(
        """INSERT INTO malformed
        SELECT 'malformed_csv_row: ' || lower(string_agg(DISTINCT error_type, ', ')), left(any_value(csv_line), $n)
        FROM reject_errors WHERE scan_id > $after GROUP BY scan_id, line""",
        {"after": after_scan, "n": SAMPLE_CHARS},
    )


def _load_rows(con, rows: Iterator[tuple[str, str, datetime | None, str | None]], log) -> None:
    import pyarrow as pa

    schema = pa.schema(
        [
            ("operation", pa.string()),
            ("key", pa.string()),
            ("request_time", pa.timestamp("us", tz="UTC")),
            ("time_text", pa.string()),
            ("http_status", pa.string()),
        ]
    )
    chunk: list[tuple] = []
    total = 0

    def flush() -> None:
        con.register("chunk", pa.Table.from_pylist([dict(zip(schema.names, r)) for r in chunk], schema=schema))
        con.execute("INSERT INTO rows SELECT * FROM chunk")
        con.unregister("chunk")
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) >= ROWS_PER_INSERT:
            total += len(chunk)
            flush()
            log(f"read {total:,} rows so far")
    total += len(chunk)
    if chunk:
        flush()
    log(f"read {total:,} rows")


# AWS's log object names: `YYYY-mm-DD-HH-MM-SS-<UniqueString>`, the time of delivery. Simple layout:
# `<prefix><name>`; partitioned (PartitionedPrefix): `<prefix><account>/<region>/<bucket>/YYYY/MM/DD/<name>`,
# the folder's date being the delivery time's or the event time's (PartitionDateSource).
LOG_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})-\d{2}-\d{2}-\d{2}-[^/]+")
PARTITION_ROOT = re.compile(r"(?:^|.*/)\d{12}/[^/]+/[^/]+/")  # <account>/<region>/<bucket>/


@dataclass
class LogFiles:
    """The access log files that can hold records of the run's days, each with the date it is filed
    under (its name's date in the simple layout, its folder's in the partitioned one)."""

    location: str
    files: list[tuple[str, str]]  # (S3 key or local path, date)
    partition_roots: list[str]

    @property
    def per_day(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, day in self.files:
            counts[day] = counts.get(day, 0) + 1
        return counts

    def looked_for(self, day: str) -> str:
        base = self.location if self.location.startswith("s3://") else self.location.rstrip("/") + "/"
        folder = day.replace("-", "/")
        if self.partition_roots:
            partitioned = ", ".join(f"{r}{folder}/" for r in self.partition_roots) + " (partitioned layout)"
        else:
            partitioned = f"{base}<account>/<region>/<bucket>/{folder}/ (partitioned layout; no such folders found)"
        return f"{base}{day}-HH-MM-SS-<id> (simple layout) and {partitioned}"


def _dates(first: date, last: date) -> list[str]:
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def find_log_files(location: str, days: list[str], s3, roots: list[Path]) -> LogFiles:
    """The log files of `location` (a local directory or s3://bucket/prefix) filed under a date that
    can hold records of `days`: a record is delivered up to hours after it happened, so the simple
    layout (named by delivery time) is read up to the day after the last; a partitioned one may be
    filed by event time (the file's first record), so it is read from the day before the first too.
    Records outside the days are counted and left out by their own time."""
    first, last = date.fromisoformat(days[0]), date.fromisoformat(days[-1])
    simple = set(_dates(first, last + timedelta(days=1)))
    partitioned = set(_dates(first - timedelta(days=1), last + timedelta(days=1)))
    if location.startswith("s3://"):
        return _s3_log_files(location, sorted(simple), sorted(partitioned), s3)
    root = confine(location, roots, "access-log directory")
    if not root.is_dir():
        raise ValueError(f"access-log directory {location!r} does not exist")
    files, partition_roots = [], set()
    for path in sorted(root.rglob("*")):
        m = LOG_NAME.fullmatch(path.name)
        if not m or not path.is_file():
            continue
        folder = path.parent.parts[-3:]
        if len(folder) == 3 and [len(p) for p in folder] == [4, 2, 2] and "".join(folder).isdigit():
            day, wanted = "-".join(folder), partitioned  # partitioned layout: filed by its folder
            partition_roots.add(f"{path.parents[3]}/")
        else:
            day, wanted = m.group(1), simple
        if day in wanted:
            files.append((str(confine(path, roots, "access-log file")), day))  # a symlink may point anywhere
    return LogFiles(location, files, sorted(partition_roots))


def _s3_log_files(location: str, simple: list[str], partitioned: list[str], s3) -> LogFiles:
    bucket, prefix = _split_s3(location)
    pages = s3.get_paginator("list_objects_v2")

    def listed(key_prefix: str):
        for page in pages.paginate(Bucket=bucket, Prefix=key_prefix):
            yield from (obj["Key"] for obj in page.get("Contents", []))

    files = [(k, day) for day in simple for k in listed(f"{prefix}{day}-") if LOG_NAME.fullmatch(k[len(prefix) :])]
    roots = _partition_roots(s3, bucket, prefix)
    for root in roots:
        for day in partitioned:
            folder = f"{root}{day.replace('-', '/')}/"
            files += [(k, day) for k in listed(folder) if LOG_NAME.fullmatch(k[len(folder) :])]
    return LogFiles(location, files, [f"s3://{bucket}/{r}" for r in roots])


def _partition_roots(s3, bucket: str, prefix: str) -> list[str]:
    """The `<prefix><account>/<region>/<bucket>/` folders of the partitioned layout under `prefix`
    (the prefix itself if it is one). Found by listing three folder levels with a delimiter; under a
    prefix that also holds simple-layout logs, the first level pages through those names too."""
    if PARTITION_ROOT.fullmatch(prefix):
        return [prefix]
    pages = s3.get_paginator("list_objects_v2")
    level = [prefix]
    for part in (r"\d{12}/", r"[^/]+/", r"[^/]+/"):  # account, region, source bucket
        level = [
            cp["Prefix"]
            for p in level
            for page in pages.paginate(Bucket=bucket, Prefix=p, Delimiter="/")
            for cp in page.get("CommonPrefixes", [])
            if re.fullmatch(part, cp["Prefix"][len(p) :])
        ]
    return level


def _report_log_files(found: LogFiles, days: list[str], log, warn) -> None:
    """How many log files each day has; no file at all is an error, a day without any a warning."""
    per_day = found.per_day
    if not found.files:
        raise ValueError(
            f"no S3 access log file for {days[0]}..{days[-1]} at {found.location}: looked for "
            f"{found.looked_for(days[0])} (and the days around it). Check the location (the logging "
            "configuration's TargetBucket and TargetPrefix) and that logging was on"
        )
    log(f"{len(found.files):,} access log files: " + ", ".join(f"{d} {n:,}" for d, n in sorted(per_day.items())))
    for day in days:
        if not per_day.get(day):
            warn(
                f"{day}: NO access log file is dated this day (looked for {found.looked_for(day)}): "
                "its records may be missing; the day's keys come only from files dated around it"
            )


def _fetch_log_files(found: LogFiles, work_dir: Path, s3) -> Iterator[Path]:
    if not found.location.startswith("s3://"):
        yield from (Path(p) for p, _ in found.files)
        return
    bucket, _ = _split_s3(found.location)
    target = work_dir / "logs"
    target.mkdir(parents=True, exist_ok=True)
    for key, _ in found.files:
        local = target / "current.log"
        s3.download_file(bucket, key, str(local))
        yield local


def parse_log_line(line: str) -> tuple[datetime, str, str, str | None] | None:
    """A record's (time, operation, key as logged, HTTP status or None), or None if it is not one."""
    m = LOG_LINE.match(line)
    if not m:
        return None
    try:
        when = datetime.strptime(m.group(1), LOG_TIME_FORMAT)
    except ValueError:
        return None
    return when, m.group(2), m.group(3), None if m.group(4) == "-" else m.group(4)


def _access_log_rows(files: Iterator[Path], con) -> Iterator[tuple]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                record = parse_log_line(line)
                if record is None:
                    con.execute("INSERT INTO malformed VALUES ('malformed_log_line', ?)", [line[:SAMPLE_CHARS]])
                    continue
                when, operation, key, status = record
                # The key as logged (URL-encoded): decoded in SQL, like an Athena export's (DECODE_KEY).
                yield operation, key, when, when.strftime(LOG_TIME_FORMAT), status


def _listing_rows(location: str, days: list[str], s3) -> Iterator[tuple]:
    if not location.startswith("s3://"):
        raise ValueError(f"listing needs an s3://bucket/prefix location, got {location!r}")
    bucket, prefix = _split_s3(location)
    start = datetime.fromisoformat(days[0]).replace(tzinfo=timezone.utc)
    end = datetime.fromisoformat(days[-1]).replace(tzinfo=timezone.utc) + timedelta(days=1)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if start <= obj["LastModified"] < end:  # a listed object exists: it was written
                yield PUT, obj["Key"], obj["LastModified"], obj["LastModified"].isoformat(), None


def _classify(con, rows_sql: str, rules: dict) -> None:
    """One streaming pass over the input into `collected`: the rows aggregated by what the outputs
    need, so memory grows with the distinct keys, not with the rows. A group is a day's valid key
    (`key`, with its PUT count and first PUT time), a refused PUT (`reason`, `raw`, its own time),
    or the other rows of a day (neither); `n` counts its rows, each also counted by whether its time
    is outside the window and whether it has a time at all."""
    con.execute(
        f"""CREATE TABLE collected AS
        SELECT day, is_put, outside, timed, reason,
               CASE WHEN is_put AND reason IS NULL THEN key END AS key,
               CASE WHEN reason IS NOT NULL THEN raw_key END AS raw,
               CASE WHEN reason IS NOT NULL THEN request_time END AS refused_at,
               count(*) AS n, min(request_time) AS first_put
        FROM (
          SELECT *, CASE WHEN is_put THEN {CLASSIFY} END AS reason
          FROM (
            SELECT operation IS NOT DISTINCT FROM '{PUT}' AS is_put, key AS raw_key, {DECODE_KEY} AS key,
                   nullif(trim(http_status), '') AS http_status, request_time, time_text,
                   time_text IS NOT NULL AS timed,
                   coalesce(strftime(timezone('UTC', request_time), '%Y-%m-%d'), $first_day) AS day,
                   coalesce(request_time < CAST($ws AS TIMESTAMPTZ) OR request_time >= CAST($we AS TIMESTAMPTZ), false)
                     AS outside
            FROM ({rows_sql})))
        GROUP BY ALL""",
        rules,
    )


def _write_days(con, days: list[str], keys_dir, quarantine_dir, log, window=None) -> KeyCollection:
    result = _count_input(con, days, log, window)
    shown = f"[{window[0].isoformat()}, {window[1].isoformat()})" if window else "whole day"
    outside = dict(con.execute("SELECT day, sum(n) FROM collected WHERE is_put AND outside GROUP BY day").fetchall())
    result.outside_window = sum(n for d, n in outside.items() if d in days)
    con.execute("DELETE FROM collected WHERE outside")  # counted above; not rows of the window
    for day in days:
        stats = DayKeys(day, window=shown, outside_window=outside.get(day, 0))
        first = day == days[0]  # the malformed lines have no day: they are counted on the first
        stats.put_rows, stats.keys, key_puts = con.execute(
            "SELECT coalesce(sum(n) FILTER (is_put), 0), count(key), coalesce(sum(n) FILTER (key IS NOT NULL), 0) "
            "FROM collected WHERE day = ?",
            [day],
        ).fetchone()
        stats.duplicates = int(key_puts) - stats.keys
        stats.quarantined_by_reason = _quarantined_by_reason(con, day)
        if first and result.malformed:
            stats.malformed_rows = result.malformed
            for reason, n in con.execute(
                "SELECT split_part(reason, ':', 1), count(*) FROM malformed GROUP BY ALL"
            ).fetchall():
                stats.quarantined_by_reason[reason] = stats.quarantined_by_reason.get(reason, 0) + n
        if stats.keys:
            _write_day_keys(con, day, keys_dir(day) / "keys.parquet", stats)
        if stats.quarantined:
            quarantine_dir(day).mkdir(parents=True, exist_ok=True)
            # One quarantine row per refused input row: a group of n identical refusals gives n rows.
            con.execute(
                """COPY (
                  SELECT reason, raw, refused_at AS request_time
                  FROM (SELECT *, unnest(range(n)) FROM collected WHERE day = $day AND reason IS NOT NULL)
                  UNION ALL
                  SELECT reason, raw, NULL FROM malformed WHERE $first
                ) TO $path (FORMAT parquet)""",
                {"day": day, "first": first, "path": str(quarantine_dir(day) / "quarantine.parquet")},
            )
        log(
            f"{day}: {stats.put_rows:,} PUT rows -> {stats.keys:,} keys, {stats.duplicates:,} duplicates, "
            f"{stats.quarantined:,} quarantined {stats.quarantined_by_reason or ''}"
            + (f"; window {shown}: {stats.outside_window:,} PUT rows of the day outside it" if window else "")
        )
        result.days[day] = stats
    return result


def _count_input(con, days: list[str], log, window=None) -> KeyCollection:
    """The input's totals; refuses a multi-day run, or a time window, when some PUT has no time."""
    result = KeyCollection()
    result.rows, puts, timed, result.other_days = (
        int(n)
        for n in con.execute(
            "SELECT coalesce(sum(n), 0), coalesce(sum(n) FILTER (is_put), 0), coalesce(sum(n) FILTER (is_put AND timed), 0), "
            "coalesce(sum(n) FILTER (is_put AND NOT list_contains($days, day)), 0) FROM collected",
            {"days": days},
        ).fetchone()
    )
    result.other_operations = result.rows - puts
    result.malformed = con.execute("SELECT count(*) FROM malformed").fetchone()[0]
    log(f"read {result.rows:,} rows, {puts:,} of them PUTs")
    if window and timed < puts:
        raise ValueError(
            f"{puts - timed:,} PUT rows have no request time, so a time window cannot select them: export "
            "`requestdatetime` with the keys (Athena: select operation, key, requestdatetime ...), or run whole days "
            "without a window (the export's own WHERE then decides the window)"
        )
    if len(days) > 1 and timed < puts:
        raise ValueError(
            "some rows have no request time, so their day is unknown: run one day at a time, "
            "or export `requestdatetime` with the keys"
        )
    return result


def _quarantined_by_reason(con, day: str) -> dict[str, int]:
    return {
        reason: int(n)
        for reason, n in con.execute(
            "SELECT reason, sum(n) FROM collected WHERE day = ? AND reason IS NOT NULL GROUP BY reason ORDER BY reason",
            [day],
        ).fetchall()
    }


def _write_day_keys(con, day: str, keys_file: Path, stats: DayKeys) -> None:
    """The day's keys, sorted (which groups them by project and type), and how many per project/type."""
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    con.execute(
        "COPY (SELECT key, first_put, n AS puts FROM collected WHERE day = $day AND key IS NOT NULL ORDER BY key) "
        "TO $path (FORMAT parquet)",
        {"day": day, "path": str(keys_file)},
    )
    stats.by_project_type = dict(
        con.execute(
            "SELECT regexp_extract(key, '^[^/]*/[^/]*'), count(*) FROM collected "
            "WHERE day = $day AND key IS NOT NULL GROUP BY ALL ORDER BY ALL",
            {"day": day},
        ).fetchall()
    )


def job_batches(
    keys_parquet: list, batch_size: int, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
) -> Iterator[Batch]:
    """Langfuse ingestion jobs for the keys, in the shape its refill script enqueues them:
    `{id, timestamp, name: "ingestion-job", payload: {data: {type: "<type>-create", eventBodyId,
    fileKey}, authCheck: {validKey, scope: {projectId, accessLevel}}}}`. The message id (the BullMQ
    job id and ledger id) is the object key itself, so a key listed twice is one job. The bodies are
    built a column at a time (pyarrow), not key by key."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in keys_parquet:
        # pre_buffer=False: with it, pyarrow keeps every row group it read cached (1 GB for 18M keys).
        for rb in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_size, columns=["key"]):
            keys = rb.column(0)
            # The keys as JSON text, escaped whole before they are split: a validated key holds no
            # backslash or control character, so `"` is all JSON escapes in it (msgspec writes the
            # same bytes; tests/test_ingestion_refill.py), and it has four parts, the last ending
            # in .json. A known type is a safe value, which escaping leaves as it is.
            parts = pc.split_pattern(pc.replace_substring(keys, '"', '\\"'), "/")
            project, type_, body_id = (pc.list_element(parts, i) for i in range(3))
            event_id = pc.utf8_slice_codeunits(pc.list_element(parts, 3), 0, -len(".json"))
            stamp = now().isoformat(timespec="milliseconds").replace("+00:00", "Z")
            bodies = pc.binary_join_element_wise(
                '{"id":"', event_id, '","timestamp":"', stamp, '","name":"ingestion-job","payload":{"data":{"type":"',
                type_, '-create","eventBodyId":"', body_id, '","fileKey":"', event_id,
                '"},"authCheck":{"validKey":true,"scope":{"projectId":"', project, '","accessLevel":"project"}}}}',
                "",
            )  # fmt: skip
            yield Batch(keys.to_pylist(), bodies.cast(pa.binary()).to_pylist(), type_.to_pylist())
