"""The argparse side of ``envctl``'s entry point (:mod:`~envctl_shared.cli.main`).

Why a module of its own: ``main`` imports it only when a command line is really parsed, so
``envctl --version`` (what scripts and installers probe) starts without argparse, its help
formatter or the config module.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from ..errors import UsageError

TYPE_CHECKING = False  # as in main: typing is not imported at run time
if TYPE_CHECKING:
    from typing import Any

GlobalOptions = dict[str, tuple[tuple[str, ...], dict[str, object]]]


def global_help() -> dict[str, str]:
    """The global options' help (config is imported here, when a parser is built)."""
    from ..config import DEFAULT_SOCKET, SOCKET_ENV
    return {"socket": f"daemon socket (default: ${SOCKET_ENV} or {DEFAULT_SOCKET})",
            "json": "print one JSON document (errors too)",
            "debug": "show tracebacks on errors"}


MAX_TIMEOUT = 86400.0  # a day: far beyond any answer, far below what a socket can take


def timeout_seconds(text: str) -> float:
    """``--timeout SECONDS``: above 0 and at most MAX_TIMEOUT (-1 reached the socket as an
    internal error, 0 as "the daemon closed the connection", 1e10 as an internal error too:
    OverflowError, the socket's timeout is bounded)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0 "
                                         f"(and at most {MAX_TIMEOUT:g}, a day)")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors become UsageError (exit 64) through the one handler, each
    hinting at the help of the command that was typed."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}", hint=f"run '{self.prog} --help'")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Words left over are reported by the top parser, after the command's own has
        finished: the hint names the command's help (``envctl doctor --help``)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            words = [w for w in (getattr(parsed, "command", None),
                                 getattr(parsed, "action", None)) if isinstance(w, str)]
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}",
                             hint=f"run '{' '.join([self.prog, *words])} --help'")
        return parsed


def leaves(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser that ends a command line (``heal``, ``request create``, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
            yield from leaves(child)


def globals_after(leaf: argparse.ArgumentParser, options: GlobalOptions) -> None:
    """Accept the global options after the subcommand without overriding the ones given before
    it: argparse copies a subparser's defaults over the main namespace, so here they are
    SUPPRESS (absent unless typed). A command's own ``--json``/``--socket`` keeps its help."""
    have = {a.dest: a for a in leaf._actions}
    for dest, (flags, kw) in options.items():
        if dest in have:
            have[dest].default = argparse.SUPPRESS
        else:
            hidden = {**kw, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
            leaf.add_argument(*flags, **hidden)  # type: ignore[arg-type]
