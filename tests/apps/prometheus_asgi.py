"""An ASGI app for the Prometheus test under uvicorn: /work takes a connection, the rest is
poolguard.prometheus.asgi_app."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import poolguard
import poolguard.prometheus

poolguard.configure(os.environ["POOLGUARD_DSN"], name="asgi", min_size=1, max_size=2)
poolguard.prometheus.instrument(interval=0.2)


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Any]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "http" and scope["path"] == "/work":
        async with poolguard.aconnection("asgi") as conn:
            await conn.execute("SELECT 1")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await poolguard.prometheus.asgi_app(scope, receive, send)
