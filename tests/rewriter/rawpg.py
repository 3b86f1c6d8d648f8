"""A tiny blocking protocol-level PostgreSQL client, so tests can send exact message sequences
(pipelines, Flush, odd orders) to the rewriter and to PostgreSQL itself and compare replies."""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from poolguard.rewriter import _auth
from poolguard.rewriter import _protocol as p

Msg = tuple[bytes, bytes]


class LoginRefused(ConnectionError):
    """The server answered the login with an ErrorResponse; ``fields`` has its SQLSTATE ("C")."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M"))
        self.fields = fields


class RawClient:
    def __init__(
        self, dsn: str, *, after_password: bytes = b"", login: bool = True, **params: str
    ) -> None:
        """``after_password`` is sent in the same packet as the last SCRAM message. With
        ``login=False`` the constructor returns once the password is accepted, without waiting
        for AuthenticationOk (``startup`` is then empty)."""
        info: dict[str, Any] = conninfo_to_dict(dsn)
        self.user = str(info["user"])
        self.password = str(info.get("password") or "")
        self.sock = socket.create_connection((str(info["host"]), int(info["port"])), timeout=15)
        self.buf = bytearray()
        self.status = b""
        self.after_password = after_password
        self.login = login
        startup = {"user": self.user, "database": str(info["dbname"]), **params}
        self.sock.sendall(p.build_startup(startup))
        try:
            self.startup = self._authenticate()
        except BaseException:
            self.sock.close()
            raise

    def _authenticate(self) -> list[Msg]:
        scram: _auth.ScramClient | None = None
        got: list[Msg] = []
        while True:
            kind, body = self.read()
            if kind == b"R":
                code = struct.unpack_from("!i", body)[0]
                if code == 3:  # cleartext (the rewriter's auth passthrough)
                    self.send(p.frame(b"p", self.password.encode() + b"\0"))
                elif code == 10:
                    scram = _auth.ScramClient(self.password)
                    first = scram.first()
                    payload = _auth.MECHANISM + b"\0" + struct.pack("!i", len(first)) + first
                    self.send(p.frame(b"p", payload))
                elif code == 11:
                    assert scram is not None
                    self.send(p.frame(b"p", scram.final(body[4:])), self.after_password)
                elif code == 12:
                    assert scram is not None
                    scram.verify(body[4:])
                    if not self.login:
                        return got
                elif code == 5:
                    self.send(
                        p.frame(
                            b"p", _auth.md5_password(self.user, self.password, body[4:8]) + b"\0"
                        )
                    )
                continue
            got.append((kind, body))
            if kind == b"E":
                raise LoginRefused(p.parse_error_fields(body))
            if kind == b"Z":
                self.status = body
                return got

    def send(self, *msgs: bytes) -> None:
        self.sock.sendall(b"".join(msgs))

    def read(self) -> Msg:
        while True:
            if len(self.buf) >= 5:
                length = struct.unpack_from("!i", self.buf, 1)[0]
                if len(self.buf) >= length + 1:
                    kind, body = bytes(self.buf[:1]), bytes(self.buf[5 : length + 1])
                    del self.buf[: length + 1]
                    return kind, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by server")
            self.buf += chunk

    def until_ready(self, count: int = 1) -> list[Msg]:
        """Messages up to and including the ``count``-th ReadyForQuery; notices left out."""
        out: list[Msg] = []
        while count:
            kind, body = self.read()
            if kind == b"N":
                continue
            out.append((kind, body))
            if kind == b"Z":
                self.status = body
                count -= 1
        return out

    def run(self, *msgs: bytes) -> list[Msg]:
        self.send(*msgs)
        return self.until_ready(sum(m[:1] in (b"S", b"Q") for m in msgs))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(p.TERMINATE_MSG)
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse(name: bytes, sql: bytes, types: tuple[int, ...] = ()) -> bytes:
    return p.build_parse(name, sql, types)


def bind(name: bytes, *params: bytes | None, portal: bytes = b"") -> bytes:
    rest = struct.pack("!hh", 0, len(params))
    for v in params:
        rest += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    rest += struct.pack("!h", 0)
    return p.build_bind(portal, name, rest)


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return p.frame(b"E", portal + b"\0" + struct.pack("!i", max_rows))


def describe(name: bytes, kind: bytes = b"S") -> bytes:
    return p.build_target(b"D", kind, name)


def close(name: bytes, kind: bytes = b"S") -> bytes:
    return p.build_target(b"C", kind, name)


def query(sql: bytes) -> bytes:
    return p.frame(b"Q", sql + b"\0")


SYNC = p.SYNC_MSG
FLUSH = p.FLUSH_MSG


def kinds(msgs: list[Msg]) -> str:
    return "".join(k.decode() for k, _ in msgs)


def errors(msgs: list[Msg]) -> list[tuple[str, str]]:
    """(SQLSTATE, message) of each ErrorResponse."""
    out = []
    for kind, body in msgs:
        if kind == b"E":
            f = p.parse_error_fields(body)
            out.append((f["C"], f["M"]))
    return out


def rows(msgs: list[Msg]) -> list[list[str | None]]:
    """Text values of the DataRows."""
    out = []
    for kind, body in msgs:
        if kind != b"D":
            continue
        n = struct.unpack_from("!h", body)[0]
        pos, row = 2, list[str | None]()
        for _ in range(n):
            length = struct.unpack_from("!i", body, pos)[0]
            pos += 4
            if length < 0:
                row.append(None)
            else:
                row.append(body[pos : pos + length].decode())
                pos += length
        out.append(row)
    return out


def replies(msgs: list[Msg]) -> list[tuple[str, Any]]:
    """A comparable summary: kind plus, for errors the SQLSTATE, for rows the values, for
    ReadyForQuery the status, for CommandComplete the tag."""
    out: list[tuple[str, Any]] = []
    for kind, body in msgs:
        k = kind.decode()
        if kind == b"E":
            out.append((k, p.parse_error_fields(body)["C"]))
        elif kind == b"D":
            out.append((k, rows([(kind, body)])[0]))
        elif kind in (b"Z", b"C"):
            out.append((k, body.rstrip(b"\0").decode()))
        else:
            out.append((k, None))
    return out
