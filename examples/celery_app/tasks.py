"""Celery workers on poolguard: the pool is set up before the fork, each child connects after.

    pip install "poolguard[celery]"
    export DATABASE_URL=postgresql://app:secret@localhost/app
    export CELERY_BROKER_URL=redis://localhost:6379/0 CELERY_RESULT_BACKEND=redis://localhost:6379/1
    python tasks.py init-db
    POOLGUARD_MAX_SIZE=1 celery -A tasks worker --pool prefork --concurrency 4
    python send.py 200

Without Redis or RabbitMQ (development, CI), PostgreSQL itself can carry the queue and the
results (SQLAlchemy is then needed; these connections are Celery's, outside poolguard's pool):
CELERY_BROKER_URL=sqla+postgresql+psycopg://... CELERY_RESULT_BACKEND=db+postgresql+psycopg://...
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown

import poolguard

app = Celery("tasks")
app.conf.broker_url = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
app.conf.result_backend = os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/1")

# At import, which for `celery worker --pool prefork` happens in the parent process, before it
# forks its children: the pool is created there but opens no connection.  Each child opens its
# own on first use; a child runs one task at a time, so max_size=1 per child is enough
# (workers x concurrency x max_size is what the server must fit).
poolguard.configure()


@app.task
def record(n: int) -> int:
    """One unit of work: a row written in a transaction, its result returned."""
    with poolguard.connection() as conn:  # commits on success, rolls back on error
        conn.execute("INSERT INTO jobs (n) VALUES (%s)", (n,))
        row = conn.execute("SELECT %s::int * 2", (n,)).fetchone()
    return int(row[0]) if row else -1


@worker_process_shutdown.connect
def close_pool(**kwargs: Any) -> None:
    """A child is exiting (warm shutdown, max_tasks_per_child): end its sessions now."""
    poolguard.close_all()


def init_db() -> None:
    with poolguard.connection() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS jobs (id serial PRIMARY KEY, n int NOT NULL)")
    poolguard.close_all()
    print("jobs table ready")


if __name__ == "__main__" and sys.argv[1:] == ["init-db"]:
    init_db()
