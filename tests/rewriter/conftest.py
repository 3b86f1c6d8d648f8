from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from poolguard import rewriter


@pytest.fixture
def make_rewriter(pg_dsn: str) -> Iterator[Callable[..., rewriter.RewriterHandle]]:
    """Start rewriters in front of this test's fresh database (or ``upstream``); all stopped at
    teardown."""
    handles: list[rewriter.RewriterHandle] = []

    def factory(upstream: str | None = None, **kwargs: Any) -> rewriter.RewriterHandle:
        kwargs.setdefault("pool_size", 2)
        kwargs.setdefault("isolate", False)  # in process, so tests can look at its state
        # Default: uvloop if installed. POOLGUARD_REWRITER_UVLOOP=0/1 forces one event loop.
        kwargs.setdefault(
            "use_uvloop",
            {"0": False, "1": True}.get(os.environ.get("POOLGUARD_REWRITER_UVLOOP", "")),
        )
        handle = rewriter.start(upstream or pg_dsn, **kwargs)
        handles.append(handle)
        return handle

    try:
        yield factory
    finally:
        for handle in handles:
            handle.stop()


@pytest.fixture
def proxy(make_rewriter: Callable[..., rewriter.RewriterHandle]) -> rewriter.RewriterHandle:
    """A rewriter with two server connections."""
    return make_rewriter()
