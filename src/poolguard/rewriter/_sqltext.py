"""What the rewriter needs to know about a client's SQL text: whether it drops prepared
statements, ends a transaction, or creates session state that ties the client to one server
connection (LISTEN, SQL-level PREPARE).

Cheap regular expressions on bytes, no parser: where a guess is needed it errs on the side
that costs only speed (forgetting a statement, pinning a client) and never correctness.
"""

from __future__ import annotations

import re

_COMMENTS = re.compile(rb"--[^\n]*|/\*.*?\*/", re.S)
_IDENT = rb"(?:\"((?:[^\"]|\"\")+)\"|([a-z_][a-z0-9_$]*))"
_DEALLOCATE = re.compile(rb"\s*deallocate\s+(?:prepare\s+)?" + _IDENT + rb"\s*;?\s*", re.I)
_DROPS_ALL = re.compile(rb"\s*(?:deallocate\s+(?:prepare\s+)?all|discard\s+all)\s*;?\s*", re.I)
_MAY_DROP = re.compile(rb"deallocate|discard", re.I)
_RESETS_ALL = re.compile(rb"discard\s+all|reset\s+all", re.I)
# PostgreSQL accepts these (and only these) in a failed transaction: IsTransactionExitStmt.
_ENDS_TRANSACTION = re.compile(
    rb"\s*(?:commit|end|rollback|abort|prepare\s+transaction)(?!\s+prepared)\b[^;]*;?\s*", re.I
)
_LISTEN = re.compile(rb"(?:^|;)\s*listen\b", re.I)
_UNLISTEN_ALL = re.compile(rb"\s*unlisten\s+\*\s*;?\s*", re.I)
_SQL_PREPARE = re.compile(rb"(?:^|;)\s*prepare\s+(?!transaction\b)" + _IDENT, re.I)


def _strip(sql: bytes) -> bytes:
    return _COMMENTS.sub(b" ", sql) if b"-" in sql or b"/" in sql else sql


def _name(m: re.Match[bytes]) -> bytes:
    if m.group(1) is not None:
        return m.group(1).replace(b'""', b'"')
    return bytes(m.group(2).lower())


def deallocate_target(sql: bytes) -> bytes | None:
    """The statement name of a lone ``DEALLOCATE [PREPARE] name``, else None.

    Unquoted names fold to lower case as PostgreSQL folds identifiers.
    """
    m = _DEALLOCATE.fullmatch(_strip(sql))
    if m is None:
        return None
    name = _name(m)
    return None if name == b"all" and m.group(1) is None else name


def drops_all(sql: bytes) -> bool:
    """True for a lone ``DEALLOCATE ALL`` or ``DISCARD ALL``: the client's statements are gone."""
    return _DROPS_ALL.fullmatch(_strip(sql)) is not None


def may_drop_statements(sql: bytes) -> bool:
    """Cheap over-approximation: could this SQL drop prepared statements on the backend?

    A false positive only costs a re-prepare later, so a multi-statement string or a function
    body mentioning the words is treated as if it did.
    """
    return _MAY_DROP.search(sql) is not None


def may_reset_settings(sql: bytes) -> bool:
    """Could this SQL (already known to mention DISCARD/DEALLOCATE, or any SQL) put every
    setting back to its default (``DISCARD ALL``, ``RESET ALL``)?"""
    return _RESETS_ALL.search(sql) is not None


def ends_transaction(sql: bytes) -> bool:
    """A lone COMMIT/END/ROLLBACK/ABORT/PREPARE TRANSACTION (ROLLBACK TO SAVEPOINT included):
    the statements PostgreSQL still parses inside a failed transaction."""
    return _ENDS_TRANSACTION.fullmatch(_strip(sql)) is not None


def listens(sql: bytes) -> bool:
    """Does this SQL (maybe one of several statements) start with LISTEN?"""
    return b"isten" in sql.lower() and _LISTEN.search(_strip(sql)) is not None


def unlistens_all(sql: bytes) -> bool:
    return _UNLISTEN_ALL.fullmatch(_strip(sql)) is not None


def sql_prepared_names(sql: bytes) -> list[bytes]:
    """The statement names of SQL-level ``PREPARE name ...`` statements in ``sql``."""
    if b"repare" not in sql.lower():
        return []
    return [_name(m) for m in _SQL_PREPARE.finditer(_strip(sql))]


_SESSION_STATE = re.compile(rb"listen|prepare|deallocate|discard", re.I)


def may_change_session_state(sql: bytes) -> bool:
    """Cheap first test before ``listens``/``sql_prepared_names``/``unlistens_all``/
    ``deallocate_target``/``drops_all``: could this SQL start or end session state?"""
    return _SESSION_STATE.search(sql) is not None
