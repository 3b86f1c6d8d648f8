"""pgbench -S through the rewriter (-M prepared) vs PgBouncer (-M simple) vs direct, one run.

    python benchmarks/bench_rewriter.py [--clients 50] [--duration 10] [--pool-size 4]

Starts a private PostgreSQL and PgBouncer (poolguard.testing), the rewriter in this process,
runs pgbench against each, and prints tps with ratios. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from poolguard import rewriter
from poolguard.testing import find_postgres_bindir, start_pgbouncer, start_postgres


def pgbench(bindir: Path, target: object, password: str, args: list[str]) -> float:
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
    if match is None:
        sys.exit(f"no tps in pgbench output:\n{run.stdout}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument("--pool-size", type=int, default=4, help="server connections (both)")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use the standard asyncio loop even if uvloop is installed",
    )
    opts = parser.parse_args()

    bindir = find_postgres_bindir()
    pg = start_postgres(max_connections=200)
    bouncer = proxy = None
    loop_name = "asyncio"
    try:
        init = [str(bindir / "pgbench"), "-i", "-q", "-s", str(opts.scale), pg.dsn]
        subprocess.run(init, check=True, capture_output=True)
        bouncer = start_pgbouncer(pg, default_pool_size=opts.pool_size)
        use_uvloop = False if opts.no_uvloop else None
        proxy = rewriter.start(pg.dsn, pool_size=opts.pool_size, use_uvloop=use_uvloop)
        common = ["-S", "-c", str(opts.clients), "-j", str(opts.threads), "-T", str(opts.duration)]
        results = {
            "direct -M prepared": pgbench(bindir, pg, pg.password, [*common, "-M", "prepared"]),
            "direct -M simple": pgbench(bindir, pg, pg.password, [*common, "-M", "simple"]),
            "pgbouncer -M simple": pgbench(
                bindir, bouncer, bouncer.password, [*common, "-M", "simple"]
            ),
            "rewriter -M prepared": pgbench(
                bindir, proxy, proxy.password, [*common, "-M", "prepared"]
            ),
        }
        loop_name = type(proxy._loop).__module__.split(".")[0]
    finally:
        if proxy is not None:
            proxy.stop()
        if bouncer is not None:
            bouncer.stop()
        pg.stop()

    print(
        f"pgbench -S, {opts.clients} clients, {opts.threads} threads, {opts.duration} s, "
        f"pool size {opts.pool_size}, {os.cpu_count()} CPUs, rewriter loop: {loop_name}"
    )
    for name, tps in results.items():
        print(f"  {name:<22} {tps:>10.0f} tps")
    bouncer_tps = results["pgbouncer -M simple"]
    mine = results["rewriter -M prepared"]
    print(f"  rewriter / pgbouncer  {mine / bouncer_tps:>10.2f}x  (target >= 0.60x)")
    print(f"  rewriter / direct     {mine / results['direct -M prepared']:>10.2f}x")


if __name__ == "__main__":
    main()
