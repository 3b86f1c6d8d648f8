"""Cleanup after a client left: bring its backend back to idle with no transaction open."""

from __future__ import annotations

from . import _protocol as p
from ._replies import SYNC_ENDS, Exchange, Pending

_ROLLBACK = p.frame(p.QUERY, b"ROLLBACK\0")
_UNLISTEN = p.frame(p.QUERY, b"UNLISTEN *\0")


def queue_rollback(ex: Exchange, *, unlisten: bool, sql_prepared: set[bytes]) -> None:
    """Queue what ends whatever the gone client left in flight: replies still due are
    swallowed, a running COPY is failed, then a Sync and a ROLLBACK (all hidden); and the
    session state that pinned the client (LISTEN, SQL PREPARE) is dropped."""
    ex.client_out.clear()
    q = ex.pending
    if q and q[0].copying:
        ex.to_server(p.frame(p.COPY_FAIL, b"client disconnected\0"))
        ex.copy_ended()
    ex.skipping = False
    # Extended-protocol messages the client sent without their Sync run in an implicit
    # transaction that a Sync would commit; PostgreSQL aborts it when the client vanishes. A
    # statement that fails first (skipped if the server is already skipping) does the same.
    ex.probe(None, None)
    ex.to_server(p.SYNC_MSG, Pending(SYNC_ENDS, extended=False, hidden=True, sync=True))
    ex.to_server(_ROLLBACK, Pending(SYNC_ENDS, extended=False, hidden=True))
    if unlisten:
        ex.to_server(_UNLISTEN, Pending(SYNC_ENDS, extended=False, hidden=True))
    for name in sorted(sql_prepared):
        sql = b'DEALLOCATE "' + name.replace(b'"', b'""') + b'"\0'
        ex.to_server(p.frame(p.QUERY, sql), Pending(SYNC_ENDS, extended=False, hidden=True))
