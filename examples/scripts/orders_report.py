"""A plain psycopg script on poolguard: a few worker threads share one small pool.

    pip install poolguard
    DATABASE_URL=postgresql://app:secret@localhost/app python orders_report.py --threads 16

16 threads, 4 connections (max_size): threads wait their turn for a connection instead of each
opening its own, and the script never holds more than 4 of the server's slots.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import poolguard


def setup() -> None:
    with poolguard.connection() as conn:  # one transaction: committed at the end of the block
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id int PRIMARY KEY, total numeric)")
        conn.execute("TRUNCATE orders")
        conn.execute("INSERT INTO orders SELECT i, i * 1.5 FROM generate_series(1, 1000) AS i")


def total_for(block: int) -> float:
    """The sum of one block of 100 orders (one checkout per call)."""
    with poolguard.connection() as conn:
        row = conn.execute(
            "SELECT coalesce(sum(total), 0) FROM orders WHERE id > %s AND id <= %s",
            (block * 100, block * 100 + 100),
        ).fetchone()
    return float(row[0]) if row else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    poolguard.configure(max_size=4)  # DATABASE_URL (or POOLGUARD_DSN)
    try:
        setup()
        with ThreadPoolExecutor(args.threads) as workers:
            totals = list(workers.map(total_for, range(10)))
        stats = poolguard.stats()
        print(f"total {sum(totals):.1f} from {len(totals)} blocks")
        print(f"connections opened: {stats['db.client.connection.create_time']['count']}")
    finally:
        poolguard.close_all()  # close the pool: the script's sessions end here


if __name__ == "__main__":
    main()
