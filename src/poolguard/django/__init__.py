"""poolguard for Django: ``ENGINE = "poolguard.django"``.

One settings change::

    DATABASES = {
        "default": {
            "ENGINE": "poolguard.django",
            "NAME": "app", "USER": "app", "PASSWORD": "...", "HOST": "db", "PORT": 5432,
            "OPTIONS": {"poolguard": {"max_size": 4}},   # optional
        }
    }

Add ``"poolguard.django"`` to ``INSTALLED_APPS`` for ``manage.py poolguard`` and for
``manage.py migrate`` through the direct DSN.  docs/django.md has the details.
"""

from __future__ import annotations

from typing import Any

__all__ = ["direct_connection", "pool_for"]


def __getattr__(name: str) -> Any:
    # The backend module imports Django's database machinery, which needs configured settings;
    # importing poolguard.django (INSTALLED_APPS does, early) must not.
    if name in __all__:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
