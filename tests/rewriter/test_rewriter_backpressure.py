"""A client that keeps sending while it cannot be served is read no further than a bound, and
loses nothing: while it waits for a server connection, and while its login is still being
admitted (the upstream check of a new database)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import psycopg
from frozen import frozen
from psycopg.conninfo import make_conninfo
from rawpg import RawClient, query

from poolguard import rewriter
from poolguard.testing import PostgresServer

# A client's send buffer plus the proxy's unread receive buffer is a few hundred kB at first;
# a proxy that kept reading would take all of TOTAL.
TOTAL = 48 << 20
BOUND = 12 << 20
_PAYLOAD = 1 << 20


def _message(i: int) -> bytes:
    """A ~1 MB simple Query whose answer identifies it."""
    return query(b"SELECT %d, length('%s')" % (i, b"x" * _PAYLOAD))


def _send_until_blocked(sock: socket.socket, seconds: float) -> tuple[int, bytes, int]:
    """Send 1 MB queries without blocking for ``seconds`` (or until TOTAL is sent); returns
    how many bytes went out, what is left of the message cut short, and how many messages
    were started."""
    sock.setblocking(False)
    sent, i, rest = 0, 0, b""
    deadline = time.monotonic() + seconds
    try:
        while sent < TOTAL and time.monotonic() < deadline:
            if not rest:
                rest = _message(i)
                i += 1
            try:
                n = sock.send(rest)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            sent += n
            rest = rest[n:]
    finally:
        sock.setblocking(True)
    return sent, rest, i


def _answers(client: RawClient, count: int) -> list[tuple[str, str]]:
    rows = []
    for _ in range(count):
        for kind, body in client.until_ready():
            if kind == b"D":
                fields = body[2:]
                first_len = int.from_bytes(fields[:4], "big")
                first = fields[4 : 4 + first_len].decode()
                second = fields[8 + first_len :].decode()
                rows.append((first, second))
            assert kind != b"E", body
    return rows


def _expected(count: int) -> list[tuple[str, str]]:
    return [(str(i), str(_PAYLOAD)) for i in range(count)]


def test_client_waiting_for_a_server_connection_is_not_read_without_bound(
    make_rewriter: Callable[..., rewriter.RewriterHandle],
) -> None:
    proxy = make_rewriter(pool_size=1)

    with psycopg.connect(proxy.dsn) as holder, RawClient(proxy.dsn) as client:
        holder.execute("SELECT 1")  # in a transaction: the only server connection stays taken
        sent, rest, count = _send_until_blocked(client.sock, 3.0)
        assert 0 < sent < BOUND, f"the proxy read {sent} bytes from a client it could not serve"
        holder.commit()
        client.sock.sendall(rest)  # finish the message cut short; the proxy reads again
        assert _answers(client, count) == _expected(count)


def test_client_sending_while_its_login_is_admitted_is_not_read_without_bound(
    make_rewriter: Callable[..., rewriter.RewriterHandle],
    postgres_factory: Callable[..., PostgresServer],
) -> None:
    server = postgres_factory()
    server.create_database("other")
    proxy = make_rewriter(server.dsn)
    # The proxy's upstream login for the new database hangs, and the client stays in admission.
    with frozen(server):
        client = RawClient(make_conninfo(proxy.dsn, dbname="other"), login=False)
        sent, rest, count = _send_until_blocked(client.sock, 3.0)
    with client:
        assert 0 < sent < BOUND, f"the proxy read {sent} bytes from a client not yet admitted"
        client.sock.sendall(rest)
        kinds = [kind for kind, _ in client.until_ready()]
        assert kinds[0] == b"R" and kinds[-1] == b"Z"  # AuthenticationOk ... ReadyForQuery
        assert _answers(client, count) == _expected(count)
