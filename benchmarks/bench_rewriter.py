"""pgbench -S through the rewriter (-M prepared) vs PgBouncer (-M simple, -M extended) vs
direct, in one run, with each proxy's CPU seconds per 10k transactions. When the rewriter's hot
path is compiled, a second rewriter running its Python source is measured too.

    python benchmarks/bench_rewriter.py [--clients 50] [--duration 10] [--rounds 3] [--no-uvloop]

Starts a private PostgreSQL and PgBouncer (poolguard.testing) and the rewriter (in its child
process, as ``start()`` runs it), runs pgbench against each, and prints tps with ratios and
the CPU time each proxy process used. Not part of the test suite.
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
from pathlib import Path

from poolguard import rewriter
from poolguard.testing import find_postgres_bindir, start_pgbouncer, start_postgres


def listener_pid(port: int) -> int | None:
    """The process listening on ``port`` (to read its CPU time), or None without psutil."""
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:
        return None
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == "LISTEN" and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` so far (from /proc), NaN if unknown."""
    if pid is None:
        return math.nan
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    parser.add_argument("--pool-size", type=int, default=4, help="server connections (both)")
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
        "--no-uvloop",
        action="store_true",
        help="use the standard asyncio loop even if uvloop is installed",
    )
    opts = parser.parse_args()

    bindir = find_postgres_bindir()
    pg = start_postgres(max_connections=200)
    bouncer = proxy = source = None
    loop_name = "asyncio"
    hot_path = rewriter.hot_path()
    try:
        init = [str(bindir / "pgbench"), "-i", "-q", "-s", str(opts.scale), pg.dsn]
        subprocess.run(init, check=True, capture_output=True)
        bouncer = start_pgbouncer(pg, default_pool_size=opts.pool_size)
        use_uvloop = False if opts.no_uvloop else None
        proxy = rewriter.start(pg.dsn, pool_size=opts.pool_size, use_uvloop=use_uvloop)
        if hot_path.startswith("compiled"):
            source = _source_build(pg.dsn, opts.pool_size, use_uvloop)
        common = ["-S", "-c", str(opts.clients), "-j", str(opts.threads), "-T", str(opts.duration)]
        targets = {
            "direct -M prepared": (pg, pg.password, "prepared", None),
            "direct -M simple": (pg, pg.password, "simple", None),
            "pgbouncer -M simple": (bouncer, bouncer.password, "simple", bouncer.port),
            "pgbouncer -M extended": (bouncer, bouncer.password, "extended", bouncer.port),
            "rewriter -M prepared": (proxy, proxy.password, "prepared", proxy.port),
        }
        if source is not None:
            targets["rewriter -M prepared (source)"] = (
                source,
                source.password,
                "prepared",
                source.port,
            )
        runs: dict[str, list[float]] = {name: [] for name in targets}
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        # Unrecorded first pass: each proxy opens its server connections and each server
        # backend warms its caches, so round one does not favour whichever ran later.
        if opts.warmup > 0:
            warm = ["-S", "-c", str(opts.clients), "-j", str(opts.threads), "-T", str(opts.warmup)]
            for target, password, mode, _ in targets.values():
                pgbench(bindir, target, password, [*warm, "-M", mode])
        for _ in range(opts.rounds):
            for name, (target, password, mode, port) in targets.items():
                pid = listener_pid(port) if port else None
                before = cpu_seconds(pid)
                tps, done = pgbench(bindir, target, password, [*common, "-M", mode])
                runs[name].append(tps)
                cpu[name].append((cpu_seconds(pid) - before) / done * 10_000)
        loop_name = "uvloop" if use_uvloop is not False and _has_uvloop() else "asyncio"
    finally:
        for handle in (proxy, source):
            if handle is not None:
                handle.stop()
        if bouncer is not None:
            bouncer.stop()
        pg.stop()

    print(
        f"pgbench -S, {opts.clients} clients, {opts.threads} threads, {opts.duration} s, "
        f"pool size {opts.pool_size} (server connections, both proxies), {opts.warmup} s "
        f"warm-up, {os.cpu_count()} CPUs, rewriter loop: {loop_name}, hot path: {hot_path}"
    )
    for name, results in runs.items():
        each = " ".join(f"{t:.0f}" for t in results)
        line = f"  {name:<30} {statistics.median(results):>10.0f} tps  (runs: {each})"
        if not math.isnan(cpu[name][0]):
            line += f"  proxy CPU {statistics.median(cpu[name]):.2f} s per 10k transactions"
        print(line)
    # Ratios per round (same moment, same background load), then their median.
    mine = runs["rewriter -M prepared"]
    vs_bouncer = [m / b for m, b in zip(mine, runs["pgbouncer -M simple"], strict=True)]
    vs_direct = [m / d for m, d in zip(mine, runs["direct -M prepared"], strict=True)]
    print(
        f"  rewriter / pgbouncer simple {statistics.median(vs_bouncer):>6.2f}x  (target >= 1.0x; "
        f"rounds: {' '.join(f'{r:.2f}' for r in vs_bouncer)})"
    )
    vs_ext = [m / b for m, b in zip(mine, runs["pgbouncer -M extended"], strict=True)]
    print(f"  rewriter / pgbouncer extended {statistics.median(vs_ext):>4.2f}x")
    print(f"  rewriter / direct     {statistics.median(vs_direct):>10.2f}x")
    if source is not None:
        vs_source = [
            m / s for m, s in zip(mine, runs["rewriter -M prepared (source)"], strict=True)
        ]
        print(f"  compiled / source     {statistics.median(vs_source):>10.2f}x")


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
