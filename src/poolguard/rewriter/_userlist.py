"""The userlist file: who may log in to the proxy, in PgBouncer's auth_file format.

One entry a line, ``"user" "password"``, where the password is either the plain password or
PostgreSQL's SCRAM secret (``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``, as in
pg_authid). A double quote inside a value is written twice. Blank lines and lines starting with
``;`` or ``#`` are skipped. md5 hashes are refused: the proxy speaks SCRAM to its clients.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ._auth import ScramVerifier

_LINE = re.compile(r'\s*"((?:[^"]|"")*)"\s+"((?:[^"]|"")*)"')


@dataclass(frozen=True)
class Credential:
    """How one user's password is checked, and how the proxy logs in upstream as that user."""

    verifier: ScramVerifier
    # The password the proxy logs in upstream with (None: the upstream asks for none).
    password: str | None = field(default=None, repr=False)
    # A SCRAM secret, no password: the proxy logs in upstream with the keys it recovers from
    # the client's own SCRAM proof, so the client must do SCRAM even on a trusted socket.
    secret_only: bool = False


def parse_userlist(text: str, source: str) -> dict[str, Credential]:
    """Raises ValueError naming ``source`` and the line, never a password."""
    users: dict[str, Credential] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        match = _LINE.match(line)
        if match is None or line[match.end() :].strip():
            raise ValueError(
                f'{source}:{number}: expected "user" "password" (both in double quotes)'
            )
        user, secret = (g.replace('""', '"') for g in match.groups())
        if not user:
            raise ValueError(f"{source}:{number}: empty user name")
        if secret.startswith("SCRAM-SHA-256$"):
            try:
                users[user] = Credential(ScramVerifier.from_secret(secret), secret_only=True)
            except ValueError as exc:
                raise ValueError(f"{source}:{number}: {exc} for user {user!r}") from None
        elif secret.startswith("md5") and len(secret) == 35:
            raise ValueError(
                f"{source}:{number}: user {user!r} has an md5 hash: the proxy authenticates "
                "clients with SCRAM-SHA-256, so give the plain password or the SCRAM secret"
            )
        elif not secret:
            raise ValueError(f"{source}:{number}: empty password for user {user!r}")
        else:
            users[user] = Credential(ScramVerifier.from_password(secret), secret)
    return users


def load_userlist(path: str) -> dict[str, Credential]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"userlist {path} cannot be read: {exc.strerror}") from None
    return parse_userlist(text, path)
