"""A rewriter process stopped with SIGSTOP right after it let a console client in: the login is
answered, the client's first query never is. A process stopped mid-connection (a debugger, ^Z,
a paused container) keeps its sockets open and the kernel still acknowledges what is sent to it,
so no TCP timeout ever ends the client's wait.

A relay in front of the real rewriter gives the moment: it reads the rewriter's replies as
protocol messages and stops the rewriter as soon as the first ReadyForQuery (the end of a
login) reaches it, before passing that on. Clients must not ask for TLS (``sslmode=disable``),
so that every reply is a typed message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator

READY_FOR_QUERY = b"Z"


class StoppingRelay:
    """Listens on a loopback port and relays each connection to ``target``; stops process
    ``pid`` when the target first finishes a login. ``resume()`` lets it run again."""

    def __init__(self, target: tuple[str, int], pid: int) -> None:
        self.target = target
        self.pid = pid
        self.stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.host, self.port = self._listener.getsockname()[:2]
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            self._start(self._pump, client, server, False)
            self._start(self._pump, server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if replies and not self.stopped.is_set():
                    buffer += data
                    if self._login_done(buffer):
                        os.kill(self.pid, signal.SIGSTOP)
                        self.stopped.set()
                sink.sendall(data)
        # One side left: end both, which also wakes the pump reading the other side.
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _login_done(buffer: bytes) -> bool:
        at = 0
        while len(buffer) - at >= 5:
            kind = buffer[at : at + 1]
            (length,) = struct.unpack_from("!i", buffer, at + 1)
            if kind == READY_FOR_QUERY:
                return True
            at += 1 + length
        return False

    def resume(self) -> None:
        if self.stopped.is_set():
            os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self._closing.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        for sock in [*self._sockets, self._listener]:
            sock.close()


@contextlib.contextmanager
def stopping_relay(target: tuple[str, int], pid: int) -> Iterator[StoppingRelay]:
    relay = StoppingRelay(target, pid)
    try:
        yield relay
    finally:
        relay.close()
