"""The checkout ledger: one record per connection that is out of the pool right now.

A record says who took the connection (thread or asyncio task), when, and where: the first frame
outside poolguard, the drivers and the ORMs, so a report points at the app's own line.  Capture
is cheap on purpose (a short walk up the frame chain keeping only the code object and line
number): no frame, and so no local variable, is kept alive by the ledger.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import threading
from pathlib import Path
from time import monotonic
from types import CodeType
from typing import Any, Final

_here = str(Path(__file__).resolve().parent) + os.sep


def _package_dir(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))).resolve()) + os.sep


# Frames from these folders are never "where it was taken": the app's line is further up.
_internal_dirs: tuple[str, ...] = (
    _here,
    *tuple(
        d
        for d in map(_package_dir, ("psycopg", "psycopg_pool", "django", "sqlalchemy", "asgiref"))
        if d
    ),
    # SQLAlchemy compiles some wrappers at run time (Session._connection_for_bind among them);
    # their code objects carry this pseudo file name, not a path under sqlalchemy/.
    "<sqlalchemy generated ",
)
_internal_files: tuple[str, ...] = ("contextlib.py",)


# code object -> is it library code?  Deciding once per code object keeps the walk cheap.
_is_internal: dict[CodeType, bool] = {}


def _classify(code: CodeType) -> bool:
    if len(_is_internal) > 20_000:  # bounded: code objects of reloaded modules pile up
        _is_internal.clear()
    filename = code.co_filename
    internal = filename.startswith(_internal_dirs) or filename.endswith(_internal_files)
    _is_internal[code] = internal
    return internal


def is_library_code(code: CodeType) -> bool:
    """Whether frames of ``code`` are poolguard's, a driver's or an ORM's (never "taken at")."""
    internal = _is_internal.get(code)
    return _classify(code) if internal is None else internal


# id(code) -> (code, verdict): False for app code, True for library code, or, for the first
# library frame of a walk, (frames up to the app's frame, the app's code). An ORM checkout
# starts 15-25 library frames below the app, and each step up the chain costs a frame object
# (about 0.2 us); sys._getframe(n) jumps n frames in C instead. The jump is trusted only when
# it lands on the same app code as last time; any other stack walks again. Keyed by id():
# hashing a code object hashes its bytecode and constants on every lookup; the code is kept
# in the value, so its id cannot be reused while listed.
_verdicts: dict[int, tuple[CodeType, Any]] = {}


def caller_site(depth: int) -> tuple[CodeType | None, int]:
    """(code object, line) of the first frame at or above ``depth`` that is not library code."""
    frame: Any = sys._getframe(depth)
    code = frame.f_code
    known = _verdicts.get(id(code))
    verdict = _judge(code) if known is None else known[1]
    if verdict is False:
        return code, frame.f_lineno
    if verdict is not True:
        skip, site_code = verdict
        try:
            site: Any = sys._getframe(depth + skip)
        except ValueError:  # a shorter stack than last time
            site = None
        if site is not None and site.f_code is site_code:
            return site_code, site.f_lineno
    return _walk(frame)


def _judge(code: CodeType) -> bool:
    if len(_verdicts) > 20_000:  # bounded, like _is_internal
        _verdicts.clear()
    internal = is_library_code(code)
    _verdicts[id(code)] = (code, internal)
    return internal


def _walk(frame: Any) -> tuple[CodeType | None, int]:
    first = frame.f_code
    steps = 0
    while frame is not None:
        code = frame.f_code
        known = _verdicts.get(id(code))
        if (_judge(code) if known is None else known[1]) is False:
            if steps > 1:  # one step costs less than a jump
                _verdicts[id(first)] = (first, (steps, code))
            return code, frame.f_lineno
        frame = frame.f_back
        steps += 1
    return None, 0


def format_site(code: CodeType | None, line: int) -> str:
    """'path/to/file.py:88 in view', the path relative to the working folder when inside it."""
    if code is None:
        return "<unknown>"
    filename = code.co_filename
    cwd = os.getcwd() + os.sep
    if filename.startswith(cwd):
        filename = filename[len(cwd) :]
    return f"{filename}:{line} in {code.co_name}"


# What the hot path stores per checkout: a plain tuple is several times cheaper to build than
# an object.  Only this module knows its layout; the pools' hot path reads TAKEN_AT by name,
# everything else reads Checkout views.
Entry = tuple[float, int, "CodeType | None", int, int, Any]
TAKEN_AT: Final = 0
OWNER: Final = 1
CODE: Final = 2
LINE: Final = 3
BACKEND_PID: Final = 4
REF: Final = 5


class Checkout:
    """A readable view of one ledger entry: who has the connection, since when, taken where."""

    __slots__ = (
        "backend_pid", "code", "conn_id", "connection", "line", "owner", "taken_at", "token",
    )  # fmt: skip

    def __init__(self, conn_id: int, entry: Entry) -> None:
        self.conn_id = conn_id
        self.taken_at, self.owner, self.code, self.line, self.backend_pid, ref = entry
        self.connection = ref  # a weakref: None once the connection is gone
        #: This checkout's identity: the same connection taken again is another checkout.
        self.token = entry

    @property
    def site(self) -> str:
        return format_site(self.code, self.line)

    @property
    def age(self) -> float:
        return monotonic() - self.taken_at

    def owner_name(self) -> str:
        thread = threading._active.get(self.owner)  # type: ignore[attr-defined]
        if thread is not None:
            return str(thread.name)
        try:  # an async pool's owner is a task: id(task), looked up in the running loop
            task = next((t for t in asyncio.all_tasks() if id(t) == self.owner), None)
        except RuntimeError:  # no running loop in this thread
            task = None
        return f"task {task.get_name()}" if task else f"owner {self.owner} (gone)"


class Ledger:
    """The checkouts of one pool, keyed by ``id(connection)``.

    Verbs: ``take`` (a checkout), ``give_back`` (a return), ``claim`` (the watchdog takes a
    checkout from under its holder), ``move`` (a checkout is re-attributed to another line).
    """

    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out: dict[int, Entry] = {}

    def take(
        self,
        conn_id: int,
        taken_at: float,
        owner: int,
        code: CodeType | None,
        line: int,
        backend_pid: int,
        ref: Any,
    ) -> None:
        """Record a checkout; ``ref`` is a weak reference to the connection."""
        self.out[conn_id] = (taken_at, owner, code, line, backend_pid, ref)

    def give_back(self, conn_id: int) -> Entry | None:
        """Remove the checkout of a returned connection; None if it is not checked out."""
        return self.out.pop(conn_id, None)

    def claim(self, record: Checkout) -> bool:
        """Remove ``record`` if it is still the connection's checkout (its holder may have
        returned it, and maybe taken it again, meanwhile)."""
        if self.out.get(record.conn_id) is not record.token:
            return False
        del self.out[record.conn_id]
        return True

    def move(self, conn_id: int, code: CodeType | None, line: int) -> None:
        """Attribute a checkout to another line (an adapter knows a better "taken at")."""
        entry = self.out.get(conn_id)
        if entry is not None:
            taken_at, owner, _, _, backend_pid, ref = entry
            self.out[conn_id] = (taken_at, owner, code, line, backend_pid, ref)

    def record(self, conn_id: int) -> Checkout | None:
        entry = self.out.get(conn_id)
        return Checkout(conn_id, entry) if entry is not None else None

    def holds(self, record: Checkout) -> bool:
        """Whether ``record`` is still out (not returned, claimed or re-taken)."""
        return self.out.get(record.conn_id) is record.token

    def records(self) -> list[Checkout]:
        """Every checkout now, oldest first."""
        items = list(self.out.items())  # a copy: other threads add and remove meanwhile
        return sorted((Checkout(k, v) for k, v in items), key=lambda r: r.taken_at)

    def oldest(self) -> Checkout | None:
        records = self.records()
        return records[0] if records else None

    def __len__(self) -> int:
        return len(self.out)
