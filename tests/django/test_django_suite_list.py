"""The Django-suite gate's pinned list: its reading of runtests.py output, and docs/django.md.

The gate itself (Django's suite in both modes) runs as the ``django-suite`` tox environment.
"""

from __future__ import annotations

from pathlib import Path

import run_django_suite as suite

DOCS = Path(__file__).resolve().parents[2] / "docs" / "django.md"
START, END = "<!-- django-suite-expected:start -->", "<!-- django-suite-expected:end -->"

OUTPUT = """\
test_a (backends.tests.A.test_a) ... ok
test_b (backends.tests.A.test_b)
A docstring line ... FAIL
test_c (backends.tests.A.test_c) ... skipped 'no feature'
test_d (backends.tests.A.test_d) ... ERROR
test_e (backends.tests.A.test_e) ... ok

======================================================================
FAIL: test_b (backends.tests.A.test_b)
----------------------------------------------------------------------
ERROR: test_d (backends.tests.A.test_d)
Ran 5 tests in 0.1s
"""


def test_outcomes_read_from_verbose_output() -> None:
    assert suite.outcomes(OUTPUT) == {
        "backends.tests.A.test_a": "ok",
        "backends.tests.A.test_b": "FAIL",
        "backends.tests.A.test_c": "skipped",
        "backends.tests.A.test_d": "ERROR",
        "backends.tests.A.test_e": "ok",
    }


def test_gate_fails_on_new_failures_and_on_listed_tests_that_pass() -> None:
    found = suite.outcomes(OUTPUT)
    listed = {"backends.tests.A.test_b": "why", "backends.tests.A.test_e": "why"}
    assert suite.judge(found, listed) == [
        "fails, not in the list: backends.tests.A.test_d",
        "listed but passes now (remove it from django_suite_expected.json): "
        "backends.tests.A.test_e",
    ]
    listed = {"backends.tests.A.test_b": "why", "backends.tests.A.test_d": "why"}
    assert suite.judge(found, listed) == []


def test_failure_pinned_on_the_wrong_test_is_noticed() -> None:
    report = (
        "======================================================================\n"
        "ERROR: test_d (backends.tests.A.test_d)\n"
        "----------------------------------------------------------------------\n"
        'Traceback (most recent call last):\n  File "tests.py", line 9, in {name}\n'
        "    boom()\nValueError\n\n"
    )
    assert suite.consistent(report.format(name="test_d"))
    assert not suite.consistent(report.format(name="test_c"))


def test_list_is_short_and_every_entry_has_a_reason() -> None:
    transaction, session = suite.expected("transaction"), suite.expected("session")
    assert len(transaction) <= 8 and len(session) <= 4
    assert all(len(reason) > 40 for reason in {**transaction, **session}.values())


def test_docs_show_the_pinned_list() -> None:
    text = DOCS.read_text()
    assert START in text and END in text, f"{DOCS} lacks the {START} ... {END} block"
    shown = text.split(START, 1)[1].split(END, 1)[0].strip() + "\n"
    assert shown == suite.docs_table(), (
        "docs/django.md differs from tests/django/django_suite_expected.json: paste the output "
        "of `python tests/django/run_django_suite.py --docs` between the markers"
    )
