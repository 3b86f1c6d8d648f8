"""The shipped Prometheus alert rules and Grafana dashboard use only series the exporter writes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import poolguard

prometheus_client = pytest.importorskip("prometheus_client")
yaml = pytest.importorskip("yaml")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import poolguard.prometheus  # noqa: E402

ALERTS = Path(__file__).parent.parent / "examples" / "alerts"
SERIES = re.compile(r"\b(?:db_client_connection|poolguard)_[a-z_]+\b")


@pytest.fixture
def exported(pg_dsn: str) -> Iterator[set[str]]:
    """The series names of one real scrape of a pool that did some work."""
    registry = prometheus_client.CollectorRegistry()
    exporter = poolguard.prometheus.instrument(registry=registry, interval=60)
    try:
        poolguard.configure(pg_dsn, name="rules")
        with poolguard.connection("rules") as conn:
            conn.execute("SELECT 1")
        exporter.push()
        exporter.push_server()
        text = prometheus_client.generate_latest(registry).decode()
        yield {
            sample.name
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
    finally:
        poolguard.prometheus.uninstrument()


def rules() -> dict[str, dict[str, Any]]:
    loaded = yaml.safe_load((ALERTS / "prometheus-rules.yml").read_text())
    return {rule["alert"]: rule for group in loaded["groups"] for rule in group["rules"]}


def dashboard_exprs() -> list[str]:
    board = json.loads((ALERTS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_five_alerts_say_what_the_runbook_says() -> None:
    found = rules()
    assert set(found) == {
        "PoolguardSlowConnectionWait",
        "PoolguardRequestsWaiting",
        "PoolguardConnectionLeak",
        "PoolguardPoolCapped",
        "PostgresConnectionSlotsLow",
    }
    slow = found["PoolguardSlowConnectionWait"]
    assert "histogram_quantile(0.99" in slow["expr"] and slow["expr"].strip().endswith("> 0.1")
    assert slow["for"] == "5m"
    assert found["PoolguardRequestsWaiting"]["for"] == "1m"
    assert found["PoolguardRequestsWaiting"]["expr"].strip().endswith("> 0")
    assert "leaks_total" in found["PoolguardConnectionLeak"]["expr"]
    assert "capped_total" in found["PoolguardPoolCapped"]["expr"]
    assert found["PostgresConnectionSlotsLow"]["expr"].strip().endswith("> 0.9")


def test_every_series_the_rules_and_dashboard_use_is_exported(exported: set[str]) -> None:
    exprs = [rule["expr"] for rule in rules().values()] + dashboard_exprs()
    used = set()
    for expr in exprs:
        names = set(SERIES.findall(expr))
        assert names, f"no poolguard series in {expr!r}"
        used |= names
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    assert used <= poolguard.prometheus.metric_names()
    # The dashboard shows every counter and histogram the exporter has.
    assert {n for n in exported if n.endswith("_total")} <= used
