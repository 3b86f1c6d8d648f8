"""Compiles the rewriter's hot path with Cython when it can; the package works without it.

The modules in HOT are compiled from their own Python source, typed by the ``.pxd`` file next
to each. A compiler error only drops the compiled build (the Python source then runs); a
Cython error in our own source fails the build, since it is a bug.
"""

import hashlib
import json
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Keep in step with src/poolguard/rewriter/_compiled.py (a test compares them).
HOT = ("_statements", "_replies", "_pool", "_params", "_prepare", "_session")
SOURCE = Path("src/poolguard/rewriter")
RECORD = "_compiled.json"


class BuildHotPath(build_ext):
    """build_ext that records which sources the extensions were compiled from, so an edited
    source is never shadowed by an older compiled module (_compiled.py checks the record)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.parallel = self.parallel or os.cpu_count() or 1

    def run(self) -> None:
        super().run()
        paths = [Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions]
        if not paths or not all(path.exists() for path in paths):
            return  # nothing built (or a compiler failed): the Python source runs
        digests = {
            name: hashlib.sha256((SOURCE / f"{name}.py").read_bytes()).hexdigest() for name in HOT
        }
        (paths[0].parent / RECORD).write_text(json.dumps(digests, indent=1) + "\n")


def hot_path() -> list[Extension]:
    if os.environ.get("POOLGUARD_NO_COMPILE"):
        return []
    from Cython.Build import cythonize

    modules = [
        Extension(f"poolguard.rewriter.{name}", [str(SOURCE / f"{name}.py")]) for name in HOT
    ]
    compiled = cythonize(
        modules,
        build_dir="build/cython",
        nthreads=os.cpu_count() or 1,
        quiet=True,
        # The .pxd files declare the types; annotations are for mypy (`X | None` and the like).
        compiler_directives={"language_level": 3, "annotation_typing": False},
    )
    for extension in compiled:
        extension.optional = True  # set here: cythonize() does not carry it over
    return compiled


setup(ext_modules=hot_path(), cmdclass={"build_ext": BuildHotPath})
