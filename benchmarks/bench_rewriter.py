"""pgbench -S through the rewriter (-M prepared) vs PgBouncer (-M simple, -M extended) vs
direct, each proxy as one process and as --workers processes on one port, in one run, with the
CPU seconds each proxy used per 10k transactions (summed over all its processes).

    python benchmarks/bench_rewriter.py [--workers 2] [--clients 50] [--duration 10]
        [--rounds 3] [--source] [--no-uvloop]

Starts a private PostgreSQL; PgBouncer as one process and as N processes sharing its port
(``so_reuseport``, ``start_pgbouncer(processes=N)``); and the rewriter in its child process as
``start()`` runs it, once with one process and once with ``workers=N``. Every proxy has the
same number of server connections in all (--pool-size); an N-process one splits them between
its processes. Each round runs pgbench against every target in turn (the machine may be
shared, so each ratio is taken within a round and the median of the rounds is printed, with
the rounds). The target line is rewriter xN / PgBouncer simple (one process, as PgBouncer is
usually run); rewriter xN / PgBouncer xN simple shows what the same number of processes gives
PgBouncer. ``--source`` also measures a one-process rewriter running its hot path's Python
source (when the installed hot path is compiled). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poolguard import rewriter
from poolguard.testing import find_postgres_bindir, start_pgbouncer, start_postgres


@dataclass
class Target:
    """What pgbench connects to, and the proxy processes whose CPU time the run costs."""

    endpoint: Any  # host, port, user, dbname
    password: str
    mode: str
    pids: Callable[[], list[int]] = list  # none: PostgreSQL directly


def listener_pids(port: int) -> set[int] | None:
    """Every process listening on ``port`` (several with SO_REUSEPORT), None without psutil."""
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:
        return None
    return {
        int(conn.pid)
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == "LISTEN" and conn.laddr and conn.laddr.port == port and conn.pid
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by all of ``pids`` (from /proc)."""
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            sys.exit(f"proxy process {pid} ended during the benchmark")
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def check_pids(name: str, target: Target) -> None:
    """The processes whose CPU is summed are exactly those listening on the port."""
    pids = target.pids()
    listening = listener_pids(target.endpoint.port) if pids else None
    if listening is not None and listening != set(pids):
        sys.exit(f"{name}: CPU would be summed over {sorted(pids)}, but {sorted(listening)} listen")


def pgbench(bindir: Path, target: object, password: str, args: list[str]) -> tuple[float, int]:
    """(tps, transactions processed)."""
    host, port, user, dbname = (getattr(target, a) for a in ("host", "port", "user", "dbname"))
    cmd = [str(bindir / "pgbench"), "-h", host, "-p", str(port), "-U", user, *args, dbname]
    run = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": password}
    )
    if run.returncode != 0:
        sys.exit(f"pgbench failed: {' '.join(cmd)}\n{run.stderr[-3000:]}")
    failed = re.search(r"number of failed transactions: (\d+)", run.stdout)
    if failed and failed.group(1) != "0":
        sys.exit(f"pgbench reported failed transactions:\n{run.stdout}")
    match = re.search(r"tps = ([\d.]+)", run.stdout)
    done = re.search(r"actually processed: (\d+)", run.stdout)
    if match is None or done is None:
        sys.exit(f"no tps in pgbench output:\n{run.stdout}")
    return float(match.group(1)), int(done.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument(
        "--pool-size", type=int, default=4, help="server connections of each proxy (all)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes of the multi-process PgBouncer and rewriter (>= 2, <= --pool-size)",
    )
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each target, interleaved; medians are printed (the machine may be shared)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="seconds of unrecorded pgbench per target first (connections opened, caches warm)",
    )
    parser.add_argument(
        "--source",
        action="store_true",
        help="also measure a one-process rewriter running its hot path's Python source",
    )
    parser.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use the standard asyncio loop even if uvloop is installed",
    )
    opts = parser.parse_args()
    workers = opts.workers
    if not 2 <= workers <= opts.pool_size:
        parser.error(
            f"--workers {workers}: needs 2 or more (one process is measured anyway) and at "
            f"most --pool-size {opts.pool_size} (each process needs a server connection)"
        )
    hot_path = rewriter.hot_path()
    if opts.source and not hot_path.startswith("compiled"):
        parser.error(f"--source compares with the compiled hot path, but this one is: {hot_path}")

    bindir = find_postgres_bindir()
    pg = start_postgres(max_connections=200)
    stoppable: list[Any] = []
    loop_name = "asyncio"
    try:
        init = [str(bindir / "pgbench"), "-i", "-q", "-s", str(opts.scale), pg.dsn]
        subprocess.run(init, check=True, capture_output=True)
        bouncer = start_pgbouncer(pg, default_pool_size=opts.pool_size)
        stoppable.append(bouncer)
        bouncers = start_pgbouncer(pg, default_pool_size=opts.pool_size, processes=workers)
        stoppable.append(bouncers)
        use_uvloop = False if opts.no_uvloop else None
        proxy = rewriter.start(pg.dsn, pool_size=opts.pool_size, use_uvloop=use_uvloop)
        stoppable.append(proxy)
        fleet = rewriter.start(
            pg.dsn, pool_size=opts.pool_size, use_uvloop=use_uvloop, workers=workers
        )
        stoppable.append(fleet)
        targets = {
            "direct -M prepared": Target(pg, pg.password, "prepared"),
            "direct -M simple": Target(pg, pg.password, "simple"),
            "pgbouncer -M simple": Target(
                bouncer, bouncer.password, "simple", lambda: bouncer.pids
            ),
            "pgbouncer -M extended": Target(
                bouncer, bouncer.password, "extended", lambda: bouncer.pids
            ),
            f"pgbouncer x{workers} -M simple": Target(
                bouncers, bouncers.password, "simple", lambda: bouncers.pids
            ),
            "rewriter -M prepared": Target(proxy, proxy.password, "prepared", lambda: proxy.pids),
            f"rewriter x{workers} -M prepared": Target(
                fleet, fleet.password, "prepared", lambda: fleet.pids
            ),
        }
        if opts.source:
            source = _source_build(pg.dsn, opts.pool_size, use_uvloop)
            stoppable.append(source)
            targets["rewriter -M prepared (source)"] = Target(
                source, source.password, "prepared", lambda: source.pids
            )
        for name, target in targets.items():
            check_pids(name, target)
        runs: dict[str, list[float]] = {name: [] for name in targets}
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        processes = {name: len(target.pids()) for name, target in targets.items()}
        # Unrecorded first pass: each proxy opens its server connections and each server
        # backend warms its caches, so round one does not favour whichever ran later.
        if opts.warmup > 0:
            warm = ["-S", "-c", str(opts.clients), "-j", str(opts.threads), "-T", str(opts.warmup)]
            for target in targets.values():
                pgbench(bindir, target.endpoint, target.password, [*warm, "-M", target.mode])
        common = ["-S", "-c", str(opts.clients), "-j", str(opts.threads), "-T", str(opts.duration)]
        for _ in range(opts.rounds):
            for name, target in targets.items():
                pids = target.pids()
                before = cpu_seconds(pids)
                tps, done = pgbench(
                    bindir, target.endpoint, target.password, [*common, "-M", target.mode]
                )
                runs[name].append(tps)
                used = cpu_seconds(pids) - before
                cpu[name].append(used / done * 10_000 if pids else math.nan)
        loop_name = "uvloop" if use_uvloop is not False and _has_uvloop() else "asyncio"
    finally:
        for server in reversed(stoppable):
            server.stop()
        pg.stop()

    print(
        f"pgbench -S, {opts.clients} clients, {opts.threads} threads, {opts.duration} s, "
        f"pool size {opts.pool_size} (server connections of each proxy, split between the "
        f"processes of an x{workers} one), workers {workers}, {opts.warmup} s warm-up, "
        f"{os.cpu_count()} CPUs, rewriter loop: {loop_name}, hot path: {hot_path}"
    )
    for name, results in runs.items():
        each = " ".join(f"{t:.0f}" for t in results)
        line = f"  {name:<30} {statistics.median(results):>10.0f} tps  (runs: {each})"
        if not math.isnan(cpu[name][0]):
            line += f"  proxy CPU {statistics.median(cpu[name]):.2f} s per 10k transactions"
            if processes[name] > 1:
                line += f" (all {processes[name]} processes)"
        print(line)

    def ratio(label: str, mine: str, theirs: str, note: str = "") -> None:
        # Per round (same moment, same background load), then their median.
        rounds = [m / t for m, t in zip(runs[mine], runs[theirs], strict=True)]
        each = " ".join(f"{r:.2f}" for r in rounds)
        print(f"  {label:<38} {statistics.median(rounds):>5.2f}x  ({note}rounds: {each})")

    many = f"rewriter x{workers} -M prepared"
    ratio(
        f"rewriter x{workers} / pgbouncer simple",
        many,
        "pgbouncer -M simple",
        "the target line, >= 1.0x; ",
    )
    ratio(
        f"rewriter x{workers} / pgbouncer x{workers} simple",
        many,
        f"pgbouncer x{workers} -M simple",
    )
    ratio("rewriter / pgbouncer simple", "rewriter -M prepared", "pgbouncer -M simple")
    ratio("rewriter / pgbouncer extended", "rewriter -M prepared", "pgbouncer -M extended")
    ratio("rewriter / direct", "rewriter -M prepared", "direct -M prepared")
    if opts.source:
        ratio("compiled / source", "rewriter -M prepared", "rewriter -M prepared (source)")


def _source_build(dsn: str, pool_size: int, use_uvloop: bool | None) -> rewriter.RewriterHandle:
    """A second rewriter whose child process runs the hot path's Python source."""
    os.environ["POOLGUARD_REWRITER_PURE"] = "1"
    try:
        return rewriter.start(dsn, pool_size=pool_size, use_uvloop=use_uvloop)
    finally:
        del os.environ["POOLGUARD_REWRITER_PURE"]


def _has_uvloop() -> bool:
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
