"""How many worker processes run this app, read from the process tree where it can be known.

A pool cannot see its sibling processes, so the connection budget needs their number. Gunicorn
and Uvicorn *read* ``WEB_CONCURRENCY`` as their default worker count; neither sets it, so a
``gunicorn -w 3`` worker sees no such variable. The master's command line says it, though:
gunicorn forks its workers (they keep the master's command line) and uvicorn spawns them as
children, so this process's command line and its parents' (``/proc/<pid>/cmdline``, Linux)
name the server and its ``--workers``. What is recognised:

- gunicorn: ``-w N`` / ``--workers N`` on the command line, then ``GUNICORN_CMD_ARGS``, then
  ``workers = N`` (a literal) in its config file (``-c``, default ``./gunicorn.conf.py`` in the
  master's working directory), then ``WEB_CONCURRENCY``, then 1, the order gunicorn applies;
- uvicorn: ``--workers N``, then ``WEB_CONCURRENCY``, then 1;
- celery: ``-c N`` / ``--concurrency N`` of ``celery worker`` (each prefork child opens a pool).

Anything else (a process manager that renames processes, a ``workers`` computed in Python, a
platform that is not Linux) is "not detected", and the declared value is used.
"""

from __future__ import annotations

import ast
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["DetectedWorkers", "detect_workers", "workers_from_argv"]

#: How many ancestors to look at: a worker, its master, and a wrapper such as ``python -m``.
_DEPTH: Final = 4
_WEB_CONCURRENCY: Final = "WEB_CONCURRENCY"


@dataclass(frozen=True, slots=True)
class DetectedWorkers:
    """A worker count and where it was read, for display."""

    count: int
    source: str


def detect_workers(
    pid: int | None = None, environ: Mapping[str, str] | None = None
) -> DetectedWorkers | None:
    """The worker count of the server that runs process `pid` (default: this one), or None."""
    environ = os.environ if environ is None else environ
    current = os.getpid() if pid is None else pid
    for _ in range(_DEPTH):
        argv = _cmdline(current)
        if _program(argv) is not None:
            # The server that runs us: its answer (or its silence, which leaves the count to
            # WEB_CONCURRENCY) is final; a grandparent's command line says nothing about it.
            found = workers_from_argv(argv, environ, cwd=_cwd(current))
            if found is None:
                return None
            return DetectedWorkers(found.count, f"{found.source} (pid {current})")
        parent = _parent(current)
        if parent is None or parent <= 1:
            return None
        current = parent
    return None


def workers_from_argv(
    argv: Sequence[str], environ: Mapping[str, str], *, cwd: Path | None = None
) -> DetectedWorkers | None:
    """The worker count a gunicorn / uvicorn / celery command line runs, or None."""
    program = _program(argv)
    if program is None:
        return None
    name, args = program
    if name == "gunicorn":
        return _gunicorn(args, environ, cwd)
    if name == "uvicorn":
        value = _option(args, ("--workers",))
        if value is not None:
            return _count(value, "uvicorn --workers")
        return _fallback("uvicorn", environ)
    if "worker" not in args:  # celery beat, flower, ...: no pools per child
        return None
    value = _option(args, ("-c", "--concurrency"))
    if value is not None:
        return _count(value, "celery worker --concurrency")
    cores = os.cpu_count() or 1
    return DetectedWorkers(cores, f"celery worker default concurrency (cpu count {cores})")


def _program(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """("gunicorn" | "uvicorn" | "celery", its arguments) when argv runs one of them."""
    for i, token in enumerate(argv[:3]):
        base = os.path.basename(token)
        if base in ("gunicorn", "uvicorn", "celery"):
            return base, list(argv[i + 1 :])
        if token == "-m" and i + 1 < len(argv) and argv[i + 1] in ("gunicorn", "uvicorn", "celery"):
            return argv[i + 1], list(argv[i + 2 :])
    return None


def _gunicorn(
    args: list[str], environ: Mapping[str, str], cwd: Path | None
) -> DetectedWorkers | None:
    value = _option(args, ("-w", "--workers"))
    if value is not None:
        return _count(value, "gunicorn --workers")
    env_args = environ.get("GUNICORN_CMD_ARGS", "")
    if env_args:
        value = _option(shlex.split(env_args), ("-w", "--workers"))
        if value is not None:
            return _count(value, "GUNICORN_CMD_ARGS --workers")
    config = _option(args, ("-c", "--config"))
    path = Path(config or "gunicorn.conf.py")
    if not path.is_absolute() and cwd is not None:
        path = cwd / path
    workers = _config_workers(path)
    if workers is not None:
        return _count(workers, f"workers in {path}")
    return _fallback("gunicorn", environ)


def _fallback(server: str, environ: Mapping[str, str]) -> DetectedWorkers | None:
    raw = environ.get(_WEB_CONCURRENCY, "").strip()
    if raw:  # the server's own default; resolve_processes validates and reports a bad value
        return None
    return DetectedWorkers(1, f"{server} without --workers (its default: 1)")


def _option(args: Sequence[str], names: tuple[str, ...]) -> str | None:
    """The last value given for an option, in its ``-w 3``, ``-w3`` or ``--workers=3`` form."""
    found: str | None = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                found = args[i + 1]
            elif name.startswith("--") and arg.startswith(name + "="):
                found = arg[len(name) + 1 :]
            elif not name.startswith("--") and arg.startswith(name) and len(arg) > len(name):
                found = arg[len(name) :]
    return found


def _count(value: str, source: str) -> DetectedWorkers | None:
    value = value.strip()
    if not value.isdigit() or int(value) < 1:
        return None
    return DetectedWorkers(int(value), f"{source} {int(value)}")


def _config_workers(path: Path) -> str | None:
    """``workers = <whole number>`` at the top level of a gunicorn config file, else None."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    found: str | None = None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "workers" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, int)
        ):
            found = str(node.value.value)
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
