"""Find out, by probing, whether a pooler sits between a client and PostgreSQL, and which mode.

Used by ``poolguard doctor`` and by the pools (a rewriter must not sit behind a transaction
pooler).

How the pooler probe works (no admin console, no SHOW pool_mode), with two client
connections A and B:

1. BackendKeyData: libpq's backend pid is what the first hop announced; a pooler announces its
   own, so it differs from ``pg_backend_pid()``: something in between, not yet which mode.
   ``inet_server_port()`` differing from the port dialled is noted too, but a plain port
   forward does that as well.
2. Multiplexing: A prepares a uniquely named statement (protocol level) returning
   ``pg_backend_pid()`` and runs it; B opens a transaction and reads its server pid; A runs its
   statement again while B's transaction is open. Directly or through a session pooler, two open
   client connections never share a server process and A never changes server. A transaction
   pooler shows at least one of: B on the server A just released, A on a new server, A's
   statement "does not exist" there (SQLSTATE 26000: the prepared-statement trap itself), or A
   waiting for B's transaction to end. Up to three rounds, because a pooler may pick servers
   round-robin.
3. A statement-mode pooler refuses B's transaction block.

The probe leaves at most one statement named ``poolguard_doctor_<random>`` prepared on a
pooler's server connection (its DEALLOCATE may land on another one); nothing else.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg.pq import DiagnosticField, ExecStatus

__all__ = ["APPLICATION_NAME", "PoolerProbe", "probe_first_hop", "probe_pooler"]

#: The probe's (and the doctor's) sessions show under this name in pg_stat_activity.
APPLICATION_NAME: Final = "poolguard doctor"
_INVALID_STATEMENT_NAME: Final = "26000"  # prepared statement "..." does not exist
_PROBE_ROUNDS: Final = 3
# How long A may wait for a server while B holds a transaction before that wait itself counts
# as evidence of a pooler with a single free server.
_PROBE_WAIT: Final = 2.0


@dataclass
class PoolerProbe:
    """What the probe found out about the path to the server."""

    #: "direct", "session" (a pooler or proxy keeping one server per client), "transaction",
    #: "statement", or "unknown".
    mode: str = "unknown"
    #: Anything between the client and PostgreSQL at all?
    proxied: bool = False
    #: Do protocol-level prepared statements survive between transactions: "safe", "unsafe",
    #: or "unknown" (a transaction pooler whose server switch the probe did not catch).
    prepared_statements: str = "unknown"
    evidence: list[str] = field(default_factory=list)


class _ProbeClient:
    """Client A: runs its own uniquely named prepared statement through libpq directly."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.name = f"poolguard_doctor_{secrets.token_hex(4)}".encode()

    def prepare(self) -> None:
        res = self.conn.pgconn.prepare(self.name, b"SELECT pg_catalog.pg_backend_pid()")
        if res.status != ExecStatus.COMMAND_OK:
            raise psycopg.OperationalError(_result_error(res))

    def server_pid(self) -> tuple[int | None, str | None]:
        """(pid, None), or (None, sqlstate) when the server refused the statement."""
        res = self.conn.pgconn.exec_prepared(self.name, None)
        if res.status != ExecStatus.TUPLES_OK:
            return None, _sqlstate(res)
        value = res.get_value(0, 0)
        return (int(value) if value is not None else None), None

    def deallocate(self) -> None:
        self.conn.pgconn.exec_(b"DEALLOCATE " + self.name)  # best effort; result ignored


def _sqlstate(res: Any) -> str:
    code = res.error_field(DiagnosticField.SQLSTATE)
    return code.decode() if code else "?????"


def _result_error(res: Any) -> str:
    message = res.error_message
    return message.decode("utf-8", "replace").strip() if message else "unknown error"


def probe_pooler(conninfo: str, *, rounds: int = _PROBE_ROUNDS) -> PoolerProbe:
    """Find out, by probing, whether a (transaction-mode) pooler sits in front of the server."""
    probe = PoolerProbe()
    kwargs: dict[str, Any] = {"application_name": APPLICATION_NAME, "prepare_threshold": None}
    with psycopg.connect(conninfo, autocommit=True, **kwargs) as conn_a:
        probe_first_hop(conn_a, probe)
        a = _ProbeClient(conn_a)
        a.prepare()
        with psycopg.connect(conninfo, autocommit=False, **kwargs) as conn_b:
            for _ in range(rounds):
                if _probe_round(a, conn_b, probe):
                    break
        a.deallocate()
    if probe.mode == "unknown":
        probe.mode = "session" if probe.proxied else "direct"
    if probe.mode in ("direct", "session"):
        probe.prepared_statements = "safe"
    return probe


def probe_first_hop(conn: psycopg.Connection[Any], probe: PoolerProbe) -> None:
    """Step 1 on an open connection: does something other than PostgreSQL answer it?"""
    row = conn.execute(
        "SELECT pg_catalog.pg_backend_pid(), pg_catalog.inet_server_port()", prepare=False
    ).fetchone()
    assert row is not None
    server_pid, server_port = row
    announced = conn.info.backend_pid
    if announced != server_pid:
        probe.proxied = True
        probe.evidence.append(
            f"the connection announced backend pid {announced} but the server process is "
            f"{server_pid}: a pooler or proxy answers the connection"
        )
    dialled = conn.info.port
    if server_port is not None and dialled and int(server_port) != int(dialled):
        # Evidence only: a port forward (containers, SSH tunnels) does this too, and it
        # changes nothing about what the connection can keep.
        probe.evidence.append(
            f"dialled port {dialled} but the server listens on {server_port}: something "
            "forwards the connection"
        )


def _probe_round(a: _ProbeClient, conn_b: psycopg.Connection[Any], probe: PoolerProbe) -> bool:
    """One A / B / A round; True once the mode is known."""
    pid_a, state = a.server_pid()
    if state is not None:
        return _unsafe_prepared(probe, "between its PREPARE and the first EXECUTE")
    try:
        row = conn_b.execute("SELECT pg_catalog.pg_backend_pid()", prepare=False).fetchone()
    except psycopg.Error as exc:
        # PgBouncer answers 08P01 "transaction blocks not allowed in statement pooling mode"
        # and closes the client connection.
        if not conn_b.closed:
            conn_b.rollback()
        if "statement pooling" in str(exc):
            probe.mode, probe.proxied = "statement", True
            probe.prepared_statements = "unsafe"
            probe.evidence.append("a transaction block was refused: statement pooling")
            return True
        raise
    pid_b = row[0] if row else None
    if pid_b == pid_a:
        _multiplexed(probe, f"two client connections were served by server process {pid_a}")

    # While B holds its transaction, A needs a server of its own. A pooler with one server
    # makes A wait; release B after a short while so A can finish either way.
    result: list[tuple[int | None, str | None]] = []
    worker = threading.Thread(target=lambda: result.append(a.server_pid()), daemon=True)
    worker.start()
    worker.join(_PROBE_WAIT)
    waited = worker.is_alive()
    conn_b.rollback()
    worker.join()
    pid_a2, state = result[0]
    if waited:
        # One server for everyone: A's statement ran where it was prepared, so another round
        # can tell nothing more about prepared statements and would only wait again.
        _multiplexed(probe, "a client waited for another client's transaction to end")
        return True
    if state == _INVALID_STATEMENT_NAME:
        return _unsafe_prepared(probe, "on the next transaction")
    if pid_a2 is not None and pid_a2 != pid_a:
        _multiplexed(probe, f"one client moved from server process {pid_a} to {pid_a2}")
        probe.prepared_statements = "safe"
        probe.evidence.append(
            "its prepared statement still worked on the new server process: the pooler "
            "tracks prepared statements (PgBouncer 1.21+ max_prepared_statements or similar)"
        )
    return probe.mode == "transaction" and probe.prepared_statements != "unknown"


def _multiplexed(probe: PoolerProbe, why: str) -> None:
    probe.mode, probe.proxied = "transaction", True
    if why not in probe.evidence:
        probe.evidence.append(why)


def _unsafe_prepared(probe: PoolerProbe, when: str) -> bool:
    _multiplexed(probe, f"a prepared statement vanished {when} (SQLSTATE 26000)")
    probe.prepared_statements = "unsafe"
    return True
