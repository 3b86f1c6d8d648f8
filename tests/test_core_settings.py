"""Settings: validation messages name the setting, never show a password (pure logic)."""

from __future__ import annotations

import pytest

import poolguard
from poolguard import ConfigurationError
from poolguard._settings import build_settings, redact_text

DSN = "postgresql://app:s3cr3t-pw@db.example:5432/shop"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_size": -1}, "max_size"),
        ({"max_size": 0}, "max_size"),
        ({"min_size": 5, "max_size": 2}, "min_size"),
        ({"min_size": -1}, "min_size"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "fast"}, "timeout"),
        ({"connect_timeout": -2.5}, "connect_timeout"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"max_size": True}, "max_size"),
        ({"mode": "statement"}, "mode"),
        ({"guard": "maybe"}, "guard"),
        ({"prepare_threshold": 0}, "prepare_threshold"),
        ({"max_sise": 3}, "max_sise"),
        ({"pool_size": 3}, "pool_size"),
    ],
)
def test_bad_setting_is_named_without_password(options: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_settings(DSN, **options)
    message = str(info.value)
    assert named in message
    assert "s3cr3t" not in message


def test_unknown_setting_suggests_the_close_one() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'max_size'"):
        build_settings(DSN, max_sise=3)


@pytest.mark.parametrize(
    "dsn",
    [
        "host=x password=s3cr3t-pw bad",
        "postgresql://u:s3cr3t pw@h/db",
        "postgresql://u:s3cr3t-pw@h:notaport/db",
        "host=x password='s3cr3t pw port=5432",
    ],
)
def test_malformed_dsn_error_names_setting_and_hides_password(dsn: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        poolguard.configure(dsn)
    assert "dsn" in str(info.value)
    assert "s3cr3t" not in str(info.value)


def test_missing_dsn_says_where_it_is_looked_for() -> None:
    with pytest.raises(ConfigurationError, match="POOLGUARD_DSN or DATABASE_URL"):
        poolguard.configure()


def test_dsn_from_environment_and_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://a@h1/db")
    assert "host=h1" in build_settings().conninfo
    monkeypatch.setenv("POOLGUARD_DSN", "postgresql://a@h2/db")
    assert "host=h2" in build_settings().conninfo
    assert "host=h3" in build_settings("postgresql://a@h3/db").conninfo


def test_env_settings_are_parsed_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGUARD_MAX_SIZE", "7")
    monkeypatch.setenv("POOLGUARD_HEALTH_CHECK", "true")
    settings = build_settings(DSN)
    assert (settings.max_size, settings.health_check) == (7, True)
    assert build_settings(DSN, max_size=3).max_size == 3  # arguments win
    monkeypatch.setenv("POOLGUARD_MAX_SIZE", "many")
    with pytest.raises(ConfigurationError, match="POOLGUARD_MAX_SIZE"):
        build_settings(DSN)


def test_safe_defaults() -> None:
    settings = build_settings(DSN, name="web")
    assert settings.prepare_threshold is None
    assert settings.application_name == "poolguard:web"
    assert settings.mode == "transaction"
    assert 1 <= settings.max_size <= 5
    assert settings.timeout > 0 and settings.connect_timeout > 0
    assert settings.connection_kwargs()["prepare_threshold"] is None


def test_pgbouncer_url_hint_is_read_and_kept_from_libpq() -> None:
    settings = build_settings(DSN + "?pgbouncer=true&sslmode=disable", mode="session")
    assert settings.mode == "session"  # an explicit argument wins over the hint
    assert "pgbouncer" not in settings.conninfo and "sslmode=disable" in settings.conninfo
    assert build_settings(DSN + "?pgbouncer=true").mode == "transaction"


def test_session_mode_allows_prepared_statements() -> None:
    assert build_settings(DSN, mode="session", prepare_threshold=0).prepare_threshold == 0


def test_repr_and_redacted_dsn_hide_password() -> None:
    settings = build_settings(DSN, direct_dsn="postgresql://app:direct-pw@db:5432/shop")
    for text in (repr(settings), str(settings), settings.redacted_dsn, settings.target):
        assert "s3cr3t" not in text and "direct-pw" not in text
    assert "***" in settings.redacted_dsn


def test_same_url_and_conninfo_are_equal_settings() -> None:
    url = build_settings("postgresql://app:pw@h:5433/db")
    conninfo = build_settings("host=h port=5433 user=app password=pw dbname=db")
    assert url == conninfo


def test_redact_text_scrubs_every_form() -> None:
    text = 'failed: "s3cr3t" near "pw" at host'
    assert "s3cr3t" not in redact_text(text, "host=x password='s3cr3t pw'")
