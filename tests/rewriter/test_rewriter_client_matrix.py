"""The client matrix: each real driver runs the same workload directly against PostgreSQL and
through the rewriter (4 concurrent workers over 2 server connections), and the results must
be equal value by value, with no error but the one each workload provokes on purpose.

The drivers come from Debian (pgJDBC, php-pgsql, ruby-pg, pgbench) and npm (``pg``, installed
into ``$POOLGUARD_NODE_MODULES`` or a cache folder). A missing one skips its test, unless
``POOLGUARD_REQUIRE_CLIENTS=1`` (set by ``.ci/run``) makes it a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from poolguard.rewriter import RewriterHandle
from poolguard.testing import find_postgres_bindir

CLIENTS = Path(__file__).parent / "clients"
WORKERS = 4
JDBC_JAR = Path("/usr/share/java/postgresql.jar")


def _require(what: str, hint: str) -> None:
    if os.environ.get("POOLGUARD_REQUIRE_CLIENTS") == "1":
        pytest.fail(f"POOLGUARD_REQUIRE_CLIENTS=1 but {what} is missing ({hint})")
    pytest.skip(f"{what} is missing ({hint})")


@pytest.fixture
def sides(pg_dsn: str, make_rewriter: Callable[..., RewriterHandle]) -> Iterator[dict[str, Any]]:
    """Connection details for "direct" and "rewriter", each with its own empty table."""
    proxy = make_rewriter(pool_size=2)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        for table in ("direct_items", "rewriter_items"):
            admin.execute(f"create table {table} (id int primary key, v text, n numeric)")
    direct = conninfo_to_dict(pg_dsn)
    via = conninfo_to_dict(proxy.dsn)
    yield {"direct": (direct, "direct_items"), "rewriter": (via, "rewriter_items")}


def _expected_errors(results: list[list[Any]]) -> list[Any]:
    return [r for r in results if r and r[0] == "error"]


def _compare(outputs: dict[str, list[list[list[Any]]]], *, errors_per_worker: int = 1) -> None:
    """Same results both ways, and only the provoked division by zero failed."""
    assert outputs["rewriter"] == outputs["direct"]
    for worker in outputs["direct"]:
        assert _expected_errors(worker) == [["error", "22012"]] * errors_per_worker
        assert len(worker) == 7 + 3 + errors_per_worker  # 7 rows, count/sum, update, list


def _run_processes(argvs: list[list[str]], env: dict[str, str]) -> list[list[list[Any]]]:
    """Start the workers at once (so they share the proxy's two server connections)."""
    procs = [
        subprocess.Popen(a, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for a in argvs
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{proc.args}: {err[-2000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _pg_env(info: dict[str, Any]) -> dict[str, str]:
    return dict(
        os.environ,
        PGHOST=str(info["host"]),
        PGPORT=str(info["port"]),
        PGUSER=str(info["user"]),
        PGPASSWORD=str(info["password"]),
        PGDATABASE=str(info["dbname"]),
    )


# --- Python drivers (in process) ------------------------------------------------------------


def _psycopg_worker(conninfo: dict[str, Any], table: str, worker: int) -> list[list[Any]]:
    base = worker * 1000
    out: list[list[Any]] = []
    with psycopg.connect(**conninfo, prepare_threshold=0) as c:
        with c.pipeline(), c.cursor() as cur:
            for i in range(20):
                cur.execute(
                    f"insert into {table} (id, v, n) values (%s, %s, %s::numeric)",
                    (base + i, f"w{worker}-{i}", str(i * 1.5)),
                )
        c.commit()
        for i in range(0, 20, 3):
            row = c.execute(f"select id, v, n::text from {table} where id = %s", (base + i,))
            out.append(list(row.fetchone() or ()))
        try:
            c.execute("select 1/%s::int", (0,))
        except psycopg.Error as exc:
            out.append(["error", exc.sqlstate])
        c.rollback()
        c.autocommit = True
        agg = f"select count(*)::int, sum(n)::text from {table} where id >= %s and id < %s"
        out.append(list(c.execute(agg, (base, base + 1000)).fetchone() or ()))
        upd = c.execute(f"update {table} set v = v || '!' where id = %s", (base + 1,))
        out.append(["updated", upd.rowcount])
        every = f"select string_agg(v, ',' order by id) from {table} where id >= %s and id < %s"
        out.append(list(c.execute(every, (base, base + 1000)).fetchone() or ()))
    return out


def test_psycopg(sides: dict[str, Any]) -> None:
    outputs = {}
    for side, (info, table) in sides.items():
        results: list[list[list[Any]]] = [[] for _ in range(WORKERS)]

        def run(
            w: int, info: dict[str, Any] = info, table: str = table, into: list[Any] = results
        ) -> None:
            into[w] = _psycopg_worker(info, table, w)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        outputs[side] = results
    _compare(outputs)


async def _asyncpg_worker(info: dict[str, Any], table: str, worker: int) -> list[list[Any]]:
    base = worker * 1000
    out: list[list[Any]] = []
    c = await asyncpg.connect(
        host=info["host"],
        port=int(info["port"]),
        user=info["user"],
        password=info["password"],
        database=info["dbname"],
    )
    try:
        async with c.transaction():
            await c.executemany(
                f"insert into {table} (id, v, n) values ($1, $2, $3::text::numeric)",
                [(base + i, f"w{worker}-{i}", str(i * 1.5)) for i in range(20)],
            )
        one = await c.prepare(f"select id, v, n::text from {table} where id = $1")
        for i in range(0, 20, 3):
            out.append(list(await one.fetchrow(base + i)))
        tr = c.transaction()
        await tr.start()
        try:
            await c.fetchval("select 1/$1::int", 0)
        except asyncpg.PostgresError as exc:
            out.append(["error", exc.sqlstate])
        await tr.rollback()
        agg = f"select count(*)::int, sum(n)::text from {table} where id >= $1 and id < $2"
        out.append(list(await c.fetchrow(agg, base, base + 1000)))
        status = await c.execute(f"update {table} set v = v || '!' where id = $1", base + 1)
        out.append(["updated", int(status.split()[-1])])
        every = f"select string_agg(v, ',' order by id) from {table} where id >= $1 and id < $2"
        async with c.transaction():  # a server-side cursor, as asyncpg iterates
            out.append([r[0] async for r in c.cursor(every, base, base + 1000)])
    finally:
        await c.close()
    return out


def test_asyncpg(sides: dict[str, Any]) -> None:
    async def main() -> dict[str, list[list[list[Any]]]]:
        outputs = {}
        for side, (info, table) in sides.items():
            outputs[side] = list(
                await asyncio.gather(*(_asyncpg_worker(info, table, w) for w in range(WORKERS)))
            )
        return outputs

    _compare(asyncio.run(main()))


# --- other languages (subprocesses) ---------------------------------------------------------


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """A folder holding npm's ``pg`` (installed there once if it is not)."""
    root = Path(
        os.environ.get("POOLGUARD_NODE_MODULES")
        or Path(tempfile.gettempdir()) / "poolguard-node-clients"
    )
    if (root / "node_modules" / "pg").is_dir():
        return root / "node_modules"
    if shutil.which("node") is None or shutil.which("npm") is None:
        _require("node/npm", "Debian: apt-get install nodejs npm")
    done = subprocess.run(
        ["npm", "install", "--prefix", str(root), "pg@8", "--no-audit", "--no-fund", "--silent"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        _require("npm package pg", f"npm install failed: {done.stderr[-500:]}")
    return root / "node_modules"


def test_node_postgres(sides: dict[str, Any], node_modules: Path) -> None:
    outputs = {}
    for side, (info, table) in sides.items():
        env = dict(_pg_env(info), NODE_PATH=str(node_modules))
        argvs = [["node", str(CLIENTS / "workload.js"), str(w), table] for w in range(WORKERS)]
        outputs[side] = _run_processes(argvs, env)
    _compare(outputs)


@pytest.fixture(scope="session")
def jdbc_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Workload.java compiled against Debian's pgJDBC."""
    if shutil.which("javac") is None or shutil.which("java") is None:
        _require("a JDK", "Debian: apt-get install default-jdk-headless")
    if not JDBC_JAR.exists():
        _require("pgJDBC", "Debian: apt-get install libpostgresql-jdbc-java")
    out = tmp_path_factory.mktemp("jdbc")
    subprocess.run(
        ["javac", "-d", str(out), "-cp", str(JDBC_JAR), str(CLIENTS / "Workload.java")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def test_pgjdbc(sides: dict[str, Any], jdbc_classes: Path) -> None:
    outputs = {}
    for side, (info, table) in sides.items():
        url = f"jdbc:postgresql://{info['host']}:{info['port']}/{info['dbname']}"
        java = ["java", "-Xshare:auto", "-XX:TieredStopAtLevel=1"]
        cp = f"{jdbc_classes}:{JDBC_JAR}"
        argvs = [
            [*java, "-cp", cp, "Workload", url, info["user"], info["password"], str(w), table]
            for w in range(WORKERS)
        ]
        outputs[side] = _run_processes(argvs, dict(os.environ))
    _compare(outputs, errors_per_worker=3)


def test_php_pdo_without_emulated_prepares(sides: dict[str, Any]) -> None:
    if shutil.which("php") is None:
        _require("php", "Debian: apt-get install php-cli php-pgsql")
    modules = subprocess.run(["php", "-m"], capture_output=True, text=True).stdout
    if "pdo_pgsql" not in modules:
        _require("php's pdo_pgsql", "Debian: apt-get install php-pgsql")
    outputs = {}
    for side, (info, table) in sides.items():
        dsn = f"pgsql:host={info['host']};port={info['port']};dbname={info['dbname']}"
        argvs = [
            [
                "php",
                str(CLIENTS / "workload.php"),
                dsn,
                info["user"],
                info["password"],
                str(w),
                table,
            ]
            for w in range(WORKERS)
        ]
        outputs[side] = _run_processes(argvs, dict(os.environ))
    _compare(outputs)


def test_ruby_pg(sides: dict[str, Any]) -> None:
    if shutil.which("ruby") is None:
        _require("ruby", "Debian: apt-get install ruby-pg")
    if subprocess.run(["ruby", "-e", "require 'pg'"], capture_output=True).returncode != 0:
        _require("ruby's pg gem", "Debian: apt-get install ruby-pg")
    outputs = {}
    for side, (info, table) in sides.items():
        conninfo = psycopg.conninfo.make_conninfo(**info)
        argvs = [["ruby", str(CLIENTS / "workload.rb"), conninfo, str(w), table] for w in range(4)]
        outputs[side] = _run_processes(argvs, dict(os.environ))
    _compare(outputs)


def test_pgbench_prepared(sides: dict[str, Any], tmp_path: Path) -> None:
    """pgbench -M prepared, 8 clients x 50 transactions of a script with a transaction block
    and statements outside one; the counters it leaves must be the same both ways.

    One thread per client (-j 8): pgbench prepares with a blocking call, so a thread serving
    several clients would wait on one that waits for a server connection held by another
    client of the same thread, mid-transaction (with any transaction pooler)."""
    pgbench = find_postgres_bindir() / "pgbench"
    script = tmp_path / "counters.sql"
    script.write_text(
        "\\set d random(1, 3)\n"
        "BEGIN;\n"
        "UPDATE TABLE_counters SET n = n + 1 WHERE id = :client_id;\n"
        "SELECT n FROM TABLE_counters WHERE id = :client_id;\n"
        "END;\n"
        "UPDATE TABLE_counters SET m = m + :d - :d + 1 WHERE id = :client_id;\n"
    )
    finals = {}
    for side, (info, table) in sides.items():
        counters = table.replace("items", "counters")
        with psycopg.connect(**sides["direct"][0], autocommit=True) as admin:
            admin.execute(f"create table {counters} (id int primary key, n int, m int)")
            admin.execute(f"insert into {counters} select g, 0, 0 from generate_series(0, 7) g")
        side_script = tmp_path / f"{side}.sql"
        side_script.write_text(script.read_text().replace("TABLE_counters", counters))
        argv = ["-n", "-M", "prepared", "-f", str(side_script), "-c", "8", "-j", "8", "-t", "50"]
        done = subprocess.run(
            [str(pgbench), *argv],
            env=_pg_env(info),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        processed = re.search(r"actually processed: (\d+)/(\d+)", done.stdout)
        assert processed is not None and processed.group(1) == processed.group(2) == "400"
        assert "failed transactions: 0 " in done.stdout
        with psycopg.connect(**sides["direct"][0]) as admin:
            finals[side] = admin.execute(f"select id, n, m from {counters} order by id").fetchall()
    assert finals["rewriter"] == finals["direct"] == [(i, 50, 50) for i in range(8)]
