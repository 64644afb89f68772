"""The access-log line parser on real S3 server access log records (tests/fixtures/s3_access_log_records.log:
AWS's documentation examples and open-source parsers' fixtures, each with its source), field by field
against an independent parse: the RegexSerDe regex AWS documents for Athena's access-log table."""

import re
from datetime import datetime
from pathlib import Path

from replay_defs.ingestion_refill.access_logs import LOG_TIME_FORMAT, parse_log_line

FIXTURE = Path(__file__).parent / "fixtures" / "s3_access_log_records.log"
# AWS's "Querying Amazon S3 server access logs" (Athena) table: 'input.regex', unescaped from its DDL.
ATHENA = re.compile(
    r'([^ ]*) ([^ ]*) \[(.*?)\] ([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*) ("[^"]*"|-) (-|[0-9]*) ([^ ]*) ([^ ]*) '
    r'([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*) ("[^"]*"|-) ([^ ]*)(?: ([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*) '
    r"([^ ]*) ([^ ]*))?.*$"
)
# The records Athena's regex cannot parse (a double quote inside a quoted field, written unescaped by
# S3), read by hand: (time, operation, key, HTTP status).
BY_HAND = {
    "63DAF67A2BC0B6C3": ("20/Jun/2019:03:51:36 +0000", "REST.GET.OBJECT", "%2522", "403"),  # "GET /" HTTP/1.1"
    "() { :;}": ("19/May/2022:12:59:47 +0000", "REST.GET.BUCKET", "-", "403"),
    'Safari/604.1""': ("24/Dec/2020:20:00:00 +0000", "REST.GET.OBJECT", "aaa/fizzbuzz.txt", "200"),
}


def records() -> list[str]:
    return [line for line in FIXTURE.read_text().split("\n") if line and not line.startswith("#")]


def test_the_parser_agrees_with_athenas_regex_on_every_real_record():
    lines = records()
    assert len(lines) == 65
    by_athena = by_hand = 0
    for line in lines:
        ours = parse_log_line(line)
        assert ours is not None, line
        when, operation, key, status = ours
        m = ATHENA.fullmatch(line)
        if m:
            expected = (m.group(3), m.group(7), m.group(8), None if m.group(10) == "-" else m.group(10))
            by_athena += 1
        else:
            (expected,) = [v for marker, v in BY_HAND.items() if marker in line]
            by_hand += 1
        got = (when.strftime(LOG_TIME_FORMAT), operation, key, status)
        assert got == expected, line
        assert when == datetime.strptime(expected[0], LOG_TIME_FORMAT)
    assert (by_athena, by_hand) == (62, 3)


def test_a_quote_inside_the_request_uri_does_not_shift_the_status():
    """The disagreeing record: S3 logs a request for `/"` as `"GET /" HTTP/1.1"`. Ending the
    Request-URI at its first inner quote read `HTTP/1.1"` as the status; a failed PUT (403) would
    then not have been recognised as one."""
    (line,) = [line for line in records() if "63DAF67A2BC0B6C3" in line]
    assert parse_log_line(line)[3] == "403"
    naive = re.match(r'^\S+ \S+ \[[^\]]+\] \S+ \S+ \S+ \S+ \S+ (?:"[^"]*"|-) (\S+)', line)
    assert naive.group(1) == 'HTTP/1.1"', "the fixture still holds the record that broke the first-quote reading"
    put = line.replace("REST.GET.OBJECT", "REST.PUT.OBJECT").replace('"GET /"', '"PUT /"')
    assert parse_log_line(put)[1:] == ("REST.PUT.OBJECT", "%2522", "403")


def test_lines_that_are_not_records_are_refused():
    for bad in [
        "this is not an access log line",
        'abc example.com 27/Apr/2016:03:58:01 +0000 166.86.131.1 - DFF WEBSITE.GET.OBJECT h2wedge.png "GET / HTTP/1.1" 200 -',
        'abc example.com [Apr/2016 03:58:01 +0000] 166.86.131.1 - DFF WEBSITE.GET.OBJECT h2wedge.png "GET / HTTP/1.1" 200 -',
        'abc example.com [27/Apr/2016:03:58:01 +0100] 66.86.131.1 - T WEBSITE.GET.OBJECT h2wedge.png "GET / HTTP/1.0" OK - 130',
    ]:
        assert parse_log_line(bad) is None, bad
