"""Prepared statements that keep working behind transaction pooling.

A small PostgreSQL wire-protocol proxy: clients connect to it as to PostgreSQL, it lends them
one of a few server connections per transaction, and rewrites prepared-statement names so a
statement a client prepared is available on whichever server connection it gets next.

Embedded::

    handle = poolguard.rewriter.start("postgresql://app:secret@db/app", pool_size=4)
    psycopg.connect(handle.dsn, prepare_threshold=0)
    handle.stop()

Sidecar: ``python -m poolguard.rewriter --upstream URL --listen 127.0.0.1:6432``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from psycopg.conninfo import make_conninfo

# First: it picks the compiled or the source build of the hot path before either is imported.
from . import _compiled
from ._admin import Stats, query_stats
from ._build import DEFAULT_MAX_MESSAGE_SIZE, ProxySettings, build_proxy, new_loop
from ._child import ChildError, Fleet
from ._fleet import check_workers
from ._pool import Upstream, UpstreamError
from ._server import Proxy

__all__ = [
    "RewriterHandle",
    "UpstreamError",
    "admin_stats",
    "hot_path",
    "main",
    "serve",
    "start",
]

logger = logging.getLogger("poolguard.rewriter")


class _Thread:
    """The rewriter on a background thread of this process."""

    def __init__(
        self, proxy: Proxy, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self.proxy = proxy
        self.loop = loop
        self.thread = thread

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float) -> None:
        if not self.thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop)
        with contextlib.suppress(Exception):
            fut.result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)


class RewriterHandle:
    """A running embedded rewriter. ``dsn``/``url`` connect to it; ``stop()`` shuts it down."""

    def __init__(
        self,
        runner: _Thread | Fleet,
        *,
        host: str,
        port: int,
        upstream: Upstream,
        password: str,
        admin_database: str,
    ) -> None:
        self._runner = runner
        self._password = password
        self.host = host
        self.port = port
        self.user = upstream.user
        self.dbname = upstream.dbname
        self.admin_database = admin_database  # the console's database name

    @property
    def _proxy(self) -> Proxy:
        """The proxy object, for tests of the in-process (``isolate=False``) rewriter."""
        if not isinstance(self._runner, _Thread):
            raise AttributeError("the rewriter runs in a child process (isolate=True)")
        return self._runner.proxy

    @property
    def pid(self) -> int:
        """The process the rewriter runs in (this one when ``isolate=False``; the first
        worker's with ``workers`` > 1)."""
        return self.pids[0]

    @property
    def pids(self) -> list[int]:
        """Every process the rewriter runs in, one per worker."""
        return self._runner.pids if isinstance(self._runner, Fleet) else [os.getpid()]

    @property
    def dsn(self) -> str:
        """libpq conninfo for clients, password included (never logged or shown in repr)."""
        return make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self._password,
            dbname=self.dbname,
        )

    @property
    def url(self) -> str:
        if self.host.startswith("/"):
            return (
                f"postgresql://{quote(self.user, safe='')}:{quote(self._password, safe='')}@"
                f"/{quote(self.dbname, safe='')}?host={quote(self.host, safe='')}&port={self.port}"
            )
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self._password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.dbname, safe='')}"
        )

    @property
    def password(self) -> str:
        return self._password

    def __repr__(self) -> str:
        state = "running" if self._runner.alive() else "stopped"
        if not isinstance(self._runner, Fleet):
            where = "a thread"
        elif len(self.pids) == 1:
            where = "a process"
        else:
            where = f"{len(self.pids)} worker processes"
        return (
            f"<RewriterHandle {self.user}@{self.host}:{self.port}/{self.dbname} {state} in {where}>"
        )

    def stats(self) -> Stats:
        """The admin console's views as rows: ``{"pools": [...], "clients": [...], "servers":
        [...], "stats": [...]}``, each row a dict of the SHOW command's columns."""
        runner = self._runner
        if isinstance(runner, _Thread):

            async def collect() -> Stats:
                return runner.proxy.stats()

            return asyncio.run_coroutine_threadsafe(collect(), runner.loop).result(10)
        return query_stats(
            make_conninfo(
                host=self.host,
                port=self.port,
                user=self.user,
                password=self._password,
                dbname=self.admin_database,
            )
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Close client and server connections and end the rewriter's thread or process.
        Idempotent."""
        self._runner.stop(timeout)

    def __enter__(self) -> RewriterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def admin_stats(dsn: str, *, timeout: float = 10) -> Stats:
    """The admin console's views read from a running rewriter, here or in another process:
    ``dsn`` (URL or conninfo) names the console's database (``poolguard`` unless renamed) and
    a user allowed there. The same rows as ``handle.stats()``.

    ``timeout`` (seconds) bounds the whole call: connection, login and queries (libpq gives a
    connection attempt at least 2 s). A console that does not answer in time (its process
    stopped, say) raises ``psycopg.errors.ConnectionTimeout`` naming the DSN without its
    password. Raises psycopg's errors when the console cannot be reached or refuses the login,
    and ValueError for a timeout that is not a number > 0."""
    return query_stats(dsn, timeout)


def hot_path() -> str:
    """Which build of the per-message code this process runs: ``"compiled (Cython)"``, built
    from the Python source when the package was installed with a C compiler at hand, or
    ``"Python source (<why>)"``. Both behave the same; the compiled one needs about a quarter
    less CPU per transaction. ``POOLGUARD_REWRITER_PURE=1`` in the environment picks the source."""
    return _compiled.describe()


def _settings(arguments: dict[str, Any]) -> ProxySettings:
    """ProxySettings from the keyword arguments of the same names of start() or serve()."""
    values = {f.name: arguments[f.name] for f in dataclasses.fields(ProxySettings)}
    values["admin_users"] = tuple(values["admin_users"])
    values["pool_sizes"] = dict(values["pool_sizes"] or {})
    return ProxySettings(**values)


def start(
    upstream_dsn: str,
    *,
    listen: str = "127.0.0.1:0",
    pool_size: int = 4,
    max_prepared: int = 500,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    cleanup_timeout: float = 10.0,
    login_timeout: float = 60.0,
    server_idle_timeout: float = 600.0,
    server_lifetime: float = 3600.0,
    pool_idle_timeout: float = 600.0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    userlist: str | None = None,
    auth_passthrough: bool = False,
    admin_users: Sequence[str] = (),
    admin_database: str | None = None,
    pool_sizes: dict[str, int] | None = None,
    use_uvloop: bool | None = None,
    isolate: bool = True,
    workers: int = 1,
) -> RewriterHandle:
    """Run the rewriter and return once it accepts connections.

    ``isolate=True`` (the default) runs it in a child process that this process supervises
    (restarted on the same address if it dies) and stops with ``stop()`` or when this process
    exits, so app threads holding the GIL (a long C call) cannot stall other clients.
    ``isolate=False`` runs it on a background thread of this process instead.

    ``listen`` is HOST:PORT (port 0 picks a free one), or the path of a folder (created with
    mode 0700, or already private) for a unix socket whose clients are trusted without a
    password. ``pool_size`` is the number of server connections of each (user, database) pool;
    ``max_prepared`` bounds the prepared statements kept on each of them (least recently used
    are closed first). Clients log in with the upstream user and password (a random password if
    the upstream needs none; it is in ``handle.dsn``) to any database that user may open
    upstream, or as a user of the ``userlist`` file (PgBouncer's auth_file format: ``"user"
    "password"`` lines, the password plain or PostgreSQL's SCRAM secret), or with
    ``auth_passthrough`` as any other user: the client's cleartext password is tried upstream
    (use it over TLS or a local socket). Each (user, database) pair gets its own pool;
    ``pool_sizes`` maps ``"user/database"`` to a size other than ``pool_size``. The virtual
    database ``poolguard`` is an admin console
    (``SHOW POOLS``, ``CLIENTS``, ``SERVERS``, ``STATS``) for the upstream user and ``admin_users``
    (``admin_database`` renames it; it is ``poolguard_admin`` when the upstream's own database
    is called ``poolguard``); ``handle.stats()`` returns the same rows. ``login_timeout``: a
    client that has not logged in after this many seconds is closed (PostgreSQL's
    authentication_timeout, 60 s by default). Server connections idle for
    ``server_idle_timeout`` seconds are closed (Terminate), and those older than
    ``server_lifetime`` (less up to 10 % at random) when they are next idle, never while a client
    uses one; a (user, database) pool other than the upstream DSN's that has had no clients and
    no server connections for ``pool_idle_timeout`` is dropped, statement map included, and
    made anew by its next client. 0 turns each off. ``tls_cert`` and ``tls_key`` (PEM files):
    clients that ask for TLS get it. Towards the upstream, TLS follows the DSN's
    ``sslmode``/``sslrootcert``/``sslcert``/``sslkey`` as libpq reads them.
    ``use_uvloop``: None uses uvloop if it is installed. ``workers`` (with ``isolate=True``):
    that many processes serve the one port, so the proxy can use as many cores; each holds its
    share of every pool's connections (together never more than the pool's size, so each size
    must be at least ``workers``), a cancel reaches the worker of its client, and the console
    and ``stats()`` show all of them. Raises UpstreamError if the upstream cannot be reached.
    """
    # Built here in every case: bad settings raise ValueError in the caller's process.
    settings = _settings(locals())
    proxy, password, host, port = build_proxy(upstream_dsn, listen, settings)
    sizes = {"pool_size": pool_size}
    sizes.update({f"pool_sizes[{pair!r}]": size for pair, size in settings.pool_sizes.items()})
    check_workers(workers, sizes, listen_folder=host.startswith("/"), isolate=isolate)
    if isolate:
        if use_uvloop:
            new_loop(True).close()  # raises ImportError here if uvloop is missing
        config = {
            "upstream_dsn": upstream_dsn,
            "listen": listen,
            "password": password,
            "use_uvloop": use_uvloop,
            "settings": dataclasses.asdict(settings),
        }
        try:
            fleet = Fleet(config, workers)
        except (ChildError, TimeoutError) as failed:
            raise UpstreamError(str(failed)) from None
        return RewriterHandle(
            fleet,
            host=fleet.host,
            port=fleet.port,
            upstream=proxy.pool.upstream,
            password=password,
            admin_database=proxy.pools.console,
        )
    loop = new_loop(use_uvloop)
    started: asyncio.Future[None] = loop.create_future()

    async def boot() -> None:
        try:
            await proxy.start(host, port)
        except BaseException as exc:
            await proxy.stop()  # the upstream check may have left a connection open
            started.set_exception(exc)
        else:
            started.set_result(None)

    def run() -> None:
        asyncio.set_event_loop(loop)
        boot_task = loop.create_task(boot())
        loop.run_forever()
        del boot_task
        # Finish what stop() started, then release the loop's resources.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, name="poolguard-rewriter", daemon=True)
    thread.start()
    ready = threading.Event()
    loop.call_soon_threadsafe(lambda: started.add_done_callback(lambda _: ready.set()))
    ready.wait()
    exc = started.exception()
    if exc is not None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        raise exc
    return RewriterHandle(
        _Thread(proxy, loop, thread),
        host=proxy.host,
        port=proxy.port,
        upstream=proxy.pool.upstream,
        password=password,
        admin_database=proxy.pools.console,
    )


async def serve(
    upstream_dsn: str,
    *,
    listen: str = "127.0.0.1:6432",
    pool_size: int = 4,
    max_prepared: int = 500,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    cleanup_timeout: float = 10.0,
    login_timeout: float = 60.0,
    server_idle_timeout: float = 600.0,
    server_lifetime: float = 3600.0,
    pool_idle_timeout: float = 600.0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    userlist: str | None = None,
    auth_passthrough: bool = False,
    admin_users: Sequence[str] = (),
    admin_database: str | None = None,
    pool_sizes: dict[str, int] | None = None,
) -> None:
    """Run the rewriter in the current event loop until SIGINT/SIGTERM (the sidecar)."""
    settings = _settings(locals())
    proxy, _, host, port = build_proxy(upstream_dsn, listen, settings)
    await proxy.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await proxy.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``poolguard proxy``: run the rewriter as a sidecar. Returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="poolguard proxy",
        description="PostgreSQL proxy with transaction pooling that keeps prepared statements "
        "working. Clients log in with the upstream's user and password, or as --userlist users "
        "(or any user with --auth-passthrough), one pool per user and database. The database "
        "'poolguard' is an admin console: SHOW POOLS, CLIENTS, SERVERS, STATS.",
    )
    parser.add_argument(
        "--upstream",
        default=os.environ.get("POOLGUARD_UPSTREAM") or os.environ.get("DATABASE_URL"),
        help="upstream PostgreSQL URL or conninfo (default: $POOLGUARD_UPSTREAM, $DATABASE_URL)",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:6432",
        help="HOST:PORT, or a private folder (mode 0700) for a unix socket with trusted clients",
    )
    parser.add_argument("--pool-size", type=int, default=4, help="server connections (4)")
    parser.add_argument(
        "--max-prepared", type=int, default=500, help="prepared statements per server connection"
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help="largest message, in bytes, a client may send; a larger one ends that client with "
        f"SQLSTATE 54000 ({DEFAULT_MAX_MESSAGE_SIZE})",
    )
    parser.add_argument(
        "--cleanup-timeout",
        type=float,
        default=10.0,
        help="seconds a server connection may take to become idle after its client vanished "
        "before it is closed (10)",
    )
    parser.add_argument(
        "--login-timeout",
        type=float,
        default=60.0,
        help="seconds a client may take to log in before it is closed (60)",
    )
    parser.add_argument(
        "--server-idle-timeout",
        type=float,
        default=600.0,
        help="seconds a server connection may stay idle before it is closed; 0: never (600)",
    )
    parser.add_argument(
        "--server-lifetime",
        type=float,
        default=3600.0,
        help="seconds after which a server connection is closed when it is next idle, less up "
        "to 10%% at random so they do not all reconnect at once; 0: never (3600)",
    )
    parser.add_argument(
        "--pool-idle-timeout",
        type=float,
        default=600.0,
        help="seconds a user/database pool with no clients and no server connections is kept "
        "before it is dropped (the upstream URL's own pool never is); 0: never (600)",
    )
    parser.add_argument(
        "--userlist",
        help='file of users clients may log in as, lines of "user" "password" (the password '
        "plain or a SCRAM-SHA-256 secret from pg_authid; PgBouncer's auth_file format)",
    )
    parser.add_argument(
        "--auth-passthrough",
        action="store_true",
        help="let users not in the userlist log in with their upstream password: the proxy asks "
        "for it in cleartext and tries it upstream (use with TLS or a local socket)",
    )
    parser.add_argument(
        "--admin-user",
        action="append",
        default=[],
        help="a user (besides the upstream's) allowed to use the 'poolguard' console; repeatable",
    )
    parser.add_argument(
        "--admin-database",
        help="name of the admin console's database (default poolguard, or poolguard_admin if "
        "the upstream's database is called poolguard)",
    )
    parser.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="USER/DATABASE=SIZE",
        help="server connections of one user/database pool instead of --pool-size; repeatable",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving the one port, each with its share of every pool's server "
        "connections (1)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate offered to clients that ask for TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    if not args.upstream:
        parser.error("--upstream is required (or set POOLGUARD_UPSTREAM / DATABASE_URL)")
    pool_sizes = {}
    for spec in args.pool:
        pair, sep, size = spec.rpartition("=")
        if not sep or not size.isdigit():
            parser.error(f"--pool {spec!r}: expected USER/DATABASE=SIZE, like app/shop=8")
        pool_sizes[pair] = int(size)
    if not Upstream.from_dsn(args.upstream).password and not (
        args.userlist or args.auth_passthrough
    ):
        parser.error(
            "the upstream URL has no password: clients authenticate to the proxy with the "
            "upstream's password, so include one (or set PGPASSWORD)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    options: dict[str, Any] = dict(
        listen=args.listen,
        pool_size=args.pool_size,
        max_prepared=args.max_prepared,
        max_message_size=args.max_message_size,
        cleanup_timeout=args.cleanup_timeout,
        login_timeout=args.login_timeout,
        server_idle_timeout=args.server_idle_timeout,
        server_lifetime=args.server_lifetime,
        pool_idle_timeout=args.pool_idle_timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        userlist=args.userlist,
        auth_passthrough=args.auth_passthrough,
        admin_users=args.admin_user,
        admin_database=args.admin_database,
        pool_sizes=pool_sizes,
    )
    if args.workers != 1:
        return _serve_workers(args.upstream, args.workers, options)
    loop = new_loop(None)
    try:
        loop.run_until_complete(serve(args.upstream, **options))
    except (UpstreamError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    finally:
        loop.close()
    return 0


def _serve_workers(upstream: str, workers: int, options: dict[str, Any]) -> int:
    """``poolguard proxy --workers N``: supervise N worker processes until SIGINT/SIGTERM."""
    try:
        handle = start(upstream, workers=workers, **options)
    except (UpstreamError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    logger.info(
        "rewriter listening on %s:%d for upstream %s with %d workers (pids %s)",
        handle.host,
        handle.port,
        Upstream.from_dsn(upstream).describe(),
        workers,
        " ".join(map(str, handle.pids)),
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        handle.stop()
    return 0
