"""Keep credentials out of logs, metadata and errors."""

import re

# scheme://user:password@host  ->  scheme://user:***@host (also a bare scheme://:password@host)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")


def redact(text: str) -> str:
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
