"""The Django backend shows no password when DATABASES holds a bad entry: a property test."""

from __future__ import annotations

import traceback
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.usefixtures("django_databases")

MARKER = "Qz7"
passwords = st.builds(
    lambda core, tail: MARKER + core + tail,
    st.text("abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=6, max_size=10),
    st.text("@:/ %'\\?&=#+xyz", max_size=4),
)
# What is wrong with the entry: each one makes the backend refuse it.
MISTAKES: list[dict[str, Any]] = [
    {"OPTIONS": {"sslmod": "require"}},
    {"OPTIONS": {"poolguard": {"max_size": 0}}},
    {"OPTIONS": {"poolguard": {"max_sise": 3}}},
    {"PORT": "notaport"},
    {"OPTIONS": {"sslmode": "bogus", "poolguard": {"budget": "loud"}}},
    {"OPTIONS": {"pool": {"num_workers": 2}}},
    {"OPTIONS": {"assume_role": "owner"}},
    {"OPTIONS": {"poolguard": {"direct_dsn": "postgres//app:{pw}@h/app"}}},
    {"OPTIONS": {"poolguard": {"direct_dsn": "app:{pw}@h/app"}}},
    {"OPTIONS": {"poolguard": {"direct_dsn": "postgresql://app:{pw}@h:x/app"}}},
]


def _entry(pw: str, where: str, mistake: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "ENGINE": "poolguard.django",
        "NAME": "app",
        "USER": "app",
        "PASSWORD": "",
        "HOST": "127.0.0.1",
        "PORT": "5432",
        "OPTIONS": {},
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": False,
        "AUTOCOMMIT": True,
        "TIME_ZONE": None,
        "ATOMIC_REQUESTS": False,
        "TEST": {},
    }
    for key, value in mistake.items():
        if isinstance(value, dict):
            value = {
                k: (
                    {kk: str(vv).format(pw=pw) for kk, vv in v.items()}
                    if isinstance(v, dict)
                    else v
                )
                for k, v in value.items()
            }
        entry[key] = value
    if where == "PASSWORD":
        entry["PASSWORD"] = pw
    elif where == "OPTIONS":
        entry["OPTIONS"] = {**entry["OPTIONS"], "password": pw}
    return entry


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    pw=passwords,
    where=st.sampled_from(["PASSWORD", "OPTIONS", "direct_dsn only"]),
    mistake=st.sampled_from(MISTAKES),
)
def test_bad_databases_entry_never_shows_the_password(
    pw: str, where: str, mistake: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from poolguard.django.base import DatabaseWrapper

    caplog.clear()
    wrapper = DatabaseWrapper(_entry(pw, where, mistake), "leaky_test")
    shown = [repr(wrapper)]
    try:
        wrapper._pg_resolved()
    except ImproperlyConfigured as exc:
        shown += [str(exc), repr(exc), *traceback.format_exception(exc)]
    else:
        shown.append("resolved")
    shown.append(caplog.text)
    for text in shown:
        for form in (pw, quote(pw, safe=""), MARKER + pw[3:9]):
            assert form not in text, text
