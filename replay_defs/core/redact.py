"""Keep credentials out of logs, metadata, errors, dead letters, audit rows and CLI output.

Secrets are masked **by value**: every password or token of a configured connection is held in a
process-wide registry, and `redact(text)` replaces each of them (as configured, URL-decoded and
URL-encoded) with `***`, wherever it appears and whatever the text around it looks like — a driver
that echoes a mistyped URL, a broker that reports "vhost guest:PW@host not found", a password with
`@` in it. The registry is filled where connection settings are resolved: `register_url` for a URL
or libpq conninfo (the `connect` helpers, the resources, the CLI), and, on every `redact` call, from
the environment variables that hold connection settings (`*_URL`, `*_DSN`, `*PASSWORD*`, `*TOKEN*`,
`*SECRET*`), so a process that only reads the environment is covered too.

Values shorter than `MIN_SECRET_LENGTH` (4) characters are not registered: masking "ab" or "1"
everywhere would mangle ordinary words and numbers. Such a password is still masked where the
patterns below recognise it (`scheme://user:PW@`, `password=PW`), but not when a driver quotes it
in some other form — use longer passwords.

The pattern-based masking of `scheme://user:password@` and `password=...` stays as the fallback for
secrets that were never registered (a URL in a message from some other process).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from contextlib import contextmanager
from urllib.parse import quote, quote_plus, unquote, unquote_plus

MASK = "***"
MIN_SECRET_LENGTH = 4

# scheme://user:password@host  ->  scheme://user:***@host (also a bare scheme://:password@host)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^\s/]*)@")
# password=... in libpq conninfo and URL query strings (password='a b', password=x&...)
_PASSWORD_KV = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|sasl\.password|token|secret)\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s&;,)'\"]+)",
    re.I,
)
_ENV_NAME = re.compile(r"(_URL|_DSN|PASSWORD|TOKEN|SECRET)", re.I)

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern | None = None
_env_seen: tuple = ()


def register_secret(value: str | None) -> None:
    """Mask `value` (and its URL-decoded and URL-encoded forms) in all text `redact` sees."""
    global _pattern
    if not value:
        return
    forms = set()
    for v in (value, unquote(value), unquote_plus(value)):
        forms |= {v, quote(v, safe=""), quote_plus(v, safe=""), quote(v)}
    forms = {f for f in forms if len(f) >= MIN_SECRET_LENGTH}
    with _lock:
        if forms <= _secrets:
            return
        _secrets.update(forms)
        # longest first, so a value that contains another is masked whole
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def secrets_of(url: str) -> list[str]:
    """The passwords and tokens in a connection URL or libpq conninfo, as written: the userinfo
    password (also when the scheme is mistyped, `amqp:/u:p@h`, or the password holds a raw `@`,
    `:` or `/`) and every `password=` value."""
    found = []
    text = url.strip()
    m = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/*(?P<rest>.*)$", text, re.S)
    if m and "@" in m["rest"]:
        # the userinfo ends at the last '@' before the query: a raw '@' or '/' in the password stays in it
        userinfo = m["rest"].split("?", 1)[0].rsplit("@", 1)[0]
        if ":" in userinfo:
            found.append(userinfo.split(":", 1)[1])
        elif userinfo and re.match(r"(rediss?|https?|kafka|sasl_\w+)$", text.split(":", 1)[0], re.I):
            found.append(userinfo)  # redis://TOKEN@host, https://TOKEN@host: the user is the secret
    for kv in _PASSWORD_KV.finditer(text):
        v = kv["value"]
        if v.startswith("'"):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        found.append(v)
    return [f for f in found if f]


def register_url(url: str | None) -> str | None:
    """Register the secrets of a connection URL or conninfo; returns `url` unchanged."""
    if url and isinstance(url, str):
        for s in secrets_of(url):
            register_secret(s)
    return url


def _register_environment() -> None:
    global _env_seen
    values = tuple(v for k, v in os.environ.items() if v and _ENV_NAME.search(k))
    if values == _env_seen:
        return
    for k, v in os.environ.items():
        if v and _ENV_NAME.search(k):
            if re.search(r"(PASSWORD|TOKEN|SECRET)", k, re.I) and not re.search(r"(_URL|_DSN)$", k, re.I):
                register_secret(v)
            else:
                register_url(v)
    _env_seen = values


def redact(text: str) -> str:
    """`text` with every registered secret, every `scheme://user:PW@` password and every
    `password=PW` value replaced by `***`."""
    if not text:
        return text
    text = str(text)
    _register_environment()
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _PASSWORD_KV.sub(lambda m: m["key"] + MASK, text)


def scrub(exc: BaseException) -> BaseException:
    """Redact an exception in place — its string arguments and attributes, the exceptions it wraps
    and its cause/context chain — so its type (what callers catch) is kept and whatever prints it
    (Dagster's run storage, a traceback, `str`) shows no secret. Returns `exc`."""
    seen: set[int] = set()

    def clean(value, depth: int):
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, bytes):
            return redact(value.decode(errors="replace")).encode()
        if isinstance(value, BaseException):
            visit(value, depth + 1)
        elif isinstance(value, (tuple, list)):
            return type(value)(clean(v, depth) for v in value)
        return value

    def visit(e: BaseException, depth: int) -> None:
        if id(e) in seen or depth > 8:
            return
        seen.add(id(e))
        try:
            e.args = tuple(clean(a, depth) for a in e.args)
        except Exception:  # noqa: BLE001 - some C exceptions refuse new args
            pass
        for k, v in list(getattr(e, "__dict__", {}).items()):
            if isinstance(v, (str, bytes, tuple, list, BaseException)):
                try:
                    setattr(e, k, clean(v, depth))
                except Exception:  # noqa: BLE001 - read-only attribute
                    pass
        for chained in (e.__cause__, e.__context__):
            if chained is not None:
                visit(chained, depth + 1)

    visit(exc, 0)
    return exc


class RedactingFilter(logging.Filter):
    """Masks secrets in a log record before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            scrub(record.exc_info[1])
            record.exc_text = None
        return True


_FILTER = RedactingFilter()


def mask_logs(prefix: str) -> None:
    """Mask secrets in what the loggers named `prefix` or `prefix.*` log (a driver that logs the
    error it is about to raise, as pika does). Filters act per logger, so each one gets it."""
    names = [n for n in list(logging.root.manager.loggerDict) if n == prefix or n.startswith(prefix + ".")]
    for name in [prefix, *names]:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


@contextmanager
def secrets_masked(*urls: str | None):
    """Register the URLs' secrets; an exception raised inside leaves with them masked (same type)."""
    for url in urls:
        register_url(url)
    try:
        yield
    except BaseException as exc:
        scrub(exc)
        if redact(str(exc)) != str(exc):  # its __str__ rebuilds the text from something we could not reach
            raise ConnectionError(redact(f"{type(exc).__name__}: {exc}")) from None
        raise
