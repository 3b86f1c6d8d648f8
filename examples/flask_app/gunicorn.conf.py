"""gunicorn settings for the example (gunicorn reads this file from the working folder)."""

import poolguard

# Import the app once in the master, then fork: poolguard's pool is created there but opens no
# connection; every worker opens its own after the fork.
preload_app = True
# Threads share their worker's pool: 8 threads, max_size 4 connections (they queue for one).
worker_class = "gthread"
threads = 8
# workers: gunicorn reads WEB_CONCURRENCY (default 1); poolguard reads the same variable to
# check workers x max_size against the server's max_connections when the pool opens.


def worker_exit(server, worker):
    """A worker is stopping: close its pool, so its server sessions end now."""
    poolguard.reset()
