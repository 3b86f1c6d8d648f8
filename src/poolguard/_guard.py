"""The session-state guard: find SQL that silently breaks behind a transaction pooler.

A transaction-mode pooler (PgBouncer ``pool_mode = transaction`` and its cousins) lends a
server connection for one transaction only. Anything a statement leaves on the *connection*
rather than in the *transaction* is then left on a server connection some other client gets
next, and is missing from the one this client gets next. :func:`classify` finds those
statements with a real tokenizer (comments, string literals, dollar quotes and quoted
identifiers never trigger it) and caches the answer per distinct SQL text, so an
already-seen statement costs one dictionary lookup. :class:`SessionStateGuard` turns the
findings into a warning or an error that names the safe alternative.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import psycopg

from ._errors import PoolGuardWarning
from ._ledger import caller_site, format_site
from ._settings import GuardAction

__all__ = [
    "CACHE_SIZE",
    "Finding",
    "FindingKind",
    "GuardAction",
    "SessionStateError",
    "SessionStateGuard",
    "SessionStateWarning",
    "classify",
    "leaves_session_state",
    "mask_literals",
    "server_cursor_finding",
]

logger = logging.getLogger("poolguard.guard")

FindingKind = Literal[
    "set",
    "reset",
    "set_session_characteristics",
    "set_config",
    "listen",
    "unlisten",
    "advisory_lock",
    "advisory_unlock",
    "temp_object",
    "prepare",
    "execute",
    "deallocate",
    "with_hold_cursor",
    "server_cursor",
    "outside_transaction",
]

#: Distinct SQL texts remembered by :func:`classify`. Applications issue a bounded set of
#: statement shapes; a few thousand covers them while capping memory when an application
#: interpolates values into SQL text and every statement is new.
CACHE_SIZE: Final = 4096

# PgBouncer re-applies these four (its ignore_startup_parameters documentation lists them) on
# every server connection it lends, so a plain SET of them survives transaction pooling; they
# still leave state on the connection, which matters to poolguard's own pool. Not
# application_name: tests/test_guard_pgbouncer.py shows PgBouncer 1.18 keeping it for the
# client that set it but leaking it to clients that never set one.
_POOLER_TRACKED: Final = frozenset(
    {"client_encoding", "datestyle", "timezone", "standard_conforming_strings"}
)

_SESSION_ADVISORY_LOCKS: Final = frozenset(
    {
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    }
)
_SESSION_ADVISORY_UNLOCKS: Final = frozenset(
    {"pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all"}
)
_XACT_ADVISORY_LOCKS: Final = frozenset(
    {
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
    }
)
_CALLS_OF_INTEREST: Final = (
    _SESSION_ADVISORY_LOCKS | _SESSION_ADVISORY_UNLOCKS | _XACT_ADVISORY_LOCKS | {"set_config"}
)

# Spellings PostgreSQL accepts for a boolean literal (boolin), lower-cased.
_TRUE_LITERALS: Final = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE_LITERALS: Final = frozenset({"false", "f", "no", "n", "off", "0"})

# A word followed by "(" after one of these names a table, column list or routine being
# defined or referenced, not a function call: CREATE TABLE set_config (...), INSERT INTO
# set_config (...), DROP FUNCTION pg_advisory_lock(bigint).
_NOT_A_CALL_AFTER: Final = frozenset(
    {
        "table",
        "into",
        "references",
        "function",
        "procedure",
        "routine",
        "aggregate",
        "copy",
        "exists",
        "view",
        "type",
        "only",
        "analyze",
        "analyse",
        "vacuum",
    }
)

# Statements that define objects whose bodies run later (or never), so calls inside them
# are not executed by the statement itself.
_DEFINING_OBJECTS: Final = frozenset(
    {"function", "procedure", "view", "rule", "trigger", "policy", "aggregate"}
)

_DIRECT = "the direct connection (poolguard's direct_dsn setting / DIRECT_URL)"

_ALTERNATIVES: Final[dict[str, str]] = {
    "set": (
        "use SET LOCAL inside a transaction, ALTER ROLE/DATABASE ... SET for a permanent "
        f"default, or {_DIRECT}"
    ),
    "reset": f"use SET LOCAL name TO DEFAULT inside a transaction, or {_DIRECT}",
    "set_session_characteristics": (
        "start each transaction with BEGIN ISOLATION LEVEL ... (psycopg: "
        "conn.isolation_level / conn.read_only), or SET TRANSACTION inside it"
    ),
    "set_config": "use set_config(name, value, true) inside a transaction",
    "listen": f"run LISTEN on {_DIRECT}; NOTIFY itself is safe through the pooler",
    "unlisten": f"run LISTEN/UNLISTEN on {_DIRECT}",
    "advisory_lock": (
        "use pg_advisory_xact_lock / pg_try_advisory_xact_lock inside a transaction "
        f"(released at COMMIT), or {_DIRECT}"
    ),
    "advisory_unlock": (
        "use pg_advisory_xact_lock, which needs no unlock; a session lock may sit on another "
        "server connection than the one running this unlock"
    ),
    "temp_object": (
        "use CREATE TEMP TABLE ... ON COMMIT DROP inside a transaction (temp views and "
        f"sequences: a CTE or a regular object), or {_DIRECT}"
    ),
    "prepare": (
        "let the driver send parameters without naming statements (poolguard's transaction "
        f"mode sets prepare_threshold=None), or {_DIRECT}"
    ),
    "execute": f"prepared statements live on one server connection; use {_DIRECT}",
    "deallocate": f"prepared statements live on one server connection; use {_DIRECT}",
    "with_hold_cursor": (
        "fetch the rows inside the transaction (a cursor WITHOUT HOLD, or keyset "
        f"pagination), or {_DIRECT}"
    ),
    "server_cursor": (
        "open the named cursor inside a transaction (with conn.transaction(): ...), use a "
        f"client-side cursor, or {_DIRECT}; Django: DISABLE_SERVER_SIDE_CURSORS = True"
    ),
    "outside_transaction": (
        "run it inside a transaction together with the statements that rely on it "
        "(with conn.transaction(): ...)"
    ),
}

_DESCRIPTIONS: Final[dict[str, str]] = {
    "set": "SET changes a session setting",
    "reset": "RESET changes a session setting",
    "set_session_characteristics": "SET SESSION CHARACTERISTICS changes session defaults",
    "set_config": "set_config(..., false) changes a session setting",
    "listen": "LISTEN subscribes the server connection, not the client",
    "unlisten": "UNLISTEN acts on whichever server connection runs it",
    "advisory_lock": "a session-level advisory lock outlives the transaction",
    "advisory_unlock": "a session-level advisory unlock",
    "temp_object": "a temporary object lives until the server connection closes",
    "prepare": "SQL PREPARE names a statement on one server connection",
    "execute": "SQL EXECUTE needs a statement prepared on the same server connection",
    "deallocate": "SQL DEALLOCATE acts on whichever server connection runs it",
    "with_hold_cursor": "a WITH HOLD cursor outlives the transaction",
    "server_cursor": "a server-side cursor outside a transaction outlives it",
    "outside_transaction": "a transaction-scoped statement outside a transaction has no effect",
}


class SessionStateWarning(PoolGuardWarning):
    """SQL sent through a transaction-mode pool leaves state on the server connection."""

    # Python hides ResourceWarning (PoolGuardWarning's base) by default; the WARNING on the
    # poolguard.guard logger is what a developer sees without -W flags.


class SessionStateError(psycopg.ProgrammingError):
    """SQL refused by the session-state guard (action="raise"); the message says what to use."""


SessionStateWarning.__module__ = "poolguard"
SessionStateError.__module__ = "poolguard"


@dataclass(frozen=True, slots=True)
class Finding:
    """One statement that depends on, or leaves, server-connection state."""

    kind: FindingKind
    #: Position of the statement in a multi-statement string, from 0.
    index: int
    #: The statement, whitespace collapsed, string literals masked, truncated: safe to log.
    statement: str
    #: What the statement targets when known: setting name, function, channel, cursor name.
    target: str | None
    #: Does a connection that ran this carry state back into a pool (so reset it on return)?
    leaves_session_state: bool
    #: Does it misbehave behind a transaction pooler? False for settings PgBouncer re-applies.
    breaks_transaction_pooling: bool = True
    #: Reported only when the statement runs outside a transaction block.
    outside_transaction_only: bool = False

    @property
    def alternative(self) -> str:
        """The safe way to get the same effect, for the message shown to the developer."""
        return _ALTERNATIVES[self.kind]

    def message(self) -> str:
        """One sentence for a warning or exception: what, which statement, what to use."""
        target = f" ({self.target})" if self.target else ""
        if self.outside_transaction_only:
            consequence = "runs outside a transaction block, so its effect ends with it"
        else:
            consequence = "silently misbehaves behind a transaction-mode pooler"
        return (
            f"{_DESCRIPTIONS[self.kind]}{target}: statement {self.index + 1} "
            f"`{self.statement}` {consequence}; {self.alternative}"
        )


# --------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(frozen=True, slots=True)
class _Token:
    # "word" (keyword or unquoted identifier, lower-cased), "ident" (quoted identifier, exact),
    # "string" (literal, value unescaped), "number", "param", or "op" (one punctuation char, or
    # "::").
    kind: str
    value: str
    start: int
    end: int


_WORD_RE = re.compile(r"[^\W\d][\w$]*")
_NUMBER_RE = re.compile(r"\d[\w.]*|\.\d[\w.]*")
_DOLLAR_TAG_RE = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_PARAM_RE = re.compile(r"\$\d+|%\([^)]*\)[sbt]|%[sbt]")
_SPACE_RE = re.compile(r"\s+")


class _UnterminatedError(ValueError):
    """The SQL ends inside a string, comment or quoted identifier."""


def _tokens(sql: str) -> Iterator[_Token]:
    """Yield the significant tokens of `sql`, skipping whitespace and comments."""
    pos = 0
    n = len(sql)
    while pos < n:
        ch = sql[pos]
        if ch.isspace():
            pos = _SPACE_RE.match(sql, pos).end()  # type: ignore[union-attr]
        elif sql.startswith("--", pos):
            end = sql.find("\n", pos)
            pos = n if end < 0 else end + 1
        elif sql.startswith("/*", pos):
            pos = _skip_block_comment(sql, pos)
        elif ch == "'":
            value, end = _read_string(sql, pos, backslash=False)
            yield _Token("string", value, pos, end)
            pos = end
        elif ch == '"':
            value, end = _read_quoted(sql, pos, '"')
            yield _Token("ident", value, pos, end)
            pos = end
        elif ch == "$":
            tag = _DOLLAR_TAG_RE.match(sql, pos)
            param = _PARAM_RE.match(sql, pos)
            if tag:
                close = sql.find(tag.group(), tag.end())
                if close < 0:
                    raise _UnterminatedError("dollar-quoted string")
                end = close + len(tag.group())
                yield _Token("string", sql[tag.end() : close], pos, end)
                pos = end
            elif param:
                yield _Token("param", param.group(), pos, param.end())
                pos = param.end()
            else:
                yield _Token("op", ch, pos, pos + 1)
                pos += 1
        elif ch == "%":
            param = _PARAM_RE.match(sql, pos)
            end = param.end() if param else pos + 1
            yield _Token("param" if param else "op", sql[pos:end], pos, end)
            pos = end
        elif "0" <= ch <= "9" or (ch == "." and pos + 1 < n and "0" <= sql[pos + 1] <= "9"):
            end = _NUMBER_RE.match(sql, pos).end()  # type: ignore[union-attr]
            yield _Token("number", sql[pos:end], pos, end)
            pos = end
        elif ch.isalpha() or ch == "_":
            end = _WORD_RE.match(sql, pos).end()  # type: ignore[union-attr]
            # E'...' is an escape string: backslash escapes, including \'.
            if end == pos + 1 and ch in "eE" and end < n and sql[end] == "'":
                value, end = _read_string(sql, end, backslash=True)
                yield _Token("string", value, pos, end)
            else:
                yield _Token("word", sql[pos:end].lower(), pos, end)
            pos = end
        elif sql.startswith("::", pos):
            yield _Token("op", "::", pos, pos + 2)
            pos += 2
        else:
            yield _Token("op", ch, pos, pos + 1)
            pos += 1


def _skip_block_comment(sql: str, pos: int) -> int:
    # PostgreSQL block comments nest, unlike C's: /* a /* b */ still a comment */.
    depth = 0
    n = len(sql)
    while pos < n:
        if sql.startswith("/*", pos):
            depth += 1
            pos += 2
        elif sql.startswith("*/", pos):
            depth -= 1
            pos += 2
            if depth == 0:
                return pos
        else:
            pos += 1
    raise _UnterminatedError("block comment")


def _read_quoted(sql: str, pos: int, quote: str) -> tuple[str, int]:
    """Read a quote-delimited token where a doubled quote stands for one; return value, end."""
    parts = []
    start = pos + 1
    while True:
        close = sql.find(quote, start)
        if close < 0:
            raise _UnterminatedError("quoted text")
        parts.append(sql[start:close])
        if sql.startswith(quote, close + 1):
            parts.append(quote)
            start = close + 2
        else:
            return "".join(parts), close + 1


def _read_string(sql: str, pos: int, *, backslash: bool) -> tuple[str, int]:
    if not backslash:
        return _read_quoted(sql, pos, "'")
    # Only the end of the literal matters here, so escapes other than \' and \\ are kept as
    # written; a value compared against keywords ('false') never contains them.
    parts = []
    i = pos + 1
    n = len(sql)
    while i < n:
        ch = sql[i]
        if ch == "\\" and i + 1 < n:
            parts.append(sql[i + 1] if sql[i + 1] in "'\\" else sql[i : i + 2])
            i += 2
        elif ch == "'":
            if sql.startswith("'", i + 1):
                parts.append("'")
                i += 2
            else:
                return "".join(parts), i + 1
        else:
            parts.append(ch)
            i += 1
    raise _UnterminatedError("escape string")


def _split_statements(tokens: Sequence[_Token]) -> list[list[_Token]]:
    """Split on top-level semicolons.

    Semicolons inside parentheses (CREATE RULE ... DO (a; b)) and inside a SQL-standard
    function body (CREATE FUNCTION ... BEGIN ATOMIC a; b; END) do not end the statement.
    """
    statements: list[list[_Token]] = []
    current: list[_Token] = []
    parens = 0
    atomic = 0  # nesting inside BEGIN ATOMIC ... END: CASE ... END nests within it
    for tok in tokens:
        if tok.kind == "op":
            if tok.value == ";" and parens == 0 and atomic == 0:
                if current:
                    statements.append(current)
                current = []
                continue
            if tok.value == "(":
                parens += 1
            elif tok.value == ")":
                parens = max(0, parens - 1)
        elif tok.kind == "word":
            opens_body = tok.value == "atomic" and _word(current, len(current) - 1) == "begin"
            if opens_body or (atomic and tok.value == "case"):
                atomic += 1
            elif atomic and tok.value == "end":
                atomic -= 1
        current.append(tok)
    if current:
        statements.append(current)
    return statements


# --------------------------------------------------------------------------------------------
# Classification


def _snippet(sql: str, stmt: Sequence[_Token], limit: int = 80) -> str:
    # Rebuilt from tokens so comments vanish and literals (which may hold secrets, e.g.
    # SET app.api_key = '...') never reach a log line or an exception message.
    out: list[str] = []
    prev_end = stmt[0].start if stmt else 0
    for tok in stmt:
        if tok.start > prev_end:
            out.append(" ")
        if tok.kind == "string":
            out.append("$…$" if sql[tok.start] == "$" else "'…'")
        else:
            out.append(sql[tok.start : tok.end])
        prev_end = tok.end
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mask_literals(sql: str, limit: int = 200) -> str:
    """`sql` with string literals masked and comments dropped, safe to print (say, a query
    from pg_stat_activity). Text cut off inside a literal (pg_stat_activity truncates) ends
    with the masked part."""
    tokens: list[_Token] = []
    try:
        tokens.extend(_tokens(sql))
    except _UnterminatedError:
        return (_snippet(sql, tokens, limit) + " '…").strip()[:limit]
    return _snippet(sql, tokens, limit)


def _word(stmt: Sequence[_Token], i: int) -> str:
    """The lower-cased keyword at index `i`, or "" (past the end, or not a bare word)."""
    if i < len(stmt) and stmt[i].kind == "word":
        return stmt[i].value
    return ""


def _is_op(stmt: Sequence[_Token], i: int, value: str) -> bool:
    return 0 <= i < len(stmt) and stmt[i].kind == "op" and stmt[i].value == value


def _matching_paren(stmt: Sequence[_Token], open_paren: int) -> int:
    depth = 0
    for i in range(open_paren, len(stmt)):
        if stmt[i].kind == "op":
            if stmt[i].value in "([":
                depth += 1
            elif stmt[i].value in ")]":
                depth -= 1
                if depth == 0:
                    return i
    return len(stmt)


def _top_level_sequence(stmt: Sequence[_Token], words: Sequence[str]) -> bool:
    """Does the statement contain the keywords `words` in a row, outside parentheses?"""
    depth = 0
    for i, tok in enumerate(stmt):
        if tok.kind == "op":
            depth += tok.value == "("
            depth -= tok.value == ")"
        elif depth == 0 and all(_word(stmt, i + k) == w for k, w in enumerate(words)):
            return True
    return False


# CREATE modifiers that may stand between CREATE and the kind of object created.
_CREATE_MODIFIERS: Final = frozenset(
    {"global", "local", "temp", "temporary", "unlogged", "recursive", "materialized", "unique"}
)


def _created_object(stmt: Sequence[_Token]) -> tuple[int, bool]:
    """For a CREATE statement: the index of the object keyword (TABLE, VIEW, FUNCTION...) and
    whether TEMP/TEMPORARY was among the modifiers before it."""
    i = 3 if _word(stmt, 1) == "or" and _word(stmt, 2) == "replace" else 1
    temp = False
    while _word(stmt, i) in _CREATE_MODIFIERS:
        temp = temp or _word(stmt, i) in ("temp", "temporary")
        i += 1
    return i, temp


def _setting_name(stmt: Sequence[_Token], at: int) -> str | None:
    """The setting a SET/RESET names from token index `at`, spelled as SHOW knows it."""
    first, second = _word(stmt, at), _word(stmt, at + 1)
    special = {
        "time": "timezone" if second == "zone" else None,
        "names": "client_encoding",
        "schema": "search_path",
        "role": "role",
        "session": "session_authorization" if second == "authorization" else None,
        "xml": "xmloption" if second == "option" else None,
    }
    if special.get(first):
        return special[first]
    parts: list[str] = []
    i = at
    while i < len(stmt) and stmt[i].kind in ("word", "ident"):
        parts.append(stmt[i].value)
        if not _is_op(stmt, i + 1, "."):
            break
        i += 2
    return ".".join(parts) or None


def _name_at(stmt: Sequence[_Token], i: int) -> str | None:
    if i < len(stmt) and stmt[i].kind in ("word", "ident"):
        return stmt[i].value
    return None


class _Statement:
    """One statement being classified; builds findings that share its index and snippet."""

    __slots__ = ("findings", "index", "single", "sql", "tokens")

    def __init__(self, sql: str, tokens: list[_Token], index: int, single: bool) -> None:
        self.sql = sql
        self.tokens = tokens
        self.index = index
        # Alone in its string: multi-statement strings run as one implicit transaction, so
        # transaction-scoped statements in them take effect even in autocommit.
        self.single = single
        self.findings: list[Finding] = []

    def add(
        self,
        kind: FindingKind,
        target: str | None,
        *,
        leaves: bool,
        breaks: bool = True,
        outside_only: bool = False,
    ) -> None:
        if outside_only and not self.single:
            return
        snippet = _snippet(self.sql, self.tokens)
        self.findings.append(
            Finding(kind, self.index, snippet, target, leaves, breaks, outside_only)
        )


def _classify_set(st: _Statement) -> None:
    stmt = st.tokens
    second = _word(stmt, 1)
    if second in ("local", "transaction", "constraints"):
        # Scoped to the current transaction: safe through a pooler, but outside a transaction
        # block it does nothing (the server only sends a WARNING notice nobody reads).
        st.add("outside_transaction", f"SET {second.upper()}", leaves=False, outside_only=True)
    elif second == "session" and _word(stmt, 2) == "characteristics":
        st.add("set_session_characteristics", None, leaves=True)
    else:
        at = 2 if second == "session" and _word(stmt, 2) != "authorization" else 1
        name = _setting_name(stmt, at)
        st.add("set", name, leaves=True, breaks=name not in _POOLER_TRACKED)


def _call_arguments(stmt: Sequence[_Token], open_paren: int) -> list[list[_Token]]:
    """The top-level arguments of the call whose "(" is at index `open_paren`."""
    args: list[list[_Token]] = [[]]
    depth = 0
    for tok in stmt[open_paren + 1 :]:
        if tok.kind == "op" and tok.value in "([":
            depth += 1
        elif tok.kind == "op" and tok.value in ")]":
            if depth == 0:
                break
            depth -= 1
        elif tok.kind == "op" and tok.value == "," and depth == 0:
            args.append([])
            continue
        args[-1].append(tok)
    return args if args != [[]] else []


def _literal(arg: Sequence[_Token]) -> str | None:
    """The text of a lone literal argument ('x', x, 1, 'x'::text), else None."""
    if len(arg) == 3 and arg[1].value == "::":
        arg = arg[:1]
    if len(arg) == 1 and arg[0].kind in ("word", "string", "number"):
        return arg[0].value.strip().lower()
    return None


def _is_cte_name(stmt: Sequence[_Token], open_paren: int) -> bool:
    # WITH set_config (a) AS (...): a CTE with a column list, not a call.
    after = _matching_paren(stmt, open_paren) + 1
    if _word(stmt, after) != "as":
        return False
    after += 1
    while _word(stmt, after) in ("not", "materialized"):
        after += 1
    return _is_op(stmt, after, "(")


def _is_call(stmt: Sequence[_Token], i: int, creating: bool) -> bool:
    """Is the word at `i` (followed by "(") the built-in function being called?"""
    prev = i - 1
    if _is_op(stmt, prev, "."):
        # Only the built-in (pg_catalog) function counts; myschema.set_config is not it.
        if prev < 1 or stmt[prev - 1].value != "pg_catalog":
            return False
        prev -= 2
    before = _word(stmt, prev) if prev >= 0 else ""
    if before in _NOT_A_CALL_AFTER or (creating and before == "on"):
        return False
    return not _is_cte_name(stmt, i + 1)


def _classify_calls(st: _Statement, creating: bool) -> None:
    stmt = st.tokens
    for i, tok in enumerate(stmt):
        if tok.kind not in ("word", "ident") or tok.value not in _CALLS_OF_INTEREST:
            continue
        if not _is_op(stmt, i + 1, "(") or not _is_call(stmt, i, creating):
            continue
        name = tok.value
        if name == "set_config":
            _classify_set_config(st, _call_arguments(stmt, i + 1))
        elif name in _SESSION_ADVISORY_LOCKS:
            st.add("advisory_lock", name, leaves=True)
        elif name in _SESSION_ADVISORY_UNLOCKS:
            st.add("advisory_unlock", name, leaves=False)
        else:
            # An xact lock taken outside a transaction is released as soon as the statement
            # ends: the caller believes it holds a lock it does not.
            st.add("outside_transaction", name, leaves=False, outside_only=True)


def _classify_set_config(st: _Statement, args: list[list[_Token]]) -> None:
    # Two arguments is an error the server reports itself; a non-literal is_local (a query
    # parameter) cannot be judged here, so neither is flagged.
    if len(args) != 3:
        return
    is_local = _literal(args[2])
    setting = _literal(args[0])
    if is_local in _FALSE_LITERALS:
        st.add("set_config", setting, leaves=True, breaks=setting not in _POOLER_TRACKED)
    elif is_local in _TRUE_LITERALS:
        st.add("outside_transaction", "set_config(..., true)", leaves=False, outside_only=True)


def _select_into_temp(stmt: Sequence[_Token]) -> bool:
    # SELECT ... INTO TEMP [TABLE] name creates a temp table and has no ON COMMIT clause.
    return any(
        tok.kind == "word"
        and tok.value == "into"
        and _word(stmt, i + 1) in ("temp", "temporary")
        and i + 2 < len(stmt)
        and stmt[i + 2].kind in ("word", "ident")
        for i, tok in enumerate(stmt)
    )


def _classify_create(st: _Statement) -> bool:
    """Flag temp objects; return whether calls in the statement run when it runs."""
    stmt = st.tokens
    at, temp = _created_object(stmt)
    kind = _word(stmt, at)
    if kind in ("table", "view", "sequence"):
        name_at = at + 4 if _word(stmt, at + 1) == "if" else at + 1
        temp = temp or (_word(stmt, name_at) == "pg_temp" and _is_op(stmt, name_at + 1, "."))
        dropped = kind == "table" and _top_level_sequence(stmt, ("on", "commit", "drop"))
        if temp and not dropped:
            st.add("temp_object", f"temporary {kind}", leaves=True)
    return kind not in _DEFINING_OBJECTS


def _classify_statement(st: _Statement) -> None:
    stmt = st.tokens
    first, second = _word(stmt, 0), _word(stmt, 1)
    if first == "set":
        _classify_set(st)
    elif first == "reset":
        name = "all" if second == "all" else _setting_name(stmt, 1)
        st.add("reset", name, leaves=True, breaks=name not in _POOLER_TRACKED)
    elif first == "listen":
        st.add("listen", _name_at(stmt, 1), leaves=True)
    elif first == "unlisten":
        st.add("unlisten", _name_at(stmt, 1) or "*", leaves=False)
    elif first == "prepare" and second != "transaction":  # PREPARE TRANSACTION is 2PC
        st.add("prepare", _name_at(stmt, 1), leaves=True)
    elif first == "execute":
        st.add("execute", _name_at(stmt, 1), leaves=False)
    elif first == "deallocate":
        st.add("deallocate", _name_at(stmt, 2 if second == "prepare" else 1), leaves=False)
    elif first == "declare":
        if _top_level_sequence(stmt, ("with", "hold")):
            st.add("with_hold_cursor", _name_at(stmt, 1), leaves=True)
    elif first == "explain" and not {"analyze", "analyse"} & {_word(stmt, i) for i in (1, 2)}:
        pass  # plain EXPLAIN plans the query without running it
    else:
        calls_run = True
        if first == "create":
            calls_run = _classify_create(st)
        elif first in ("select", "with") and _select_into_temp(stmt):
            st.add("temp_object", "SELECT INTO TEMP", leaves=True)
        if calls_run:
            _classify_calls(st, creating=first == "create")


# The cached analysis of one SQL text: findings reported inside a transaction block, those
# reported outside one, every finding, and whether the text leaves session state.
_Analysis = tuple[tuple[Finding, ...], tuple[Finding, ...], tuple[Finding, ...], bool]


@functools.lru_cache(maxsize=CACHE_SIZE)
def _analyze(sql: str | bytes) -> _Analysis:
    text = sql.decode("utf-8", "replace") if isinstance(sql, bytes) else sql
    try:
        statements = _split_statements(list(_tokens(text)))
    except _UnterminatedError:
        # The server will reject it with a syntax error; nothing runs, nothing to flag.
        return (), (), (), False
    single = len(statements) == 1
    found: list[Finding] = []
    for index, tokens in enumerate(statements):
        st = _Statement(text, tokens, index, single)
        _classify_statement(st)
        found += st.findings
    findings = tuple(found)
    breaking = tuple(f for f in findings if f.breaks_transaction_pooling)
    inside = tuple(f for f in breaking if not f.outside_transaction_only)
    leaves = any(f.leaves_session_state for f in findings)
    return inside, breaking, findings, leaves


def classify(sql: str | bytes) -> tuple[Finding, ...]:
    """Every finding in `sql`, in statement order (cached per distinct text).

    Includes findings that do not break transaction pooling (``breaks_transaction_pooling``
    False: a SET of a setting PgBouncer re-applies) and those that apply only outside a
    transaction block (``outside_transaction_only``). Text that ends inside a string or
    comment yields nothing: the server rejects it before running anything.
    """
    return _analyze(sql)[2]


def leaves_session_state(sql: str | bytes) -> bool:
    """Would a connection that ran `sql` carry session state back into a pool?"""
    return _analyze(sql)[3]


def server_cursor_finding(name: str, *, in_transaction: bool, withhold: bool) -> Finding | None:
    """The finding for opening the server-side (named) cursor `name`, if it is unsafe.

    A cursor declared inside a transaction lives and dies with it, which is fine behind a
    pooler. Outside one (autocommit), psycopg needs ``withhold=True`` and the cursor then
    lives on a server connection the pooler lends to someone else after the DECLARE.
    """
    if in_transaction and not withhold:
        return None
    kind: FindingKind = "with_hold_cursor" if in_transaction else "server_cursor"
    return Finding(kind, 0, f"DECLARE {name} CURSOR", name, True)


class SessionStateGuard:
    """Warn about, or refuse, SQL that leaves state on a transaction-pooled connection.

    ``action="warn"`` emits a :class:`SessionStateWarning` (pointing at the application's
    line, past poolguard's and psycopg's frames) and a WARNING on the ``poolguard.guard``
    logger, once per distinct statement; ``"raise"`` raises :class:`SessionStateError` before
    the statement runs; ``"off"`` does nothing.
    """

    __slots__ = ("_lock", "_warned", "action")

    # Bound on the remembered warned statements, for the same reason as CACHE_SIZE.
    _MAX_WARNED: Final = CACHE_SIZE

    def __init__(self, action: GuardAction = "warn") -> None:
        if action not in ("warn", "raise", "off"):
            raise ValueError(f"guard action must be 'warn', 'raise' or 'off', got {action!r}")
        self.action: GuardAction = action
        self._warned: set[tuple[str | bytes, bool]] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SessionStateGuard(action={self.action!r})"

    def check(self, sql: str | bytes, *, in_transaction: bool) -> tuple[Finding, ...]:
        """Check `sql` before it runs; return what was reported (empty when it is safe).

        `in_transaction`: whether the statement will run inside a transaction block (psycopg:
        not autocommit, or a transaction already open).
        """
        if self.action == "off":
            return ()
        analysis = _analyze(sql)
        findings = analysis[0] if in_transaction else analysis[1]
        if findings:
            self._report(sql, in_transaction, findings)
        return findings

    def observe(self, sql: object, *, in_transaction: bool) -> bool:
        """The pool's execute hook: :meth:`check` `sql`, then return whether it leaves session
        state behind, so the pool resets the connection when it comes back.

        Only str and bytes are examined (psycopg's sql.Composed must be rendered with
        ``as_string(conn)`` by the caller first); anything else returns False.
        """
        if type(sql) is not str and type(sql) is not bytes:
            return False
        analysis = _analyze(sql)
        if self.action != "off":
            findings = analysis[0] if in_transaction else analysis[1]
            if findings:
                self._report(sql, in_transaction, findings)
        return analysis[3]

    def check_server_cursor(
        self, name: str, *, in_transaction: bool, withhold: bool
    ) -> Finding | None:
        """Check the declaration of a named cursor; see :func:`server_cursor_finding`."""
        if self.action == "off":
            return None
        found = server_cursor_finding(name, in_transaction=in_transaction, withhold=withhold)
        if found:
            self._report(f"\0cursor {name}", in_transaction, (found,))
        return found

    def _report(
        self, key: str | bytes, in_transaction: bool, findings: tuple[Finding, ...]
    ) -> None:
        if self.action == "raise":
            raise SessionStateError("; ".join(f.message() for f in findings))
        seen = (key, in_transaction)
        # Unlocked fast path for a statement already reported; the lock below only keeps
        # two threads from both warning about a new one.
        if seen in self._warned:
            return
        with self._lock:
            if seen in self._warned:
                return
            if len(self._warned) >= self._MAX_WARNED:
                self._warned.clear()
            self._warned.add(seen)
        message = "; ".join(f.message() for f in findings)
        code, line = caller_site(1)
        logger.warning("%s (at %s)", message, format_site(code, line))
        # The call depth between the application and here varies (cursor.execute,
        # connection.execute, an ORM), so the warning names the first non-library frame.
        filename = code.co_filename if code else "<unknown>"
        warnings.warn_explicit(message, SessionStateWarning, filename, line)
