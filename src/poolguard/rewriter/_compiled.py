"""Which build of the rewriter's hot path runs: the extension modules Cython compiled from its
Python source when the package was built (the proxy then needs about a quarter less CPU per
transaction), or that source itself.

Both are the same code: each module in ``HOT`` is plain Python, and a ``.pxd`` next to it only
declares types for the compiled build. The source runs instead when no compiled build is
there (no compiler at install time), when ``POOLGUARD_REWRITER_PURE=1`` asks for it, or when the
source changed after it was compiled (an editable install edited since): an older compiled
module must never shadow the code beside it. It is all or nothing, since the compiled modules
expect each other's types.

The choice is made when this module is imported, which ``poolguard.rewriter`` does before any
of these modules.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

logger = logging.getLogger("poolguard.rewriter")

# Keep in step with setup.py (a test compares them); dependencies first.
HOT = ("_statements", "_replies", "_pool", "_params", "_prepare", "_session")
PURE_ENV = "POOLGUARD_REWRITER_PURE"
_RECORD = "_compiled.json"  # written by setup.py: the digest of each source compiled

#: True when the compiled build runs; ``reason`` says why when it does not.
active = False
reason = "not chosen yet"


def choose() -> None:
    global active, reason
    here = Path(__file__).parent
    package = __name__.rpartition(".")[0]
    active, reason = _check(here)
    # Without any compiled module beside them, the usual import finds the sources already.
    if not active and any(has_extension(here, name) for name in HOT):
        sources = {f"{package}.{name}": here / f"{name}.py" for name in HOT}
        sys.meta_path.insert(0, _SourceFirst(sources))
        if reason.startswith("the source changed"):
            logger.warning("rewriter hot path: %s", reason)


def describe() -> str:
    """One line for logs and benchmarks."""
    return "compiled (Cython)" if active else f"Python source ({reason})"


def _check(here: Path) -> tuple[bool, str]:
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return False, f"{PURE_ENV} is set"
    if not all(has_extension(here, name) for name in HOT):
        return False, "no compiled build installed"
    try:
        recorded = json.loads((here / _RECORD).read_text())
    except (OSError, ValueError):
        return False, f"the compiled build has no readable {_RECORD}"
    changed = [
        name
        for name in HOT
        if recorded.get(name) != hashlib.sha256((here / f"{name}.py").read_bytes()).hexdigest()
    ]
    if changed:
        return False, (
            f"the source changed since it was compiled ({', '.join(changed)}): running the "
            "source; reinstall (pip install -e .) to compile it again"
        )
    return True, ""


def has_extension(here: Path, name: str) -> bool:
    return any((here / (name + s)).exists() for s in importlib.machinery.EXTENSION_SUFFIXES)


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Imports the hot modules from their ``.py`` even where a compiled module sits beside
    them (the normal finder prefers extension modules)."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        source = self.sources.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


choose()
