"""poolguard's exceptions and warnings.

Exceptions subclass psycopg's, so code that already catches ``psycopg.OperationalError`` or
``psycopg_pool.PoolTimeout`` keeps working; each message says what to do next.
"""

from __future__ import annotations

import psycopg
import psycopg_pool


class ConfigurationError(psycopg.ProgrammingError):
    """A setting is missing, unknown or out of range; the message names it and what is allowed."""


class PoolExhausted(psycopg_pool.PoolTimeout):
    """No connection became free within the checkout timeout; names the oldest holder."""


class PoolConnectError(psycopg.OperationalError):
    """The pool could not open a connection; the message names host, port, user and database."""


class ConnectionReclaimed(psycopg.OperationalError):
    """The connection was taken back by poolguard (leaked, or its owner died) and cannot be used."""


class PoolGuardWarning(ResourceWarning):
    """Base of poolguard's warnings: ``-W error::ResourceWarning`` in a test suite catches them."""


for _cls in (
    ConfigurationError,
    PoolExhausted,
    PoolConnectError,
    ConnectionReclaimed,
    PoolGuardWarning,
):
    _cls.__module__ = "poolguard"
