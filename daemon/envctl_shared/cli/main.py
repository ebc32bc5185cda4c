"""Entry point of ``envctl``: parse, dispatch to a command module, turn errors into exit codes.

Every command module exposes ``add_parser(subparsers)`` and sets ``func`` (``args -> int``) on
its parser. This is the only place that catches :class:`~envctl_shared.errors.EnvctlError`: it prints
one line (plus a hint) and returns the error's exit code; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..errors import EX_SOFTWARE, EnvctlError, UsageError
from . import env_cmd, heal_cmd, kernels_cmd, request_cmd, status_cmd, whoami_cmd
from .output import print_error

COMMAND_MODULES = [heal_cmd, request_cmd, env_cmd, status_cmd, whoami_cmd, kernels_cmd]


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors become UsageError (exit 64) through the one handler."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}", hint=f"run '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="envctl", description="Shared conda environments that simply work.")
    parser.add_argument("--version", action="version", version=f"envctl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for mod in COMMAND_MODULES:
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except EnvctlError as err:
        if debug:
            raise
        print_error(err)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: say so in one line unless debugging
        if debug:
            raise
        print_error(EnvctlError(f"internal error: {exc.__class__.__name__}: {exc}",
                                hint="re-run with --debug and report the traceback"))
        return EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
