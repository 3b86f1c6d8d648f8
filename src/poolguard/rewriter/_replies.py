"""The reply queue: what the server (or the proxy itself) still owes the client, in order.

Every request forwarded to (or answered for) the server gets a ``Pending`` record in a FIFO,
in the order the client sent it. Server replies are matched against the head of that FIFO,
which is how a session knows which replies to hide (a lazy Parse it added), which to
synthesize (ParseComplete for a statement the backend already has) and when the backend can go
back to the pool: at ReadyForQuery 'I' with nothing outstanding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from . import _protocol as p
from ._statements import Statement

SYNC_ENDS = b"Z"  # ReadyForQuery completes a Sync, a simple Query or a FunctionCall
# A Bind to this name always fails with 26000; it is how the proxy gets the server to raise an
# error at the right point of a pipeline with PostgreSQL's own transaction semantics.
_MISSING = b"poolguard: no such statement"
_PROBE = p.build_bind(b"", _MISSING, b"\0\0\0\0\0\0")


class Pending:
    """One request awaiting server replies (or a synthesized reply awaiting its turn)."""

    __slots__ = (
        "copying",
        "ends",
        "error",
        "extended",
        "hidden",
        "on_ok",
        "stmt",
        "sync",
        "synth",
        "undo",
    )

    def __init__(
        self,
        ends: bytes,
        *,
        extended: bool = True,
        hidden: bool = False,
        stmt: Statement | None = None,
        error: bytes | None = None,
        undo: Callable[[], None] | None = None,
        on_ok: Callable[[bytes], None] | None = None,
        synth: bytes | Callable[[], bytes] | None = None,
        sync: bool = False,
    ) -> None:
        self.ends = ends  # message types that complete this request
        self.extended = extended  # an error here makes the server skip to the next Sync
        self.hidden = hidden  # added by the proxy: only its errors reach the client
        self.stmt = stmt
        self.error = error  # replaces the server's 26000 error (a probe)
        self.undo = undo  # the request failed or was skipped: forget its effects
        self.on_ok = on_ok  # called with the message that completed the request
        self.synth = synth  # reply to deliver when this reaches the head, no server involved
        self.sync = sync  # a Sync: where skipping after an error stops
        self.copying = False  # the server answered with CopyInResponse

    def copy_started(self) -> Pending:
        """This request, marked as answered with CopyInResponse: a new record, since the
        common records below are shared by every session."""
        started = Pending(
            self.ends,
            extended=self.extended,
            hidden=self.hidden,
            stmt=self.stmt,
            error=self.error,
            undo=self.undo,
            on_ok=self.on_ok,
            synth=self.synth,
            sync=self.sync,
        )
        started.copying = True
        return started


# Records of requests the proxy passes on as they are (a prepared statement's round trip, a
# simple Query). They carry no state of their own (``copy_started`` replaces one that starts a
# COPY), so every session queues these same objects instead of one new object per message.
EXECUTE_REPLY = Pending(b"CIsE")
SYNC_REPLY = Pending(SYNC_ENDS, extended=False, sync=True)
DESCRIBE_PORTAL_REPLY = Pending(b"TnE")
BIND_UNNAMED_REPLY = Pending(b"2E")
QUERY_REPLY = Pending(SYNC_ENDS, extended=False)


class Exchange:
    """The messages a session has queued for the server and the client, and the reply queue
    that pairs them. No I/O: the session flushes ``server_out``/``client_out``."""

    __slots__ = ("client_out", "pending", "server_out", "skipping", "status")

    def __init__(self) -> None:
        self.pending: deque[Pending] = deque()
        self.client_out: list[bytes | bytearray] = []
        self.server_out: list[bytes | bytearray] = []
        self.skipping = False  # the server is discarding messages until the next Sync
        self.status = b"I"  # the transaction status of the last ReadyForQuery

    def to_server(self, data: bytes | bytearray, pending: Pending | None = None) -> None:
        self.server_out.append(data)
        if pending is not None:
            self.pending.append(pending)

    def send(self, data: bytes | bytearray) -> None:
        self.client_out.append(data)

    def synth(self, reply: bytes | Callable[[], bytes], undo: Callable[[], None] | None) -> None:
        """Answer the client without the server, after every reply still due before it."""
        if not self.pending:
            self.send(reply if isinstance(reply, bytes) else reply())
        else:
            self.pending.append(Pending(b"", synth=reply, undo=undo))

    def probe(self, error: bytes | None, undo: Callable[[], None] | None) -> None:
        """Make the server fail here, so the error lands in pipeline order and aborts the
        transaction exactly as PostgreSQL would; its 26000 is replaced with ``error``."""
        self.to_server(_PROBE, Pending(b"2E", error=error, undo=undo))

    def deliver_synth(self) -> None:
        q = self.pending
        while q and q[0].synth is not None:
            synth = q.popleft().synth
            assert synth is not None
            self.client_out.append(synth if isinstance(synth, bytes) else synth())

    def skip_to_sync(self) -> None:
        """After an extended-protocol error: the server discards everything up to the next
        Sync, so those requests will get no replies; forget their effects."""
        q = self.pending
        while q and not q[0].sync:
            skipped = q.popleft()
            if skipped.undo is not None:
                skipped.undo()
        if not q:
            self.skipping = True

    def copy_ended(self) -> None:
        # Syncs sent while an extended-protocol COPY FROM STDIN ran were ignored by the server
        # (libpq sends one right after Execute), so no ReadyForQuery will answer them.
        q = self.pending
        if q and q[0].copying and q[0].extended:
            head = q.popleft()
            kept = [e for e in q if e.ends != SYNC_ENDS or e.extended is not False]
            q.clear()
            q.append(head)
            q.extend(kept)
