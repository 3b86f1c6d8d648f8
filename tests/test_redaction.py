"""No password in any error, repr, log line or CLI output: a property test over DSN shapes.

Every generated password starts with a marker no other text contains, so any occurrence (as
given, percent-decoded or percent-encoded) is a leak.  The DSNs point at a closed port on
127.0.0.1, so the paths that connect fail at once, with libpq's own error text.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poolguard
from poolguard import cli
from poolguard._redact import redact_conninfo, redact_text

MARKER = "Qz7"
# Characters that break naive parsing: URL delimiters, quotes, spaces, percent signs.
_SPECIAL = "@:/ %'\\?&=#+,;[]"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PORT = _closed_port()

passwords = st.builds(
    lambda core, tail: MARKER + core + tail,
    st.text("abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=6, max_size=10),
    st.text(_SPECIAL + "xyz", max_size=4),
)


def _quoted(pw: str) -> str:
    return "'" + pw.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Each shape: (name, password -> DSN).  Well-formed and malformed, URL and conninfo.
SHAPES: list[tuple[str, Callable[[str], str]]] = [
    ("url", lambda pw: f"postgresql://app:{quote(pw, safe='')}@127.0.0.1:{PORT}/app"),
    ("url raw", lambda pw: f"postgresql://app:{pw}@127.0.0.1:{PORT}/app"),
    ("url bad option", lambda pw: f"postgres://app:{quote(pw, safe='')}@h/app?sslmode=bogus"),
    ("url bad number", lambda pw: f"postgresql://app:{quote(pw)}@h/app?connect_timeout=x"),
    ("url unknown option", lambda pw: f"postgresql://app:{quote(pw, safe='')}@h/app?nope=1"),
    ("url bad port", lambda pw: f"postgresql://app:{quote(pw, safe='')}@h:notaport/app"),
    ("ipv6", lambda pw: f"postgresql://app:{quote(pw, safe='')}@[::1]:{PORT}/app"),
    (
        "multi-host",
        lambda pw: f"postgresql://app:{quote(pw, safe='')}@127.0.0.1:{PORT},[::1]:{PORT}/app",
    ),
    ("query password", lambda pw: f"postgresql://app@127.0.0.1:{PORT}/app?password={quote(pw)}"),
    ("query password bad", lambda pw: f"postgresql://app@h/app?password={quote(pw)}&sslmode=x"),
    ("no scheme slashes", lambda pw: f"postgres//app:{pw}@h/app"),
    ("one slash", lambda pw: f"postgresql:/app:{pw}@h/app"),
    ("no scheme", lambda pw: f"app:{pw}@h/app"),
    ("conninfo", lambda pw: f"host=127.0.0.1 port={PORT} user=app password={_quoted(pw)}"),
    ("conninfo bad port", lambda pw: f"host=h port=abc user=app password={_quoted(pw)}"),
    ("conninfo unquoted", lambda pw: f"host=h user=app password={pw} dbname=app"),
    ("conninfo unknown", lambda pw: f"host=h password={_quoted(pw)} sslmod=require"),
    ("passfile", lambda pw: f"host=h passfile=/nonexistent password={_quoted(pw)} port=x"),
]


def _forms(pw: str) -> set[str]:
    forms = {pw, unquote(pw), quote(pw, safe=""), quote(pw)}
    # Fragments libpq may quote on their own: whatever is long enough to be the secret.
    return {f for f in forms if len(f) >= len(MARKER) + 6}


def assert_clean(pw: str, *texts: str) -> None:
    for text in texts:
        for form in _forms(pw):
            assert form not in text, f"password form {form!r} leaked in {text!r}"
        assert MARKER + pw[len(MARKER) : len(MARKER) + 6] not in text, text


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every record of every logger, formatted with its arguments, at DEBUG and up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def _errors_of(call: Callable[[], Any]) -> list[str]:
    try:
        result = call()
    except Exception as exc:
        # What a traceback shows: the chained exceptions too, unless `from None` hid them.
        shown = traceback.format_exception(exc)
        return [str(exc), repr(exc), *shown]
    return [repr(result), str(result)]


def _doctor(dsn: str, *options: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        contextlib.suppress(SystemExit),
    ):
        cli.main(["doctor", *options, dsn])
    return out.getvalue() + err.getvalue()


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pw=passwords, shape=st.sampled_from(SHAPES))
def test_no_password_in_configure_engine_or_doctor_output(
    pw: str, shape: tuple[str, Callable[[str], str]]
) -> None:
    from poolguard.sqlalchemy import create_engine

    dsn = shape[1](pw)
    texts: list[str] = []
    with captured_logs() as logs:
        try:
            texts += _errors_of(lambda: poolguard.configure(dsn, connect_timeout=1, name="p"))
            texts += _errors_of(lambda: poolguard.get_pool("p").open())
            texts += _errors_of(lambda: repr(poolguard.get_pool("p").settings))
            texts += _errors_of(lambda: poolguard.report())
            texts += _errors_of(lambda: poolguard.stats("p"))
        finally:
            poolguard.reset()
        url = f"postgresql+psycopg://app@127.0.0.1:{PORT}/app"
        texts += _errors_of(lambda: create_engine(dsn.replace("postgresql", "postgresql+psycopg")))
        poolguard.reset()
        texts += _errors_of(lambda: create_engine(url, connect_args={"password": pw}))
        poolguard.reset()
        texts += _errors_of(lambda: create_engine(dsn, connect_args={"sslmode": "x", "pwd": pw}))
        poolguard.reset()
        text = _doctor(dsn)
        as_json = _doctor(dsn, "--json")
    texts += [text, as_json, *_strings(json.loads(as_json)), logs.getvalue()]
    texts += [redact_conninfo(dsn), redact_text(f"dsn was {dsn}", dsn)]
    assert_clean(pw, *texts)


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgres//app:{MARKER}SubProc1x@h/app",
        f"postgresql:/app:{MARKER}SubProc2x@h/app",
        f"app:{MARKER}SubProc3x@h/app",
        f"postgresql://app:{MARKER}SubProc4x@127.0.0.1:{PORT}/app",
    ],
)
@pytest.mark.parametrize("options", [[], ["--json"]])
def test_doctor_in_a_real_process_shows_no_password(dsn: str, options: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "poolguard.cli", "doctor", *options, dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "SubProc" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "127.0.0.1" in done.stdout + done.stderr or "h" in done.stdout + done.stderr


def test_redaction_keeps_the_message_readable() -> None:
    dsn = "host=db port=5432 user=app password='x'"
    # A one-letter password is removed only where it stands alone, not inside words.
    assert redact_text("bad value x for port: expected digits", dsn) == (
        "bad value *** for port: expected digits"
    )
    assert redact_conninfo("postgresql://app:s3cr%40t@db/app") == (
        "user=app password=*** dbname=app host=db"
    )
