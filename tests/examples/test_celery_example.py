"""examples/celery_app: a real prefork worker (4 children forked after the app is imported) and
200 tasks queued at once.  No Redis or RabbitMQ offline: the queue and the results live in
PostgreSQL (kombu's SQLAlchemy transport, Celery's database result backend)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from exhelpers import EXAMPLES, Load, example_env, sample_sessions

from poolguard.testing import PostgresServer

pytest.importorskip("celery")
HERE = EXAMPLES / "celery_app"


def test_celery_prefork_worker_runs_200_queued_tasks(
    small_server: PostgresServer, small_db: str, tmp_path: Path
) -> None:
    db = small_db.rsplit("/", 1)[1]
    env = example_env(
        small_db,
        CELERY_BROKER_URL=small_db.replace("postgresql://", "sqla+postgresql+psycopg://"),
        CELERY_RESULT_BACKEND=small_db.replace("postgresql://", "db+postgresql+psycopg://"),
        POOLGUARD_MAX_SIZE="1",
        PYTHONFAULTHANDLER="1",
    )
    run = {"cwd": HERE, "env": env, "capture_output": True, "text": True, "timeout": 180}
    init = subprocess.run([sys.executable, "tasks.py", "init-db"], check=False, **run)
    assert init.returncode == 0, init.stderr
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork",
            "--concurrency", "4", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            "--without-heartbeat"]  # fmt: skip
    with log.open("w") as sink:
        worker = subprocess.Popen(argv, cwd=HERE, env=env, stdout=sink, stderr=subprocess.STDOUT)
    load, stop = Load(), threading.Event()
    sampler = threading.Thread(
        target=sample_sessions, args=(small_server, db, load, stop, "poolguard:default")
    )
    try:
        deadline = time.monotonic() + 60
        while "ready." not in log.read_text():
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        sampler.start()
        began = time.monotonic()
        sent = subprocess.run([sys.executable, "send.py", "200"], check=False, **run)
        load.seconds = time.monotonic() - began
        assert sent.returncode == 0 and "200 tasks done" in sent.stdout, sent.stderr[-3000:]
        load.ok = 200
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        worker.send_signal(signal.SIGTERM)  # warm shutdown: children run worker_process_shutdown
        code = worker.wait(timeout=60)
    print(f"celery: {load}")
    output = log.read_text()
    assert code == 0 and "Traceback" not in output, output[-3000:]
    # poolguard's sessions (Celery's broker and result connections are its own): 4 children x 1
    assert 1 <= load.peak_sessions <= 4, load.peak_sessions
    with small_server.connect(db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT n) FROM jobs").fetchone() == (200, 200)
