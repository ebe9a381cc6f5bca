"""Command line: ``arrag-kernels <command>`` or ``python -m arrag_kernels <command>``.

Commands: ``demo`` (the embedded default job), ``build-db``, ``merge-db``, ``import-official``, ``generate``, ``train-faid``,
``convert``, ``eval``; each module in ``_COMMAND_MODULES`` adds its own through ``add_subcommands(subparsers)``
and loads models through :func:`arrag_kernels.cli.common.load_model`.

Every user error (bad argument, missing or corrupted file, unavailable device) prints one line
``arrag-kernels <command>: error: ...`` to stderr, no traceback, and exits with ``USER_ERROR`` (2,
argparse's own code); 0 is success; anything else is a bug worth reporting.
"""

from __future__ import annotations

import argparse
import sys

from arrag_kernels.cli import database, demo, evaluate, faid, generate
from arrag_kernels.cli.common import USER_ERROR, UserErrorParser, user_error_message

__all__ = ["USER_ERROR", "build_parser", "main"]

# In the order ``--help`` lists their commands.
_COMMAND_MODULES = (demo, database, generate, faid, evaluate)


def build_parser() -> argparse.ArgumentParser:
    p = UserErrorParser(prog="arrag-kernels", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for module in _COMMAND_MODULES:
        module.add_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (USER_ERROR, its one line already printed)
        return e.code if isinstance(e.code, int) else USER_ERROR
    try:
        args.func(args)
    except (Exception, SystemExit) as e:
        message = user_error_message(e, getattr(args, "checkpoint", None))
        if message is None:
            raise
        print(f"arrag-kernels {args.command}: error: {message}", file=sys.stderr)
        return USER_ERROR
    return 0
