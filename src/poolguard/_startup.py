"""The ``options`` startup parameter: idle_in_transaction_session_timeout set per connection.

The server ends a session left idle inside a transaction for that long, whatever the client
does; docs/leaks.md explains when a pooler refuses the parameter and what to do then.
"""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from ._settings import Settings


def startup_options(settings: Settings) -> dict[str, str]:
    """The ``options`` startup parameter carrying idle_in_transaction_session_timeout."""
    seconds = settings.idle_in_transaction_session_timeout
    # The embedded rewriter pools server connections itself and refuses ``options`` (a
    # setting in it would follow one client onto shared connections): docs/leaks.md.
    if not seconds or settings.rewriter:
        return {}
    base = conninfo_to_dict(settings.conninfo).get("options") or ""
    option = f"-c idle_in_transaction_session_timeout={max(1, round(seconds * 1000))}"
    return {"options": f"{base} {option}".strip()}


def options_rejected(exc: Exception) -> bool:
    """Whether a pooler refused the ``options`` startup parameter (PgBouncer before 1.20)."""
    return "unsupported startup parameter" in str(exc) and "options" in str(exc)
