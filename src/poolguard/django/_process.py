"""What this Django process is doing: serving requests, running a management command, or tests.

poolguard's watchdog and server-side defaults are made for a process that serves requests,
where a transaction idle for seconds is nearly always a bug.  A migration that pauses in a data
step, ``manage.py shell`` with a ``pdb`` prompt inside ``atomic()``, a command waiting on I/O and
a ``TestCase`` that holds one transaction for a whole class all do that on purpose.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

from django.core import mail  # type: ignore[import-untyped]

Kind = Literal["serving", "command", "tests"]

#: Management commands that serve requests: they keep the serving defaults.
SERVING_COMMANDS = frozenset({"runserver", "testserver"})
_LAUNCHERS = ("manage.py", "django-admin", "django-admin.py")


def process_kind(argv: list[str] | None = None) -> Kind:
    """``tests`` while Django's test environment is set up (its test runner, pytest-django),
    ``command`` in a management command other than runserver, else ``serving``."""
    # setup_test_environment() installs the in-memory outbox; teardown removes it.
    if hasattr(mail, "outbox"):
        return "tests"
    return _ARGV_KIND if argv is None else _command_kind(argv)


def _command_kind(argv: list[str]) -> Kind:
    command = management_command(argv)
    return "command" if command is not None and command not in SERVING_COMMANDS else "serving"


def management_command(argv: list[str]) -> str | None:
    """The subcommand of ``manage.py X``, ``django-admin X`` or ``python -m django X``."""
    if len(argv) < 2:
        return None
    launcher = argv[0]
    if os.path.basename(launcher) in _LAUNCHERS or launcher.endswith(
        os.path.join("django", "__main__.py")
    ):
        return argv[1]
    return None


def defaults_for(kind: Kind, ours: dict[str, Any]) -> None:
    """Adjust poolguard's settings (``OPTIONS["poolguard"]``, in place) for this process."""
    if kind == "serving":
        return
    # The server ends a session idle in a transaction past this; outside request serving that
    # is a deliberate pause, so the server's own setting applies (docs/django.md).
    ours["idle_in_transaction_session_timeout"] = 0
    if kind == "tests":
        # TestCase holds one transaction per class and the runner holds its connections for
        # the whole run: by design, so no warnings.  A real leak in a test still fails under
        # the poolguard_no_leaks pytest marker, which reads the checkouts themselves.
        ours.update(leak_threshold=0, idle_in_transaction_threshold=0, leak_reclaim_after=0)


# A process's command line does not change: read it once.
_ARGV_KIND: Kind = _command_kind(sys.argv)
