"""The ``poolguard`` command: demo, doctor, proxy."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__
from ._cli_help import DefaultsHelpFormatter


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(sys.stdout, users=args.users, requests=args.requests)


# Subcommands implemented (and parsed) by other modules: (module, function, help).
DELEGATED = {
    "doctor": ("._doctor", "main", "check a database's connection budget and pooler"),
    "proxy": (".rewriter", "main", "run the statement-name rewriter as a sidecar"),
    "top": ("._top", "main", "live view of a database's connections, pools, slots and rewriters"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolguard",
        description="One guarded PostgreSQL connection pool per process.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"poolguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log poolguard's INFO lines")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="connect-per-request vs poolguard on a real server",
        formatter_class=DefaultsHelpFormatter,
    )
    demo.add_argument("--users", type=int, default=200, help="concurrent simulated users")
    demo.add_argument("--requests", type=int, default=5, help="requests per user")
    demo.set_defaults(run=_demo)

    for name, (_, _, text) in DELEGATED.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # the whole rest of the line is theirs, options first too
        module, function, _ = DELEGATED[argv[0]]
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        run = getattr(importlib.import_module(module, __package__), function)
        return int(run(argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
