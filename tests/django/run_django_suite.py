"""Django's own database tests on ENGINE "poolguard.django": a comparison tool and a CI gate.

Django's test suite is not vendored: this script downloads the sdist of the installed Django
version with pip (cached), unpacks its ``tests/``, starts a private PostgreSQL from
``poolguard.testing`` and runs ``tests/runtests.py`` with poolguard's mode set the documented way,
through ``OPTIONS["poolguard"]``.

    python tests/django/run_django_suite.py --gate                # CI: both modes, GATE_MODULES
    python tests/django/run_django_suite.py --mode transaction    # stock vs poolguard
    python tests/django/run_django_suite.py --engines poolguard -- basic.tests.ModelTest
    python tests/django/run_django_suite.py --docs                # the list, as in docs/django.md

The gate fails on any failure not pinned in django_suite_expected.json and on any pinned test
that passes now (the list only shrinks).  Exit status: 0 when the gate (or, without --gate,
the comparison) finds nothing; 2 when a run produced no test summary.
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
GATE_MODULES = [
    "backends", "transactions", "basic", "select_for_update", "queries", "postgres_tests", "async",
]  # fmt: skip
MODES = ("transaction", "session")
EXPECTED_FILE = Path(__file__).with_name("django_suite_expected.json")
ENGINES = {"stock": "django.db.backends.postgresql", "poolguard": "poolguard.django"}
# One "FAIL: test_name (module.Class.test_name)" header per failing test in unittest's output.
_PROBLEM = re.compile(r"^(FAIL|ERROR|UNEXPECTED SUCCESS): (\S+) \(([^)]+)\)", re.MULTILINE)
_RAN = re.compile(r"^Ran (\d+) tests? in ([\d.]+)s", re.MULTILINE)
_SKIPPED = re.compile(r"skipped=(\d+)")
# -v 2 prints "test_name (module.Class.test_name)", a docstring line maybe, then " ... ok".
_TEST_LINE = re.compile(r"^(\w+) \(([\w.]+)\)(?: \.\.\. (.+))?$")
_RESULT = re.compile(r" \.\.\. (.+)$")

SETTINGS = """\
import json, os

from test_sqlite import *  # noqa: F403  Django's own test settings for this version

DATABASES = json.loads(os.environ["POOLGUARD_SUITE_DATABASES"])
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
             f"--parallel={parallel}", "--noinput", "-v", "2", *labels],
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


def outcomes(output: str) -> dict[str, str]:
    """test id -> "ok", "FAIL", "ERROR", "skipped"... from runtests.py's ``-v 2`` output."""
    found: dict[str, str] = {}
    pending: str | None = None
    for line in output.splitlines():
        test = _TEST_LINE.match(line)
        if test:
            pending = test.group(2)
            if test.group(3) is None:
                continue  # the result follows the docstring line
            line = " ... " + test.group(3)
        result = _RESULT.search(line)
        if pending is not None and result:
            word = result.group(1).split()[0]
            if found.get(pending) not in ("FAIL", "ERROR"):  # a subtest's failure wins
                found[pending] = word
            pending = None
    for test, word in reported_failures(output).items():  # reported without a result line
        found.setdefault(test, word)
    return found


def reported_failures(output: str) -> dict[str, str]:
    """test id -> "FAIL", "ERROR" or "unexpected", from the failure reports at the end."""
    return {
        where: kind.split()[0] if kind != "UNEXPECTED SUCCESS" else "unexpected"
        for kind, _name, where in _PROBLEM.findall(output)
    }


def consistent(output: str) -> bool:
    """Whether each failure report's traceback runs through the test it names.

    Django 6.0's --parallel on Python 3.12 was seen to pin a failure on the wrong test (the
    traceback of test_connect_role under test_connect_pool_with_timezone's name); a failure in
    setUp() looks the same here, and both fail the gate.
    """
    sections = re.split(r"^={20,}$", output, flags=re.MULTILINE)
    for section in sections:
        header = _PROBLEM.search(section)
        if header and f", in {header.group(2)}\n" not in section:
            return False
    return True


def expected(mode: str, path: Path = EXPECTED_FILE) -> dict[str, str]:
    """The pinned differences for ``mode``: test id -> reason."""
    entries = json.loads(path.read_text())["expected"]
    return {e["test"]: e["reason"] for e in entries if mode in e["modes"]}


def judge(found: dict[str, str], listed: dict[str, str]) -> list[str]:
    """What fails the gate: a failure not listed, and a listed test that passes now."""
    failed = {test for test, word in found.items() if word in ("FAIL", "ERROR", "unexpected")}
    problems = [f"fails, not in the list: {test}" for test in sorted(failed - set(listed))]
    problems += [
        f"listed but passes now (remove it from {EXPECTED_FILE.name}): {test}"
        for test in sorted(listed)
        if found.get(test) == "ok"
    ]
    return problems


def docs_table(path: Path = EXPECTED_FILE) -> str:
    """The pinned list as the Markdown table in docs/django.md."""
    rows = ["| Django test | Modes | Why it differs |", "| --- | --- | --- |"]
    for e in json.loads(path.read_text())["expected"]:
        rows.append(f"| `{e['test']}` | {', '.join(e['modes'])} | {e['reason']} |")
    return "\n".join(rows) + "\n"


def gate(
    tests: Path,
    max_size: int,
    parallel: int,
    labels: list[str],
    log_dir: Path | None,
    stock: bool = False,
) -> int:
    server = start_postgres(max_connections=100)
    problems: list[str] = []
    shared: set[str] = set()  # failing with Django's own backend too: not poolguard's to fix
    try:
        if stock:
            r = run(tests, server, "stock", "session", max_size, labels, parallel)
            found = outcomes(r["output"])
            shared = {test for test, word in found.items() if word in ("FAIL", "ERROR")}
            print(
                f"Django {django.get_version()}, stock backend: ran {r['ran']}, skipped "
                f"{r['skipped']}, failed/errored {len(shared)} (not counted below), "
                f"{r['seconds']} s"
            )
            for test in sorted(shared):
                print(f"  stock fails too: {test}")
        for mode in MODES:
            r = run(tests, server, "poolguard", mode, max_size, labels, parallel)
            found = {t: w for t, w in outcomes(r["output"]).items() if t not in shared}
            if log_dir:
                log_dir.mkdir(parents=True, exist_ok=True)
                (log_dir / f"gate-{mode}.log").write_text(r["output"])
            print(
                f"Django {django.get_version()}, poolguard mode={mode}: ran {r['ran']}, "
                f"skipped {r['skipped']}, failed/errored {len(r['problems'])}, {r['seconds']} s"
            )
            if not r["ran"]:
                print("  no test summary; output ends with:\n" + r["tail"])
                return 2
            if not consistent(r["output"]):
                problems.append(
                    f"mode={mode}: a failure report's traceback does not run through the test "
                    "it names (a setUp() error, or Django 6.0's --parallel: try --parallel 1)"
                )
            if len(found) + len(shared) < r["ran"]:  # else "passes now" could go unnoticed
                problems.append(f"mode={mode}: read {len(found)} outcomes of {r['ran']} tests")
            listed = expected(mode)
            for test in sorted(listed):
                print(f"  expected difference: {test}: {found.get(test, 'did not run')}")
            problems += [f"mode={mode}: {p}" for p in judge(found, listed)]
    finally:
        server.stop()
    for problem in problems:
        print("  GATE: " + problem)
    print("Django suite gate: " + ("FAILED" if problems else "passed"))
    return 1 if problems else 0


def _parallel(wanted: int) -> int:
    """Django's --parallel pickles failures' tracebacks with tblib; without it one failure
    stops the whole run, so run serially then."""
    if wanted > 1:
        try:
            import tblib  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            print("tblib is not installed: running with --parallel=1 (pip install tblib)")
            return 1
    return wanted


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
    parser.add_argument("--gate", action="store_true", help="both modes, the pinned list")
    parser.add_argument(
        "--stock", action="store_true", help="with --gate: run the stock backend too and do not "
        "count the failures it shares (a Django or server version's own failures)",
    )  # fmt: skip
    parser.add_argument("--docs", action="store_true", help="print the list for docs/django.md")
    parser.add_argument("labels", nargs="*")
    args = parser.parse_args()
    if args.docs:
        print(docs_table(), end="")
        return 0

    tests = django_tests(args.cache)
    args.parallel = _parallel(args.parallel)
    if args.gate:
        return gate(
            tests,
            args.max_size,
            args.parallel,
            args.labels or GATE_MODULES,
            args.log_dir,
            args.stock,
        )
    args.labels = args.labels or DEFAULT_MODULES
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
