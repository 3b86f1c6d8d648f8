"""examples/scripts/orders_report.py: 16 threads on a pool of 4, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from exhelpers import EXAMPLES, example_env


def test_orders_report_script(small_db: str) -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "orders_report.py", "--threads", "16"],
        cwd=EXAMPLES / "scripts", env=example_env(small_db), capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "total 750750.0 from 10 blocks" in done.stdout  # 1.5 x (1 + ... + 1000)
    opened = int(done.stdout.split("connections opened: ")[1].split()[0])
    assert 1 <= opened <= 4, done.stdout  # max_size 4, whatever the thread count
