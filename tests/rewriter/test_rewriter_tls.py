"""TLS: to the upstream as the DSN's sslmode/sslrootcert say (verify-full against a server
with a certificate from a CA made here), and to clients that ask for it."""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from poolguard import rewriter
from poolguard.testing import PostgresServer


@dataclass
class Certs:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path
    server_key: Path  # a copy of key the PostgreSQL server may read


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    """A test CA, another CA, and a certificate for 127.0.0.1/localhost signed by the first."""
    folder = Path(tempfile.mkdtemp(prefix="poolguard-tls-"))
    folder.chmod(0o755)  # the PostgreSQL server runs as another user when the tests run as root
    _ca(folder, "ca")
    _ca(folder, "other")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=folder,
    )  # fmt: skip
    (folder / "server.pem").chmod(0o644)
    server_key = folder / "pg-server.key"
    server_key.write_bytes((folder / "server.key").read_bytes())
    server_key.chmod(0o600)
    if os.geteuid() == 0:  # PostgreSQL wants its key owned by the user it runs as
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            entry = pwd.getpwnam("nobody")
        os.chown(server_key, entry.pw_uid, entry.pw_gid)
    try:
        yield Certs(
            ca=folder / "ca.pem",
            other_ca=folder / "other.pem",
            cert=folder / "server.pem",
            key=folder / "server.key",
            server_key=server_key,
        )
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.fixture(scope="module")
def tls_server(postgres_factory: Callable[..., PostgresServer], certs: Certs) -> PostgresServer:
    return postgres_factory(
        settings={
            "ssl": "on",
            "ssl_cert_file": str(certs.cert),
            "ssl_key_file": str(certs.server_key),
        }
    )


def test_upstream_verify_full_with_a_test_ca(tls_server: PostgresServer, certs: Certs) -> None:
    dsn = f"{tls_server.dsn} sslmode=verify-full sslrootcert={certs.ca}"
    handle = rewriter.start(dsn, pool_size=1, isolate=False)
    try:
        with psycopg.connect(handle.dsn, autocommit=True) as conn:
            pid = conn.execute("select pg_backend_pid()").fetchone()
        with tls_server.connect(autocommit=True) as admin:
            row = admin.execute("select ssl from pg_stat_ssl where pid = %s", pid).fetchone()
        assert row == (True,)
    finally:
        handle.stop()


def test_upstream_certificate_from_another_ca_is_refused(
    tls_server: PostgresServer, certs: Certs
) -> None:
    dsn = f"{tls_server.dsn} sslmode=verify-full sslrootcert={certs.other_ca}"
    with pytest.raises(rewriter.UpstreamError, match="certificate verify failed"):
        rewriter.start(dsn, pool_size=1)


def test_sslmode_require_against_a_server_without_tls(postgres_server: PostgresServer) -> None:
    with pytest.raises(rewriter.UpstreamError, match="does not accept TLS"):
        rewriter.start(postgres_server.dsn + " sslmode=require", pool_size=1)
    with pytest.raises(ValueError, match="sslrootcert"):
        rewriter.start(postgres_server.dsn + " sslmode=verify-full", pool_size=1)


def test_clients_over_tls(pg_dsn: str, certs: Certs) -> None:
    handle = rewriter.start(pg_dsn, pool_size=1, tls_cert=str(certs.cert), tls_key=str(certs.key))
    try:
        verified = f"{handle.dsn} sslmode=verify-full sslrootcert={certs.ca}"
        with psycopg.connect(verified) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("select 1").fetchone() == (1,)
        with psycopg.connect(handle.dsn + " sslmode=disable") as conn:  # plain still allowed
            assert not conn.pgconn.ssl_in_use
            assert conn.execute("select 2").fetchone() == (2,)
    finally:
        handle.stop()
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        rewriter.start(pg_dsn, tls_cert=str(certs.cert))
