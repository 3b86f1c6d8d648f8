"""Per-client session settings: which a client asked for at startup, and the SET that gives a
shared server connection the client's values before it runs the client's requests."""

from __future__ import annotations

import logging

from . import _protocol as p
from ._pool import Backend
from ._replies import SYNC_ENDS, Exchange, Pending

logger = logging.getLogger("poolguard.rewriter")

_RESERVED_STARTUP = {"user", "database", "replication", "options"}
# Settings the server reports with ParameterStatus that a client may change: each client's
# values are re-applied with SET whenever it gets a backend whose values differ.
TRACKED = {
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "search_path",
    "default_transaction_read_only",
}


def startup_settings(params: dict[str, str], server_params: dict[str, str]) -> dict[str, str]:
    """The settings a client wants on every backend: the server's tracked defaults overlaid
    with the client's startup parameters (names spelled as the server spells them).

    Raises ``p.Refused`` for parameters the proxy cannot honour, ``p.ProtocolError`` for
    malformed ones.
    """
    canonical = {k.lower(): k for k in (*TRACKED, *server_params)}
    wanted = {k: v for k, v in server_params.items() if k in TRACKED}
    for name, value in params.items():
        name = canonical.get(name.lower(), name)
        if name in _RESERVED_STARTUP:
            if name == "options" and value.strip():
                raise p.Refused(
                    "0A000",
                    "startup parameter 'options' is not supported by the proxy: "
                    "pass settings as separate startup parameters or use SET",
                )
            continue
        if not name.replace("_", "").replace(".", "").isalnum():
            raise p.ProtocolError(f"invalid startup parameter name {name!r}")
        if name == "client_encoding" and value.lower().replace("-", "") in ("utf8", "unicode"):
            value = "UTF8"  # what the server would report back
        wanted[name] = value
    return wanted


def set_message(name: str, value: str) -> bytes:
    """A simple Query giving the session ``name`` = ``value`` exactly as a startup packet
    would: set_config() takes the raw string, so a list (``search_path=s,public``) stays a
    list, where ``SET name TO 'a,b'`` would make it one quoted name."""
    sql = f"SELECT pg_catalog.set_config({_literal(name)}, {_literal(value)}, false)"
    return p.frame(p.QUERY, sql.encode() + b"\0")


def reset_message(name: str) -> bytes:
    """A simple Query putting ``name`` (checked at startup: letters, digits, _ and .) back to
    the server's default."""
    return p.frame(p.QUERY, f"RESET {name}".encode() + b"\0")


def _literal(value: str) -> str:
    # An E'' literal reads backslashes as escapes whatever standard_conforming_strings is
    # (another client may have turned it off on this connection), so both are escaped.
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def apply_settings(
    backend: Backend, wanted: dict[str, str], server_params: dict[str, str], ex: Exchange
) -> None:
    """Give ``backend`` the client's ``wanted`` settings: one hidden query for each that
    differs, and a RESET for each another client had set that this one did not ask for.

    A setting the server refuses is dropped from ``wanted`` with a warning (PostgreSQL would
    have refused it at login), so it is not retried on every backend.
    """
    extra = backend.extra
    # The usual case, checked in C: nothing to do.
    if wanted.items() <= backend.params.items() and (not extra or extra <= wanted.keys()):
        return
    _apply(backend, wanted, server_params, ex)


def _apply(
    backend: Backend, wanted: dict[str, str], server_params: dict[str, str], ex: Exchange
) -> None:
    # Apart from the check above, which the compiled build makes a C function: one cannot hold
    # the closures below.
    extra = backend.extra
    backend.unnamed = None  # a simple Query drops the unnamed statement
    for name in [n for n in extra if n not in wanted]:
        extra.discard(name)
        backend.params.pop(name, None)
        ex.to_server(reset_message(name), Pending(SYNC_ENDS, extended=False, hidden=True))
    for name, value in wanted.items():
        if backend.params.get(name) == value:
            continue
        backend.params[name] = value
        if name not in server_params:
            extra.add(name)

        def failed(name: str = name, value: str = value) -> None:
            logger.warning("could not apply client setting %s=%r on the server", name, value)
            backend.params.pop(name, None)
            backend.extra.discard(name)
            if wanted.get(name) == value:
                del wanted[name]

        ex.to_server(
            set_message(name, value), Pending(SYNC_ENDS, extended=False, hidden=True, undo=failed)
        )
