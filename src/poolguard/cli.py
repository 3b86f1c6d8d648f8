"""The ``poolguard`` command: demo, doctor, proxy."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(sys.stdout, users=args.users, requests=args.requests)


def _delegate(module: str, function: str) -> object:
    """A subcommand whose implementation lives in (and is parsed by) another module."""

    def run(args: argparse.Namespace) -> int:
        main = getattr(importlib.import_module(module, __package__), function)
        return int(main(args.rest))

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolguard", description="One guarded PostgreSQL connection pool per process."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log poolguard's INFO lines")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="connect-per-request vs poolguard on a real server")
    demo.add_argument("--users", type=int, default=200, help="concurrent simulated users")
    demo.add_argument("--requests", type=int, default=5, help="requests per user")
    demo.set_defaults(run=_demo)

    for name, module, function, text in (
        ("doctor", "._doctor", "main", "check a database's connection budget and pooler"),
        ("proxy", ".rewriter", "main", "run the statement-name rewriter as a sidecar"),
    ):
        sub = commands.add_parser(name, help=text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
        sub.set_defaults(run=_delegate(module, function))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
