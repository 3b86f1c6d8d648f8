"""Password authentication: SCRAM-SHA-256 as a server (for clients) and as a client (upstream).

Only the message payloads live here (RFC 5802 / RFC 7677, no channel binding); the proxy moves
them in and out of AuthenticationSASL* / SASL*Response messages. Secrets never appear in an
exception message or repr.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

MECHANISM = b"SCRAM-SHA-256"
ITERATIONS = 4096


class AuthError(Exception):
    """Authentication failed; the message is safe to show to the peer."""


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _attrs(msg: bytes) -> dict[str, bytes]:
    out = {}
    for part in msg.split(b","):
        if len(part) < 2 or part[1:2] != b"=":
            raise AuthError("malformed SCRAM message")
        out[chr(part[0])] = part[2:]
    return out


def _salted(password: str, salt: bytes, iterations: int) -> bytes:
    # SASLprep is the identity for the ASCII passwords this targets; PostgreSQL also falls back
    # to the raw bytes when normalization fails.
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


@dataclass(frozen=True)
class ScramVerifier:
    """What the server keeps for one password (like pg_authid's SCRAM secret)."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @classmethod
    def from_password(cls, password: str, iterations: int = ITERATIONS) -> ScramVerifier:
        salt = secrets.token_bytes(16)
        salted = _salted(password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(salt, iterations, _h(client_key), _hmac(salted, b"Server Key"))

    @classmethod
    def from_secret(cls, secret: str) -> ScramVerifier:
        """From PostgreSQL's stored form (pg_authid.rolpassword),
        ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``.

        Raises ValueError without echoing the secret."""
        try:
            head, keys = secret.split("$", 1)[1].split("$")
            iterations, salt = head.split(":")
            stored, server = keys.split(":")
            verifier = cls(
                base64.b64decode(salt, validate=True),
                int(iterations),
                base64.b64decode(stored, validate=True),
                base64.b64decode(server, validate=True),
            )
        except (ValueError, IndexError):
            raise ValueError("malformed SCRAM-SHA-256 secret") from None
        if len(verifier.stored_key) != 32 or len(verifier.server_key) != 32:
            raise ValueError("malformed SCRAM-SHA-256 secret")
        return verifier


class ScramServer:
    """One server-side SCRAM exchange: first() then final(), each returning the reply payload."""

    def __init__(self, verifier: ScramVerifier) -> None:
        self._v = verifier
        # Recovered from a valid proof (proof XOR ClientSignature): with the ServerKey it lets the
        # proxy log in upstream as this client when it holds only the SCRAM secret.
        self.client_key: bytes | None = None
        self._nonce = b""
        self._auth_prefix = b""

    def first(self, client_first: bytes) -> bytes:
        header, _, bare = client_first.partition(b",")
        authzid, _, bare = bare.partition(b",")
        # 'p' would demand channel binding, which this server does not offer.
        if header not in (b"n", b"y") or authzid:
            raise AuthError("SCRAM channel binding and authzid are not supported")
        attrs = _attrs(bare)
        cnonce = attrs.get("r")
        if not cnonce:
            raise AuthError("SCRAM client-first-message lacks a nonce")
        self._gs2 = header + b",,"
        self._nonce = cnonce + base64.b64encode(secrets.token_bytes(18))
        server_first = b"r=%s,s=%s,i=%d" % (
            self._nonce,
            base64.b64encode(self._v.salt),
            self._v.iterations,
        )
        self._auth_prefix = bare + b"," + server_first
        return server_first

    def final(self, client_final: bytes) -> bytes:
        without_proof, sep, proof_b64 = client_final.rpartition(b",p=")
        if not sep:
            raise AuthError("SCRAM client-final-message lacks a proof")
        attrs = _attrs(without_proof)
        if attrs.get("r") != self._nonce:
            raise AuthError("SCRAM nonce mismatch")
        if attrs.get("c") != base64.b64encode(self._gs2):
            raise AuthError("SCRAM channel binding mismatch")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            raise AuthError("malformed SCRAM proof") from None
        auth_message = self._auth_prefix + b"," + without_proof
        signature = _hmac(self._v.stored_key, auth_message)
        if len(proof) != len(signature) or not hmac.compare_digest(
            _h(_xor(proof, signature)), self._v.stored_key
        ):
            raise AuthError("password authentication failed")
        self.client_key = _xor(proof, signature)
        return b"v=" + base64.b64encode(_hmac(self._v.server_key, auth_message))


@dataclass(frozen=True)
class ScramKeys:
    """A client's ClientKey and ServerKey for one SCRAM secret (salt and iterations included):
    enough to log in as that client to a server holding the same secret, no password needed."""

    salt: bytes
    iterations: int
    client_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


class ScramClient:
    """One client-side SCRAM exchange against an upstream server, with a password or keys."""

    def __init__(self, password: str, keys: ScramKeys | None = None) -> None:
        self._password = password
        self._keys = keys
        self._nonce = base64.b64encode(secrets.token_bytes(18))
        self._bare = b"n=,r=" + self._nonce
        self._server_signature = b""

    def __repr__(self) -> str:
        return "<ScramClient>"

    def first(self) -> bytes:
        return b"n,," + self._bare

    def final(self, server_first: bytes) -> bytes:
        attrs = _attrs(server_first)
        nonce, salt, iterations = attrs.get("r", b""), attrs.get("s"), attrs.get("i")
        if not nonce.startswith(self._nonce) or salt is None or iterations is None:
            raise AuthError("malformed SCRAM server-first-message from upstream")
        if self._keys is not None:
            keys = self._keys
            if base64.b64decode(salt) != keys.salt or int(iterations) != keys.iterations:
                raise AuthError(
                    "upstream's SCRAM salt differs from the userlist secret: copy the secret "
                    "from the upstream's pg_authid again"
                )
            client_key, server_key = keys.client_key, keys.server_key
        else:
            salted = _salted(self._password, base64.b64decode(salt), int(iterations))
            client_key = _hmac(salted, b"Client Key")
            server_key = _hmac(salted, b"Server Key")
        without_proof = b"c=biws,r=" + nonce
        auth_message = self._bare + b"," + server_first + b"," + without_proof
        proof = _xor(client_key, _hmac(_h(client_key), auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify(self, server_final: bytes) -> None:
        v = _attrs(server_final).get("v")
        if v is None or not hmac.compare_digest(base64.b64decode(v), self._server_signature):
            raise AuthError("upstream server's SCRAM signature did not verify")


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
