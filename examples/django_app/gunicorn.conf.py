"""gunicorn settings for the example shop: ``WEB_CONCURRENCY=2 gunicorn shop.wsgi``."""

import poolguard

# Django is set up once in the master, then the workers fork: poolguard drops any connection a
# child inherits (without closing the parent's session) and each worker checks out its own.
preload_app = True
# Request threads share their worker's pool (max_size 4 in shop/settings.py): 8 threads wait
# their turn for 4 connections instead of opening more.
worker_class = "gthread"
threads = 8
# workers: gunicorn reads WEB_CONCURRENCY (default 1; it never sets it); poolguard's budget
# check counts the workers the same way (or from -w).


def worker_exit(server, worker):
    """A worker is stopping: close its pools now, so its server sessions end with it."""
    poolguard.close_all()
