"""Run Django's own database tests with ENGINE "poolguard.django" and with the stock backend.

Django's test suite is not vendored: this script downloads the sdist of the installed Django
version with pip (cached), unpacks its ``tests/``, starts a private PostgreSQL from
``poolguard.testing`` and runs ``tests/runtests.py`` once per backend, then prints the counts and
every test whose outcome differs between the two.

    python tests/django/run_django_suite.py                       # backends transactions basic
    python tests/django/run_django_suite.py --mode transaction    # poolguard's default mode
    python tests/django/run_django_suite.py --engines poolguard -- basic.tests.ModelTest

Exit status: 0 when poolguard's run has no failure that the stock run does not also have.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import django  # type: ignore[import-untyped]

from poolguard.testing import PostgresServer, start_postgres

DEFAULT_MODULES = ["backends", "transactions", "basic"]
ENGINES = {"stock": "django.db.backends.postgresql", "poolguard": "poolguard.django"}
# One "FAIL: test_name (module.Class.test_name)" header per failing test in unittest's output.
_PROBLEM = re.compile(r"^(FAIL|ERROR|UNEXPECTED SUCCESS): (\S+) \(([^)]+)\)", re.MULTILINE)
_RAN = re.compile(r"^Ran (\d+) tests? in ([\d.]+)s", re.MULTILINE)
_SKIPPED = re.compile(r"skipped=(\d+)")

SETTINGS = """\
import json, os
_dbs = json.loads(os.environ["POOLGUARD_SUITE_DATABASES"])
DATABASES = _dbs
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
"""


def django_tests(cache: Path) -> Path:
    """The ``tests/`` folder of the installed Django's sdist, downloaded once."""
    version = django.get_version()
    root = cache / f"Django-{version}"
    tests = next(root.glob("*/tests"), None) if root.exists() else None
    if tests is not None and (tests / "runtests.py").exists():
        return tests
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         "--disable-pip-version-check", f"django=={version}", "-d", str(root)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    sdist = next(root.glob("[Dd]jango-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name or m.name.endswith("/tests")]
        tar.extractall(root, members=members, filter="data")
    return next(root.glob("*/tests"))


def databases(server: PostgresServer, engine: str, mode: str, max_size: int) -> dict[str, Any]:
    def entry(name: str) -> dict[str, Any]:
        db: dict[str, object] = {
            "ENGINE": ENGINES[engine],
            "NAME": name,
            "USER": server.user,
            "PASSWORD": server.password,
            "HOST": server.host,
            "PORT": server.port,
        }
        if engine == "poolguard":
            # The documented way: poolguard's settings under OPTIONS, never the environment.
            # The documented way to set the mode.  max_size comes from the environment: Django's
            # own pool tests add OPTIONS["pool"] sizes, which must win over it.
            db["OPTIONS"] = {"poolguard": {"mode": mode}}
        return db

    return {"default": entry(f"{engine}_default"), "other": entry(f"{engine}_other")}


def run(
    tests: Path,
    server: PostgresServer,
    engine: str,
    mode: str,
    max_size: int,
    labels: list[str],
    parallel: int = 1,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="poolguard-suite-") as tmp:
        Path(tmp, "poolguard_suite_settings.py").write_text(SETTINGS)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]),
            "POOLGUARD_SUITE_DATABASES": json.dumps(databases(server, engine, mode, max_size)),
            "PYTHONWARNINGS": "ignore",
            "POOLGUARD_MAX_SIZE": str(max_size),
        }
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "runtests.py", "--settings=poolguard_suite_settings",
             f"--parallel={parallel}", "--noinput", "-v", "1", *labels],
            cwd=tests, env=env, capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    ran = _RAN.search(output)
    problems = sorted({f"{kind}: {where}" for kind, _name, where in _PROBLEM.findall(output)})
    skipped = _SKIPPED.search(output)
    return {
        "engine": engine,
        "ran": int(ran.group(1)) if ran else 0,
        "skipped": int(skipped.group(1)) if skipped else 0,
        "problems": problems,
        "seconds": round(seconds, 1),
        "returncode": proc.returncode,
        "tail": "\n".join(output.strip().splitlines()[-15:]) if not ran else "",
        "output": output,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=["stock", "poolguard"], choices=ENGINES)
    parser.add_argument("--mode", default="session", choices=["session", "transaction"])
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", "~/.cache"))
        .expanduser() / "poolguard" / "django-suite",
    )  # fmt: skip
    parser.add_argument(
        "--max-size", type=int, default=10, help="poolguard max_size (some tests hold 5 at once)"
    )
    parser.add_argument("--parallel", type=int, default=1, help="Django's --parallel")
    parser.add_argument("--log-dir", type=Path, help="write each run's full output here")
    parser.add_argument("labels", nargs="*", default=DEFAULT_MODULES)
    args = parser.parse_args()

    tests = django_tests(args.cache)
    server = start_postgres(max_connections=100)
    try:
        results = [
            run(tests, server, e, args.mode, args.max_size, args.labels, args.parallel)
            for e in args.engines
        ]
    finally:
        server.stop()

    print(f"Django {django.get_version()}: {' '.join(args.labels)} (poolguard mode={args.mode})")
    for r in results:
        print(
            f"  {r['engine']:>9}: ran {r['ran']}, skipped {r['skipped']}, "
            f"failed/errored {len(r['problems'])}, {r['seconds']} s"
        )
        if r["tail"]:
            print("    no test summary; output ends with:\n" + r["tail"])
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            (args.log_dir / f"{r['engine']}-{args.mode}.log").write_text(r["output"])
    by_engine = {r["engine"]: set(r["problems"]) for r in results}
    stock, ours = by_engine.get("stock", set()), by_engine.get("poolguard", set())
    for title, names in (
        ("only with poolguard", sorted(ours - stock)),
        ("only with stock", sorted(stock - ours)),
        ("with both", sorted(ours & stock)),
    ):
        if names:
            print(f"  {title}:")
            print("\n".join(f"    {n}" for n in names))
    if any(not r["ran"] for r in results):
        return 2
    return 1 if ours - stock else 0


if __name__ == "__main__":
    sys.exit(main())
