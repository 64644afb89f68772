"""ClickHouse's HTTP interface served from chDB, for exactly what clickhouse-connect sends.

There is no ClickHouse server package for this machine, so the tests run the resource's HTTP path
(clickhouse-connect over HTTP) against this: a threaded HTTP server on 127.0.0.1 that hands each
request to chDB, in this process, on the process's one chDB data directory.

What it understands: the SQL in the `query` URL parameter or the POST body; `database`;
`param_<name>` values for `{name:Type}` placeholders (bound by chDB, as the server would);
INSERTs whose data (any format named in the SQL, e.g. Arrow or Native) is the body, also when
compressed (Content-Encoding lz4 / zstd / gzip); Basic or X-ClickHouse-User/Key credentials checked
against the configured user. Other URL parameters are ClickHouse settings (ignored), and the
output is whatever FORMAT the SQL names (TabSeparated otherwise), with the headers clickhouse-connect
reads (X-ClickHouse-Timezone, X-ClickHouse-Format, X-ClickHouse-Summary).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
_INSERT = re.compile(r"^\s*INSERT\s+INTO\b", re.IGNORECASE)


class ChdbHttpServer:
    def __init__(self, data_path: str, user: str = "default", password: str = ""):
        from chdb import session

        self.session = session.Session(data_path)
        self.user, self.password = user, password
        self.lock = threading.Lock()  # one chDB call at a time
        self.requests: list[dict] = []  # what was asked: sql, params, body bytes, format
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, with_password: bool = True) -> str:
        secret = f":{self.password}" if with_password and self.password else ""
        return f"http://{self.user}{secret}@127.0.0.1:{self.port}"

    def start(self) -> "ChdbHttpServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.session.close()

    def _authorized(self, headers) -> bool:
        auth = headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        else:
            user, password = headers.get("X-ClickHouse-User", "default"), headers.get("X-ClickHouse-Key", "")
        return (user, password) == (self.user, self.password)

    def execute(self, sql: str, database: str | None, params: dict, body: bytes | None) -> tuple[bytes, str]:
        m = _FORMAT.search(sql)
        fmt = m.group(1) if m else "TabSeparated"
        with self.lock:
            if database:
                self.session.query(f"USE `{database.replace('`', '')}`")
            if body is not None and _INSERT.match(sql):
                statement = sql[: m.start()] if m else sql
                with self.session.send_insert(statement, fmt) as ins:
                    ins.append(body)
                    ins.finish()
                return b"", fmt
            result = self.session.query(sql[: m.start()] if m else sql, fmt, params=params or None)
        return result.bytes(), fmt

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self, body: bytes | None) -> None:
                url = urlparse(self.path)
                if url.path in ("/ping", "/"):
                    if "query" not in parse_qs(url.query) and not body:
                        return self._reply(200, b"Ok.\n", {})
                if not server._authorized(self.headers):
                    return self._reply(
                        516, b"Code: 516. DB::Exception: default: Authentication failed. (AUTHENTICATION_FAILED)\n", {}
                    )
                qs = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                encoding = self.headers.get("Content-Encoding")
                if body and encoding:
                    body = _decompress(body, encoding)
                sql = qs.get("query")
                if sql is None:
                    sql, body = (body or b"").decode(), None
                params = {k[len("param_") :]: v for k, v in qs.items() if k.startswith("param_")}
                server.requests.append({"sql": sql, "params": params, "body": body, "database": qs.get("database")})
                try:
                    out, fmt = server.execute(sql, qs.get("database"), params, body)
                except Exception as exc:  # chDB's error text, as the server would answer
                    code = re.search(r"Code: (\d+)", str(exc))
                    return self._reply(
                        500, f"{exc}\n".encode(), {"X-ClickHouse-Exception-Code": code.group(1) if code else "1"}
                    )
                summary = {"read_rows": "0", "written_rows": "0"}
                self._reply(
                    200,
                    out,
                    {
                        "X-ClickHouse-Format": fmt,
                        "X-ClickHouse-Timezone": "UTC",
                        "X-ClickHouse-Summary": json.dumps(summary),
                        "X-ClickHouse-Server-Display-Name": "chdb-http-fixture",
                    },
                )

            def _reply(self, status: int, payload: bytes, headers: dict) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._handle(None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    self._handle(_read_chunked(self.rfile))
                else:
                    self._handle(self.rfile.read(length))

        return Handler


def _read_chunked(rfile) -> bytes:
    out = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            rfile.readline()
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()


def _decompress(body: bytes, encoding: str) -> bytes:
    if encoding == "lz4":
        import lz4.frame

        return lz4.frame.decompress(body)
    if encoding == "zstd":
        from backports import zstd

        return zstd.decompress(body)
    if encoding == "gzip":
        return gzip.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")
