"""An app process for the ``poolguard top`` test: one pool, one connection held, metrics served.

Usage: python top_app.py POOL_NAME PORT  (DSN in $POOLGUARD_DSN); prints "ready" once serving,
exits when its stdin closes.
"""

from __future__ import annotations

import os
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import poolguard
import poolguard.prometheus


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    pool = poolguard.configure(os.environ["POOLGUARD_DSN"], name=name, min_size=2, max_size=3)
    poolguard.prometheus.instrument()
    for _ in range(10):
        with pool.connection() as conn:
            conn.execute("SELECT 1")
    held = pool.getconn()  # in use while the process runs
    server = make_server(
        "127.0.0.1", port, poolguard.prometheus.wsgi_app, handler_class=QuietHandler
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    server.shutdown()
    pool.putconn(held)


if __name__ == "__main__":
    main()
