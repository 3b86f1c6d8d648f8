"""docs/transaction-mode.md's budget section is what the code prints, line by line."""

from __future__ import annotations

import re
from pathlib import Path

from poolguard._budget import ServerLimits, compute_budget, resolve_processes_source
from poolguard._doctor import group_line

DOC = (Path(__file__).parents[1] / "docs" / "transaction-mode.md").read_text()
SECTION = DOC[DOC.index("## The connection budget") : DOC.index("### How the pooler is detected")]
BLOCKS = re.findall(r"```text\n(.*?)```", SECTION, re.S)
FORMULAS = [b.rstrip("\n") for b in BLOCKS if b.startswith("usable      =")]

POOLER = "default_pool_size 5 x pairs 1 (app/app)"
EXAMPLES = [
    # two processes x 4 held directly, PgBouncer (read with --pooler) holding 5
    compute_budget(
        ServerLimits(20, 3, 0, 0, own=8, pooler=5),
        max_size=4,
        processes=2,
        pooler_bound=5,
        pooler_text=POOLER,
    ),
    compute_budget(
        ServerLimits(100, 3, 0, 12), max_size=10, processes=4, processes_source="WEB_CONCURRENCY"
    ),
    compute_budget(
        ServerLimits(20, 3, 0, 0, pooler=2),
        max_size=4,
        processes=8,
        pooler_bound=5,
        pooler_text=POOLER,
        through_pooler=True,
        max_client_conn=500,
        pooler_pairs=1,
    ),
]


def test_every_formula_in_the_docs_is_the_codes() -> None:
    assert len(FORMULAS) == len(EXAMPLES)
    for documented, budget in zip(FORMULAS, EXAMPLES, strict=True):
        assert documented == budget.formula()


def test_the_documented_multi_pool_demand() -> None:
    budget = compute_budget(
        ServerLimits(20, 3), max_size=8, processes=4, pools=(("default", 4), ("reports", 4))
    )
    assert "`max_size 4 (default) + 4 (reports) = 8 x processes 4 = 32`" in SECTION
    assert "max_size 4 (default) + 4 (reports) = 8 x processes 4 = 32" in budget.formula()


def test_the_documented_fallback_and_fleet_lines() -> None:
    count, source = resolve_processes_source(None, {})
    assert f"`processes   = {count}: {source}`" in SECTION
    (fleet,) = [b for b in BLOCKS if b.startswith("Fleet:")]
    lines = fleet.splitlines()
    groups = [
        ("app", "127.0.0.1", "poolguard:default", 3),
        ("app", "local socket", "poolguard:default", 2),
        ("other", "127.0.0.1", "cron-report", 1),
    ]
    for line, (kind, client, app, n) in zip(lines[1:4], groups, strict=True):
        group = {"kind": kind, "client": client, "application_name": app, "count": n,
                 "states": {"idle": n}, "oldest_seconds": 2.0}  # fmt: skip
        assert line == group_line(group)
