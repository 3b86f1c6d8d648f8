"""TLS for the proxy: towards the upstream from the DSN's sslmode/sslrootcert (as libpq reads
them), and optionally towards clients with a certificate and key."""

from __future__ import annotations

import os
import ssl
import struct

SSL_REQUEST_MSG = struct.pack("!ii", 8, 80877103)
# libpq's modes, weakest first; "disable"/"allow" never ask the server for TLS here.
_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def check_sslmode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"sslmode must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def wants_tls(mode: str) -> bool:
    return mode in ("prefer", "require", "verify-ca", "verify-full")


def needs_tls(mode: str) -> bool:
    """The upstream must accept TLS, or the connection fails (libpq's semantics)."""
    return mode in ("require", "verify-ca", "verify-full")


def client_context(
    mode: str, rootcert: str | None, cert: str | None, key: str | None
) -> ssl.SSLContext:
    """The context for the proxy's connections to the upstream, verifying as libpq does:
    verify-full checks the chain and the host name, verify-ca the chain, require checks the
    chain only if a root certificate file is given, prefer nothing."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    verify = mode in ("verify-ca", "verify-full") or (
        mode == "require" and rootcert is not None and os.path.exists(rootcert)
    )
    if verify:
        if rootcert is None:
            raise ValueError(
                f"sslmode={mode} needs sslrootcert=<file of trusted CA certificates> in the DSN"
            )
        ctx.load_verify_locations(cafile=rootcert)
        ctx.check_hostname = mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The context for clients that ask the proxy for TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
