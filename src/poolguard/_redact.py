"""The one place that keeps passwords out of text: errors, logs, reprs, reports and CLI output.

``redact_text(text, *sources)`` removes from ``text`` every password found in ``sources``:
DSNs (URLs and conninfo strings, well-formed or not: a malformed one is exactly what libpq
quotes back in its error) and mappings of connection arguments (``connect_args``, Django's
``DATABASES`` entry and its ``OPTIONS``).  Each password is removed as given, percent-decoded and
percent-encoded, and in the fragments libpq quotes when it cannot parse a value.
``redact_conninfo(dsn)`` is a DSN fit to show.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

MASK = "***"

_CONNINFO_PASSWORD = (
    re.compile(r"password\s*=\s*'((?:[^'\\]|\\.)*)'?", re.IGNORECASE),
    re.compile(r"password\s*=\s*([^\s']+)", re.IGNORECASE),
)
# The scheme and slashes in front of a URL's userinfo, however mistyped: "postgresql://",
# "postgresql:/", or none at all ("app:PW@host/db", where "app:" is the user, not a scheme;
# "postgres//app:PW" keeps its prefix, which the first ":" still separates from the password).
_URL_PREFIX = re.compile(r"^(?:[A-Za-z][\w+.-]*:(?=/))?/*")
# A URL however mistyped ("postgresql://", "postgres//", "postgresql:/"), or userinfo with no
# scheme at all ("app:PW@host"): anything but a conninfo string's "key=value".
_URL_START = re.compile(r"^(?:[A-Za-z][\w+.-]*:?/|[^\s=:/@]+:)")
# Keys of argument mappings that hold a secret ("passfile" is a path, not a secret).
_SECRET_KEY = re.compile(r"^(?:password|pass|pwd|secret|sslpassword)$", re.IGNORECASE)
# A fragment shorter than this is only removed where it stands alone, so that a one-letter
# piece of a quoted password does not mangle the rest of a message.
_MIN_SUBSTRING = 3


def redact_text(text: str, *sources: object) -> str:
    """``text`` without any password that appears in ``sources`` (DSNs or argument mappings)."""
    for secret in sorted(_secrets(sources), key=len, reverse=True):
        if len(secret) >= _MIN_SUBSTRING:
            text = text.replace(secret, MASK)
        else:
            text = re.sub(rf"(?<![\w%]){re.escape(secret)}(?![\w%])", MASK, text)
    return text


def redact_conninfo(dsn: str) -> str:
    """``dsn`` as a conninfo string with ``password=***``; a DSN libpq cannot parse is not shown."""
    if not dsn:
        return ""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = MASK
    return redact_text(make_conninfo(**params), dsn)  # type: ignore[arg-type]


def _secrets(sources: Iterable[object]) -> set[str]:
    found: set[str] = set()
    for source in sources:
        if isinstance(source, str):
            found.update(_dsn_secrets(source))
        elif isinstance(source, Mapping):
            for key, value in source.items():
                if isinstance(key, str) and _SECRET_KEY.match(key) and value:
                    found.add(str(value))
                elif isinstance(value, (str, Mapping)):
                    found.update(_secrets([value]))
    variants: set[str] = set()
    for secret in found:
        for form in (secret, unquote(secret), quote(secret, safe=""), quote(secret)):
            variants.add(form)
            # libpq and urlsplit cut a malformed value at spaces and URL delimiters, and quote
            # the fragments: each is removed on its own.
            variants.update(re.split(r"[\s/?#@:\[\]'\"\\&=,;]+", form))
            if "\\" in form:
                variants.add(re.sub(r"\\(.)", r"\1", form))
    return {v for v in variants if v and v != MASK}


def _dsn_secrets(dsn: str) -> set[str]:
    found: set[str] = set()
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
    if password:
        found.add(str(password))
    for pattern in _CONNINFO_PASSWORD:
        found.update(m.group(1) for m in pattern.finditer(dsn) if m.group(1))
    for query in re.finditer(r"[?&]password=([^&#\s]*)", dsn, re.IGNORECASE):
        found.add(query.group(1))
    # A URL's userinfo may hold spaces (a malformed one); a conninfo string's words are apart.
    url_like = bool(_URL_START.match(dsn)) or "=" not in dsn.split("@", 1)[0]
    for token in [dsn] if url_like else dsn.split():
        if "@" not in token:
            continue
        before = token[: token.rindex("@")]
        found.add(_URL_PREFIX.sub("", before, count=1).partition(":")[2])
    return {s for s in found if s}


def redact_value(value: Any, *sources: object) -> str:
    """``repr(value)`` without passwords, the value itself counted as a source."""
    return redact_text(repr(value), value, *sources)
