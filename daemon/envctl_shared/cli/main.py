"""Entry point of ``envctl``: parse, dispatch to a command module, turn errors into exit codes.

Every command module exposes ``add_parser(subparsers)`` and sets ``func`` (``args -> int``) on
its parser. This is the only place that catches :class:`~envctl_shared.errors.EnvctlError`:
it prints one line (plus a hint) and returns the error's exit code; tracebacks only with
``--debug``.
Under ``--json`` an error is a JSON document on stdout too (unless the command already printed
its own), so a script never has to parse a human sentence.

The global options ``--socket``, ``--json`` and ``--debug`` are accepted before the subcommand
(``envctl --json status``) as well as after it: people type them where they think of them.

Start-up is part of every command's cost (``envctl check`` of a compliant tree is bound by it:
its walk is faster than ``find``'s). So each command's module is imported only when it runs,
and the modules ``check`` needs (config, policy, heal) define their records as ``NamedTuple``
or plain classes, not dataclasses: the ``dataclasses`` module and the code it generates for
each class were a third of that command's start-up (``tests/test_cli_startup.py``,
``bench/bench_walk.py``).
"""

from __future__ import annotations

import sys
from importlib import import_module

from .. import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (half the start-up)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from types import ModuleType

    from ..errors import EnvctlError

# Each command's module, imported only when that command runs: all of them are ~0.14 s of every
# start (``request`` needs half of it); help, or a word that is no command, imports them all.
COMMANDS = {"heal": "heal_cmd", "check": "heal_cmd", "request": "request_cmd",
            "env": "env_cmd", "status": "status_cmd", "whoami": "whoami_cmd",
            "kernels": "kernels_cmd", "doctor": "doctor_cmd", "init": "init_cmd",
            "web": "web_cmd"}
# Options every command accepts on either side of its name: (flags, argparse keywords).
GLOBAL_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, object]]] = {
    "socket": (("--socket",), {"metavar": "PATH", "default": None}),
    "json": (("--json",), {"action": "store_true", "default": False}),
    "debug": (("--debug",), {"action": "store_true", "default": False}),
}


def _command(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (the first word that is no global option nor its value);
    None under ``-h``/``--help`` before it: the main help lists every command."""
    valued = {flag for flags, kw in GLOBAL_OPTIONS.values() if "action" not in kw
              for flag in flags}
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help", "--"):
            return None
        if word in valued:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def command_modules(argv: Sequence[str] = ()) -> list[ModuleType]:
    """The command modules ``argv`` needs (see COMMANDS), in the order help lists them."""
    command = _command(argv)
    if command is None and "--version" in argv and not {"-h", "--help"} & set(argv):
        return []  # argparse prints the version before it looks for a command
    names = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    return [import_module(f".{name}", __package__) for name in names]


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    from .parsing import Parser, global_help, globals_after, leaves
    parser = Parser(prog="envctl", description="Shared conda environments that simply work.")
    parser.add_argument("--version", action="version", version=f"envctl {__version__}")
    helps = global_help()
    for dest, (flags, kw) in GLOBAL_OPTIONS.items():
        parser.add_argument(*flags, **kw, help=helps[dest])  # type: ignore[arg-type]
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for mod in command_modules(argv):
        mod.add_parser(sub)
    for leaf in leaves(parser):
        globals_after(leaf, GLOBAL_OPTIONS)
    return parser


def _typed(argv: list[str], flag: str) -> bool:
    """Whether ``flag`` is on the command line (before any ``--``): for errors raised before
    argparse is done, e.g. a usage error under ``--json``."""
    return flag in argv[:argv.index("--")] if "--" in argv else flag in argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--version"]:  # what scripts probe: answered before anything is imported
        print(f"envctl {__version__}")  # (argparse, its formatter, errors: 2/3 of the start)
        return 0
    from ..errors import EX_SOFTWARE, EnvctlError
    debug, as_json = _typed(argv, "--debug"), _typed(argv, "--json")
    try:
        args = build_parser(argv).parse_args(argv)
        debug, as_json = bool(args.debug), bool(args.json)
        return int(args.func(args))
    except EnvctlError as err:
        if debug:
            raise
        return _fail(err, as_json)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: say so in one line unless debugging
        if debug:
            raise
        bug = EnvctlError(f"internal error: {exc.__class__.__name__}: {exc}",
                          hint="re-run with --debug and report the traceback")
        bug.exit_code = EX_SOFTWARE  # type: ignore[misc]
        return _fail(bug, as_json)


def _fail(err: EnvctlError, as_json: bool) -> int:
    """Report ``err`` once: as JSON when asked and no document was printed yet (a command that
    printed its result, e.g. a failed build's job, has said it), else as text on stderr."""
    from .output import emit_error, json_emitted
    emit_error(err, as_json=as_json and not json_emitted())
    return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
