"""Requests/s of a simple ORM view: Django's own pool (OPTIONS["pool"]) vs ENGINE poolguard.django.

One private PostgreSQL, one process per configuration (Django is configured once per process),
the same view, the same threads, rounds interleaved so that drift hits every configuration.
Requests go through Django's WSGIHandler in-process (signals, middleware-free URL resolution,
request_started/request_finished and so each checkout and return), without an HTTP server.

    python benchmarks/bench_django.py [--threads 4] [--seconds 3] [--rounds 3]

It also times ``cursor.execute("SELECT 1")`` through poolguard's observing cursor wrapper vs
Django's own CursorWrapper on one connection, the cost of telling poolguard each statement.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "django pool": {
        "ENGINE": "django.db.backends.postgresql",
        "OPTIONS": {"pool": {"min_size": 4, "max_size": 4}},
    },
    "poolguard (transaction mode, guard on)": {
        "ENGINE": "poolguard.django",
        "OPTIONS": {"poolguard": {"min_size": 4, "max_size": 4}},
    },
    "poolguard (session mode)": {
        "ENGINE": "poolguard.django",
        "OPTIONS": {"poolguard": {"min_size": 4, "max_size": 4, "mode": "session"}},
    },
}


def view(request: Any) -> Any:
    from django.contrib.contenttypes.models import ContentType
    from django.http import HttpResponse

    return HttpResponse(str(ContentType.objects.filter(app_label="contenttypes").count()))


def _urls() -> list[Any]:
    from django.urls import path

    return [path("ct/", view)]


urlpatterns: list[Any] = []


def worker(database: dict[str, Any], threads: int, seconds: float) -> dict[str, float]:
    """In a fresh process: configure Django, then measure requests/s for ``seconds``."""
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": database},
        INSTALLED_APPS=["django.contrib.contenttypes"],
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="bench",
        USE_TZ=True,
        MIDDLEWARE=[],
        LOGGING_CONFIG=None,
    )
    django.setup()
    urlpatterns[:] = _urls()
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    handler = WSGIHandler()
    base = {
        "REQUEST_METHOD": "GET", "PATH_INFO": "/ct/", "SERVER_NAME": "bench",
        "SERVER_PORT": "80", "wsgi.url_scheme": "http",
    }  # fmt: skip

    def request() -> None:
        environ = {**base, "wsgi.input": io.BytesIO()}
        response = handler(environ, lambda status, headers: None)
        b"".join(response)
        response.close()  # fires request_finished: the connection goes back to its pool

    for _ in range(50):
        request()  # warm up: imports, URL resolution, the pool's connections
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        while time.monotonic() < stop:
            request()
            counts[i] += 1

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    result = {"requests_per_s": sum(counts) / seconds}
    if database["ENGINE"] == "poolguard.django":
        result.update(observe_cost())
    return result


def observe_cost(n: int = 3000) -> dict[str, float]:
    """Microseconds per execute("SELECT 1"): poolguard's observed cursor vs Django's own."""
    from django.db import connection
    from django.db.backends.utils import CursorWrapper

    connection.ensure_connection()
    raw = connection.connection
    timings = {}
    for name, wrap in (
        ("django_cursor_us", lambda: CursorWrapper(raw.cursor(), connection)),
        ("observed_cursor_us", lambda: connection.make_cursor(raw.cursor())),
    ):
        best = float("inf")
        for _ in range(3):
            cursor = wrap()
            started = time.perf_counter()
            for _ in range(n):
                cursor.execute("SELECT 1")
            best = min(best, (time.perf_counter() - started) / n * 1e6)
            cursor.close()
        timings[name] = best
    connection.close()
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(json.loads(args.worker), args.threads, args.seconds)
        print(json.dumps(result))
        return 0

    from poolguard.testing import start_postgres

    server = start_postgres()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    try:
        for _ in range(args.rounds):
            for name, config in CONFIGS.items():
                database = {
                    **config, "NAME": server.dbname, "USER": server.user,
                    "PASSWORD": server.password, "HOST": server.host, "PORT": server.port,
                }  # fmt: skip
                out = subprocess.run(
                    [sys.executable, __file__, "--threads", str(args.threads), "--seconds",
                     str(args.seconds), "--worker", json.dumps(database)],
                    capture_output=True, text=True, check=True, env={**os.environ},
                )  # fmt: skip
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        server.stop()

    print(
        f"Django ORM view (ContentType count), {args.threads} threads, pool max_size 4, "
        f"{args.rounds} rounds x {args.seconds:g} s, best round:"
    )
    baseline = max(r["requests_per_s"] for r in results["django pool"])
    for name, runs in results.items():
        best = max(r["requests_per_s"] for r in runs)
        print(f"  {name:<40} {best:8.0f} requests/s  ({best / baseline:.2f}x django pool)")
    observed = [r for runs in results.values() for r in runs if "observed_cursor_us" in r]
    if observed:
        django_us = min(r["django_cursor_us"] for r in observed)
        ours_us = min(r["observed_cursor_us"] for r in observed)
        print(
            f"  execute('SELECT 1'): Django's cursor {django_us:.1f} us, poolguard's observed "
            f"cursor {ours_us:.1f} us (+{ours_us - django_us:.1f} us per statement)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
