"""Settings of the example project.  The only poolguard line is ENGINE (and the optional app)."""

import os
from urllib.parse import unquote, urlsplit

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "shop.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "static/"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "poolguard.django",  # optional: `manage.py poolguard`, and migrate through DIRECT_URL
    "shop",
]

# postgresql://user:password@host:port/dbname, e.g. from your platform or `python demo.py`.
_url = urlsplit(os.environ.get("DATABASE_URL", "postgresql://localhost/shop"))
DATABASES = {
    "default": {
        "ENGINE": "poolguard.django",  # the one-line change from django.db.backends.postgresql
        "NAME": _url.path.lstrip("/"),
        "USER": unquote(_url.username or ""),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "",
        "PORT": _url.port or "",
        # Optional: poolguard's settings (docs/django.md).  Behind PgBouncer in transaction
        # mode, keep the default mode and give migrations a direct DSN (or set DIRECT_URL).
        "OPTIONS": {"poolguard": {"max_size": 4, "leak_threshold": 5}},
    }
}
