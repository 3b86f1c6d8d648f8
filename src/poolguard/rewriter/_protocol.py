"""PostgreSQL v3 wire-protocol codec: framing and the few messages the rewriter reads or writes.

Pure functions over bytes, no I/O, so the proxy and the tests share one source of truth.
Message layout reference: https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

PROTOCOL_V3 = 196608  # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# PostgreSQL itself refuses startup packets above this size (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_SIZE = 10_000

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")
_I16 = struct.Struct("!h")

# Message types (one byte) the proxy looks at.
PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNC, FLUSH = b"P", b"B", b"D", b"E", b"C", b"S", b"H"
QUERY, TERMINATE, FUNCTION_CALL = b"Q", b"X", b"F"
COPY_DATA, COPY_DONE, COPY_FAIL = b"d", b"c", b"f"


class ProtocolError(Exception):
    """The peer sent bytes that are not a well-formed protocol message."""

    def __init__(self, message: str, *, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class Refused(Exception):
    """The proxy refuses a well-formed request it cannot serve (sent to the client as FATAL)."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def frame(kind: bytes, body: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (including itself), body."""
    return _HDR.pack(kind, len(body) + 4) + body


def check_length(length: int, max_size: int) -> int:
    if length < 4 or length > max_size:
        raise ProtocolError(
            f"message of {length} bytes is outside the allowed range 4..{max_size} "
            "(raise max_message_size if your client sends larger messages)",
            sqlstate="08P01" if length < 4 else "54000",
        )
    return length


def split_messages(buf: bytearray, max_size: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """Complete typed messages at the start of ``buf`` and how many bytes they used.

    Raises ProtocolError for a length that is negative or above ``max_size``, so a peer can
    never make the proxy buffer more than one oversized header's worth before it is refused.
    """
    out: list[tuple[bytes, bytes]] = []
    pos, n = 0, len(buf)
    while n - pos >= 5:
        end = pos + 1 + check_length(_I32.unpack_from(buf, pos + 1)[0], max_size)
        if end > n:
            break
        out.append((bytes(buf[pos : pos + 1]), bytes(buf[pos + 5 : end])))
        pos = end
    return out, pos


def next_message(buf: bytearray, max_size: int) -> tuple[bytes, bytes] | None:
    """Remove and return the first complete message of ``buf``, if there is one."""
    if len(buf) < 5:
        return None
    end = 1 + check_length(_I32.unpack_from(buf, 1)[0], max_size)
    if len(buf) < end:
        return None
    kind, body = bytes(buf[:1]), bytes(buf[5:end])
    del buf[:end]
    return kind, body


def read_startup(buf: bytearray) -> tuple[bytes, int] | None:
    """The untyped startup-phase packet at the start of ``buf`` (body, bytes used), if complete."""
    if len(buf) < 4:
        return None
    length = _I32.unpack_from(buf, 0)[0]
    if length < 8 or length > MAX_STARTUP_SIZE:
        raise ProtocolError(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None
    return bytes(buf[4:length]), length


@dataclass(frozen=True)
class Startup:
    code: int
    params: dict[str, str]
    cancel: tuple[int, int] | None = None  # (pid, key) of a CancelRequest


def parse_startup(body: bytes) -> Startup:
    if len(body) < 4:
        raise ProtocolError("startup packet too short")
    code = _I32.unpack_from(body, 0)[0]
    if code == CANCEL_REQUEST:
        if len(body) != 12:
            raise ProtocolError("invalid CancelRequest length")
        pid, key = struct.unpack_from("!ii", body, 4)
        return Startup(code, {}, (pid, key))
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        return Startup(code, {})
    if code != PROTOCOL_V3:
        raise ProtocolError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "the proxy speaks protocol 3.0",
            sqlstate="0A000",
        )
    parts = body[4:].split(b"\0")
    # A well-formed packet ends with the pair terminator, giving two trailing empty parts.
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or len(parts) % 2:
        raise ProtocolError("invalid startup packet layout")
    params = {}
    for i in range(0, len(parts) - 2, 2):
        params[_text(parts[i])] = _text(parts[i + 1])
    return Startup(code, params)


def build_startup(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_V3)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return _I32.pack(len(body) + 4) + body


def build_cancel(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST, pid, key)


class Reader:
    """Sequential reads from one message body; every overrun is a ProtocolError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def cstring(self) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string in message")
        s = self.data[self.pos : end]
        self.pos = end + 1
        return s

    def int16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise ProtocolError("message too short")
        v: int = _I16.unpack_from(self.data, self.pos)[0]
        self.pos += 2
        return v

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ProtocolError("message too short")
        v: int = _I32.unpack_from(self.data, self.pos)[0]
        self.pos += 4
        return v

    def rest(self) -> bytes:
        r = self.data[self.pos :]
        self.pos = len(self.data)
        return r

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes in message")


def _text(b: bytes) -> str:
    try:
        return b.decode()
    except UnicodeDecodeError:
        raise ProtocolError("invalid UTF-8 in message") from None


# --- Parse / Bind / Describe / Close -------------------------------------------------------


class Parse(NamedTuple):
    name: bytes
    query: bytes
    param_types: tuple[int, ...]


def parse_parse(body: bytes) -> Parse:
    # Read with find() and one unpack rather than a Reader: drivers send a Parse per query.
    name_end = body.find(0)
    query_end = body.find(0, name_end + 1) if name_end >= 0 else -1
    if query_end < 0:
        raise ProtocolError("unterminated string in message")
    at = query_end + 3
    if at > len(body):
        raise ProtocolError("message too short")
    n = _I16.unpack_from(body, at - 2)[0]
    if n < 0:
        raise ProtocolError("negative parameter count in Parse")
    if at + 4 * n != len(body):
        raise ProtocolError(
            "message too short" if at + 4 * n > len(body) else "trailing bytes in message"
        )
    types = struct.unpack_from(f"!{n}i", body, at) if n else ()
    return Parse(body[:name_end], body[name_end + 1 : query_end], types)


def build_parse(name: bytes, query: bytes, param_types: tuple[int, ...]) -> bytes:
    body = b"%s\0%s\0" % (name, query) + _I16.pack(len(param_types))
    body += b"".join(_I32.pack(t) for t in param_types)
    return frame(PARSE, body)


def split_bind(body: bytes) -> tuple[bytes, bytes, int]:
    """(portal, statement name, offset of the rest) of a Bind body; the rest is passed as is."""
    p = body.find(b"\0")
    s = body.find(b"\0", p + 1) if p >= 0 else -1
    if s < 0:
        raise ProtocolError("malformed Bind message")
    return body[:p], body[p + 1 : s], s + 1


#: A message's int32 length field (a built-in: no Python frame on the rewriter's hot path).
pack_length = struct.Struct("!i").pack


def build_bind(portal: bytes, statement: bytes, rest: bytes) -> bytes:
    return frame(BIND, b"%s\0%s\0%s" % (portal, statement, rest))


def parse_target(body: bytes) -> tuple[bytes, bytes]:
    """(kind 'S' or 'P', name) of a Describe or Close body."""
    if len(body) < 2 or body[-1] != 0 or body[:1] not in (b"S", b"P"):
        raise ProtocolError("malformed Describe/Close message")
    name = body[1:-1]
    if b"\0" in name:
        raise ProtocolError("malformed Describe/Close message")
    return body[:1], name


def build_target(kind: bytes, target: bytes, name: bytes) -> bytes:
    return frame(kind, target + name + b"\0")


# --- server messages --------------------------------------------------------------------------

PARSE_COMPLETE = frame(b"1")
BIND_COMPLETE = frame(b"2")
CLOSE_COMPLETE = frame(b"3")
SYNC_MSG = frame(SYNC)
FLUSH_MSG = frame(FLUSH)
TERMINATE_MSG = frame(TERMINATE)
AUTH_OK = frame(b"R", _I32.pack(0))


def ready_for_query(status: bytes) -> bytes:
    return frame(b"Z", status)


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    r = Reader(body)
    return _text(r.cstring()), _text(r.cstring())


def backend_key_data(pid: int, key: int) -> bytes:
    return frame(b"K", struct.pack("!ii", pid, key))


def command_complete(tag: bytes) -> bytes:
    return frame(b"C", tag + b"\0")


def error_response(sqlstate: str, message: str, severity: str = "ERROR") -> bytes:
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    body = b"".join(k + v.encode() + b"\0" for k, v in fields) + b"\0"
    return frame(b"E", body)


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse body, keyed by their one-letter code."""
    out: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode(errors="replace")
    return out


def query_text(body: bytes) -> bytes:
    if not body or body[-1] != 0:
        raise ProtocolError("malformed Query message")
    return body[:-1]
