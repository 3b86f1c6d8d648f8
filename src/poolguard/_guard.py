"""The session-state guard's policy: warn about, or refuse, SQL that leaves state on a
transaction-pooled connection (:mod:`._sqlstate_rules` decides which SQL does)."""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Final

import psycopg

from ._errors import PoolGuardWarning
from ._findings import Finding
from ._ledger import caller_site, format_site
from ._settings import GuardAction
from ._sqlstate_rules import CACHE_SIZE, analyze, server_cursor_finding

__all__ = ["SessionStateError", "SessionStateGuard", "SessionStateWarning"]

logger = logging.getLogger("poolguard.guard")


class SessionStateWarning(PoolGuardWarning):
    """SQL sent through a transaction-mode pool leaves state on the server connection."""

    # Python hides ResourceWarning (PoolGuardWarning's base) by default; the WARNING on the
    # poolguard.guard logger is what a developer sees without -W flags.


class SessionStateError(psycopg.ProgrammingError):
    """SQL refused by the session-state guard (action="raise"); the message says what to use."""


SessionStateWarning.__module__ = "poolguard"
SessionStateError.__module__ = "poolguard"


class SessionStateGuard:
    """Warn about, or refuse, SQL that leaves state on a transaction-pooled connection.

    ``action="warn"`` emits a :class:`SessionStateWarning` (pointing at the application's
    line, past poolguard's and psycopg's frames) and a WARNING on the ``poolguard.guard``
    logger, once per distinct statement; ``"raise"`` raises :class:`SessionStateError` before
    the statement runs; ``"off"`` does nothing.
    """

    __slots__ = ("_lock", "_warned", "action")

    # Bound on the remembered warned statements, for the same reason as CACHE_SIZE.
    _MAX_WARNED: Final = CACHE_SIZE

    def __init__(self, action: GuardAction = "warn") -> None:
        if action not in ("warn", "raise", "off"):
            raise ValueError(f"guard action must be 'warn', 'raise' or 'off', got {action!r}")
        self.action: GuardAction = action
        self._warned: set[tuple[str | bytes, bool]] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SessionStateGuard(action={self.action!r})"

    def check(self, sql: str | bytes, *, in_transaction: bool) -> tuple[Finding, ...]:
        """Check `sql` before it runs; return what was reported (empty when it is safe).

        `in_transaction`: whether the statement will run inside a transaction block (psycopg:
        not autocommit, or a transaction already open).
        """
        if self.action == "off":
            return ()
        analysis = analyze(sql)
        findings = analysis[0] if in_transaction else analysis[1]
        if findings:
            self._report(sql, in_transaction, findings)
        return findings

    def observe(self, sql: object, *, in_transaction: bool) -> bool:
        """The pool's execute hook: :meth:`check` `sql`, then return whether it leaves session
        state behind, so the pool resets the connection when it comes back.

        Only str and bytes are examined (psycopg's sql.Composed must be rendered with
        ``as_string(conn)`` by the caller first); anything else returns False.
        """
        if type(sql) is not str and type(sql) is not bytes:
            return False
        analysis = analyze(sql)
        if self.action != "off":
            findings = analysis[0] if in_transaction else analysis[1]
            if findings:
                self._report(sql, in_transaction, findings)
        return analysis[3]

    def check_server_cursor(
        self, name: str, *, in_transaction: bool, withhold: bool
    ) -> Finding | None:
        """Check the declaration of a named cursor; see :func:`server_cursor_finding`."""
        if self.action == "off":
            return None
        found = server_cursor_finding(name, in_transaction=in_transaction, withhold=withhold)
        if found:
            self._report(f"\0cursor {name}", in_transaction, (found,))
        return found

    def _report(
        self, key: str | bytes, in_transaction: bool, findings: tuple[Finding, ...]
    ) -> None:
        if self.action == "raise":
            raise SessionStateError("; ".join(f.message() for f in findings))
        seen = (key, in_transaction)
        # Unlocked fast path for a statement already reported; the lock below only keeps
        # two threads from both warning about a new one.
        if seen in self._warned:
            return
        with self._lock:
            if seen in self._warned:
                return
            if len(self._warned) >= self._MAX_WARNED:
                self._warned.clear()
            self._warned.add(seen)
        message = "; ".join(f.message() for f in findings)
        code, line = caller_site(1)
        logger.warning("%s (at %s)", message, format_site(code, line))
        # The call depth between the application and here varies (cursor.execute,
        # connection.execute, an ORM), so the warning names the first non-library frame.
        filename = code.co_filename if code else "<unknown>"
        warnings.warn_explicit(message, SessionStateWarning, filename, line)
