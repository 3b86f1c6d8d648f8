"""A Flask app on poolguard, served by gunicorn with preloaded, forked workers.

    pip install "poolguard[flask]"
    export DATABASE_URL=postgresql://app:secret@localhost/app
    flask --app app init-db
    WEB_CONCURRENCY=2 gunicorn app:app         # settings in gunicorn.conf.py

configure() runs at import, in gunicorn's master (preload_app = True): it opens no connection
there.  Each forked worker opens its own on first use, and never touches the master's.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

import poolguard

poolguard.configure()  # DATABASE_URL; POOLGUARD_MAX_SIZE etc. from the environment
app = Flask(__name__)


@app.cli.command("init-db")
def init_db() -> None:
    """Create the table (run once, before the server)."""
    with poolguard.connection() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS visits (id serial PRIMARY KEY, n int NOT NULL)")
    print("visits table ready")


@app.get("/double/<int:n>")
def double(n: int) -> dict[str, Any]:
    with poolguard.connection() as conn:  # commits on success, rolls back on error
        row = conn.execute("SELECT %s::int * 2", (n,)).fetchone()
    return {"n": n, "double": row[0] if row else None}


@app.post("/visit/<int:n>")
def visit(n: int) -> dict[str, Any]:
    with poolguard.connection() as conn:
        conn.execute("INSERT INTO visits (n) VALUES (%s)", (n,))
        row = conn.execute("SELECT count(*) FROM visits").fetchone()
    return {"visits": row[0] if row else None}


@app.get("/checked-out")
def checked_out() -> dict[str, int]:
    """Connections of this worker out right now, besides this request's (none)."""
    return {"checked_out": len(poolguard.report())}
