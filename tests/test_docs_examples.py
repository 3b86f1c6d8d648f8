"""The docs are tests: every fenced code block of README.md and docs/*.md that a reader would run
is run here, as written, in a subprocess against a real PostgreSQL (max_connections=20).

The convention, for anyone writing docs:

- Every ```` ```python ```` block is a script run on its own in a fresh database
  (``DATABASE_URL`` and ``POOLGUARD_DSN`` point at it), with ResourceWarning (poolguard's
  warnings, unclosed connections) and RuntimeWarning (a coroutine never awaited) as errors.  A
  block must be complete (imports, configuration, shutdown) and must exit 0.
- Every ```` ```console ```` block is run line by line: a line starting with ``$ `` is a
  command for ``bash`` (other lines are output, shown to the reader and not checked).  Each
  command must exit 0.  ``pip install`` and ``python3 -m venv`` lines are not run (no network
  in CI); instead every extra they name (``"poolguard[fastapi]"``) must be a declared extra.
- Other languages (``text``, ``ini``, ``toml``, ``bash``, no language) are shown, not run.
- A block may declare what it needs on the line right above its fence, in one HTML comment
  (invisible on the rendered page, visible in the source):
  ``<!-- test: pgbouncer -->``: DATABASE_URL/POOLGUARD_DSN go through a real PgBouncer in
  transaction mode and DIRECT_URL reaches PostgreSQL directly;
  ``<!-- test: file=NAME -->``: the block is not run but written to NAME in the page's working
  folder, which later blocks of the same page (run there) import or use; a page whose file
  block is used by no later block fails;
  ``<!-- test: exit=N -->``: the block (or each command of a console block) exits with N;
  ``<!-- test: env=NAME=VALUE -->``: an extra environment variable (repeatable);
  ``<!-- test: skip=REASON -->``: console blocks only (a long-running server, say; the reason
  is the rest of the comment and shows in the test report).  Python blocks cannot be skipped.
  Several keys go in one comment: ``<!-- test: pgbouncer exit=1 -->``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import metadata
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from poolguard.testing import PgBouncerServer, PostgresServer, find_pgbouncer, start_pgbouncer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "console"}
KEYS = {"pgbouncer", "file", "exit", "env", "skip"}
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*test:(?P<body>.*?)-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    options: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_directive(text: str, where: str) -> tuple[dict[str, str], dict[str, str]]:
    """``pgbouncer exit=1 env=A=B`` -> options and extra environment; unknown keys fail."""
    options: dict[str, str] = {}
    env: dict[str, str] = {}
    text, _, reason = text.partition("skip=")
    if reason:
        options["skip"] = reason.strip()
    for word in shlex.split(text):
        key, _, value = word.partition("=")
        if key not in KEYS:
            raise ValueError(f"{where}: unknown test directive {key!r} (known: {sorted(KEYS)})")
        if key == "env":
            name, _, env_value = value.partition("=")
            env[name] = env_value
        else:
            options[key] = value
    return options, env


def collect(page: Path) -> list[Block]:
    """The fenced blocks of one Markdown page, with the directive above each."""
    blocks: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        lang = (opening["info"].strip().split() or [""])[0].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not _closes(lines[j], fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        where = f"{page.relative_to(ROOT)}:{i + 1}"
        above = _DIRECTIVE.match(lines[i - 1]) if i else None
        options, env = parse_directive(above["body"], where) if above else ({}, {})
        blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n", options, env))
        i = j + 1
    return blocks


def _closes(line: str, fence: str) -> bool:
    text = line.strip()
    return len(text) >= len(fence) and text == fence[0] * len(text)


def runnable_blocks() -> list[Block]:
    return [b for page in PAGES for b in collect(page) if b.lang in RUN or b.options]


# --- the servers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs_server(postgres_factory) -> PostgresServer:  # type: ignore[no-untyped-def]
    """One small server for every block: the docs' examples must fit max_connections=20."""
    return postgres_factory(max_connections=20)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def docs_bouncer(docs_server: PostgresServer) -> Iterator[PgBouncerServer | None]:
    """PgBouncer in front of it, started on first use; None when it is not installed."""
    if find_pgbouncer() is None:
        yield None
        return
    bouncer = start_pgbouncer(docs_server)
    try:
        yield bouncer
    finally:
        bouncer.stop()


# --- running a page -------------------------------------------------------------------------


_INSTALL = re.compile(r"^(?:\S*/)?(?:pip3?|python3? -m pip) install |^(?:\S*/)?python3? -m venv ")
_EXTRAS = re.compile(r"poolguard\[([^\]]+)\]")


def check_install_line(command: str) -> None:
    """Not run (no network); every poolguard extra it names must exist."""
    declared = metadata("poolguard").get_all("Provides-Extra") or []
    for group in _EXTRAS.findall(command):
        for extra in (e.strip() for e in group.split(",")):
            assert extra in declared, f"{command!r} names the extra {extra!r}: not in pyproject"


def run_one(block: Block, workdir: Path, env: dict[str, str], argv: list[str]) -> str:
    expected = int(block.options.get("exit", "0"))
    done = subprocess.run(
        argv,
        cwd=workdir,
        env={**env, **block.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == expected, (
        f"{block.id} exited with {done.returncode}, expected {expected}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )
    return done.stderr


def run_block(block: Block, workdir: Path, env: dict[str, str]) -> None:
    if block.lang == "python":
        script = workdir / f"block_{block.line}.py"
        script.write_text(block.code)
        # poolguard's warnings (all ResourceWarnings), unclosed resources and coroutines never
        # awaited are errors; other libraries' deprecation notices are not the example's fault.
        strict = ["-W", "error::ResourceWarning", "-W", "error::RuntimeWarning"]
        stderr = run_one(block, workdir, env, [sys.executable, *strict, script.name])
        # A ResourceWarning raised in __del__ is only printed ("Exception ignored in ...").
        assert "Exception ignored" not in stderr, f"{block.id}:\n{stderr[-3000:]}"
        return
    lines = block.code.splitlines()
    commands = [line[2:] for line in lines if line.startswith("$ ")]
    assert commands, f"{block.id}: a console block needs at least one '$ ' command line"
    for command in commands:
        if _INSTALL.match(command):
            check_install_line(command)
        else:
            run_one(block, workdir, env, ["bash", "-euo", "pipefail", "-c", command])


def _run_targets() -> list[Block]:
    return [b for b in runnable_blocks() if "file" not in b.options and b.lang in RUN]


@pytest.mark.parametrize("block", _run_targets(), ids=lambda b: b.id)
def test_block_runs(
    block: Block,
    docs_server: PostgresServer,
    docs_bouncer: PgBouncerServer | None,
    tmp_path: Path,
) -> None:
    """One block, as written, in a fresh database (after the page's earlier file= blocks)."""
    if "skip" in block.options:
        assert block.lang == "console", f"{block.id}: only console blocks may be skipped"
        pytest.skip(f"{block.id}: {block.options['skip'] or 'skip= needs a reason'}")
    for earlier in collect(block.page):
        if earlier.line < block.line and "file" in earlier.options:
            target = tmp_path / earlier.options["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(earlier.code)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(tmp_path),
    }
    for var in ("DATABASE_URL", "POOLGUARD_DSN", "DIRECT_URL"):
        env.pop(var, None)
    name = f"docs_{block.page.stem.replace('-', '_').lower()}_{block.line}"
    direct = docs_server.create_database(name)
    try:
        dsn = direct
        if "pgbouncer" in block.options:
            if docs_bouncer is None:
                if os.environ.get("POOLGUARD_REQUIRE_PGBOUNCER") == "1":
                    pytest.fail("POOLGUARD_REQUIRE_PGBOUNCER=1 but pgbouncer is not installed")
                pytest.skip("pgbouncer is not installed")
            dsn = make_conninfo(docs_bouncer.dsn, dbname=name)
            env["DIRECT_URL"] = direct
        env["DATABASE_URL"] = env["POOLGUARD_DSN"] = dsn
        run_block(block, tmp_path, env)
    finally:
        docs_server.drop_database(name)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_file_blocks_are_used(page: Path) -> None:
    """A file= block is only tested through a later runnable block of its page."""
    blocks = collect(page)
    for n, block in enumerate(blocks):
        if "file" in block.options:
            assert block.lang != "console", f"{block.id}: file= is for file contents"
            later = [b for b in blocks[n + 1 :] if b.lang in RUN and "file" not in b.options]
            assert later, f"{block.id}: a file= block that no later block of the page runs"


def test_every_python_block_is_collected() -> None:
    """The collector sees every python fence (guards against a parser that misses some)."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        fences = len(re.findall(r"^ *```python *$", text, flags=re.MULTILINE))
        collected = [b for b in collect(page) if b.lang == "python"]
        assert len(collected) == fences, page


def test_directives_parse() -> None:
    options, env = parse_directive(" pgbouncer exit=1 env=A=b=c ", "here")
    assert options == {"pgbouncer": "", "exit": "1"} and env == {"A": "b=c"}
    assert parse_directive("skip=runs a server; see x", "here")[0] == {
        "skip": "runs a server; see x"
    }
    with pytest.raises(ValueError, match="unknown test directive 'pgbouncr'"):
        parse_directive("pgbouncr", "here")
