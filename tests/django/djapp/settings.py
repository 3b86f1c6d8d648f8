"""Settings for the Django test app: DATABASES come from $POOLGUARD_DJANGO_DATABASES (JSON)."""

import json
import os

SECRET_KEY = "tests-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "djapp.urls"
INSTALLED_APPS = ["django.contrib.contenttypes", "poolguard.django", "djapp"]
MIDDLEWARE: list[str] = []
DATABASES = json.loads(os.environ.get("POOLGUARD_DJANGO_DATABASES", "{}"))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING_CONFIG = None
STATIC_URL = "static/"
