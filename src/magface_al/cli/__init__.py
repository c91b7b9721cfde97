"""The ``magface-al`` command: argument parsing and dispatch only.

Each sub-module of this package registers one group of subcommands through a
``register(subparsers)`` function and sets ``func`` on its parser; the work
itself lives in the library packages.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from magface_al import __version__
from magface_al.utils import setup_logging

logger = logging.getLogger(__name__)

# Sub-modules that contribute subcommands, imported lazily so that
# `magface-al rec info` does not pay for importing torch.
COMMAND_MODULES = ("rec", "models", "label")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magface-al",
        description="Score face pairs with MagFace, learn from pair feedback, measure the effect.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING or ERROR (default: INFO)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"magface_al.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"magface_al.cli.{name}":
                continue  # that command group is not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def console_main() -> int:
    """Entry point of the installed ``magface-al`` command.

    Sets the glibc allocator up for the large, repeated activations of
    embedding and training before any work starts. ``main`` leaves it alone,
    because changing the allocator inside a long-lived process that already
    holds memory (a test run, a notebook) is not safe.
    """
    from magface_al.embedding.backends import configure_allocator

    configure_allocator()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
