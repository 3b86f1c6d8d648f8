"""Settings: one frozen, validated description of a pool, built from arguments, env and the DSN.

Precedence: keyword arguments, then ``POOLGUARD_<SETTING>`` environment variables, then the
defaults below.  Every default is chosen for a small app behind a small ``max_connections`` and
a transaction-mode pooler; docs/settings.md gives the reasons.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Literal, TypeGuard
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._errors import ConfigurationError
from ._redact import redact_conninfo as redact_conninfo
from ._redact import redact_text as redact_text

Mode = Literal["transaction", "session", "auto"]
GuardAction = Literal["warn", "raise", "off"]
BudgetAction = Literal["warn", "raise", "off"]

# Query parameters that poolguard reads from a URL and libpq must never see.
_URL_HINTS = ("pgbouncer",)
#: Environment variables poolguard reads that are not POOLGUARD_<SETTING>: anything else that
#: starts with POOLGUARD_ is a typo worth a warning (see _warn_unknown_variables).
ENV_VARIABLES = frozenset(
    {
        "POOLGUARD_DSN",
        "POOLGUARD_DIRECT_DSN",
        "POOLGUARD_UPSTREAM",
        "POOLGUARD_PG_BINDIR",
        "POOLGUARD_REQUIRE_PGBOUNCER",
        "POOLGUARD_REQUIRE_CLIENTS",
        "POOLGUARD_NODE_MODULES",
        "POOLGUARD_REWRITER_UVLOOP",
        "POOLGUARD_REWRITER_PURE",
        "POOLGUARD_REQUIRE_COMPILED",
        "POOLGUARD_NO_COMPILE",
    }
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
TRUE_WORDS = {"1", "true", "yes", "on"}
# psycopg's default prepare_threshold: prepare a statement on its 5th execution.
_PSYCOPG_PREPARE_THRESHOLD = 5
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """Everything that defines one pool.  Two pools with equal Settings are the same pool."""

    #: libpq conninfo (normalized, password included); never shown: see :attr:`redacted_dsn`.
    conninfo: str = field(repr=False)
    name: str = "default"
    #: Connections kept open when idle.  One keeps the first request fast without holding
    #: slots that a reload or an idle worker would waste.
    min_size: int = 1
    #: Upper bound of real connections for this process.  Small on purpose: 4 workers x 4 = 16
    #: fits a 20-connection server with its 3 superuser slots to spare.
    max_size: int = 4
    #: Seconds a caller waits for a free connection before PoolExhausted.
    timeout: float = 10.0
    #: Seconds to establish one new server connection.
    connect_timeout: float = 5.0
    #: Seconds an idle connection above min_size is kept.
    max_idle: float = 300.0
    #: Seconds after which a connection is replaced, so server-side memory bloat is bounded.
    max_lifetime: float = 1800.0
    #: Callers allowed to queue (0: unbounded).
    max_waiting: int = 0
    #: psycopg's prepare_threshold.  None: no server-side prepared statements, the only
    #: setting that is safe behind a transaction-mode pooler.
    prepare_threshold: int | None = None
    #: Shown in pg_stat_activity; defaults to "poolguard:<name>".
    application_name: str = ""
    #: "transaction": safe behind PgBouncer in transaction mode (default); "session": direct
    #: to PostgreSQL or a session pooler; "auto": found at open by probing the path (see
    #: docs/settings.md for why it is not the default), switched to "transaction" if a pooler
    #: appears later.
    mode: Mode = "transaction"
    #: What to do with SQL that leaves session state behind in transaction mode.
    guard: GuardAction = "warn"
    #: A direct (non-pooler) DSN for migrations and session-state work; from DIRECT_URL.
    direct_conninfo: str = field(default="", repr=False)
    #: Run a round trip on checkout to catch dead connections before the caller does.
    health_check: bool = False
    #: Put the pool behind poolguard's embedded statement-name rewriter (one per upstream DSN,
    #: max_size and rewriter_options per process), so prepared statements keep working behind
    #: transaction pooling.
    rewriter: bool = False
    #: The embedded rewriter's own tunables, named as poolguard.rewriter.start() names them
    #: (REWRITER_OPTIONS below); the rest keep start()'s defaults.  A mapping rather than a
    #: setting each: one name per tunable wherever a rewriter is configured, and the pool's
    #: own settings (max_idle, max_lifetime) are not confused with the proxy's.
    rewriter_options: dict[str, Any] = field(default_factory=dict)
    #: Worker processes that each open this pool, for the connection budget at open.  None:
    #: the worker count of the gunicorn / uvicorn / celery that runs this process (read from
    #: its command line), else $WEB_CONCURRENCY (which those servers read, never set), else 1.
    processes: int | None = None
    #: What to do at open when max_size x processes does not fit the server's free slots.
    #: "warn": the figures are a snapshot (a deploy may be about to free connections), so
    #: refusing to start would turn a risk into an outage; "raise" is for CI and strict deploys.
    budget: BudgetAction = "warn"
    #: Seconds a connection may stay checked out before one WARNING on ``poolguard.leaks``
    #: (0: off).  30 s is past any sane web request (proxies give up at 30-60 s) and still
    #: short enough to be seen before a small pool starves.
    leak_threshold: float = 30.0
    #: Seconds after which a leaked connection is closed and its slot freed; the holder's
    #: next use raises ConnectionReclaimed.  Off (0) by default: taking a connection away
    #: from running code is a decision only the application can make.
    leak_reclaim_after: float = 0.0
    #: Seconds a checked-out connection may sit in an open (or failed) transaction with no
    #: statement before a WARNING (0: off).  5 s: such a transaction holds locks, a slot and
    #: the xmin horizon while the app does something else, nearly always a bug in web code.
    idle_in_transaction_threshold: float = 5.0
    #: PostgreSQL's idle_in_transaction_session_timeout for the pool's sessions, in seconds
    #: (0: leave the server's setting).  60 s: well past the client-side warning, so the log
    #: names the culprit before the server kills its session.  Not sent through a pooler
    #: that rejects the ``options`` startup parameter (PgBouncer before 1.20): docs/leaks.md.
    idle_in_transaction_session_timeout: float = 60.0
    #: Seconds between two watchdog checks.  1 s: a report comes at most this late, and one
    #: scan of the ledger per second costs nothing measurable.
    watchdog_interval: float = 1.0
    #: Callables given a poolguard.PoolEvent when the pool finds trouble (docs/observability.md).
    on_event: Any = ()
    #: Seconds during which further events of one kind from this pool are only counted.
    event_interval: float = 60.0

    def __post_init__(self) -> None:
        if not self.application_name:
            object.__setattr__(self, "application_name", f"poolguard:{self.name}")
        if isinstance(self.rewriter_options, Mapping):
            # A copy: the caller's dict may change after configure(), these settings may not.
            object.__setattr__(self, "rewriter_options", dict(self.rewriter_options))
        if callable(self.on_event) or isinstance(self.on_event, list):
            object.__setattr__(
                self,
                "on_event",
                (self.on_event,) if callable(self.on_event) else tuple(self.on_event),
            )
        _validate(self)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.repr and getattr(self, f.name) != _default(f)
        )
        return f"Settings(dsn={self.redacted_dsn!r}{', ' if shown else ''}{shown})"

    @property
    def redacted_dsn(self) -> str:
        return redact_conninfo(self.conninfo)

    @property
    def target(self) -> str:
        """user@host:port/dbname, for messages."""
        params = conninfo_to_dict(self.conninfo)
        host = params.get("host") or params.get("hostaddr") or "localhost"
        return (
            f"{params.get('user', '')}@{host}:{params.get('port', 5432)}/{params.get('dbname', '')}"
        )

    def differences(self, other: Settings) -> list[str]:
        """Names of the settings that differ, the DSN shown only as 'dsn'."""
        names = []
        for f in fields(self):
            if getattr(self, f.name) != getattr(other, f.name):
                names.append("dsn" if f.name == "conninfo" else f.name)
        return names

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for psycopg.connect()."""
        return {
            "application_name": self.application_name,
            "connect_timeout": max(1, round(self.connect_timeout)),
            "prepare_threshold": self.prepare_threshold,
        }


SETTING_NAMES = frozenset(f.name for f in fields(Settings)) - {"conninfo", "direct_conninfo"}


def _default(f: Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: What ``rewriter_options`` takes: the arguments of poolguard.rewriter.start() that tune a
#: rewriter only this process's pools use, each with the values it accepts (start() accepts
#: them too: tests/test_core_rewriter_pool.py keeps the two in step).
REWRITER_OPTIONS: dict[str, tuple[Callable[[object], bool], str]] = {
    "max_prepared": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_message_size": (lambda v: _is_int(v) and v >= 1024, "an integer >= 1024 (bytes)"),
    "cleanup_timeout": (lambda v: _is_number(v) and 0 < v < math.inf, "seconds > 0"),
    "login_timeout": (lambda v: _is_number(v) and 0 < v < math.inf, "seconds > 0"),
    "server_idle_timeout": (
        lambda v: _is_number(v) and 0 <= v < math.inf,
        "seconds >= 0 (0: never)",
    ),
    "server_lifetime": (lambda v: _is_number(v) and 0 <= v < math.inf, "seconds >= 0 (0: never)"),
}
_OTHER_USERS = "only the DSN's user logs in to it; for other users run `poolguard proxy`"
_LOOPBACK = "the pool reaches it over loopback; TLS towards PostgreSQL follows the DSN's sslmode"
_PROCESS = "poolguard runs it in a child process, with uvloop when that is installed"
#: start()'s other arguments, and why the embedded rewriter does not take them.
REWRITER_NOT_EMBEDDED = {
    "pool_size": "its pool size is the pool's max_size (set max_size)",
    "pool_sizes": "it serves the DSN's one user and database, with max_size server connections",
    "listen": "it listens on a free loopback port that only this process's pools know",
    "pool_idle_timeout": "it serves only the DSN's user and database, whose pool it never drops",
    "userlist": _OTHER_USERS,
    "auth_passthrough": _OTHER_USERS,
    "admin_users": _OTHER_USERS,
    "admin_database": (
        "its console is `poolguard` (`poolguard_admin` when the DSN's database has that name); "
        "for another name run `poolguard proxy`"
    ),
    "tls_cert": _LOOPBACK,
    "tls_key": _LOOPBACK,
    "use_uvloop": _PROCESS,
    "isolate": _PROCESS,
    "workers": (
        "each worker holds only its share of max_size server connections, and the kernel, not "
        "the pool, picks the worker of each of the pool's few connections; for a proxy of "
        "several processes run `poolguard proxy --workers N`"
    ),
}


def build_settings(
    dsn: str | None = None,
    *,
    name: str = "default",
    env: Mapping[str, str] | None = None,
    **options: Any,
) -> Settings:
    """Build validated Settings from a DSN (or POOLGUARD_DSN / DATABASE_URL) and options."""
    env = os.environ if env is None else env
    unknown = set(options) - SETTING_NAMES - {"direct_dsn"}
    if unknown:
        raise ConfigurationError("; ".join(_unknown_message(key) for key in sorted(unknown)))
    dsn = dsn or env.get("POOLGUARD_DSN") or env.get("DATABASE_URL")
    if not dsn:
        raise ConfigurationError(
            "no database given: pass poolguard.configure(dsn=...) or set POOLGUARD_DSN or "
            "DATABASE_URL"
        )
    conninfo, hints = parse_dsn(dsn, "dsn")
    _warn_unknown_variables(env)
    merged: dict[str, Any] = {}
    for key in SETTING_NAMES - {"name"}:
        raw = env.get(f"POOLGUARD_{key.upper()}")
        if raw is not None:
            merged[key] = _from_env(key, raw)
    if hints.get("pgbouncer") in TRUE_WORDS:
        merged["mode"] = "transaction"
    merged.update(options)
    if (merged.get("rewriter") or merged.get("mode") == "auto") and (
        "prepare_threshold" not in merged
    ):
        # The point of the rewriter and of mode="auto": psycopg's own default (prepare on the
        # 5th execution); an auto pool that finds a transaction pooler uses None instead.
        merged["prepare_threshold"] = _PSYCOPG_PREPARE_THRESHOLD
    direct = (
        merged.pop("direct_dsn", None)
        or env.get("POOLGUARD_DIRECT_DSN")
        or env.get("DIRECT_URL")
        or ""
    )
    direct_conninfo = parse_dsn(direct, "direct_dsn")[0] if direct else ""
    try:
        return Settings(conninfo=conninfo, name=name, direct_conninfo=direct_conninfo, **merged)
    except TypeError as exc:  # a wrong type that dataclass construction itself rejected
        raise ConfigurationError(str(exc)) from None


def parse_dsn(dsn: str, setting: str) -> tuple[str, dict[str, str]]:
    """Normalize a URL or conninfo string; return it and poolguard's own URL hints."""
    if not isinstance(dsn, str):
        raise ConfigurationError(f"{setting} must be a string, got {type(dsn).__name__}")
    hints: dict[str, str] = {}
    given = dsn  # errors are redacted against it: the normalized URL may have lost its "@"
    if _URL.match(dsn):
        dsn = _without_driver(dsn, setting)
        try:
            parts = urlsplit(dsn)
        except ValueError as exc:  # "Invalid IPv6 URL": a "[" in the wrong place
            raise ConfigurationError(
                f"{setting} is not a valid PostgreSQL URL: {exc} ({redact_text(given, given)}; "
                "write it as postgresql://user:password@host:port/dbname)"
            ) from None
        query = parse_qsl(parts.query, keep_blank_values=True)
        hints = {k: v.lower() for k, v in query if k in _URL_HINTS}
        kept = [(k, v) for k, v in query if k not in _URL_HINTS]
        dsn = urlunsplit(parts._replace(query=urlencode(kept)))
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise ConfigurationError(
            f"{setting} is not a valid PostgreSQL URL or conninfo string: "
            f"{redact_text(str(exc), given, dsn)}"
        ) from None
    ports = str(params.get("port") or "")
    if ports and not all(p.strip().isdigit() for p in ports.split(",")):
        shown = redact_text(repr(ports), given, dsn)
        raise ConfigurationError(
            f"{setting} has port {shown}: expected a number such as 5432 "
            "(or a comma-separated list, one per host)"
        )
    return make_conninfo(**params), hints  # type: ignore[arg-type]


def _without_driver(url: str, setting: str) -> str:
    """``postgresql+asyncpg://...`` (SQLAlchemy's form, common in DATABASE_URL) as libpq reads it.

    The driver part names a Python driver, which libpq does not know: poolguard picks its driver
    itself (psycopg, or asyncpg through poolguard.sqlalchemy), so the part is dropped.
    """
    scheme, _, rest = url.partition("://")
    backend, _, _driver = scheme.partition("+")
    if backend.lower() not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"{setting} is a {scheme}:// URL: expected postgresql:// or postgres:// (optionally "
            "with a driver, as in postgresql+psycopg://), or a libpq conninfo string"
        )
    return f"{backend}://{rest}"


_warned_variables: set[str] = set()
_logger = logging.getLogger("poolguard")


def _warn_unknown_variables(env: Mapping[str, str]) -> None:
    """One WARNING per process for each POOLGUARD_* variable that poolguard does not read.

    A typo (POOLGUARD_MAXSIZE) would otherwise leave the default in force without a word.  A
    log line rather than a Python warning: the variable comes from the deployment, not from the
    code that runs configure(), and a stray variable must not fail a ``-W error`` test suite.
    """
    known = ENV_VARIABLES | {f"POOLGUARD_{name.upper()}" for name in SETTING_NAMES - {"name"}}
    for variable in sorted(k for k in env if k.startswith("POOLGUARD_")):
        if variable in known or variable in _warned_variables:
            continue
        _warned_variables.add(variable)
        # Compared without the shared prefix, which would make every name look close.
        suffixes = sorted(k.removeprefix("POOLGUARD_") for k in known)
        close = difflib.get_close_matches(variable.removeprefix("POOLGUARD_"), suffixes, n=1)
        _logger.warning(
            "environment variable %s is not a poolguard setting and is ignored%s",
            variable,
            f" (did you mean POOLGUARD_{close[0]}?)" if close else "; docs/settings.md lists them",
        )


def _unknown_message(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(SETTING_NAMES | {"direct_dsn"}), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(SETTING_NAMES))}"
    return f"unknown setting {key!r} ({hint})"


def _from_env(key: str, raw: str) -> Any:
    variable = f"POOLGUARD_{key.upper()}"
    if key == "rewriter_options":
        return _options_from_env(variable, raw)
    default = next(f.default for f in fields(Settings) if f.name == key)
    if isinstance(default, bool):
        if raw.lower() in TRUE_WORDS | _FALSE:
            return raw.lower() in TRUE_WORDS
        raise ConfigurationError(f"{variable}={raw!r}: expected true or false")
    optional_int = key in ("prepare_threshold", "processes")
    if optional_int and raw.lower() in {"", "none"}:
        return None
    try:
        if isinstance(default, int) or optional_int:
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ConfigurationError(f"{variable}={raw!r}: expected a number") from None
    return raw


def _options_from_env(variable: str, raw: str) -> dict[str, float]:
    """``name=number,name=number`` as a dict (the values are checked with the settings)."""
    options: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = (word.strip() for word in item.partition("="))
        try:
            number = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            sep = ""
        if not (sep and name):
            raise ConfigurationError(
                f"{variable}={raw!r}: expected name=number pairs separated by commas, like "
                "server_lifetime=900,max_prepared=200"
            )
        options[name] = number
    return options


def _validate(s: Settings) -> None:
    def check(ok: bool, setting: str, expected: str) -> None:
        if not ok:
            value = getattr(s, setting)
            raise ConfigurationError(
                f"{setting}={value!r} for pool {s.name!r} is invalid: expected {expected}"
            )

    check(isinstance(s.name, str) and bool(s.name), "name", "a non-empty string")
    check(_is_int(s.max_size) and s.max_size >= 1, "max_size", "an integer >= 1")
    check(
        _is_int(s.min_size) and 0 <= s.min_size <= s.max_size,
        "min_size",
        f"an integer from 0 to max_size ({s.max_size})",
    )
    for setting in ("timeout", "connect_timeout", "max_idle", "max_lifetime"):
        check(_is_number(getattr(s, setting)) and getattr(s, setting) > 0, setting, "seconds > 0")
    check(_is_int(s.max_waiting) and s.max_waiting >= 0, "max_waiting", "an integer >= 0")
    check(
        s.prepare_threshold is None or (_is_int(s.prepare_threshold) and s.prepare_threshold >= 0),
        "prepare_threshold",
        "None (no prepared statements) or an integer >= 0",
    )
    check(
        s.mode in ("transaction", "session", "auto"),
        "mode",
        "'transaction', 'session' or 'auto' (probe the path at open)",
    )
    check(s.guard in ("warn", "raise", "off"), "guard", "'warn', 'raise' or 'off'")
    check(isinstance(s.health_check, bool), "health_check", "True or False")
    check(
        s.processes is None or (_is_int(s.processes) and s.processes >= 1),
        "processes",
        "None ($WEB_CONCURRENCY, else 1) or an integer >= 1",
    )
    check(s.budget in ("warn", "raise", "off"), "budget", "'warn', 'raise' or 'off'")
    for setting in (
        "leak_threshold",
        "leak_reclaim_after",
        "idle_in_transaction_threshold",
        "idle_in_transaction_session_timeout",
    ):
        value = getattr(s, setting)
        check(_is_number(value) and value >= 0, setting, "seconds >= 0 (0: off)")
    check(
        _is_number(s.watchdog_interval) and 0.01 <= s.watchdog_interval <= 60,
        "watchdog_interval",
        "seconds from 0.01 to 60",
    )
    check(isinstance(s.application_name, str), "application_name", "a string")
    check(isinstance(s.rewriter, bool), "rewriter", "True or False")
    check(
        isinstance(s.on_event, tuple) and all(callable(h) for h in s.on_event),
        "on_event",
        "a callable taking a poolguard.PoolEvent, or a list of them",
    )
    check(_is_number(s.event_interval) and s.event_interval >= 0, "event_interval", "seconds >= 0")
    _validate_rewriter_options(s)
    if s.mode == "transaction" and s.prepare_threshold is not None and not s.rewriter:
        raise ConfigurationError(
            f"prepare_threshold={s.prepare_threshold} for pool {s.name!r} needs mode='session': "
            "server-side prepared statements break behind a transaction-mode pooler "
            "(use mode='session' when connecting directly to PostgreSQL, mode='auto' to let "
            "poolguard find out, or rewriter=True)"
        )


def _validate_rewriter_options(s: Settings) -> None:
    options, pool = s.rewriter_options, f"for pool {s.name!r}"
    if not isinstance(options, dict):
        raise ConfigurationError(
            f"rewriter_options={options!r} {pool} is invalid: expected a dict of "
            "poolguard.rewriter.start() arguments, like {'server_lifetime': 900}"
        )
    if options and not s.rewriter:
        raise ConfigurationError(
            f"rewriter_options {pool} tune the embedded rewriter, which the pool does not use: "
            "add rewriter=True, or drop rewriter_options"
        )
    for name, value in options.items():
        if name in REWRITER_NOT_EMBEDDED:
            raise ConfigurationError(
                f"rewriter_options[{name!r}] {pool} does not apply to the embedded rewriter: "
                f"{REWRITER_NOT_EMBEDDED[name]}"
            )
        if name not in REWRITER_OPTIONS:
            close = difflib.get_close_matches(str(name), list(REWRITER_OPTIONS), n=1)
            known = ", ".join(REWRITER_OPTIONS)
            hint = f"did you mean {close[0]!r}?" if close else f"it takes {known}"
            raise ConfigurationError(f"rewriter_options has no option {name!r} {pool} ({hint})")
        accepts, expected = REWRITER_OPTIONS[name]
        if not accepts(value):
            raise ConfigurationError(
                f"rewriter_options[{name!r}]={value!r} {pool} is invalid: expected {expected}"
            )
