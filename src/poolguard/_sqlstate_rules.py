"""Which SQL leaves state on the server connection: the rules behind the session-state guard.

A transaction-mode pooler (PgBouncer ``pool_mode = transaction`` and its cousins) lends a
server connection for one transaction only. Anything a statement leaves on the *connection*
rather than in the *transaction* is then left on a server connection some other client gets
next, and is missing from the one this client gets next. :func:`classify` finds those
statements with a real tokenizer (comments, string literals, dollar quotes and quoted
identifiers never trigger it) and caches the answer per distinct SQL text, so an
already-seen statement costs one dictionary lookup.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from ._findings import Finding, FindingKind
from ._sqlnames import PLAIN_STATEMENTS, TRUSTED_CALLS
from ._sqlprefilter import LONG_STATEMENT, clears, long_needs_tokens
from ._sqltokens import (
    Token,
    UnterminatedError,
    is_op,
    matching_paren,
    snippet,
    split_statements,
    tokenize,
    top_level_sequence,
    word,
)

__all__ = [
    "CACHE_SIZE",
    "Analysis",
    "analyze",
    "analyze_short",
    "classify",
    "leaves_session_state",
    "server_cursor_finding",
]

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

# CREATE modifiers that may stand between CREATE and the kind of object created.
_CREATE_MODIFIERS: Final = frozenset(
    {"global", "local", "temp", "temporary", "unlogged", "recursive", "materialized", "unique"}
)


def _created_object(stmt: Sequence[Token]) -> tuple[int, bool]:
    """For a CREATE statement: the index of the object keyword (TABLE, VIEW, FUNCTION...) and
    whether TEMP/TEMPORARY was among the modifiers before it."""
    i = 3 if word(stmt, 1) == "or" and word(stmt, 2) == "replace" else 1
    temp = False
    while word(stmt, i) in _CREATE_MODIFIERS:
        temp = temp or word(stmt, i) in ("temp", "temporary")
        i += 1
    return i, temp


def _setting_name(stmt: Sequence[Token], at: int) -> str | None:
    """The setting a SET/RESET names from token index `at`, spelled as SHOW knows it."""
    first, second = word(stmt, at), word(stmt, at + 1)
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
        if not is_op(stmt, i + 1, "."):
            break
        i += 2
    return ".".join(parts) or None


def _name_at(stmt: Sequence[Token], i: int) -> str | None:
    if i < len(stmt) and stmt[i].kind in ("word", "ident"):
        return stmt[i].value
    return None


class _Statement:
    """One statement being classified; builds findings that share its index and snippet."""

    __slots__ = ("doubt", "findings", "index", "single", "sql", "tokens")

    def __init__(self, sql: str, tokens: list[Token], index: int, single: bool) -> None:
        self.sql = sql
        self.tokens = tokens
        self.index = index
        # Alone in its string: multi-statement strings run as one implicit transaction, so
        # transaction-scoped statements in them take effect even in autocommit.
        self.single = single
        self.findings: list[Finding] = []
        # Could not judge it (DO, CALL, a function not known to be harmless, an unknown
        # statement): not reported by the guard, but the connection is reset on return.
        self.doubt = False

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
        text = snippet(self.sql, self.tokens)
        self.findings.append(Finding(kind, self.index, text, target, leaves, breaks, outside_only))


def _classify_set(st: _Statement) -> None:
    stmt = st.tokens
    second = word(stmt, 1)
    if second in ("local", "transaction", "constraints"):
        # Scoped to the current transaction: safe through a pooler, but outside a transaction
        # block it does nothing (the server only sends a WARNING notice nobody reads).
        st.add("outside_transaction", f"SET {second.upper()}", leaves=False, outside_only=True)
    elif second == "session" and word(stmt, 2) == "characteristics":
        st.add("set_session_characteristics", None, leaves=True)
    else:
        at = 2 if second == "session" and word(stmt, 2) != "authorization" else 1
        name = _setting_name(stmt, at)
        st.add("set", name, leaves=True, breaks=name not in _POOLER_TRACKED)


def _call_arguments(stmt: Sequence[Token], open_paren: int) -> list[list[Token]]:
    """The top-level arguments of the call whose "(" is at index `open_paren`."""
    args: list[list[Token]] = [[]]
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


def _literal(arg: Sequence[Token]) -> str | None:
    """The text of a lone literal argument ('x', x, 1, 'x'::text), else None."""
    if len(arg) == 3 and arg[1].value == "::":
        arg = arg[:1]
    if len(arg) == 1 and arg[0].kind in ("word", "string", "number"):
        return arg[0].value.strip().lower()
    return None


def _is_cte_name(stmt: Sequence[Token], open_paren: int) -> bool:
    # WITH set_config (a) AS (...): a CTE with a column list, not a call.
    after = matching_paren(stmt, open_paren) + 1
    if word(stmt, after) != "as":
        return False
    after += 1
    while word(stmt, after) in ("not", "materialized"):
        after += 1
    return is_op(stmt, after, "(")


_KNOWN_CALLS: Final = TRUSTED_CALLS | _CALLS_OF_INTEREST


def _call_at(stmt: Sequence[Token], i: int, creating: bool) -> str | None:
    """What the name at `i` (followed by "(") is: "builtin" (unqualified or pg_catalog's),
    "qualified" (a function in another schema), or None (a table, column list, CTE...)."""
    prev = i - 1
    schema = None
    if is_op(stmt, prev, "."):
        schema = stmt[prev - 1].value if prev >= 1 else ""
        prev -= 2
    before = word(stmt, prev) if prev >= 0 else ""
    if before in _NOT_A_CALL_AFTER or (creating and before == "on") or _is_cte_name(stmt, i + 1):
        return None
    if before == "as" and schema is None:  # AS alias(a, b), CAST(x AS numeric(10, 2))
        return None
    return "builtin" if schema in (None, "pg_catalog") else "qualified"


def _classify_calls(st: _Statement, creating: bool) -> None:
    stmt = st.tokens
    for i, tok in enumerate(stmt):
        if tok.kind not in ("word", "ident") or not is_op(stmt, i + 1, "("):
            continue
        name = tok.value
        call = _call_at(stmt, i, creating)
        if call is None:
            continue
        if call == "qualified" or name not in _KNOWN_CALLS:
            # myschema.set_config is not the built-in; a user function may do anything.
            st.doubt = True
            continue
        if name not in _CALLS_OF_INTEREST:
            continue
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


def _classify_set_config(st: _Statement, args: list[list[Token]]) -> None:
    # Two arguments is an error the server reports itself. A non-literal is_local (a query
    # parameter) cannot be judged, so the guard says nothing but the connection is reset.
    if len(args) != 3:
        return
    is_local = _literal(args[2])
    setting = _literal(args[0])
    if is_local in _FALSE_LITERALS:
        st.add("set_config", setting, leaves=True, breaks=setting not in _POOLER_TRACKED)
    elif is_local in _TRUE_LITERALS:
        st.add("outside_transaction", "set_config(..., true)", leaves=False, outside_only=True)
    else:
        st.doubt = True


def _select_into_temp(stmt: Sequence[Token]) -> bool:
    # SELECT ... INTO TEMP [TABLE] name creates a temp table and has no ON COMMIT clause.
    return any(
        tok.kind == "word"
        and tok.value == "into"
        and word(stmt, i + 1) in ("temp", "temporary")
        and i + 2 < len(stmt)
        and stmt[i + 2].kind in ("word", "ident")
        for i, tok in enumerate(stmt)
    )


def _classify_create(st: _Statement) -> bool:
    """Flag temp objects; return whether calls in the statement run when it runs."""
    stmt = st.tokens
    at, temp = _created_object(stmt)
    kind = word(stmt, at)
    if kind in ("table", "view", "sequence"):
        name_at = at + 4 if word(stmt, at + 1) == "if" else at + 1
        temp = temp or (word(stmt, name_at) == "pg_temp" and is_op(stmt, name_at + 1, "."))
        dropped = kind == "table" and top_level_sequence(stmt, ("on", "commit", "drop"))
        if temp and not dropped:
            st.add("temp_object", f"temporary {kind}", leaves=True)
    return kind not in _DEFINING_OBJECTS


def _classify_statement(st: _Statement) -> None:
    stmt = st.tokens
    first, second = word(stmt, 0), word(stmt, 1)
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
        if top_level_sequence(stmt, ("with", "hold")):
            st.add("with_hold_cursor", _name_at(stmt, 1), leaves=True)
    elif first == "explain" and not {"analyze", "analyse"} & {word(stmt, i) for i in (1, 2)}:
        pass  # plain EXPLAIN plans the query without running it
    else:
        calls_run = True
        if first not in PLAIN_STATEMENTS:
            st.doubt = True  # DO, CALL, LOAD, or a statement these rules do not know
        if first == "create":
            calls_run = _classify_create(st)
        elif first in ("select", "with") and _select_into_temp(stmt):
            st.add("temp_object", "SELECT INTO TEMP", leaves=True)
        if calls_run:
            _classify_calls(st, creating=first == "create")


# The cached analysis of one SQL text: findings reported inside a transaction block, those
# reported outside one, every finding, and whether the text leaves session state.
Analysis = tuple[tuple[Finding, ...], tuple[Finding, ...], tuple[Finding, ...], bool]


_NOTHING: Final[Analysis] = ((), (), (), False)
# A long text that only the cheap checks looked at: nothing to report, reset on return.
_UNREAD: Final[Analysis] = ((), (), (), True)


def analyze(sql: str | bytes) -> Analysis:
    """The analysis of `sql`; costs a dictionary lookup once seen, and stays bounded for long
    texts (see _sqlprefilter)."""
    if len(sql) <= LONG_STATEMENT:
        return analyze_short(sql)
    text = sql.decode("utf-8", "replace") if isinstance(sql, bytes) else sql
    return _analyze_long(text) if long_needs_tokens(text) else _UNREAD


@functools.lru_cache(maxsize=CACHE_SIZE)
def analyze_short(sql: str | bytes) -> Analysis:
    text = sql.decode("utf-8", "replace") if isinstance(sql, bytes) else sql
    return _NOTHING if clears(text) else _analyze_tokens(text)


# Long texts that must be tokenized (a migration script starting with SET...) are few and
# costly, so a handful are remembered.
@functools.lru_cache(maxsize=16)
def _analyze_long(text: str) -> Analysis:
    return _analyze_tokens(text)


def _analyze_tokens(text: str) -> Analysis:
    try:
        statements = split_statements(list(tokenize(text)))
    except UnterminatedError:
        # The server rejects it with a syntax error, so there is nothing to report; unless a
        # backslash means its string syntax differs from ours (standard_conforming_strings
        # off): then the connection is reset in case it ran after all.
        return (), (), (), "\\" in text
    single = len(statements) == 1
    found: list[Finding] = []
    doubt = False
    for index, tokens in enumerate(statements):
        st = _Statement(text, tokens, index, single)
        _classify_statement(st)
        found += st.findings
        doubt = doubt or st.doubt
    findings = tuple(found)
    breaking = tuple(f for f in findings if f.breaks_transaction_pooling)
    inside = tuple(f for f in breaking if not f.outside_transaction_only)
    leaves = doubt or any(f.leaves_session_state for f in findings)
    return inside, breaking, findings, leaves


def classify(sql: str | bytes) -> tuple[Finding, ...]:
    """Every finding in `sql`, in statement order (cached per distinct text).

    Includes findings that do not break transaction pooling (``breaks_transaction_pooling``
    False: a SET of a setting PgBouncer re-applies) and those that apply only outside a
    transaction block (``outside_transaction_only``). Text that ends inside a string or
    comment yields nothing: the server rejects it before running anything.
    """
    return analyze(sql)[2]


def leaves_session_state(sql: str | bytes) -> bool:
    """Would a connection that ran `sql` carry session state back into a pool, or can the
    rules not tell (DO, CALL, a function not known to be harmless)? Either way: reset it."""
    return analyze(sql)[3]


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
