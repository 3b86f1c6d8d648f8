"""asyncpg through the factory uses TLS as libpq would: sslmode and friends from the URL.

A real PostgreSQL with ``ssl = on`` and a throwaway certificate for 127.0.0.1 (openssl).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

import poolguard
from poolguard.testing import PostgresServer, start_postgres

sqlalchemy = pytest.importorskip("sqlalchemy")
pytest.importorskip("asyncpg")
from poolguard.sqlalchemy import aclose, create_async_engine  # noqa: E402


@pytest.fixture(scope="module")
def tls_server() -> Iterator[tuple[PostgresServer, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = Path(tempfile.mkdtemp(prefix="poolguard-tls-"))
    folder.chmod(0o755)  # the server may run as another user (postgres) when we are root
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    cert.chmod(0o644)
    key.chmod(0o600)
    if os.geteuid() == 0:  # PostgreSQL refuses a key that its own user does not own
        import pwd

        entry = pwd.getpwnam("postgres")
        os.chown(key, entry.pw_uid, entry.pw_gid)
    server = start_postgres(
        settings={"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}
    )
    try:
        yield server, cert
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def url(server: PostgresServer, query: str) -> str:
    return f"postgresql+asyncpg://{server.user}:{server.password}@127.0.0.1:{server.port}/postgres?{query}"


async def uses_tls(engine_url: str) -> bool:
    engine = create_async_engine(engine_url)
    try:
        async with engine.connect() as conn:
            sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            return bool((await conn.execute(sqlalchemy.text(sql))).scalar_one())
    finally:
        await engine.dispose()
        await aclose()


@pytest.mark.parametrize(
    ("query", "tls"),
    [("sslmode=verify-full&sslrootcert={cert}", True), ("sslmode=require", True),
     ("sslmode=disable", False)],
)  # fmt: skip
def test_sslmode_reaches_asyncpg(
    tls_server: tuple[PostgresServer, Path], query: str, tls: bool
) -> None:
    server, cert = tls_server
    assert asyncio.run(uses_tls(url(server, query.format(cert=cert)))) is tls
    poolguard.reset()


def test_verify_full_with_the_wrong_root_fails_and_says_why(
    tls_server: tuple[PostgresServer, Path], tmp_path: Path
) -> None:
    server, _ = tls_server
    other = tmp_path / "other.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=other", "-keyout", str(tmp_path / "other.key"), "-out", str(other)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with pytest.raises(poolguard.PoolConnectError, match="certificate verify failed") as info:
        asyncio.run(uses_tls(url(server, f"sslmode=verify-full&sslrootcert={other}")))
    assert server.password not in str(info.value)


def test_tls_against_a_server_without_it_is_refused(postgres_server: PostgresServer) -> None:
    dsn = conninfo_to_dict(postgres_server.dsn)
    plain = (
        f"postgresql+asyncpg://{dsn['user']}:{dsn['password']}@{dsn['host']}:{dsn['port']}"
        "/postgres?sslmode=require"
    )
    with pytest.raises(poolguard.PoolConnectError, match=r"(?i)ssl"):
        asyncio.run(uses_tls(plain))
