"""From a ``DATABASES`` entry to poolguard Settings: which keys go where, and what they mean.

``OPTIONS`` holds three kinds of keys, as it does for Django's own backend:

- poolguard's settings, under ``OPTIONS["poolguard"]`` (a dict), never flat: libpq owns the flat
  namespace and already uses some of the same names (``connect_timeout``, ``application_name``);
- Django's own Python-level options (``isolation_level``, ``assume_role``,
  ``server_side_binding``, ``prepare_threshold``, and ``pool``, whose sizes are translated);
- everything else, handed to libpq as connection parameters (``sslmode``, ``options``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from psycopg.conninfo import make_conninfo

from .._errors import ConfigurationError
from .._redact import redact_text
from .._settings import Settings, build_settings
from ._cursors import cursor_class
from ._process import Kind, defaults_for

#: Keys of Django's ``OPTIONS["pool"]`` (psycopg_pool arguments) that mean the same in poolguard.
POOL_KEYS = frozenset(
    {"min_size", "max_size", "timeout", "max_idle", "max_lifetime", "max_waiting"}
)
#: libpq parameters that are also poolguard settings: poolguard applies them itself.
_SHARED_KEYS = ("connect_timeout", "application_name")
#: Options Django reads in Python, never sent to libpq.
_DJANGO_KEYS = frozenset({"isolation_level", "assume_role", "server_side_binding", "pool"})
#: What Django's get_connection_params() adds that is not a libpq parameter.
_PYTHON_PARAMS = frozenset({"context", "cursor_factory", "prepare_threshold", "poolguard"})


@dataclass(frozen=True)
class Resolved:
    """One DATABASES entry, understood: the pool's settings and the per-connection choices."""

    settings: Settings
    #: The keyword arguments that give ``settings`` to poolguard.configure().
    options: Mapping[str, Any]
    #: The connections' cursor_factory: Django's (or OPTIONS["cursor_factory"]).
    cursor_class: type
    assume_role: str | None


def pool_name(alias: str) -> str:
    """The poolguard pool that serves the Django database ``alias``."""
    return f"django:{alias}"


def resolve(
    alias: str, settings_dict: Mapping[str, Any], params: Mapping[str, Any], kind: Kind
) -> Resolved:
    """Understand ``settings_dict`` (``params``: Django's get_connection_params() for it) in a
    process of ``kind`` (_process.process_kind())."""
    where = f"DATABASES[{alias!r}]['OPTIONS']"
    options = dict(settings_dict.get("OPTIONS") or {})
    ours = options.get("poolguard", {})
    if not isinstance(ours, Mapping):
        raise ImproperlyConfigured(
            f"{where}['poolguard'] must be a dict of poolguard settings, got {type(ours).__name__}"
        )
    ours = dict(ours)
    if "name" in ours:
        raise ImproperlyConfigured(
            f"{where}['poolguard']['name'] cannot be set: the backend names the pool "
            f"{pool_name(alias)!r} after the alias"
        )
    max_age = settings_dict.get("CONN_MAX_AGE", 0)
    _translate_django_pool(where, options.get("pool"), max_age, ours)
    for key in (*_SHARED_KEYS, "prepare_threshold"):
        if key in options:
            value = options[key]
            ours.setdefault(key, _number(value) if key == "connect_timeout" else value)
    if max_age and "max_lifetime" not in ours:
        ours["max_lifetime"] = max_age
    if settings_dict.get("CONN_HEALTH_CHECKS") and "health_check" not in ours:
        ours["health_check"] = True
    defaults_for(kind, ours)

    dropped = _PYTHON_PARAMS | _DJANGO_KEYS | set(_SHARED_KEYS)
    libpq = {k: v for k, v in params.items() if k not in dropped and v is not None}
    try:
        settings = build_settings(make_conninfo("", **libpq), name=pool_name(alias), **ours)
    except ConfigurationError as exc:
        raise ImproperlyConfigured(
            f"{where}['poolguard']: {redact_text(str(exc), settings_dict, params)}"
        ) from None
    except Exception as exc:  # make_conninfo rejects an unknown libpq parameter
        raise ImproperlyConfigured(
            f"{where}: {redact_text(str(exc), settings_dict, params)}"
        ) from None
    role = options.get("assume_role") or None
    if role and settings.mode != "session":  # mode="auto" may find a transaction pooler
        raise ImproperlyConfigured(
            f"{where}['assume_role'] needs {where}['poolguard']['mode'] = 'session': SET ROLE "
            "is session state that a transaction-mode pooler does not carry between transactions"
        )
    return Resolved(
        settings=settings,
        options=ours,
        cursor_class=cursor_class(options),
        assume_role=role,
    )


def _translate_django_pool(where: str, pool: Any, max_age: Any, ours: dict[str, Any]) -> None:
    """Honour Django's ``OPTIONS["pool"]`` the way Django does, so switching ENGINE is the
    whole change: its sizes become poolguard's, and what Django refuses is refused."""
    if not pool:
        return
    if max_age != 0:
        # Django's own message: a pooled connection goes back at the end of each request.
        raise ImproperlyConfigured(
            f"{where}['pool']: Pooling doesn't support persistent connections. Set CONN_MAX_AGE "
            f"to 0, or drop 'pool' (poolguard pools anyway) and keep CONN_MAX_AGE as "
            "max_lifetime"
        )
    if pool is True:
        return
    if not isinstance(pool, Mapping):
        raise ImproperlyConfigured(f"{where}['pool'] must be True or a dict")
    for key, value in pool.items():
        if key not in POOL_KEYS:
            raise ImproperlyConfigured(
                f"{where}['pool'][{key!r}] has no poolguard equivalent (supported: "
                f"{', '.join(sorted(POOL_KEYS))}; other settings go in {where}['poolguard'])"
            )
        if key in ours and ours[key] != value:
            raise ImproperlyConfigured(
                f"{where} sets {key!r} twice, as ['pool'][{key!r}] = {value!r} and "
                f"['poolguard'][{key!r}] = {ours[key]!r}: keep one"
            )
        ours[key] = value


def _number(value: Any) -> Any:
    """libpq parameters are often given as strings ("10"); poolguard wants numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
