"""Building a proxy from the user's settings (validated here) and the event loop it runs on."""

from __future__ import annotations

import asyncio
import importlib
import secrets
import ssl
from dataclasses import dataclass, field

from ._fleet import Worker
from ._pool import Upstream
from ._pools import console_name
from ._reaper import Lifecycle
from ._server import Proxy
from ._tls import server_context
from ._userlist import load_userlist

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


@dataclass(frozen=True)
class ProxySettings:
    """The proxy's tunables (the keyword arguments of ``start()``), JSON-able for the child."""

    pool_size: int = 4
    max_prepared: int = 500
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    cleanup_timeout: float = 10.0
    login_timeout: float = 60.0
    # Seconds, 0 = off: an idle server connection is closed after server_idle_timeout, one
    # older than server_lifetime when it is next idle, and a (user, database) pool other than
    # the upstream DSN's with no clients and no server connections after pool_idle_timeout.
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    pool_idle_timeout: float = 600.0
    tls_cert: str | None = None
    tls_key: str | None = None
    userlist: str | None = None  # PgBouncer auth_file format: "user" "password-or-SCRAM-secret"
    auth_passthrough: bool = False  # other users: their cleartext password, tried upstream
    admin_users: tuple[str, ...] = ()  # besides the upstream DSN's user
    admin_database: str | None = None  # the console's name; None: see _pools.console_name
    pool_sizes: dict[str, int] = field(default_factory=dict)  # "user/database" -> size


def build_proxy(
    upstream_dsn: str,
    listen: str,
    settings: ProxySettings,
    *,
    password: str | None = None,
    worker: Worker | None = None,
) -> tuple[Proxy, str, str, int]:
    """Build (not start) a proxy: (proxy, client password, listen host, listen port).

    The client password is ``password``, else the upstream one, else a random one. ``worker``:
    its place in a fleet of worker processes (one process when None).
    """
    pool_size, max_prepared = settings.pool_size, settings.max_prepared
    max_message_size, login_timeout = settings.max_message_size, settings.login_timeout
    tls_cert, tls_key = settings.tls_cert, settings.tls_key
    host, port = split_listen(listen)
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    if max_prepared < 1:
        raise ValueError(f"max_prepared must be >= 1, got {max_prepared}")
    if max_message_size < 1024:
        raise ValueError(f"max_message_size must be >= 1024 bytes, got {max_message_size}")
    if not login_timeout > 0:
        raise ValueError(f"login_timeout must be > 0 seconds, got {login_timeout}")
    if not settings.cleanup_timeout > 0:
        raise ValueError(f"cleanup_timeout must be > 0 seconds, got {settings.cleanup_timeout}")
    lifecycle = Lifecycle(
        server_idle_timeout=settings.server_idle_timeout,
        server_lifetime=settings.server_lifetime,
        pool_idle_timeout=settings.pool_idle_timeout,
    )  # raises ValueError naming a bad one
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both files, or neither")
    tls = None
    if tls_cert is not None and tls_key is not None:
        try:
            tls = server_context(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"tls_cert/tls_key could not be loaded: {exc}") from None
    sizes = {}
    for pair, size in settings.pool_sizes.items():
        user, sep, dbname = pair.partition("/")
        if not (sep and user and dbname) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"pool_sizes entry {pair!r}: {size!r} must be 'user/database': size >= 1"
            )
        sizes[(user, dbname)] = size
    users = load_userlist(settings.userlist) if settings.userlist is not None else {}
    upstream = Upstream.from_dsn(upstream_dsn)
    password = password or upstream.password or secrets.token_urlsafe(24)
    proxy = Proxy(
        upstream,
        password=password,
        pool_size=pool_size,
        max_prepared=max_prepared,
        max_message_size=max_message_size,
        cleanup_timeout=settings.cleanup_timeout,
        login_timeout=login_timeout,
        tls=tls,
        users=users,
        passthrough=settings.auth_passthrough,
        admins=frozenset(settings.admin_users),
        pool_sizes=sizes,
        console=console_name(settings.admin_database, upstream.dbname),
        lifecycle=lifecycle,
        worker=worker,
    )
    return proxy, password, host, port


def new_loop(use_uvloop: bool | None) -> asyncio.AbstractEventLoop:
    """uvloop when installed (or asked for): the proxy spends most of its time in the event
    loop's socket calls, which uvloop does with less overhead than the standard loop."""
    if use_uvloop is not False:
        try:
            loop: asyncio.AbstractEventLoop = importlib.import_module("uvloop").new_event_loop()
            return loop
        except ImportError:
            if use_uvloop:
                raise ImportError("use_uvloop=True but uvloop is not installed") from None
    return asyncio.new_event_loop()


def split_listen(listen: str) -> tuple[str, int]:
    if listen.startswith("/"):  # a private folder for a unix socket, optionally :PORT
        folder, sep, port = listen.rpartition(":")
        if sep and port.isdigit():
            return folder, int(port)
        return listen, 0
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(
            "listen must be HOST:PORT (like 127.0.0.1:6432) or a private folder for a unix "
            f"socket (like /run/app/pg or /run/app/pg:6432), got {listen!r}"
        )
    return host.strip("[]") or "127.0.0.1", int(port)
