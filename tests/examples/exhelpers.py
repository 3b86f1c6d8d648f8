"""Helpers for the example-project tests: start a server as a user would, drive it with
concurrent clients, watch the database server meanwhile (a plain module, imported by name)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from poolguard.testing import PostgresServer, free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BIN = Path(sys.executable).parent


def example_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOLGUARD_", "DJANGO_"))}
    env.pop("DIRECT_URL", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "DATABASE_URL": database_url, **extra}


@dataclass
class Served:
    url: str
    process: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serve(
    argv: list[str], cwd: Path, env: dict[str, str], log: Path, ready: str
) -> Iterator[Served]:
    """Run a server on a free port ({port} in argv), wait until GET ``ready`` answers 200, and
    stop it with SIGTERM at the end: it must exit 0 (its shutdown hooks ran)."""
    import httpx

    port = free_port()
    with log.open("w") as sink:
        process = subprocess.Popen(
            [a.format(port=port) for a in argv], cwd=cwd, env=env, stdout=sink,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"server exited early:\n{served.output()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(served.url + ready, timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"server not ready:\n{served.output()[-3000:]}"
            time.sleep(0.2)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
    assert code == 0, f"server exited with {code}:\n{served.output()[-3000:]}"


@dataclass
class Load:
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    peak_sessions: int = 0
    seconds: float = 0.0


def hammer(base: str, paths: list[str], concurrency: int, server: PostgresServer, db: str) -> Load:
    """``concurrency`` clients at once, each requesting every path in turn ("POST /x" posts,
    "{i}" is the client's number); the server's sessions on the example's database are sampled
    meanwhile."""
    import httpx

    load = Load()
    stop = threading.Event()
    sampler = threading.Thread(target=sample_sessions, args=(server, db, load, stop), daemon=True)
    sampler.start()

    async def client(i: int, http: httpx.AsyncClient, start: asyncio.Event) -> None:
        await start.wait()
        for path in paths:
            try:
                method, _, target = path.rpartition(" ")
                reply = await http.request(method or "GET", base + target.format(i=i))
                if reply.status_code == 200:
                    load.ok += 1
                else:
                    load.errors.append(f"{path}: {reply.status_code} {reply.text[:200]}")
            except httpx.HTTPError as exc:
                load.errors.append(f"{path}: {exc!r}")

    async def run() -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:
            start = asyncio.Event()
            tasks = [asyncio.create_task(client(i, http, start)) for i in range(concurrency)]
            await asyncio.sleep(0.1)
            start.set()  # every client starts at once
            await asyncio.gather(*tasks)

    began = time.monotonic()
    try:
        asyncio.run(run())
    finally:
        load.seconds = time.monotonic() - began
        stop.set()
        sampler.join()
    return load


def sample_sessions(
    server: PostgresServer, db: str, load: Load, stop: threading.Event, app: str = "%"
) -> None:
    """Record in ``load`` the most server sessions seen on ``db`` until ``stop`` is set (only
    those whose application_name is LIKE ``app``)."""
    with server.connect() as conn:
        while not stop.is_set():
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND application_name LIKE %s",
                (db, app),
            ).fetchone()
            load.peak_sessions = max(load.peak_sessions, row[0] if row else 0)
            time.sleep(0.02)
