"""A client's login: startup packet (or a CancelRequest / SSLRequest), then SCRAM-SHA-256
(or, for auth passthrough, the cleartext password the proxy then tries upstream).

No I/O: ``feed()`` consumes bytes from the client's buffer and appends replies to ``out``.
AuthenticationOk is not among them: the session sends it once the proxy has a pool for the
client (which may take an upstream login that can still refuse it).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable

from . import _auth
from . import _protocol as p
from ._params import startup_settings
from ._userlist import Credential

_mock: _auth.ScramVerifier | None = None


def _mock_verifier() -> _auth.ScramVerifier:
    """A verifier no password matches: a user the proxy does not know goes through the same
    SCRAM exchange and fails the same way as a wrong password (as PostgreSQL does), so clients
    cannot probe which users exist."""
    global _mock
    if _mock is None:
        _mock = _auth.ScramVerifier.from_password(secrets.token_urlsafe(32))
    return _mock


class Login:
    """The login state machine of one client connection."""

    __slots__ = (
        "cancel",
        "client_key",
        "dbname",
        "lookup",
        "passthrough",
        "password",
        "scram",
        "server_params",
        "state",
        "tls",
        "tls_requested",
        "trusted",
        "user",
        "wanted",
    )

    def __init__(
        self,
        *,
        lookup: Callable[[str], Credential | None],
        server_params: dict[str, str],
        trusted: bool,
        tls: bool = False,
        passthrough: bool = False,
    ) -> None:
        self.user = ""  # what the client's startup packet names
        self.dbname = ""
        self.lookup = lookup  # the credential of a user name, None if the proxy has none
        self.passthrough = passthrough  # users without one are asked for a cleartext password
        self.password: str | None = None  # the cleartext password of a passthrough client
        self.client_key: bytes | None = None  # from the client's SCRAM proof
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
            if kind != b"p":
                raise p.ProtocolError(f"expected a password message, got {kind!r}")
            self._password(body, out)

    def _begin(self, params: dict[str, str], out: list[bytes | bytearray]) -> None:
        user = params.get("user", "")
        if not user:
            raise p.Refused("28000", "no PostgreSQL user name specified in startup packet")
        self.user = user
        self.dbname = params.get("database") or user
        if "replication" in params:
            raise p.Refused("0A000", "replication connections are not supported by the proxy")
        self.wanted = startup_settings(params, self.server_params)
        cred = self.lookup(user)
        if self.trusted and cred is not None and not cred.secret_only:
            self.state = "done"
            return
        if cred is None and self.passthrough:
            # The proxy must learn the password to log in upstream with it: ask for cleartext
            # (over TLS or a local socket only, see docs/rewriter.md).
            out.append(p.frame(b"R", struct.pack("!i", 3)))
            self.state = "auth"
            return
        self.scram = _auth.ScramServer(cred.verifier if cred is not None else _mock_verifier())
        out.append(p.frame(b"R", struct.pack("!i", 10) + _auth.MECHANISM + b"\0\0"))
        self.state = "auth"

    def _password(self, body: bytes, out: list[bytes | bytearray]) -> None:
        if self.scram is None:  # cleartext, for passthrough
            password = body[:-1] if body.endswith(b"\0") else body
            if not password or b"\0" in password:
                raise p.ProtocolError("malformed password message")
            self.password = password.decode("utf-8", "replace")
            self.state = "done"
            return
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
        self.client_key = self.scram.client_key
        self.scram = None
        self.state = "done"
