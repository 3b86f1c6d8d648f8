"""Where an async view took its connection, seen from the thread that took it.

Under ASGI, Django runs the ORM of an async view in a worker thread (asgiref's sync_to_async).
That thread's stack ends in the thread pool, not in the view: the view's line is in a suspended
coroutine on the event loop.  This finds the task whose ``SyncToAsync.__call__`` is waiting for
this very thread and returns the innermost app frame of its await chain.  It runs only for a
checkout whose recorded site is the thread pool, never on the WSGI path.

The walk runs on the loop's own thread (the worker waits for it, briefly): a coroutine frame
may only be read while it is suspended, and on its loop's thread, between two task steps, every
coroutine of that loop is.  Read from the worker thread instead, ``f_locals`` of a frame the
loop is executing at that moment crashes CPython.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from types import CodeType, FrameType
from typing import Any

from asgiref.sync import SyncToAsync

from .._ledger import is_library_code

_CALL = SyncToAsync.__call__.__code__
_HANDLER = SyncToAsync.thread_handler.__code__
# How long a worker waits for the loop to find its site (one loop iteration, normally).
_LOOKUP_TIMEOUT = 0.5
# The thread pool's own frames: a site there means "taken by a sync_to_async worker".
_POOL_FILES = ("concurrent/futures/thread.py", "threading.py")


def in_asgi_request() -> bool:
    """Whether this thread runs sync code for an event loop (an ASGI request's ORM calls)."""
    # asgiref leaves the loop in the thread-local after the call: only a running one counts.
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    if loop is not None and loop.is_running():
        return True
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def needs_site(code: CodeType | None) -> bool:
    return code is None or code.co_filename.endswith(_POOL_FILES)


def awaiting_site() -> tuple[CodeType, int] | None:
    """(code, line) of the app frame awaiting this sync_to_async thread, or None."""
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    handler = _own_frame(_HANDLER)
    if loop is None or handler is None:
        return None
    token = handler.f_locals.get("task_context")  # this thread's own frame: safe to read
    found: list[tuple[CodeType, int] | None] = []
    done = threading.Event()

    def look() -> None:
        try:
            found.append(_site_of_waiting_task(loop, token))
        finally:
            done.set()

    try:
        loop.call_soon_threadsafe(look)
    except RuntimeError:  # the loop is closed
        return None
    # Bounded: a loop that is itself blocked leaves the checkout's site at the thread pool.
    if not done.wait(_LOOKUP_TIMEOUT) or not found:
        return None
    return found[0]


def _site_of_waiting_task(
    loop: asyncio.AbstractEventLoop, token: object
) -> tuple[CodeType, int] | None:
    for task in asyncio.all_tasks(loop):
        frames = _await_chain(task.get_coro())
        for i, frame in enumerate(frames):
            if frame.f_code is _CALL and frame.f_locals.get("task_context") is token:
                return _innermost_app_frame(frames[:i])
    return None


def _own_frame(code: CodeType) -> FrameType | None:
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame


def _await_chain(coro: Any) -> list[FrameType]:
    """The frames of a suspended coroutine and of everything it awaits, outermost first."""
    frames = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def _innermost_app_frame(frames: list[FrameType]) -> tuple[CodeType, int] | None:
    for frame in reversed(frames):
        code = frame.f_code
        if not is_library_code(code):
            return code, frame.f_lineno
    return None
