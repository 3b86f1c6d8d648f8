"""The issue's "Done when" cases against a real PostgreSQL, at the protocol level.

Where PostgreSQL defines the answer, the same message sequence is sent straight to the server
and through the rewriter and the replies compared.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from rawpg import (
    FLUSH,
    SYNC,
    RawClient,
    bind,
    close,
    describe,
    errors,
    execute,
    kinds,
    parse,
    query,
    replies,
    rows,
)

from poolguard.rewriter import RewriterHandle
from poolguard.rewriter import _protocol as p

INT4, INT8, TEXT = 23, 20, 25


def both(pg_dsn: str, proxy: RewriterHandle, *steps: tuple[bytes, ...]) -> None:
    """Run ``steps`` (each a batch of messages) directly and through the proxy; same replies."""
    with RawClient(pg_dsn) as direct, RawClient(proxy.dsn) as via:
        for batch in steps:
            want, got = direct.run(*batch), via.run(*batch)
            assert replies(got) == replies(want), f"batch {kinds(want)}"
            assert_released(proxy)


def assert_released(proxy: RewriterHandle) -> None:
    """Every session idle outside a transaction has given its server connection back, with
    nothing outstanding: the proxy's bookkeeping of replies matched the server's."""
    deadline = time.monotonic() + 2
    while True:
        stuck = [
            s
            for s in list(proxy._proxy.sessions.values())
            if s.ex.status == b"I" and (s.backend is not None or s.ex.pending)
        ]
        if not stuck or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert stuck == []


def backend_pid(c: RawClient) -> int:
    return int(rows(c.run(query(b"select pg_backend_pid()")))[0][0] or 0)


def prepared(c: RawClient) -> list[list[str | None]]:
    """(statement text, parameter types) prepared on the connection's current backend."""
    got = c.run(
        query(b"select statement, parameter_types::text from pg_prepared_statements order by 1, 2")
    )
    return rows(got)


def test_statement_prepared_on_one_backend_is_used_on_another(proxy: RewriterHandle) -> None:
    with RawClient(proxy.dsn) as a, RawClient(proxy.dsn) as holder:
        first = a.run(parse(b"s", b"select pg_backend_pid()"), bind(b"s"), execute(), SYNC)
        assert kinds(first) == "12DCZ"
        pid_x = int(rows(first)[0][0] or 0)
        holder.run(query(b"begin"))  # takes the only idle backend, X, and keeps it
        assert backend_pid(holder) == pid_x
        second = a.run(bind(b"s"), execute(), SYNC)
        assert kinds(second) == "2DCZ"
        assert int(rows(second)[0][0] or 0) != pid_x
        holder.run(query(b"commit"))


def test_two_clients_same_name_different_sql(make_rewriter: Callable[..., RewriterHandle]) -> None:
    proxy = make_rewriter(pool_size=1)
    with RawClient(proxy.dsn) as a, RawClient(proxy.dsn) as b:
        assert kinds(a.run(parse(b"s1", b"select 'a'"), SYNC)) == "1Z"
        assert kinds(b.run(parse(b"s1", b"select 'b'"), SYNC)) == "1Z"
        assert rows(a.run(bind(b"s1"), execute(), SYNC)) == [["a"]]
        assert rows(b.run(bind(b"s1"), execute(), SYNC)) == [["b"]]


def test_same_sql_different_names_is_prepared_once(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    proxy = make_rewriter(pool_size=1)
    with RawClient(proxy.dsn) as a, RawClient(proxy.dsn) as b:
        a.run(parse(b"one", b"select 42"), SYNC)
        b.run(parse(b"two", b"select 42"), SYNC)
        a.run(parse(b"three", b"select 42"), SYNC)
        for c, name in ((a, b"one"), (b, b"two"), (a, b"three")):
            assert rows(c.run(bind(name), execute(), SYNC)) == [["42"]]
        assert [r[0] for r in prepared(a)].count("select 42") == 1


def test_same_text_different_parameter_types(make_rewriter: Callable[..., RewriterHandle]) -> None:
    proxy = make_rewriter(pool_size=1)
    with RawClient(proxy.dsn) as c:
        c.run(parse(b"i", b"select $1", (INT4,)), parse(b"t", b"select $1", (TEXT,)), SYNC)
        di = c.run(describe(b"i"), SYNC)
        dt = c.run(describe(b"t"), SYNC)
        assert di[0][0] == dt[0][0] == b"t"
        assert di[0][1] != dt[0][1]  # ParameterDescription: int4 vs text
        assert prepared(c) == [["select $1", "{integer}"], ["select $1", "{text}"]]


def test_reply_order_with_a_cached_parse(pg_dsn: str, proxy: RewriterHandle) -> None:
    # The second client's Parse is answered by the proxy (the backend already has the
    # statement); its ParseComplete must still come first, then Bind's, as PostgreSQL does.
    sql = b"select $1::int + 1"
    with RawClient(proxy.dsn) as other:
        other.run(parse(b"warm", sql), SYNC)
    both(
        pg_dsn,
        proxy,
        (parse(b"s", sql), bind(b"s", b"1"), execute(), SYNC),
        (parse(b"t", sql), bind(b"t", b"2"), describe(b"", b"P"), execute(), SYNC),
        (parse(b"u", sql), FLUSH),
        (bind(b"u", b"3"), execute(), parse(b"v", sql), bind(b"v", b"4"), execute(), SYNC),
    )


def test_close_then_reuse_the_name(pg_dsn: str, proxy: RewriterHandle) -> None:
    both(
        pg_dsn,
        proxy,
        (parse(b"s", b"select 1"), bind(b"s"), execute(), SYNC),
        (close(b"s"), SYNC),
        (bind(b"s"), execute(), SYNC),  # gone: 26000
        (parse(b"s", b"select 2"), bind(b"s"), execute(), SYNC),
        (
            close(b"s"),
            close(b"never-existed"),
            parse(b"s", b"select 3"),
            bind(b"s"),
            execute(),
            SYNC,
        ),
    )


def test_standalone_describe_on_a_fresh_backend(pg_dsn: str, proxy: RewriterHandle) -> None:
    with RawClient(proxy.dsn) as a, RawClient(proxy.dsn) as holder:
        a.run(parse(b"s", b"select $1::int as n, 'x'::text as t"), SYNC)
        holder.run(query(b"begin"))  # a's next request lands on a backend without "s"
        got = a.run(describe(b"s"), SYNC)
        holder.run(query(b"commit"))
    with RawClient(pg_dsn) as d:
        want = d.run(parse(b"s", b"select $1::int as n, 'x'::text as t"), SYNC)
        want = d.run(describe(b"s"), SYNC)
    assert kinds(got) == "tTZ"
    assert got == want


def test_unknown_name_gets_26000_and_the_connection_still_works(
    pg_dsn: str, proxy: RewriterHandle
) -> None:
    both(
        pg_dsn,
        proxy,
        (bind(b"nope"), execute(), SYNC),
        (describe(b"nope"), SYNC),
        (bind(b""), execute(), SYNC),
        (query(b"begin"),),
        (parse(b"ok", b"select 1"), bind(b"ok"), execute(), bind(b"nope"), execute(), SYNC),
        (query(b"select 1"),),  # the failed transaction is still failed
        (query(b"rollback"),),
        (query(b"select 5"),),
    )
    with RawClient(proxy.dsn) as c:
        assert errors(c.run(bind(b"nope"), execute(), SYNC)) == [
            ("26000", 'prepared statement "nope" does not exist')
        ]


def test_failed_parse_leaves_no_mapping_and_can_be_reparsed(
    pg_dsn: str, proxy: RewriterHandle
) -> None:
    both(
        pg_dsn,
        proxy,
        (parse(b"s", b"select no_such_column"), SYNC),
        (bind(b"s"), execute(), SYNC),
        (parse(b"s", b"select 'second try'"), bind(b"s"), execute(), SYNC),
    )


def test_duplicate_named_parse_gets_42P05(pg_dsn: str, proxy: RewriterHandle) -> None:
    both(
        pg_dsn,
        proxy,
        (parse(b"s", b"select 1"), SYNC),
        (parse(b"s", b"select 2"), SYNC),
        (parse(b"s", b"select 1"), bind(b"s"), execute(), SYNC),
        (query(b"begin"),),
        (parse(b"s", b"select 1"), SYNC),  # error inside a transaction block aborts it
        (query(b"select 1"),),
        (query(b"rollback"),),
        (bind(b"s"), execute(), SYNC),
    )
    with RawClient(proxy.dsn) as c:
        c.run(parse(b"s", b"select 1"), SYNC)
        assert errors(c.run(parse(b"s", b"select 1"), SYNC)) == [
            ("42P05", 'prepared statement "s" already exists')
        ]


def test_mid_pipeline_error_skips_to_sync(pg_dsn: str, proxy: RewriterHandle) -> None:
    both(
        pg_dsn,
        proxy,
        (
            parse(b"a", b"select 1 / $1::int"),
            bind(b"a", b"0"),
            execute(),
            parse(b"b", b"select 2"),  # skipped by the server: no statement "b"
            bind(b"b"),
            execute(),
            close(b"a"),  # skipped too: "a" survives
            SYNC,
            parse(b"c", b"select 3"),
            bind(b"c"),
            execute(),
            SYNC,
        ),
        (bind(b"b"), execute(), SYNC),
        (bind(b"a", b"4"), execute(), SYNC),
        (parse(b"b", b"select 2"), bind(b"b"), execute(), SYNC),
    )


def test_lru_bound_is_visible_in_pg_prepared_statements(
    make_rewriter: Callable[..., RewriterHandle],
) -> None:
    proxy = make_rewriter(pool_size=1, max_prepared=3)
    with RawClient(proxy.dsn) as c:
        for i in range(6):
            c.run(parse(b"s%d" % i, b"select %d" % i), SYNC)
        assert len(prepared(c)) <= 3
        for i in range(6):  # evicted ones come back transparently
            assert rows(c.run(bind(b"s%d" % i), execute(), SYNC)) == [[str(i)]]
        texts = [r[0] for r in prepared(c)]
        assert len(texts) <= 3
        assert "select 5" in texts


@pytest.mark.parametrize("sql", [b"DEALLOCATE ALL", b"DISCARD ALL"])
def test_deallocate_all_and_discard_all(pg_dsn: str, proxy: RewriterHandle, sql: bytes) -> None:
    with RawClient(proxy.dsn) as other:
        other.run(parse(b"keep", b"select 'other'"), SYNC)
        both(
            pg_dsn,
            proxy,
            (parse(b"a", b"select 'other'"), parse(b"b", b"select 2"), SYNC),
            (query(sql),),
            (bind(b"a"), execute(), SYNC),  # the client's statements are gone, as on PostgreSQL
            (parse(b"a", b"select 'other'"), bind(b"a"), execute(), SYNC),  # no 42P05
        )
        # Another client's statement survives the server-side drop: it is prepared again.
        assert rows(other.run(bind(b"keep"), execute(), SYNC)) == [["other"]]


def test_sql_deallocate_name(pg_dsn: str, proxy: RewriterHandle) -> None:
    with RawClient(proxy.dsn) as other:
        other.run(parse(b"x", b"select 'shared'"), SYNC)
        both(
            pg_dsn,
            proxy,
            (parse(b"s", b"select 'shared'"), SYNC),
            (query(b'DEALLOCATE "s"'),),
            (bind(b"s"), execute(), SYNC),
            (parse(b"s", b"select 'shared'"), SYNC),
            # the extended-protocol form, as libpq < 17 sends it
            (parse(b"", b"DEALLOCATE s"), bind(b""), describe(b"", b"P"), execute(), SYNC),
            (parse(b"s", b"select 'again'"), bind(b"s"), execute(), SYNC),
            (query(b"DEALLOCATE missing"),),
            (parse(b"s", b"select 'again'"), SYNC),
            (query(b"begin"),),
            (query(b"select 1/0"),),
            (query(b"DEALLOCATE s"),),  # refused in a failed transaction: "s" stays
            (query(b"rollback"),),
            (bind(b"s"), execute(), SYNC),
        )
        assert rows(other.run(bind(b"x"), execute(), SYNC)) == [["shared"]]


def test_unnamed_statement_across_syncs(pg_dsn: str, proxy: RewriterHandle) -> None:
    with RawClient(proxy.dsn) as c, RawClient(proxy.dsn) as holder:
        assert kinds(c.run(parse(b"", b"select $1::int * 3", (INT4,)), SYNC)) == "1Z"
        pid = backend_pid(holder)
        holder.run(query(b"begin"))
        got = c.run(bind(b"", b"5"), execute(), SYNC, bind(b"", b"6"), execute(), SYNC)
        assert rows(got) == [["15"], ["18"]]
        holder.run(query(b"commit"))
        assert pid  # holder really held a backend
    both(
        pg_dsn,
        proxy,
        (parse(b"", b"select 1"), SYNC),
        (bind(b""), execute(), SYNC),
        (query(b"select 2"),),  # a simple Query drops the unnamed statement
        (bind(b""), execute(), SYNC),
        (parse(b"", b"select 3"), close(b""), bind(b""), execute(), SYNC),
    )


def test_portal_suspended_and_resumed(pg_dsn: str, proxy: RewriterHandle) -> None:
    both(
        pg_dsn,
        proxy,
        (query(b"begin"),),
        (
            parse(b"s", b"select generate_series(1, 5)"),
            bind(b"s", portal=b"cur"),
            execute(b"cur", 2),
            execute(b"cur", 2),
            execute(b"cur", 2),
            SYNC,
        ),
        (query(b"commit"),),
    )


def _copy_in_extended(c: RawClient) -> list[tuple[str, object]]:
    # libpq's order for COPY FROM STDIN over the extended protocol: a Sync right after Execute
    # (ignored by the server while the copy runs), then the data, CopyDone and another Sync.
    c.send(parse(b"", b"copy ci from stdin"), bind(b""), execute(), SYNC)
    got = []
    while True:
        kind, body = c.read()
        got.append((kind, body))
        if kind == b"G":
            break
    c.send(p.frame(b"d", b"1\n2\n"), p.frame(b"c"), SYNC)
    got += c.until_ready()
    got += c.run(query(b"select count(*) from ci"))
    return replies(got)


def test_copy_in_over_the_extended_protocol(
    pg_dsn: str, make_rewriter: Callable[..., RewriterHandle]
) -> None:
    proxy = make_rewriter(pool_size=1)
    with RawClient(pg_dsn) as d:
        d.run(query(b"create table ci (a int)"))
        want = _copy_in_extended(d)
        d.run(query(b"truncate ci"))
    with RawClient(proxy.dsn) as c, RawClient(proxy.dsn) as other:
        assert _copy_in_extended(c) == want
        # The only server connection went back to the pool: the proxy saw the copy end.
        other.sock.settimeout(5)
        assert rows(other.run(query(b"select 1"))) == [["1"]]
