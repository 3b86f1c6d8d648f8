"""Malformed and random input: the codec raises only ProtocolError, and a session fed garbage
(before or after login) ends alone while other clients keep working."""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawpg import FLUSH, SYNC, RawClient, bind, close, describe, execute, parse, query

from poolguard.rewriter import RewriterHandle
from poolguard.rewriter import _protocol as p


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_codec_raises_only_protocol_errors(data: bytes) -> None:
    decoders = (
        lambda: p.split_messages(bytearray(data), 1024),
        lambda: p.read_startup(bytearray(data)),
        lambda: p.parse_startup(data),
        lambda: p.parse_parse(data),
        lambda: p.split_bind(data),
        lambda: p.parse_target(data),
        lambda: p.query_text(data),
        lambda: p.parse_parameter_status(data),
    )
    for decode in decoders:
        with contextlib.suppress(p.ProtocolError):
            decode()


_names = st.sampled_from([b"", b"s1", b"s2", b"x" * 70])
_sql = st.sampled_from(
    [
        b"select 1",
        b"select $1::int",
        b"select 1/0",
        b"begin",
        b"commit",
        b"select no_such_column",
        b"DEALLOCATE ALL",
        b"DEALLOCATE s1",
        b"DISCARD ALL",
        b"create temp table f (a int)",
        b"copy (select 1) to stdout",
    ]
)
_message = st.one_of(
    st.builds(parse, _names, _sql),
    st.builds(lambda n, v: bind(n, v), _names, st.sampled_from([b"1", b"x", None])),
    st.builds(lambda: execute()),
    st.builds(describe, _names, st.sampled_from([b"S", b"P"])),
    st.builds(close, _names, st.sampled_from([b"S", b"P"])),
    st.builds(query, _sql),
    st.just(SYNC),
    st.just(FLUSH),
    st.just(p.frame(b"d", b"1\n")),
    st.just(p.frame(b"c")),
    # malformed: a known type with a random body, an unknown type, a lying length
    st.builds(
        p.frame, st.sampled_from([b"P", b"B", b"D", b"C", b"E", b"Q"]), st.binary(max_size=20)
    ),
    st.builds(p.frame, st.sampled_from([b"Y", b"\0", b"p", b"1"]), st.binary(max_size=8)),
    st.builds(lambda n: b"Q" + struct.pack("!i", n), st.integers(-5, 1 << 31 - 1)),
)


@pytest.fixture
def fuzz_proxy(make_rewriter):  # type: ignore[no-untyped-def]
    return make_rewriter(pool_size=2, max_message_size=4096, cleanup_timeout=5.0)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(_message, max_size=12), st.booleans())
def test_sessions_fed_random_messages_do_not_hurt_others(
    fuzz_proxy: RewriterHandle,
    caplog: pytest.LogCaptureFixture,
    messages: list[bytes],
    wait: bool,
) -> None:
    c = RawClient(fuzz_proxy.dsn)
    try:
        c.send(*messages)
        if wait:  # let some replies come back before the client vanishes
            c.sock.settimeout(0.05)
            try:
                while c.sock.recv(65536):
                    pass
            except OSError:
                pass
    finally:
        c.sock.close()
    with psycopg.connect(fuzz_proxy.dsn, autocommit=True, connect_timeout=10) as other:
        assert other.execute("select 'ok'").fetchone() == ("ok",)
    # An exception escaping a protocol callback is only logged by asyncio: treat it as a crash.
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(min_size=1, max_size=64), st.booleans())
def test_garbage_before_login_ends_only_that_connection(
    fuzz_proxy: RewriterHandle,
    caplog: pytest.LogCaptureFixture,
    garbage: bytes,
    after_startup: bool,
) -> None:
    # Either the very first bytes, or what follows a valid startup packet (the SCRAM exchange).
    startup = p.build_startup({"user": fuzz_proxy.user, "database": fuzz_proxy.dbname})
    with socket.create_connection((fuzz_proxy.host, fuzz_proxy.port), timeout=5) as s:
        s.sendall(startup + garbage if after_startup else garbage)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(2)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    with psycopg.connect(fuzz_proxy.dsn, autocommit=True, connect_timeout=10) as other:
        assert other.execute("select 1").fetchone() == (1,)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_after_fuzzing_no_server_connection_is_left_in_a_transaction(
    fuzz_proxy: RewriterHandle, pg_dsn: str
) -> None:
    # One deterministic worst case per kind of leftover, then look at the server itself.
    leftovers = [
        [query(b"begin"), query(b"select 1")],
        [parse(b"s1", b"select 1"), bind(b"s1"), execute()],
        [query(b"create temp table f (a int)"), query(b"copy f from stdin"), p.frame(b"d", b"1\n")],
        [query(b"begin"), p.frame(b"P", b"garbage")],
    ]
    for messages in leftovers:
        c = RawClient(fuzz_proxy.dsn)
        c.send(*messages)
        time.sleep(0.05)
        c.sock.close()
    deadline = time.monotonic() + 10
    with psycopg.connect(pg_dsn, autocommit=True) as direct:
        while True:
            row = direct.execute(
                "select count(*) from pg_stat_activity where datname = current_database() "
                "and state <> 'idle' and pid <> pg_backend_pid()"
            ).fetchone()
            if row == (0,) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert row == (0,)
