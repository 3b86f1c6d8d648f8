"""A web app for the worker-count tests: each worker opens its pool and records the budget check.

Started by tests/test_workers.py under real ``gunicorn -w N`` and ``uvicorn --workers N``; the
budget check at open writes what it decided to $BUDGET_APP_OUT/<pid>.txt.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import poolguard

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    poolguard.configure(
        os.environ["BUDGET_APP_DSN"], max_size=int(os.environ["BUDGET_APP_MAX_SIZE"])
    ).open()
found = "\n".join(str(w.message) for w in caught if isinstance(w.message, poolguard.BudgetWarning))
(Path(os.environ["BUDGET_APP_OUT"]) / f"{os.getpid()}.txt").write_text(found or "fits")


def wsgi(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


async def asgi(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
