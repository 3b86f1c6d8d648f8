"""poolguard.report(): who holds the pool's connections right now, printable and as data.

For each connection out of its pool: how long it has been out, what it is doing (active, idle
in transaction, idle), who took it and where, what that owner is executing now, and the last
statement it sent.  Nothing here runs on the hot path; a report reads the ledgers, and only
``server=True`` opens a short-lived connection to ask pg_stat_activity.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from time import monotonic, sleep
from typing import IO, TYPE_CHECKING, Any

from ._connection import state_text
from ._ledger import Checkout
from ._state import configure, pools
from ._watchdog import Owners, server_activity

if TYPE_CHECKING:
    from ._pool import PoolCore


@dataclass(frozen=True)
class CheckoutReport:
    """One checked-out connection."""

    pool: str
    #: Seconds since it was taken.
    age: float
    #: "active", "idle in transaction", "idle in transaction (aborted)", "idle" or "closed".
    state: str
    #: "thread 'name'" or "task 'name'", "(ended)" / "(finished)" when it is gone.
    owner: str
    owner_alive: bool
    #: The app's line that took it: "path/file.py:88 in view".
    taken_at: str
    backend_pid: int
    #: The last statement on this connection: string literals masked, parameters never shown.
    last_statement: str
    #: Seconds since the last statement was sent (or since checkout, if none was).
    idle_for: float
    #: The owner's current stack, outermost first, formatted like a traceback.
    stack: tuple[str, ...] = ()
    #: What pg_stat_activity says about the backend (report(server=True) only).
    server: dict[str, Any] | None = field(default=None)

    def __str__(self) -> str:
        server = ""
        if self.server:
            server = f", server: {self.server['state']}"
        lines = [
            f"pool {self.pool!r}: {self.state} for {self.idle_for:.1f} s, "
            f"out for {self.age:.1f} s, taken at {self.taken_at} by {self.owner}, "
            f"backend pid {self.backend_pid}{server}",
            f"  last statement: {self.last_statement}",
        ]
        if self.stack:
            lines.append("  owner now at:")
            lines.extend("  " + line for frame in self.stack for line in frame.rstrip().split("\n"))
        return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """Every connection checked out right now, oldest first."""

    checkouts: tuple[CheckoutReport, ...]
    #: Pools with mode="auto": (name, the mode they use now and why, as in stats()).
    modes: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __str__(self) -> str:
        modes = [_mode_line(name, mode) for name, mode in self.modes]
        if not self.checkouts:
            return "\n".join(["poolguard: no connection is checked out", *modes])
        head = f"poolguard: {len(self.checkouts)} connection(s) checked out"
        return "\n".join([head, *modes, *(str(c) for c in self.checkouts)])

    def __iter__(self) -> Iterator[CheckoutReport]:
        return iter(self.checkouts)

    def __len__(self) -> int:
        return len(self.checkouts)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serializable): {"checkouts": [{...}, ...]}."""
        found = {"checkouts": [asdict(c) for c in self.checkouts]}
        if self.modes:
            found["modes"] = dict(self.modes)  # type: ignore[assignment]
        return found


def _mode_line(name: str, mode: dict[str, Any]) -> str:
    switched = ", switched at run time" if mode["switched"] else ""
    why = "; ".join(mode["evidence"]) or "not probed yet"
    return (
        f"pool {name!r}: mode='auto' uses {mode['mode']} mode{switched}: the path is "
        f"{mode['path'] or 'unknown'} ({why})"
    )


def _pools(name: str | None) -> list[PoolCore]:
    return [p for p in pools() if name is None or p.name == name]


def describe(
    pool: PoolCore, records: list[Checkout], *, owners: Owners | None = None, server: bool = False
) -> list[CheckoutReport]:
    """Reports for some checkouts of ``pool``."""
    owners = owners or Owners(pool)
    now = monotonic()
    activity = server_activity(pool.settings, [r.backend_pid for r in records]) if server else {}
    found = []
    for record in records:
        conn = record.connection()
        if conn is None:
            continue
        found.append(
            CheckoutReport(
                pool=pool.name,
                age=now - record.taken_at,
                state=state_text(pool.conn_status(conn)),
                owner=owners.describe(record.owner),
                owner_alive=owners.alive(record.owner),
                taken_at=record.site,
                backend_pid=record.backend_pid,
                last_statement=pool.conn_statement(conn),
                idle_for=now - max(pool.conn_last_active(conn), record.taken_at),
                stack=tuple(owners.stack(record.owner)),
                server=activity.get(record.backend_pid),
            )
        )
    return found


def report(name: str | None = None, *, server: bool = False) -> Report:
    """Every connection checked out now (of the pool ``name``, or of all pools), oldest first.

    ``print(poolguard.report())`` for people, ``poolguard.report().as_dict()`` for machines.
    ``server=True`` adds what pg_stat_activity says about each backend (one short connection).
    """
    found: list[CheckoutReport] = []
    modes: dict[str, dict[str, Any]] = {}
    for pool in _pools(name):
        found += describe(pool, pool.ledger.records(), server=server)
        if pool.routes.auto:  # the flavors of a name share one
            modes[pool.name] = pool.routes.as_dict()
    return Report(tuple(sorted(found, key=lambda c: -c.age)), tuple(modes.items()))


def report_on_signal(signum: int = signal.SIGUSR1, file: IO[str] | None = None) -> Any:
    """Print report() to ``file`` (stderr) whenever the process receives ``signum``.

    Off unless called; call it from the main thread.  Returns the previous handler.
    ``kill -USR1 <pid>`` then shows who holds the connections of a stuck process.
    """

    def dump(signum: int, frame: Any) -> None:
        print(report(), file=file or sys.stderr, flush=True)

    return signal.signal(signum, dump)


def checkouts_now() -> set[int]:
    """Identities of every ledger entry now, to compare with later (see leftovers)."""
    return {id(record.token) for pool in _pools(None) for record in pool.ledger.records()}


def leftovers(before: set[int]) -> list[CheckoutReport]:
    """Checkouts made since ``before = checkouts_now()`` and still out."""
    found: list[CheckoutReport] = []
    for pool in _pools(None):
        fresh = [r for r in pool.ledger.records() if id(r.token) not in before]
        found += describe(pool, fresh)
    return found


# --- the leak scene of `poolguard demo` -------------------------------------------------------

# An app's request handler with the classic leak: it stashes its connection and never returns
# it.  Compiled under an app-like file name, because frames inside poolguard's own folder are
# never "where it was taken".
_SCENE_FILE = "demo_app/views.py"
_SCENE_SOURCE = """\
def handle_order(request, pool):
    conn = pool.getconn()
    request["db"] = conn  # "for later": nothing ever calls pool.putconn(conn)
    return conn.execute("SELECT %s::int AS order_id", [request["order"]]).fetchone()[0]
"""


def leak_scene(dsn: str, *, threshold: float = 0.5, name: str = "leak-demo") -> str:
    """Run a leaking handler against ``dsn`` and return what poolguard found, pinned to its line.

    Takes about ``threshold`` + 0.1 s; uses its own pool ``name`` and closes it afterwards.
    """
    import logging

    namespace: dict[str, Any] = {}
    exec(compile(_SCENE_SOURCE, _SCENE_FILE, "exec"), namespace)
    found: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage().split("; its owner is now at:")[0])

    leaks = logging.getLogger("poolguard.leaks")
    capture = Capture(logging.WARNING)
    leaks.addHandler(capture)
    pool = configure(
        dsn, name=name, min_size=0, max_size=2, leak_threshold=threshold,
        idle_in_transaction_threshold=0, watchdog_interval=0.1,
    )  # fmt: skip
    request: dict[str, Any] = {"order": 42}
    try:
        answer = namespace["handle_order"](request, pool)
        deadline = monotonic() + threshold + 5
        while not found and monotonic() < deadline:
            sleep(0.05)
    finally:
        leaks.removeHandler(capture)
        if "db" in request:  # end the scene quietly: roll back, then give it back
            conn = request.pop("db")
            conn.rollback()
            pool.putconn(conn)
        pool.close()
    listing = "\n".join(
        f"  {number:3d}  {text}" for number, text in enumerate(_SCENE_SOURCE.splitlines(), 1)
    )
    finding = found[0] if found else "(no report: is the watchdog running?)"
    return (
        f"{_SCENE_FILE}, a handler that keeps its connection:\n{listing}\n"
        f"The handler answered {answer!r}, and {threshold:g} s later poolguard.leaks said:\n"
        f"  {finding}"
    )
