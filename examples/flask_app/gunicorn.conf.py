"""gunicorn settings for the example (gunicorn reads this file from the working folder)."""

import poolguard

# Import the app once in the master, then fork: poolguard's pool is created there but opens no
# connection; every worker opens its own after the fork.
preload_app = True
# Threads share their worker's pool: 8 threads, max_size 4 connections (they queue for one).
worker_class = "gthread"
threads = 8
# workers: gunicorn reads WEB_CONCURRENCY (default 1; it never sets it); poolguard counts the
# workers the same way (or from -w) to check workers x max_size against max_connections.


def worker_exit(server, worker):
    """A worker is stopping: close its pool, so its server sessions end now."""
    poolguard.close_all()
