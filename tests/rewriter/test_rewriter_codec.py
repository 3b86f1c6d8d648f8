"""Unit tests for the pure parts: message codec, statement bookkeeping, SCRAM."""

from __future__ import annotations

import gc
import struct

import pytest

from poolguard.rewriter import _auth
from poolguard.rewriter import _protocol as p
from poolguard.rewriter._sqltext import deallocate_target, drops_all, may_drop_statements
from poolguard.rewriter._statements import BackendStatements, Registry

# --- framing ------------------------------------------------------------------------------


def test_split_messages_returns_complete_messages_and_leaves_the_partial_tail() -> None:
    data = bytearray(p.frame(b"Q", b"select 1\0") + p.SYNC_MSG + p.frame(b"P", b"abc")[:4])
    msgs, used = p.split_messages(data, 1024)
    assert msgs == [(b"Q", b"select 1\0"), (b"S", b"")]
    assert used == len(data) - 4


def test_next_message_takes_one_message_at_a_time() -> None:
    data = bytearray(p.frame(b"p", b"abc") + p.SYNC_MSG[:3])
    assert p.next_message(data, 1024) == (b"p", b"abc")
    assert data == bytearray(p.SYNC_MSG[:3])
    assert p.next_message(data, 1024) is None
    with pytest.raises(p.ProtocolError):
        p.next_message(bytearray(b"p\x7f\0\0\0"), 1024)


@pytest.mark.parametrize(("length", "sqlstate"), [(3, "08P01"), (-1, "08P01"), (2048, "54000")])
def test_split_messages_rejects_lengths_outside_the_limit(length: int, sqlstate: str) -> None:
    data = bytearray(b"Q" + struct.pack("!i", length))
    with pytest.raises(p.ProtocolError) as info:
        p.split_messages(data, 1024)
    assert info.value.sqlstate == sqlstate


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    with pytest.raises(p.ProtocolError, match="max_message_size"):
        p.split_messages(bytearray(b"B" + struct.pack("!i", 10_000_000)), 1 << 20)


def test_startup_roundtrip_and_special_requests() -> None:
    raw = bytearray(p.build_startup({"user": "u", "database": "d", "application_name": "x"}))
    body, used = p.read_startup(raw) or (b"", 0)
    assert used == len(raw)
    st = p.parse_startup(body)
    assert st.code == p.PROTOCOL_V3
    assert st.params == {"user": "u", "database": "d", "application_name": "x"}
    assert p.parse_startup(struct.pack("!i", p.SSL_REQUEST)).code == p.SSL_REQUEST
    cancel = p.build_cancel(7, 99)
    assert p.parse_startup(cancel[4:]).cancel == (7, 99)


@pytest.mark.parametrize(
    "body",
    [
        struct.pack("!i", 0x00020000),  # protocol 2
        struct.pack("!i", p.PROTOCOL_V3) + b"user\0",  # not terminated
        struct.pack("!i", p.PROTOCOL_V3) + b"user\0u\0x\0\0",  # odd number of strings
        struct.pack("!ii", p.CANCEL_REQUEST, 1),  # short cancel
    ],
)
def test_malformed_startup_packets_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_startup(body)


def test_startup_length_limit() -> None:
    with pytest.raises(p.ProtocolError):
        p.read_startup(bytearray(struct.pack("!i", p.MAX_STARTUP_SIZE + 1)))


def test_parse_message_roundtrip() -> None:
    raw = p.build_parse(b"s1", b"select $1, $2", (23, 25))
    msgs, _ = p.split_messages(bytearray(raw), 1024)
    assert p.parse_parse(msgs[0][1]) == p.Parse(b"s1", b"select $1, $2", (23, 25))


@pytest.mark.parametrize(
    "body", [b"s1", b"s1\0select\0", b"s1\0select\0\0\x01", b"s\0q\0\xff\xff", b"s\0q\0\0\0x"]
)
def test_malformed_parse_bodies(body: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_parse(body)


def test_bind_split_keeps_parameters_untouched() -> None:
    rest = b"\0\0\0\x01\0\0\0\x02hi\0\0"
    portal, name, at = p.split_bind(b"por\0stmt\0" + rest)
    assert (portal, name) == (b"por", b"stmt")
    rebuilt = p.build_bind(portal, b"poolguard_9", (b"por\0stmt\0" + rest)[at:])
    assert rebuilt == p.frame(b"B", b"por\0poolguard_9\0" + rest)
    with pytest.raises(p.ProtocolError):
        p.split_bind(b"no terminator")


def test_describe_close_targets() -> None:
    assert p.parse_target(b"Sname\0") == (b"S", b"name")
    assert p.parse_target(b"P\0") == (b"P", b"")
    for bad in (b"", b"X\0", b"Sname", b"Sa\0b\0"):
        with pytest.raises(p.ProtocolError):
            p.parse_target(bad)


def test_error_response_fields() -> None:
    msg = p.error_response("26000", 'prepared statement "x" does not exist')
    assert msg[:1] == b"E"
    fields = p.parse_error_fields(msg[5:])
    assert fields["C"] == "26000"
    assert fields["S"] == "ERROR"
    assert fields["M"] == 'prepared statement "x" does not exist'


# --- statement bookkeeping ---------------------------------------------------------------


def test_registry_shares_one_name_per_query_and_types() -> None:
    reg = Registry()
    a = reg.get((b"select $1", (23,)))
    assert reg.get((b"select $1", (23,))) is a
    b = reg.get((b"select $1", (25,)))
    assert b.name != a.name
    assert reg.get((b"select $1 ", (23,))).name not in (a.name, b.name)


def test_registry_forgets_statements_nobody_holds() -> None:
    reg = Registry()
    name = reg.get((b"select 1", ())).name
    gc.collect()
    assert len(reg) == 0
    assert reg.get((b"select 1", ())).name != name  # names are never reused


def test_registry_retire_gives_a_fresh_name() -> None:
    reg = Registry()
    old = reg.get((b"select * from t", ()))
    reg.retire(old)
    new = reg.get((b"select * from t", ()))
    assert new is not old and new.name != old.name


def test_backend_lru_evicts_least_recently_used() -> None:
    reg = Registry()
    s = [reg.get((f"select {i}".encode(), ())) for i in range(4)]
    lru = BackendStatements(3)
    assert lru.add(s[0]) == [] and lru.add(s[1]) == [] and lru.add(s[2]) == []
    assert lru.touch(s[0])  # s[1] is now the oldest
    assert lru.add(s[3]) == [s[1]]
    assert s[1] not in lru and s[0] in lru and len(lru) == 3
    assert not lru.touch(s[1])
    lru.discard(s[0])
    assert s[0] not in lru
    lru.clear()
    assert len(lru) == 0
    with pytest.raises(ValueError, match="capacity"):
        BackendStatements(0)


def test_backend_lru_does_not_confuse_a_retired_statement_with_its_successor() -> None:
    reg = Registry()
    old = reg.get((b"select 1", ()))
    lru = BackendStatements(5)
    lru.add(old)
    reg.retire(old)
    assert reg.get((b"select 1", ())) not in lru


@pytest.mark.parametrize(
    ("sql", "target"),
    [
        (b"DEALLOCATE s1", b"s1"),
        (b"  deallocate prepare S1 ;", b"s1"),
        (b'DEALLOCATE "_pg3_0"', b"_pg3_0"),
        (b'DEALLOCATE "a""b"', b'a"b'),
        (b"/* c */ DEALLOCATE x -- bye", b"x"),
        (b"DEALLOCATE ALL", None),
        (b"DEALLOCATE s1; SELECT 1", None),
        (b"SELECT 'DEALLOCATE s1'", None),
    ],
)
def test_deallocate_target(sql: bytes, target: bytes | None) -> None:
    assert deallocate_target(sql) == target


def test_drops_all_and_may_drop() -> None:
    assert drops_all(b"DEALLOCATE ALL") and drops_all(b"discard all;")
    assert drops_all(b"deallocate prepare all")
    assert not drops_all(b"DISCARD PLANS") and not drops_all(b"select 1; discard all")
    assert may_drop_statements(b"select 1; DISCARD ALL")
    assert not may_drop_statements(b"select * from t where x = $1")


# --- SCRAM -------------------------------------------------------------------------------


def test_scram_client_and_server_agree() -> None:
    verifier = _auth.ScramVerifier.from_password("s3cret", iterations=64)
    server = _auth.ScramServer(verifier)
    client = _auth.ScramClient("s3cret")
    server_first = server.first(client.first())
    server_final = server.final(client.final(server_first))
    client.verify(server_final)


def test_scram_rejects_a_wrong_password_without_echoing_it() -> None:
    server = _auth.ScramServer(_auth.ScramVerifier.from_password("right", iterations=64))
    client = _auth.ScramClient("wrong-password")
    server_first = server.first(client.first())
    with pytest.raises(_auth.AuthError) as info:
        server.final(client.final(server_first))
    assert "wrong-password" not in str(info.value) and "right" not in str(info.value)
    assert "wrong-password" not in repr(client)


@pytest.mark.parametrize(
    "first", [b"p=tls-server-end-point,,n=,r=abc", b"n,a=admin,n=,r=x", b"n,,n="]
)
def test_scram_server_refuses_unsupported_first_messages(first: bytes) -> None:
    server = _auth.ScramServer(_auth.ScramVerifier.from_password("pw", iterations=64))
    with pytest.raises(_auth.AuthError):
        server.first(first)


def test_scram_server_refuses_a_tampered_nonce() -> None:
    server = _auth.ScramServer(_auth.ScramVerifier.from_password("pw", iterations=64))
    client = _auth.ScramClient("pw")
    server_first = server.first(client.first())
    final = client.final(server_first).replace(b"r=", b"r=x", 1)
    with pytest.raises(_auth.AuthError, match="nonce"):
        server.final(final)


def test_md5_password_matches_postgres_format() -> None:
    # pg_authid stores "md5" + md5(password + user); for postgres/postgres that is the widely
    # published md53175bce1d3201d16594cebf9d7eb3f9d. The wire answer salts that hex digest.
    import hashlib

    salt = b"\x01\x02\x03\x04"
    expected = b"md5" + hashlib.md5(b"3175bce1d3201d16594cebf9d7eb3f9d" + salt).hexdigest().encode()
    assert _auth.md5_password("postgres", "postgres", salt) == expected
