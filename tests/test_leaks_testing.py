"""The leak check that poolguard.testing offers users' test suites, run in a real pytest."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INNER = """
import os

import pytest

import poolguard

KEEP = []


@pytest.mark.poolguard_no_leaks
def test_leaky():
    pool = poolguard.configure(os.environ["LEAK_DSN"], min_size=0, leak_threshold=0)
    conn = pool.getconn()
    conn.execute("SELECT 'forgotten'")
    KEEP.append(conn)


@pytest.mark.poolguard_no_leaks
def test_clean():
    with poolguard.connection() as conn:
        conn.execute("SELECT 1")


def test_not_marked_is_not_checked():
    KEEP.append(poolguard.get_pool().getconn())
"""


def test_marker_fails_a_test_that_leaves_a_connection_out(
    pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEAK_DSN", pg_dsn)
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test left 1 poolguard connection(s) checked out:*",
            "*pool 'default': taken at test_inner.py:13 in test_leaky by thread 'MainThread', "
            "idle in transaction (an open transaction), last statement: SELECT '…'*",
        ]
    )


def test_ini_option_checks_every_test(
    pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEAK_DSN", pg_dsn)
    pytester.makepyfile(test_inner=INNER)
    pytester.makeini("[pytest]\npoolguard_no_leaks = true\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
