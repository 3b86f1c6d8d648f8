"""The two builds of the rewriter's hot path: the modules Cython compiled from the Python source
when the package was built, and that source. The suite runs on each (tox env ``py`` on the
compiled build, ``rewriter-pure`` on the source); these tests check which one a process picks,
and that an edited source is never shadowed by an older compiled module."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import poolguard
import poolguard.rewriter
from poolguard.rewriter import _compiled

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(poolguard.rewriter.__file__).parent
PURE = bool(os.environ.get(_compiled.PURE_ENV))
# CI and the tox env `py` set this: there, a missing compiled build is a failure, not a skip.
REQUIRED = os.environ.get("POOLGUARD_REQUIRE_COMPILED") == "1" and not PURE


def _built() -> bool:
    return all(_compiled.has_extension(PACKAGE, name) for name in _compiled.HOT)


def _needs_compiled_build() -> None:
    if not _built():
        if REQUIRED:
            pytest.fail("no compiled build of the rewriter's hot path is installed: is gcc there?")
        pytest.skip("no compiled build installed here (no C compiler when it was installed)")


def test_setup_compiles_what_the_loader_expects() -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    [hot] = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HOT"
    ]
    assert tuple(hot) == _compiled.HOT
    for name in _compiled.HOT:  # each is typed for Cython by the .pxd beside it
        assert (ROOT / "src/poolguard/rewriter" / f"{name}.pxd").exists(), name


def test_this_process_runs_the_build_it_should() -> None:
    modules = [importlib.import_module(f"poolguard.rewriter.{name}") for name in _compiled.HOT]
    files = [str(module.__file__) for module in modules]
    if PURE:
        assert poolguard.rewriter.hot_path() == (f"Python source ({_compiled.PURE_ENV} is set)")
        assert all(f.endswith(".py") for f in files), files
        return
    _needs_compiled_build()
    assert poolguard.rewriter.hot_path() == "compiled (Cython)"
    assert not any(f.endswith(".py") for f in files), files


def _run(package_copy: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != _compiled.PURE_ENV}
    env["PYTHONPATH"] = str(package_copy)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )


_REPORT = """
import logging
logging.basicConfig(level=logging.WARNING)
import poolguard, poolguard.rewriter
from poolguard.rewriter import _pool, _session
print(poolguard.__file__)
print(_session.__file__)
print(_pool.__file__)
print(getattr(_session, "EDITED", False))
print(poolguard.rewriter.hot_path())
"""


def test_an_edited_source_runs_instead_of_its_older_compiled_module(tmp_path: Path) -> None:
    _needs_compiled_build()
    shutil.copytree(Path(poolguard.__file__).parent, tmp_path / "poolguard")
    copy = tmp_path / "poolguard" / "rewriter"

    before = _run(tmp_path, _REPORT)
    package, session, pool, edited, hot_path = before.stdout.splitlines()
    assert package.startswith(str(tmp_path))  # the copy is what ran
    assert hot_path == "compiled (Cython)" and not session.endswith(".py")

    with (copy / "_session.py").open("a") as source:
        source.write("\nEDITED = True\n")
    after = _run(tmp_path, _REPORT)
    package, session, pool, edited, hot_path = after.stdout.splitlines()
    # All of the hot path from source, the edit included: the compiled modules expect each
    # other's types, so one edited module takes the others with it.
    assert session == str(copy / "_session.py") and pool == str(copy / "_pool.py")
    assert edited == "True"
    assert hot_path.startswith("Python source (the source changed since it was compiled")
    assert "_session" in hot_path and "pip install -e ." in hot_path
    assert "rewriter hot path: the source changed" in after.stderr


def test_a_compiled_build_without_its_record_is_not_trusted(tmp_path: Path) -> None:
    _needs_compiled_build()
    shutil.copytree(Path(poolguard.__file__).parent, tmp_path / "poolguard")
    (tmp_path / "poolguard" / "rewriter" / "_compiled.json").unlink()
    done = _run(tmp_path, _REPORT)
    assert done.stdout.splitlines()[-1] == (
        "Python source (the compiled build has no readable _compiled.json)"
    )
