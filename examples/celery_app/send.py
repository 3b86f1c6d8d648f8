"""Queue N tasks at once and wait for all of them: ``python send.py 200``."""

from __future__ import annotations

import sys

from celery import group
from tasks import record

if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    results = group(record.s(i) for i in range(count)).apply_async().get(timeout=120, interval=0.05)
    assert results == [2 * i for i in range(count)], results
    print(f"{count} tasks done")
