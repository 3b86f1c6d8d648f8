"""``manage.py poolguard doctor``: every alias on one server adds up in one budget."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from djhelpers import db_entry

from poolguard.testing import PostgresServer


@pytest.fixture(scope="module")
def small_server(postgres_factory: Any) -> PostgresServer:
    server: PostgresServer = postgres_factory(max_connections=20)
    server.create_database("doctor_app")
    return server


def doctor(
    run_django: Callable[..., subprocess.CompletedProcess[str]],
    server: PostgresServer,
    *args: str,
) -> tuple[int, dict[str, Any]]:
    databases = {
        "default": db_entry(server, "doctor_app", mode="session", max_size=4),
        "reports": db_entry(server, "doctor_app", mode="session", max_size=4),
    }
    result = run_django(
        ["-m", "django", "poolguard", "doctor", "--json", "--cores", "8", *args], databases
    )
    assert server.password not in result.stdout + result.stderr
    return result.returncode, json.loads(result.stdout)


def test_two_aliases_on_one_server_add_up(
    run_django: Callable[..., subprocess.CompletedProcess[str]], small_server: PostgresServer
) -> None:
    code, report = doctor(run_django, small_server, "--processes", "4")
    budget = report["budget"]
    assert code != 0  # CommandError: problems found
    assert budget["pools"] == {"default": 4, "reports": 4}
    assert (budget["max_size"], budget["demand"], budget["usable"]) == (8, 32, 17)
    assert budget["fits"] is False
    assert (
        "demand      = max_size 4 (default) + 4 (reports) = 8 x processes 4 = 32 > usable 17"
        in (budget["formula"])
    )
    assert report["problems"][0] == (
        "4 process(es) x max_size 8 = 32 exceeds the 17 usable connections: set max_size <= 4 "
        "or run fewer processes"
    )
    # 4 per process across both aliases: 2 each.
    assert report["suggested_max_size"] == {"default": 2, "reports": 2}


def test_one_process_is_never_told_to_take_the_whole_server(
    run_django: Callable[..., subprocess.CompletedProcess[str]], small_server: PostgresServer
) -> None:
    code, report = doctor(run_django, small_server, "--processes", "1")
    assert code == 0
    assert report["budget"]["demand"] == 8 and report["budget"]["fits"] is True
    assert report["suggested_max_size"] == {"default": 4, "reports": 4}
    assert "'max_size': 4" in report["settings"]["django"]
    assert "17" not in report["settings"]["django"]
    assert report["fixes"] == []
