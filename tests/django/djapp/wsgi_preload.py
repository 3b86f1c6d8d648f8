"""WSGI entry point that uses the database while loading, as apps often do at import time.

Under ``gunicorn --preload`` this runs once in the master, which then forks the workers with
that connection still open: the case where workers must not inherit the master's socket.
"""

import os

from django.core.wsgi import get_wsgi_application
from django.db import connection

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djapp.settings")
application = get_wsgi_application()
with connection.cursor() as cursor:  # left open on purpose: the master keeps this connection
    cursor.execute("SELECT 1")
