"""Peak memory of Django's ``QuerySet.iterator()`` over 300,000 rows inside ``atomic()``.

Before: transaction mode read every row into the client at once (no server-side cursor at
all, as with DISABLE_SERVER_SIDE_CURSORS).  Now a transaction-mode pool uses a server-side
cursor inside ``atomic()``, where it is not WITH HOLD and dies with the transaction, so the rows
stream in chunks of 2,000.  mode="auto" against PostgreSQL itself is shown for reference.

    python benchmarks/bench_django_iterator.py [--rows 300000] [--rounds 3]

One private PostgreSQL (or DATABASE_URL), one fresh process per configuration and round (peak
RSS only grows within a process); the figure is the growth of peak RSS while iterating, the
smallest of the rounds.  Target (issue 16): now <= 0.2 x before.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

import psycopg
from _common import database, has_rows

CONFIGS: dict[str, dict[str, Any]] = {
    "before: transaction mode, client-side": {
        "ENGINE": "poolguard.django",
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "OPTIONS": {"poolguard": {"mode": "transaction"}},
    },
    "now: transaction mode": {
        "ENGINE": "poolguard.django",
        "OPTIONS": {"poolguard": {"mode": "transaction"}},
    },
    "mode=auto (direct)": {
        "ENGINE": "poolguard.django",
        "OPTIONS": {"poolguard": {"mode": "auto"}},
    },
}
BASELINE, NOW = "before: transaction mode, client-side", "now: transaction mode"


def _load(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if has_rows(conn, "bench_rows", rows):
            return
        conn.execute("DROP TABLE IF EXISTS bench_rows")
        conn.execute("CREATE TABLE bench_rows (id int PRIMARY KEY, name text, amount int)")
        conn.execute(
            "INSERT INTO bench_rows SELECT g, repeat(md5(g::text), 3), g %% 1000 "
            "FROM generate_series(1, %s) g",
            (rows,),
        )


def worker(database: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: configure Django, iterate once inside atomic(), report peak RSS."""
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={"default": database},
        INSTALLED_APPS=[],
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()
    from django.db import connection, models, transaction

    class Row(models.Model):
        name = models.TextField()
        amount = models.IntegerField()

        class Meta:
            app_label = "bench"
            managed = False
            db_table = "bench_rows"

    with transaction.atomic():
        Row.objects.filter(id=1).first()  # connected, warm: the baseline excludes set-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        count = total = 0
        for row in Row.objects.all().iterator():
            count += 1
            total += row.amount
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    server_side = not connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS")
    connection.close()
    return {"rows": count, "kib": peak - before, "server_side_setting": server_side}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    dsn, server = database()
    try:
        _load(dsn, args.rows)
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        base = {
            "NAME": params.get("dbname", ""),
            "USER": params.get("user", ""),
            "PASSWORD": params.get("password", ""),
            "HOST": params.get("host", ""),
            "PORT": str(params.get("port", "")),
        }
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for label, config in CONFIGS.items():
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps({**base, **config})],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(out.stdout.strip().splitlines()[-1])
                assert result["rows"] == args.rows, result
                best[label] = min(best.get(label, float("inf")), result["kib"])
        print(f"QuerySet.iterator() over {args.rows:,} rows inside atomic(): peak RSS growth")
        for label, kib in best.items():
            print(f"  {label:40s} {kib / 1024:8.1f} MiB")
        ratio = best[NOW] / best[BASELINE] if best[BASELINE] else float("inf")
        ok = ratio <= 0.2
        print(f"  now vs before {ratio:.3f}x (target <= 0.2): {'ok' if ok else 'MISSED'}")
        return 0 if ok else 1
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
