"""A concurrent load generator: many threads issuing requests at once, with their timings.

The demo (``poolguard demo``) and the tests use it to compare pools under the same load.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

__all__ = ["Workload", "run_users"]


@dataclass
class Workload:
    """What :func:`run_users` saw: successes, failures and their timings."""

    ok: int = 0
    #: The first line of each failed request's error, in the order they happened.
    failures: list[str] = field(default_factory=list)
    #: Seconds per successful request.
    latencies: list[float] = field(default_factory=list)
    #: Wall-clock seconds for the whole run.
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def messages(self) -> list[str]:
        """The distinct failure messages, sorted."""
        return sorted(set(self.failures))

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        """Latency (seconds) below which a fraction ``p`` of successful requests finished."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def run_users(users: int, requests: int, request: Callable[[int, int], object]) -> Workload:
    """Run ``users`` threads that each call ``request(user, i)`` ``requests`` times at once.

    A psycopg error counts as a failed request; anything else propagates.  The threads start
    together (a barrier), so the load really is concurrent.
    """
    result = Workload()
    lock = threading.Lock()
    start = threading.Barrier(users)
    crashed: list[BaseException] = []

    def user(number: int) -> None:
        start.wait()
        for i in range(requests):
            began = time.perf_counter()
            try:
                request(number, i)
            except psycopg.Error as exc:
                with lock:
                    result.failures.append(str(exc).strip().splitlines()[0])
            except BaseException as exc:  # a bug in the request itself: re-raised below
                crashed.append(exc)
                return
            else:
                elapsed = time.perf_counter() - began
                with lock:
                    result.ok += 1
                    result.latencies.append(elapsed)

    threads = [threading.Thread(target=user, args=(n,)) for n in range(users)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - began
    if crashed:
        raise crashed[0]
    return result
