"""The session-state guard's classifier: table-driven, with the false-positive traps."""

from __future__ import annotations

import inspect
import logging
import warnings

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolguard._findings import Finding
from poolguard._guard import SessionStateError, SessionStateGuard, SessionStateWarning
from poolguard._sqlstate_rules import (
    CACHE_SIZE,
    classify,
    leaves_session_state,
    server_cursor_finding,
)
from poolguard._sqltokens import mask_literals

# (sql, kinds reported by check(..., in_transaction=True)). Each case either must be flagged
# with exactly these kinds, in statement order, or must be left alone.
REPORTED_IN_TRANSACTION: list[tuple[str, tuple[str, ...]]] = [
    # plain SET / RESET and their spellings
    ("SET search_path = app", ("set",)),
    ("set search_path to app, public", ("set",)),
    ("SeT   statement_timeout\n=\t'5s'", ("set",)),
    ("SET SESSION search_path = app", ("set",)),
    ("SET SCHEMA 'app'", ("set",)),
    ("SET ROLE reporting", ("set",)),
    ("SET SESSION AUTHORIZATION bob", ("set",)),
    ("SET myapp.tenant_id = '42'", ("set",)),
    ('SET "MyApp".tenant = 1', ("set",)),
    ("SET work_mem TO DEFAULT", ("set",)),
    ("RESET search_path", ("reset",)),
    ("RESET ALL", ("reset",)),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        ("set_session_characteristics",),
    ),
    # transaction-scoped SETs are fine inside a transaction
    ("SET LOCAL search_path = app", ()),
    ("set local statement_timeout = '1s'", ()),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", ()),
    ("SET CONSTRAINTS ALL DEFERRED", ()),
    # settings PgBouncer re-applies on every server connection survive transaction pooling
    ("SET TIME ZONE 'UTC'", ()),
    ("SET timezone = 'Europe/Paris'", ()),
    ("SET application_name = 'worker'", ("set",)),  # leaks to clients that set none
    ("SET NAMES 'UTF8'", ()),
    ("SET DateStyle = 'ISO, MDY'", ()),
    # set_config
    ("SELECT set_config('search_path', 'app', false)", ("set_config",)),
    ("select SET_CONFIG('app.user', '7', FALSE)", ("set_config",)),
    ("SELECT set_config('app.user', '7', 'off')", ("set_config",)),
    ("SELECT pg_catalog.set_config('app.user', '7', 'f'::boolean)", ("set_config",)),
    ("SELECT set_config('app.user', %s, false)", ("set_config",)),
    ("SELECT set_config('app.user', '7', true)", ()),
    ("SELECT set_config('app.user', %s, %s)", ()),
    ("SELECT set_config('TimeZone', 'UTC', false)", ()),
    ("SELECT set_config FROM settings_audit", ()),
    ("SELECT s.set_config FROM t AS s", ()),
    ("CREATE TABLE set_config (name text, value text)", ()),
    ("INSERT INTO set_config (name) VALUES ('x')", ()),
    ("INSERT INTO set_config (name, value, is_local) VALUES ('a', 'b', false)", ()),
    ("CREATE TABLE pg_advisory_lock (id bigint)", ()),
    ("CREATE INDEX ON pg_try_advisory_lock (id)", ()),
    ("COPY pg_advisory_lock (id) FROM STDIN", ()),
    ("DROP FUNCTION IF EXISTS pg_advisory_lock(bigint)", ()),
    ("GRANT EXECUTE ON FUNCTION pg_advisory_lock(bigint) TO app", ()),
    ("SELECT myschema.set_config('a', 'b', false)", ()),
    ("WITH set_config (a) AS (SELECT 1) SELECT * FROM set_config", ()),
    ("WITH pg_advisory_lock (id) AS MATERIALIZED (SELECT 1) SELECT id FROM pg_advisory_lock", ()),
    ("DROP FUNCTION IF EXISTS set_config(text, text, boolean)", ()),
    # LISTEN / UNLISTEN
    ("LISTEN jobs", ("listen",)),
    ('LISTEN "Jobs"', ("listen",)),
    ("UNLISTEN *", ("unlisten",)),
    ("NOTIFY jobs, 'payload'", ()),
    ("SELECT pg_notify('jobs', 'x')", ()),
    ('SELECT "listen", "unlisten" FROM events', ()),
    ("SELECT listen FROM events", ()),
    # advisory locks
    ("SELECT pg_advisory_lock(42)", ("advisory_lock",)),
    ("SELECT pg_try_advisory_lock(1, 2)", ("advisory_lock",)),
    ("SELECT PG_ADVISORY_LOCK_SHARED(hashtext('job'))", ("advisory_lock",)),
    ("select pg_try_advisory_lock_shared($1)", ("advisory_lock",)),
    ("SELECT pg_catalog.pg_advisory_lock(7)", ("advisory_lock",)),
    ("SELECT id FROM jobs WHERE pg_try_advisory_lock(id) LIMIT 1", ("advisory_lock",)),
    ("SELECT pg_advisory_unlock(42)", ("advisory_unlock",)),
    ("SELECT pg_advisory_unlock_all()", ("advisory_unlock",)),
    ("SELECT pg_advisory_xact_lock(1)", ()),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", ()),
    ("SELECT * FROM pg_locks WHERE locktype = 'advisory'", ()),
    # temporary objects
    ("CREATE TEMP TABLE scratch (id int)", ("temp_object",)),
    ("create temporary table scratch as select 1", ("temp_object",)),
    ("CREATE GLOBAL TEMPORARY TABLE IF NOT EXISTS scratch (id int)", ("temp_object",)),
    ("CREATE TEMP TABLE s (id int) ON COMMIT DELETE ROWS", ("temp_object",)),
    ("CREATE TEMP TABLE s (id int) ON COMMIT PRESERVE ROWS", ("temp_object",)),
    ("CREATE TEMP VIEW v AS SELECT 1", ("temp_object",)),
    ("CREATE TEMP SEQUENCE s", ("temp_object",)),
    ("CREATE TABLE pg_temp.scratch (id int)", ("temp_object",)),
    ("SELECT * INTO TEMP scratch FROM jobs", ("temp_object",)),
    ("CREATE TEMP TABLE scratch (id int) ON COMMIT DROP", ()),
    ("CREATE TEMP TABLE scratch ON COMMIT DROP AS SELECT 1", ()),
    ("CREATE TABLE temp (id int)", ()),
    ("INSERT INTO temp VALUES (1)", ()),
    # SQL-level prepared statements and cursors
    ("PREPARE get_user (int) AS SELECT * FROM users WHERE id = $1", ("prepare",)),
    ("EXECUTE get_user(1)", ("execute",)),
    ("DEALLOCATE get_user", ("deallocate",)),
    ("DEALLOCATE PREPARE ALL", ("deallocate",)),
    ("PREPARE TRANSACTION 'tx1'", ()),
    ("COMMIT PREPARED 'tx1'", ()),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM jobs", ("with_hold_cursor",)),
    ("declare c no scroll cursor with hold for select 1", ("with_hold_cursor",)),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", ()),
    ("DECLARE c CURSOR FOR SELECT 'with hold'", ()),
    # text that only looks like session state
    ("SELECT 'SET search_path = x'", ()),
    ("SELECT 'it''s; SET x = 1; LISTEN y'", ()),
    ("SELECT E'it\\'s; SET x = 1'", ()),
    ("SELECT e'\\\\'; SET x = 1", ("set",)),
    ("SELECT E'\\'; LISTEN x; --'", ()),
    ("SELECT 'a\\'; LISTEN x; --'", ("listen",)),
    ("-- SET search_path = x\nSELECT 1", ()),
    ("SELECT 1 -- ; LISTEN x", ()),
    ("/* SET x = 1 */ SELECT 1", ()),
    ("/* outer /* SET x = 1 */ still a comment; LISTEN y */ SELECT 1", ()),
    ("SELECT $$; SET x = 1; $$", ()),
    ("SELECT $body$ LISTEN x; $inner$ $body$", ()),
    ("DO $$BEGIN PERFORM pg_advisory_lock(1); SET x = 1; END$$", ()),
    (
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN SET LOCAL x = 1; "
        "PERFORM pg_advisory_lock(1); END $f$",
        (),
    ),
    (
        "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql BEGIN ATOMIC "
        "SELECT CASE WHEN true THEN 1 END; SELECT pg_advisory_lock(1); END",
        (),
    ),
    ("CREATE VIEW locks AS SELECT pg_advisory_lock(1)", ()),
    ("EXPLAIN SELECT pg_advisory_lock(1)", ()),
    ("EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", ("advisory_lock",)),
    ('SELECT "SET" FROM t', ()),
    ("UPDATE settings SET value = 'x' WHERE name = 'a'", ()),
    ("ALTER ROLE app SET search_path = app", ()),
    ("ALTER DATABASE app SET statement_timeout = '5s'", ()),
    ("SELECT a % b, c %% d FROM t WHERE e = %(e)s", ()),
    ("SELECT x$y FROM t; SELECT 1", ()),
    # multi-statement strings: each statement is classified on its own
    ("SELECT 1; SET search_path = app", ("set",)),
    ("BEGIN; SET LOCAL search_path = app; SELECT 1; COMMIT", ()),
    ("LISTEN a; SELECT 1; SELECT pg_advisory_lock(1);", ("listen", "advisory_lock")),
    ("CREATE RULE r AS ON INSERT TO t DO ALSO (SELECT 1; SELECT 2); SET x = 1", ("set",)),
    ("SELECT 1;;;", ()),
    ("", ()),
    # text the server will reject is not flagged
    ("SET x = 'unterminated", ()),
    ("SELECT 1 /* unterminated", ()),
]


@pytest.mark.parametrize(("sql", "kinds"), REPORTED_IN_TRANSACTION)
def test_reported_in_transaction(sql: str, kinds: tuple[str, ...]) -> None:
    guard = SessionStateGuard("raise")
    if not kinds:
        assert guard.check(sql, in_transaction=True) == ()
        return
    with pytest.raises(SessionStateError) as caught:
        guard.check(sql, in_transaction=True)
    found = tuple(f.kind for f in classify(sql) if f.breaks_transaction_pooling)
    assert found == kinds
    for finding in classify(sql):
        assert finding.alternative in str(caught.value)


# (sql, kinds reported by check(..., in_transaction=False) in addition to the above)
OUTSIDE_TRANSACTION: list[tuple[str, tuple[str, ...]]] = [
    ("SET LOCAL search_path = app", ("outside_transaction",)),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", ("outside_transaction",)),
    ("SELECT set_config('app.user', '7', true)", ("outside_transaction",)),
    ("SELECT pg_advisory_xact_lock(1)", ("outside_transaction",)),
    ("SELECT pg_try_advisory_xact_lock(1)", ("outside_transaction",)),
    ("SET search_path = app", ("set",)),
    # a multi-statement string runs as one implicit transaction: SET LOCAL works there
    ("SET LOCAL search_path = app; SELECT 1", ()),
    ("SELECT pg_advisory_xact_lock(1); UPDATE jobs SET done = true", ()),
    ("CREATE TEMP TABLE s (id int) ON COMMIT DROP", ()),
    ("SELECT 1", ()),
]


@pytest.mark.parametrize(("sql", "kinds"), OUTSIDE_TRANSACTION)
def test_reported_outside_transaction(sql: str, kinds: tuple[str, ...]) -> None:
    guard = SessionStateGuard("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = guard.check(sql, in_transaction=False)
    assert tuple(f.kind for f in found) == kinds
    assert len(caught) == (1 if kinds else 0)


@pytest.mark.parametrize(
    ("sql", "target", "leaves"),
    [
        ("SET search_path = app", "search_path", True),
        ("SET SESSION statement_timeout = 0", "statement_timeout", True),
        ("SET TIME ZONE 'UTC'", "timezone", True),
        ("SET SESSION AUTHORIZATION bob", "session_authorization", True),
        ("SET myapp.tenant = 1", "myapp.tenant", True),
        ("SELECT set_config('App.Tenant', '1', false)", "app.tenant", True),
        ("LISTEN jobs", "jobs", True),
        ("UNLISTEN *", "*", False),
        ("SELECT pg_try_advisory_lock(1)", "pg_try_advisory_lock", True),
        ("SELECT pg_advisory_unlock(1)", "pg_advisory_unlock", False),
        ("PREPARE q AS SELECT 1", "q", True),
        ("EXECUTE q", "q", False),
        ("DEALLOCATE q", "q", False),
        ("DECLARE cur CURSOR WITH HOLD FOR SELECT 1", "cur", True),
        ("CREATE TEMP TABLE t (a int)", "temporary table", True),
        ("SET LOCAL search_path = app", "SET LOCAL", False),
    ],
)
def test_target_and_leaves_session_state(sql: str, target: str, leaves: bool) -> None:
    (finding,) = classify(sql)
    assert finding.target == target
    assert finding.leaves_session_state is leaves
    assert leaves_session_state(sql) is leaves


def test_clean_statements_leave_no_state() -> None:
    for sql in ("SELECT 1", "SET LOCAL x = 1", "SELECT pg_advisory_xact_lock(1)", "NOTIFY x"):
        assert not leaves_session_state(sql)


def test_findings_name_the_statement_position() -> None:
    findings = classify("SELECT 1; SET a = 1; SELECT 2; LISTEN b")
    assert [(f.index, f.kind) for f in findings] == [(1, "set"), (3, "listen")]
    assert "statement 2 `SET a = 1`" in findings[0].message()


def test_snippet_masks_literals_and_drops_comments() -> None:
    (finding,) = classify(
        "SET app.api_key = 'hunter2-secret' /* note */ ; SELECT 1",
    )
    assert "hunter2" not in finding.statement
    assert finding.statement == "SET app.api_key = '…'"
    (finding,) = classify("SELECT set_config('app.token', $tok$s3cr3t$tok$, false)")
    assert "s3cr3t" not in finding.message()


def test_snippet_is_truncated() -> None:
    (finding,) = classify("SET search_path = " + ", ".join(f"schema_{i}" for i in range(50)))
    assert len(finding.statement) == 80
    assert finding.statement.endswith("…")


def test_bytes_and_str_classify_alike() -> None:
    assert [f.kind for f in classify(b"LISTEN x")] == ["listen"]
    assert classify(b"SELECT 'LISTEN x'") == ()


def test_classify_is_cached_per_text() -> None:
    sql = "SELECT pg_advisory_lock(12345) /* cached */"
    assert classify(sql) is classify(sql)
    assert classify("SELECT 1 /* cached */") is classify("SELECT 1 /* cached */")


def test_cache_is_bounded() -> None:
    from poolguard._sqlstate_rules import analyze_short

    for i in range(CACHE_SIZE + 10):
        classify(f"SELECT {i} /* fill */")
    assert analyze_short.cache_info().currsize <= CACHE_SIZE


def test_warn_once_per_statement_with_log(caplog: pytest.LogCaptureFixture) -> None:
    guard = SessionStateGuard("warn")
    caplog.set_level(logging.WARNING, logger="poolguard.guard")
    with pytest.warns(SessionStateWarning, match="SET LOCAL inside a transaction"):
        guard.check("SET search_path = app", in_transaction=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.check("SET search_path = app", in_transaction=True)  # already reported
    records = [r for r in caplog.records if r.name == "poolguard.guard"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "search_path" in records[0].getMessage()
    with pytest.warns(SessionStateWarning, match="pg_advisory_xact_lock"):
        guard.check("SELECT pg_advisory_lock(1)", in_transaction=True)


def test_warning_points_at_the_application_line(caplog: pytest.LogCaptureFixture) -> None:
    guard = SessionStateGuard("warn")
    with pytest.warns(SessionStateWarning) as caught:
        line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
        guard.observe("LISTEN here", in_transaction=True)
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)
    assert f"test_guard.py:{line} in test_warning_points_at_the_application_line" in caplog.text


def test_observe_reports_and_returns_leaves_session_state() -> None:
    guard = SessionStateGuard("raise")
    assert guard.observe("SELECT 1", in_transaction=False) is False
    assert guard.observe("SET TIME ZONE 'UTC'", in_transaction=True) is True  # not reported
    assert guard.observe(object(), in_transaction=True) is False
    with pytest.raises(SessionStateError):
        guard.observe(b"LISTEN x", in_transaction=True)
    off = SessionStateGuard("off")
    assert off.observe("CREATE TEMP TABLE t (a int)", in_transaction=True) is True
    assert off.observe("SET LOCAL a = 1", in_transaction=False) is False


def test_raise_names_kind_and_alternative() -> None:
    guard = SessionStateGuard("raise")
    with pytest.raises(SessionStateError, match=r"set_config\(name, value, true\)") as caught:
        guard.check("SELECT set_config('search_path', 'app', false)", in_transaction=True)
    assert isinstance(caught.value, psycopg.ProgrammingError)
    assert "set_config(..., false)" in str(caught.value)
    with pytest.raises(SessionStateError, match="ON COMMIT DROP"):
        guard.check("CREATE TEMP TABLE t (a int)", in_transaction=True)
    with pytest.raises(SessionStateError, match="direct_dsn"):
        guard.check("LISTEN jobs", in_transaction=True)


def test_raise_reports_every_finding_every_time() -> None:
    guard = SessionStateGuard("raise")
    for _ in range(2):
        with pytest.raises(SessionStateError, match=r"LISTEN.*advisory"):
            guard.check("LISTEN a; SELECT pg_advisory_lock(1)", in_transaction=True)


def test_off_reports_nothing() -> None:
    guard = SessionStateGuard("off")
    assert guard.check("SET search_path = app", in_transaction=False) == ()
    assert guard.check_server_cursor("c", in_transaction=False, withhold=True) is None


def test_invalid_action_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"'warn', 'raise' or 'off'.*'loud'"):
        SessionStateGuard("loud")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("in_transaction", "withhold", "kind"),
    [
        (True, False, None),
        (True, True, "with_hold_cursor"),
        (False, True, "server_cursor"),
        (False, False, "server_cursor"),
    ],
)
def test_server_cursor(in_transaction: bool, withhold: bool, kind: str | None) -> None:
    found = server_cursor_finding("c1", in_transaction=in_transaction, withhold=withhold)
    assert (found.kind if found else None) == kind
    guard = SessionStateGuard("raise")
    if kind is None:
        assert (
            guard.check_server_cursor("c1", in_transaction=in_transaction, withhold=withhold)
            is None
        )
    else:
        with pytest.raises(SessionStateError, match="c1"):
            guard.check_server_cursor("c1", in_transaction=in_transaction, withhold=withhold)


_BAD = [
    "SET search_path = x",
    "LISTEN x",
    "SELECT pg_advisory_lock(1)",
    "SELECT set_config('a', 'b', false)",
    "CREATE TEMP TABLE t (a int)",
    "PREPARE p AS SELECT 1",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
]


@given(
    st.sampled_from(_BAD), st.sampled_from(["'{}'", "$${}$$", "$q${}$q$", "/* {} */", "-- {}\n"])
)
def test_hidden_statements_are_never_flagged(bad: str, wrapper: str) -> None:
    hidden = wrapper.format(bad.replace("'", "''") if wrapper == "'{}'" else bad)
    assert classify("SELECT 1, " + hidden + " AS x") == ()


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list("SETLIN $'\"-/*;(),ex_1\\\n"))))
def test_tokenizer_never_crashes(text: str) -> None:
    for finding in classify(text):
        assert finding.message()


@settings(max_examples=300)
@given(st.text())
def test_any_text_is_classified_or_ignored(text: str) -> None:
    for finding in classify(text):
        assert finding.message()
    assert isinstance(mask_literals(text), str)


@pytest.mark.parametrize(
    ("sql", "masked"),
    [
        (
            "SELECT * FROM users WHERE email = 'a@b.c' -- by email",
            "SELECT * FROM users WHERE email = '…'",
        ),
        ("ALTER ROLE app PASSWORD 'hunter2'", "ALTER ROLE app PASSWORD '…'"),
        (
            "ALTER ROLE app PASSWORD 'cut off by track_activity_query_si",
            "ALTER ROLE app PASSWORD '…",
        ),
        ("SELECT $$body$$, E'x\\'y', \"Quoted\"", "SELECT $…$, '…', \"Quoted\""),
        ("", ""),
    ],
)
def test_mask_literals(sql: str, masked: str) -> None:
    assert mask_literals(sql) == masked


# The reset decision: True when the rules saw state or could not judge; the guard stays quiet
# about what it could not judge (it warns only about what it knows breaks behind a pooler).
RESET_DECISIONS: list[tuple[str, bool]] = [
    ("SELECT 1", False),
    ("SELECT count(*) FROM t WHERE id IN (1, 2) AND x = ANY(%s)", False),
    ("INSERT INTO s.t (a, b) VALUES (1, now()), (2, lower('X'))", False),
    ("UPDATE t SET a = coalesce(b, 0) WHERE c IN (SELECT 1)", False),
    ("SELECT CAST(a AS numeric(10, 2)) FROM t AS x(a)", False),
    ("CREATE TABLE t (id bigint PRIMARY KEY, name varchar(20), CHECK (id > 0))", False),
    ("SELECT pg_catalog.format_type(1, 2)", False),
    ("DISCARD ALL", False),
    ("SELECT my_function(1)", True),
    ("SELECT app.audit('x')", True),
    ("SELECT app.set_config('a', 'b', false)", True),
    ('SELECT "MyFunction"()', True),
    ("DO $$BEGIN PERFORM 1; END$$", True),
    ("CALL refresh_all()", True),
    ("LOAD 'auto_explain'", True),
    ("SELECT set_config('app.tenant', %s, %s)", True),
    ("SELECT 1; SELECT my_function()", True),
]


@pytest.mark.parametrize(("sql", "reset"), RESET_DECISIONS)
def test_reset_when_state_seen_or_not_judged(sql: str, reset: bool) -> None:
    assert leaves_session_state(sql) is reset
    if reset and sql.lower().startswith(("do", "call", "load", "select")):
        assert classify(sql) == ()  # nothing the guard could name: no warning, just a reset


# The pre-filter may send harmless SQL to the tokenizer, never clear SQL the rules would report
# or reset for.
_PIECES = [
    "SELECT", "INSERT INTO t (a, b) VALUES", "UPDATE t SET a =", "WITH x AS (SELECT 1)",
    "select", " ", "(", ")", ",", "'x'", "'it''s'", '"T"', '"t" (', "t.", "pg_catalog.",
    "now()", "count(*)", "lower(", "my_fn(", "s.fn(", "set_config('a', 'b', false)",
    "pg_advisory_lock(1)", "INTO TEMP t", "temp", "AS x(a)", ";", "; SET x = 1", "--",
    "/*", "*/", "E'\\''", "$$", "%s", "IN (", "values (", "DO", "CALL", "\n", "LISTEN x",
    "\u0130now(", "x\u0130count(",
]  # fmt: skip


def _agrees_with_rules(sql: str) -> None:
    from poolguard._sqlprefilter import clears
    from poolguard._sqlstate_rules import _analyze_tokens

    if clears(sql):
        assert _analyze_tokens(sql) == ((), (), (), False), sql


@pytest.mark.parametrize(
    "sql",
    [s for s, _ in REPORTED_IN_TRANSACTION + OUTSIDE_TRANSACTION]
    + [s for s, _ in RESET_DECISIONS]
    + _BAD,
)
def test_prefilter_never_clears_what_the_rules_flag(sql: str) -> None:
    _agrees_with_rules(sql)


@settings(max_examples=500)
@given(st.lists(st.sampled_from(_PIECES), max_size=12))
def test_prefilter_agrees_with_rules_on_generated_sql(pieces: list[str]) -> None:
    _agrees_with_rules(" ".join(pieces))


def test_prefilter_clears_common_statements() -> None:
    from poolguard._sqlprefilter import clears

    assert clears('INSERT INTO "app_t" ("a", "b") VALUES (%s, now()) RETURNING "app_t"."id"')
    assert clears("SELECT count(*) FROM t WHERE id IN (1, 2) AND x = ANY(%s)")
    assert not clears("SELECT my_fn(1)")
    assert not clears("SELECT 1 -- set_config")


def test_long_statements_stay_bounded_and_are_reset() -> None:
    from poolguard._sqlprefilter import LONG_STATEMENT

    rows = ", ".join(f"({i}, 'a value; with a semicolon')" for i in range(LONG_STATEMENT // 20))
    bulk = f"INSERT INTO t (a, b) VALUES {rows}"
    assert len(bulk) > LONG_STATEMENT
    assert classify(bulk) == () and leaves_session_state(bulk)  # not read: reset on return
    script = "SET statement_timeout = 0;\n" + bulk
    assert [f.kind for f in classify(script)] == ["set"]  # a reported head: tokenized


def _found_only_by_reading_calls(finding: Finding) -> bool:
    """Findings the long-text check does not look for (documented in docs/settings.md)."""
    if finding.kind in ("set_config", "advisory_lock", "advisory_unlock"):
        return True
    if finding.kind == "temp_object":
        return finding.target == "SELECT INTO TEMP"
    return finding.kind == "outside_transaction" and not (finding.target or "").startswith("SET")


@settings(max_examples=500)
@given(st.lists(st.sampled_from(_PIECES), max_size=12))
def test_long_text_check_finds_every_reported_statement(pieces: list[str]) -> None:
    from poolguard._sqlprefilter import LONG_STATEMENT, long_needs_tokens
    from poolguard._sqlstate_rules import _analyze_tokens

    sql = " ".join(pieces) + " " * LONG_STATEMENT
    if not long_needs_tokens(sql):
        assert all(map(_found_only_by_reading_calls, _analyze_tokens(sql)[2])), sql
