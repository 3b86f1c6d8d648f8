"""Where a checkout was taken: the first frame outside library code, however deep the stack,
and still right when the same library code is reached through another path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy

from poolguard._ledger import caller_site

LIBRARY_FILE = str(Path(sqlalchemy.__file__).parent / "orm" / "_test_caller_site.py")

# lib0 asks for the site, as the pool does; libN calls lib(N-1). hop(f) is library code that
# calls back into `f`, the way an ORM runs an application's event hook.
_SOURCE = "def lib0():\n    return caller_site(1)\n" + "".join(
    f"def lib{i}():\n    return lib{i - 1}()\n" for i in range(1, 30)
)
_SOURCE += "def hop(f):\n    return f()\n"
LIBRARY: dict[str, Any] = {"caller_site": caller_site}
exec(compile(_SOURCE, LIBRARY_FILE, "exec"), LIBRARY)


def lib(n: int) -> Callable[[], Any]:
    return LIBRARY[f"lib{n}"]  # type: ignore[no-any-return]


def site_of(call: Callable[[], Any]) -> tuple[str, str]:
    code, _ = call()
    return code.co_filename, code.co_name


def app_deep() -> tuple[Any, int]:
    return lib(24)()


def app_shallow() -> tuple[Any, int]:
    return lib(3)()


def app_inside_hook() -> tuple[Any, int]:
    return lib(5)()


def test_site_is_the_app_frame_at_any_depth() -> None:
    for _ in range(3):  # the first call walks, the next ones jump
        assert site_of(app_deep) == (__file__, "app_deep")
        assert site_of(app_shallow) == (__file__, "app_shallow")
        assert site_of(app_deep) == (__file__, "app_deep")


def test_same_library_code_reached_another_way_is_walked_again() -> None:
    assert site_of(app_deep) == (__file__, "app_deep")
    # lib0's call instruction is the same; above it, an app frame sits between library frames.
    hooked = LIBRARY["hop"]
    for _ in range(3):
        assert site_of(lambda: hooked(app_inside_hook)) == (__file__, "app_inside_hook")
        assert site_of(app_deep) == (__file__, "app_deep")
