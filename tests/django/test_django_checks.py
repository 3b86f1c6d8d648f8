"""poolguard.W001: DIRECT_URL set, poolguard.django not installed, so migrate ignores it.

Each case is a real ``django-admin`` process on a settings module without the app (or with it),
the way a project that forgot the INSTALLED_APPS line runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("django")

SETTINGS = """\
import os
from psycopg.conninfo import conninfo_to_dict

SECRET_KEY = "test"
INSTALLED_APPS = ["django.contrib.contenttypes"] + (
    ["poolguard.django"] if os.environ.get("WITH_APP") else []
)
db = conninfo_to_dict(os.environ["DATABASE_URL"])
DATABASES = {
    "default": {
        "ENGINE": "poolguard.django",
        "NAME": db["dbname"], "USER": db["user"], "PASSWORD": db["password"],
        "HOST": db["host"], "PORT": db["port"],
        "OPTIONS": {"poolguard": {"direct_dsn": os.environ.get("IN_OPTIONS", "")}},
    }
}
"""


def django_admin(
    tmp_path: Path, dsn: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "w001_settings.py").write_text(SETTINGS)
    clean = {k: v for k, v in os.environ.items() if k not in ("DIRECT_URL", "POOLGUARD_DIRECT_DSN")}
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=tmp_path,
        env={**clean, "PYTHONPATH": str(tmp_path), "DJANGO_SETTINGS_MODULE": "w001_settings",
             "DATABASE_URL": dsn, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_migrate_warns_when_the_direct_dsn_would_be_ignored(pg_dsn: str, tmp_path: Path) -> None:
    done = django_admin(tmp_path, pg_dsn, "migrate", "--verbosity", "0", DIRECT_URL=pg_dsn)
    assert done.returncode == 0, done.stderr
    assert "(poolguard.W001) DATABASES['default'] has a direct DSN (DIRECT_URL)" in done.stderr
    assert "add 'poolguard.django' to INSTALLED_APPS" in done.stderr


@pytest.mark.parametrize(
    ("env", "source"),
    [({"POOLGUARD_DIRECT_DSN": "host=db"}, "POOLGUARD_DIRECT_DSN"),
     ({"IN_OPTIONS": "host=db"}, "OPTIONS['poolguard']['direct_dsn']")],
)  # fmt: skip
def test_check_database_names_where_the_direct_dsn_comes_from(
    pg_dsn: str, tmp_path: Path, env: dict[str, str], source: str
) -> None:
    done = django_admin(tmp_path, pg_dsn, "check", "--database", "default", **env)
    assert f"(poolguard.W001) DATABASES['default'] has a direct DSN ({source})" in done.stderr


@pytest.mark.parametrize("env", [{"WITH_APP": "1", "DIRECT_URL": "host=db"}, {}])
def test_no_warning_with_the_app_or_without_a_direct_dsn(
    pg_dsn: str, tmp_path: Path, env: dict[str, str]
) -> None:
    done = django_admin(tmp_path, pg_dsn, "check", "--database", "default", **env)
    assert done.returncode == 0 and "poolguard.W001" not in done.stderr + done.stdout, done.stderr
    assert "no issues" in done.stdout
