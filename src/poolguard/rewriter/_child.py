"""The embedded rewriter in a child process, so app threads holding the GIL cannot stall it.

The parent starts a Python running ``main()`` below and sends its settings (upstream DSN
with the password included) as one JSON line on the child's stdin, never on its command line or
in its environment. The child answers ``ready HOST PORT`` (or ``error MESSAGE``) on stdout and
runs until its stdin closes: when the parent calls ``stop()`` or dies in any way. A supervisor
thread in the parent restarts a child that exits unexpectedly, on the same address, so the
DSN the app holds stays valid.

With ``workers=N`` (see ``_fleet``) a ``Fleet`` runs N such children on one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from ._build import ProxySettings, build_proxy, new_loop
from ._fleet import Worker

logger = logging.getLogger("poolguard.rewriter")

_CHILD_MAIN = "import sys; from poolguard.rewriter._child import main; sys.exit(main())"
_READY_TIMEOUT = 60.0  # the child checks the upstream with one real connection first
_RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)


class ChildError(Exception):
    """The child could not start; the message is the child's own."""


class Child:
    """A supervised rewriter process listening on ``host``:``port``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = dict(config)
        self._lock = threading.Lock()
        self._stopping = False
        self.restarts = 0
        self._proc = self._spawn()  # raises ChildError / TimeoutError if it does not start
        self._supervisor = threading.Thread(
            target=self._supervise, name="poolguard-rewriter-supervisor", daemon=True
        )
        self._supervisor.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return not self._stopping and self._proc.poll() is None

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_MAIN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(self._config).encode() + b"\n")
        proc.stdin.flush()
        line = _read_line(proc, _READY_TIMEOUT)
        if line.startswith("ready "):
            _, host, port = line.split(" ", 2)
            # A restarted child must listen where the first one did: clients hold that DSN.
            self._config["listen"] = f"{host}:{port}"
            self.host, self.port = host, int(port)
            return proc
        _end(proc)
        if line.startswith("error "):
            raise ChildError(line[6:])
        raise ChildError(f"the rewriter process exited with code {proc.returncode}")

    def _supervise(self) -> None:
        attempt = 0
        while True:
            proc = self._proc
            code = proc.wait()
            _end(proc)  # close our ends of its pipes
            with self._lock:
                if self._stopping:
                    return
            delay = _RESTART_DELAYS[min(attempt, len(_RESTART_DELAYS) - 1)]
            logger.warning(
                "rewriter process pid=%d exited with code %s; restarting it in %.1f s",
                proc.pid,
                code,
                delay,
            )
            time.sleep(delay)
            with self._lock:
                if self._stopping:
                    return
                try:
                    self._proc = self._spawn()
                except (ChildError, OSError, TimeoutError) as exc:
                    logger.error("could not restart the rewriter process: %s", exc)
                    attempt += 1
                    continue
                self.restarts += 1
                attempt = 0

    def stop(self, timeout: float) -> None:
        with self._lock:
            self._stopping = True
            proc = self._proc
        _end(proc, timeout)
        self._supervisor.join(timeout)


class Fleet:
    """``count`` supervised children serving one port as one proxy (see ``_fleet``)."""

    def __init__(self, config: dict[str, Any], count: int) -> None:
        # Only the workers' own user may enter: their private sockets trust their clients.
        self.folder = tempfile.mkdtemp(prefix="poolguard-rewriter-") if count > 1 else ""
        self.children: list[Child] = []
        try:
            for index in range(count):
                child = Child({**config, "worker": [index, count, self.folder]})
                self.children.append(child)
                # The first picked the port (listen=...:0 picks one); the others join it.
                config = {**config, "listen": f"{child.host}:{child.port}"}
        except BaseException:
            self.stop(5.0)
            raise
        self.host, self.port = self.children[0].host, self.children[0].port

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self.children]

    def alive(self) -> bool:
        return all(child.alive() for child in self.children)

    def stop(self, timeout: float) -> None:
        for child in self.children:
            child.stop(timeout)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            _end(proc)
            raise TimeoutError(f"the rewriter process did not start within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def _end(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Close the child's stdin (it stops on EOF), then escalate if it does not exit."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# --- the child side -------------------------------------------------------------------------


def main() -> int:
    """The child process: read the settings, serve until stdin closes or SIGTERM."""
    line = sys.stdin.buffer.readline()
    cfg = json.loads(line)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = ProxySettings(**cfg["settings"])
        proxy, _, host, port = build_proxy(
            cfg["upstream_dsn"],
            cfg["listen"],
            settings,
            password=cfg["password"],
            worker=Worker(*cfg.get("worker", (0, 1, ""))),
        )
    except ValueError as exc:
        print(f"error {exc}", flush=True)
        return 1
    loop = new_loop(cfg.get("use_uvloop"))
    asyncio.set_event_loop(loop)
    done = asyncio.Event()

    async def serve() -> None:
        try:
            await proxy.start(host, port)
        except Exception as exc:
            await proxy.stop()
            print(f"error {exc}", flush=True)
            raise SystemExit(1) from None
        print(f"ready {proxy.host} {proxy.port}", flush=True)
        # The parent's end of stdin closes when it stops us or dies: then stop too.
        loop.add_reader(sys.stdin.fileno(), _on_stdin, done)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        await proxy.stop()

    try:
        loop.run_until_complete(serve())
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        loop.close()
    return 0


def _on_stdin(done: asyncio.Event) -> None:
    if not os.read(sys.stdin.fileno(), 4096):
        asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
        done.set()
