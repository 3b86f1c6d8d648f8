"""Waiting in tests for something a server or another thread does: polled against a deadline,
never a fixed sleep, so a loaded machine only makes a test slower."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {what}")
        time.sleep(0.02)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie left for its parent to reap has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
