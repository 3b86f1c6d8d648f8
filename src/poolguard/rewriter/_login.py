"""A client's login: startup packet (or a CancelRequest / SSLRequest), then SCRAM-SHA-256.

No I/O: ``feed()`` consumes bytes from the client's buffer and appends replies to ``out``.
"""

from __future__ import annotations

import struct

from . import _auth
from . import _protocol as p
from ._params import startup_settings


class Login:
    """The login state machine of one client connection."""

    __slots__ = (
        "cancel",
        "dbname",
        "scram",
        "server_params",
        "state",
        "tls",
        "tls_requested",
        "trusted",
        "user",
        "verifier",
        "wanted",
    )

    def __init__(
        self,
        *,
        user: str,
        dbname: str,
        verifier: _auth.ScramVerifier,
        server_params: dict[str, str],
        trusted: bool,
        tls: bool = False,
    ) -> None:
        self.user = user  # the proxy's user until the client names its own
        self.dbname = dbname
        self.verifier = verifier
        self.server_params = server_params
        self.trusted = trusted  # on a unix socket in a private folder: no password asked
        self.state = "startup"  # startup -> auth -> auth2 -> done
        self.scram: _auth.ScramServer | None = None
        self.cancel: tuple[int, int] | None = None  # the connection was a CancelRequest
        self.wanted: dict[str, str] = {}  # the client's settings, once its startup arrived
        self.tls = tls  # the proxy has a certificate: an SSLRequest is answered S
        self.tls_requested = False  # answer S and hand the connection to TLS before going on

    @property
    def done(self) -> bool:
        return self.state == "done"

    def feed(self, buf: bytearray, out: list[bytes | bytearray]) -> None:
        """Consume what ``buf`` holds of the login; stops at a CancelRequest, at an SSLRequest
        the proxy accepts (``tls_requested``), when more bytes are needed, or when the client
        is logged in (bytes after that stay in ``buf``).

        Raises ``_auth.AuthError``, ``p.Refused`` or ``p.ProtocolError``.
        """
        while self.state == "startup":
            got = p.read_startup(buf)
            if got is None:
                return
            body, used = got
            del buf[:used]
            startup = p.parse_startup(body)
            if startup.cancel is not None:
                self.cancel = startup.cancel
                return
            if startup.code == p.SSL_REQUEST and self.tls:
                self.tls = False  # once per connection
                self.tls_requested = True
                return
            if startup.code in (p.SSL_REQUEST, p.GSSENC_REQUEST):
                out.append(b"N")  # the client may go on in plain text or give up
                continue
            self._begin(startup.params, out)
        while self.state in ("auth", "auth2"):
            msg = p.next_message(buf, p.MAX_STARTUP_SIZE)
            if msg is None:
                return
            kind, body = msg
            if kind != b"p" or self.scram is None:
                raise p.ProtocolError(f"expected a password message, got {kind!r}")
            self._password(body, out)

    def _begin(self, params: dict[str, str], out: list[bytes | bytearray]) -> None:
        user = params.get("user", "")
        database = params.get("database") or user
        if user != self.user:
            wanted_user, self.user = self.user, user
            raise _auth.AuthError(f"user {user!r} is not the proxy's user {wanted_user!r}")
        if database != self.dbname:
            raise p.Refused(
                "3D000",
                f'database "{database}" is not served here: this proxy serves only '
                f'"{self.dbname}" (connect to it, or start another proxy)',
            )
        if "replication" in params:
            raise p.Refused("0A000", "replication connections are not supported by the proxy")
        self.wanted = startup_settings(params, self.server_params)
        if self.trusted:
            out.append(p.AUTH_OK)
            self.state = "done"
            return
        self.scram = _auth.ScramServer(self.verifier)
        out.append(p.frame(b"R", struct.pack("!i", 10) + _auth.MECHANISM + b"\0\0"))
        self.state = "auth"

    def _password(self, body: bytes, out: list[bytes | bytearray]) -> None:
        assert self.scram is not None
        if self.state == "auth":
            r = p.Reader(body)
            if r.cstring() != _auth.MECHANISM:
                raise _auth.AuthError("client chose an unsupported SASL mechanism")
            length = r.int32()
            data = r.rest()
            if length != len(data):
                raise p.ProtocolError("SASLInitialResponse length mismatch")
            reply = self.scram.first(data)
            out.append(p.frame(b"R", struct.pack("!i", 11) + reply))
            self.state = "auth2"
            return
        reply = self.scram.final(body)
        out.append(p.frame(b"R", struct.pack("!i", 12) + reply))
        out.append(p.AUTH_OK)
        self.scram = None
        self.state = "done"
