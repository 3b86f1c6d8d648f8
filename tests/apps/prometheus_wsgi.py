"""A WSGI app for the Prometheus multiprocess test: one pool per gunicorn worker.

/work   takes a connection and runs a query (?hold=S: pg_sleep(S), holding it S seconds)
/starve holds the pool's only connection and asks for a second: that wait times out
/pid    the worker's pid
/metrics poolguard.prometheus.wsgi_app
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import poolguard
import poolguard.prometheus

poolguard.configure(
    os.environ["POOLGUARD_DSN"], name="web", min_size=1, max_size=1, timeout=5, leak_threshold=0
)
poolguard.prometheus.instrument(interval=0.2)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/metrics":
        return poolguard.prometheus.wsgi_app(environ, start_response)
    body: dict[str, Any] = {"pid": os.getpid()}
    if path == "/work":
        hold = float(environ.get("QUERY_STRING", "").partition("hold=")[2] or 0)
        with poolguard.connection("web") as conn:
            conn.execute("SELECT pg_sleep(%s)", (hold,))
    elif path == "/starve":
        with poolguard.connection("web"):
            try:
                with poolguard.connection("web", timeout=0.05):
                    pass
            except poolguard.PoolExhausted:
                body["timed_out"] = True
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
