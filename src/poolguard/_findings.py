"""What the session-state guard reports: one :class:`Finding` per statement that leaves, or
depends on, state on the server connection, with the sentence shown to the developer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["Finding", "FindingKind"]

FindingKind = Literal[
    "set",
    "reset",
    "set_session_characteristics",
    "set_config",
    "listen",
    "unlisten",
    "advisory_lock",
    "advisory_unlock",
    "temp_object",
    "prepare",
    "execute",
    "deallocate",
    "with_hold_cursor",
    "server_cursor",
    "outside_transaction",
]

#: Distinct SQL texts remembered by :func:`classify`. Applications issue a bounded set of
#: statement shapes; a few thousand covers them while capping memory when an application

_DIRECT = "the direct connection (poolguard's direct_dsn setting / DIRECT_URL)"

_ALTERNATIVES: Final[dict[str, str]] = {
    "set": (
        "use SET LOCAL inside a transaction, ALTER ROLE/DATABASE ... SET for a permanent "
        f"default, or {_DIRECT}"
    ),
    "reset": f"use SET LOCAL name TO DEFAULT inside a transaction, or {_DIRECT}",
    "set_session_characteristics": (
        "start each transaction with BEGIN ISOLATION LEVEL ... (psycopg: "
        "conn.isolation_level / conn.read_only), or SET TRANSACTION inside it"
    ),
    "set_config": "use set_config(name, value, true) inside a transaction",
    "listen": f"run LISTEN on {_DIRECT}; NOTIFY itself is safe through the pooler",
    "unlisten": f"run LISTEN/UNLISTEN on {_DIRECT}",
    "advisory_lock": (
        "use pg_advisory_xact_lock / pg_try_advisory_xact_lock inside a transaction "
        f"(released at COMMIT), or {_DIRECT}"
    ),
    "advisory_unlock": (
        "use pg_advisory_xact_lock, which needs no unlock; a session lock may sit on another "
        "server connection than the one running this unlock"
    ),
    "temp_object": (
        "use CREATE TEMP TABLE ... ON COMMIT DROP inside a transaction (temp views and "
        f"sequences: a CTE or a regular object), or {_DIRECT}"
    ),
    "prepare": (
        "let the driver send parameters without naming statements (poolguard's transaction "
        f"mode sets prepare_threshold=None), or {_DIRECT}"
    ),
    "execute": f"prepared statements live on one server connection; use {_DIRECT}",
    "deallocate": f"prepared statements live on one server connection; use {_DIRECT}",
    "with_hold_cursor": (
        "fetch the rows inside the transaction (a cursor WITHOUT HOLD, or keyset "
        f"pagination), or {_DIRECT}"
    ),
    "server_cursor": (
        "open the named cursor inside a transaction (with conn.transaction(): ...), use a "
        f"client-side cursor, or {_DIRECT}; Django: DISABLE_SERVER_SIDE_CURSORS = True"
    ),
    "outside_transaction": (
        "run it inside a transaction together with the statements that rely on it "
        "(with conn.transaction(): ...)"
    ),
}

_DESCRIPTIONS: Final[dict[str, str]] = {
    "set": "SET changes a session setting",
    "reset": "RESET changes a session setting",
    "set_session_characteristics": "SET SESSION CHARACTERISTICS changes session defaults",
    "set_config": "set_config(..., false) changes a session setting",
    "listen": "LISTEN subscribes the server connection, not the client",
    "unlisten": "UNLISTEN acts on whichever server connection runs it",
    "advisory_lock": "a session-level advisory lock outlives the transaction",
    "advisory_unlock": "a session-level advisory unlock",
    "temp_object": "a temporary object lives until the server connection closes",
    "prepare": "SQL PREPARE names a statement on one server connection",
    "execute": "SQL EXECUTE needs a statement prepared on the same server connection",
    "deallocate": "SQL DEALLOCATE acts on whichever server connection runs it",
    "with_hold_cursor": "a WITH HOLD cursor outlives the transaction",
    "server_cursor": "a server-side cursor outside a transaction outlives it",
    "outside_transaction": "a transaction-scoped statement outside a transaction has no effect",
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One statement that depends on, or leaves, server-connection state."""

    kind: FindingKind
    #: Position of the statement in a multi-statement string, from 0.
    index: int
    #: The statement, whitespace collapsed, string literals masked, truncated: safe to log.
    statement: str
    #: What the statement targets when known: setting name, function, channel, cursor name.
    target: str | None
    #: Does a connection that ran this carry state back into a pool (so reset it on return)?
    leaves_session_state: bool
    #: Does it misbehave behind a transaction pooler? False for settings PgBouncer re-applies.
    breaks_transaction_pooling: bool = True
    #: Reported only when the statement runs outside a transaction block.
    outside_transaction_only: bool = False

    @property
    def alternative(self) -> str:
        """The safe way to get the same effect, for the message shown to the developer."""
        return _ALTERNATIVES[self.kind]

    def message(self) -> str:
        """One sentence for a warning or exception: what, which statement, what to use."""
        target = f" ({self.target})" if self.target else ""
        if self.outside_transaction_only:
            consequence = "runs outside a transaction block, so its effect ends with it"
        else:
            consequence = "silently misbehaves behind a transaction-mode pooler"
        return (
            f"{_DESCRIPTIONS[self.kind]}{target}: statement {self.index + 1} "
            f"`{self.statement}` {consequence}; {self.alternative}"
        )
