"""The server's idle-in-transaction timeout, explained in the error the application sees.

PostgreSQL ends a session whose transaction sat idle past idle_in_transaction_session_timeout
and says only "terminating connection due to idle-in-transaction timeout".  poolguard sets that
timeout on its connections (the ``idle_in_transaction_session_timeout`` setting), so the error
names the value poolguard applied and the setting that changes it.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from django.db.utils import DatabaseErrorWrapper  # type: ignore[import-untyped]

_APPLIED = re.compile(r"idle_in_transaction_session_timeout=(\d+)")


class ErrorWrapper(DatabaseErrorWrapper):  # type: ignore[misc]
    """Django's psycopg-to-Django error translation, plus the explanation above."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if isinstance(exc_value, psycopg.errors.IdleInTransactionSessionTimeout):
            explain_idle_timeout(exc_value, self.wrapper)
        super().__exit__(exc_type, exc_value, traceback)


def explain_idle_timeout(exc: psycopg.Error, wrapper: Any) -> None:
    """Add to ``exc``'s message (Django copies it into its own error) who set the timeout."""
    conn = wrapper.connection
    try:
        options = conn.info.get_parameters().get("options", "") if conn is not None else ""
    except psycopg.Error:
        options = ""
    applied = _APPLIED.search(options)
    setting = (
        f"DATABASES[{wrapper.alias!r}]['OPTIONS']['poolguard']"
        "['idle_in_transaction_session_timeout']"
    )
    if applied:
        seconds = int(applied.group(1)) / 1000
        note = (
            f"poolguard set idle_in_transaction_session_timeout={seconds:g} s on this connection "
            f"and the transaction sat idle longer than that; raise it, or set it to 0 to keep "
            f"the server's own value, with {setting} (management commands and test runs never "
            "set it: docs/django.md)"
        )
    else:
        note = (
            "poolguard did not set idle_in_transaction_session_timeout on this connection: the "
            "server's, the database's or the role's own value ended the session"
        )
    first = str(exc.args[0]) if exc.args else str(exc)
    exc.args = (f"{first} ({note})", *exc.args[1:])
