"""The rewriter's modules import one way: no cycle, not even one hidden behind TYPE_CHECKING
or a function-level import."""

from __future__ import annotations

import ast
from pathlib import Path

import poolguard.rewriter

PACKAGE = Path(poolguard.rewriter.__file__).parent


def _imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports anywhere in its body (relative or absolute)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 and module:
                found.add(module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif module.startswith("poolguard.rewriter."):
                found.add(module.split(".")[2])
    return found


def test_no_import_cycle_among_rewriter_modules() -> None:
    graph = {path.stem: _imports(path) for path in PACKAGE.glob("*.py")}
    assert "_session" in graph and "_login" in graph  # the walk found the modules

    def visit(module: str, trail: list[str]) -> None:
        for dep in graph.get(module, ()):
            assert dep not in trail, f"import cycle: {' -> '.join([*trail, dep])}"
            visit(dep, [*trail, dep])

    for module in graph:
        visit(module, [module])
