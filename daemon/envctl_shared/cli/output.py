"""Formatting shared by every command: JSON for scripts, short aligned text for people."""

from __future__ import annotations

import json
import re
import sys
from typing import Any, TextIO

from ..errors import EnvctlError


# Printable ASCII but the backslash: what a name may show as is. Everything else is looked at.
_NOT_PLAIN = re.compile(r"[^ -\[\]-~]")
_C_ESCAPES = {"\\": "\\\\", "\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n",
              "\v": "\\v", "\f": "\\f", "\r": "\\r"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _C_ESCAPES:
        return _C_ESCAPES[ch]
    if "\udc80" <= ch <= "\udcff":  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\{ord(ch) - 0xDC00:03o}"
    if ch.isprintable():  # letters, accents, CJK...: shown as they are
        return ch
    # control characters (C0, C1), line/paragraph separators, bidi overrides, lone surrogates
    return "".join(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass"))


def quote_name(name: str) -> str:
    """A file name or path as one unambiguous line of human output (``ls -b`` style).

    Names come from users: a newline in one would forge an output line, a terminal escape
    sequence would rewrite the screen. Backslash and C escapes become ``\\``, ``\\n``,
    ``\\t``...; other control and invisible format characters, and bytes that are not UTF-8,
    become ``\\ooo`` (octal, per byte). Printable text, non-ASCII letters included, is kept.
    JSON output is never escaped this way: it carries the exact name.
    """
    return name if _NOT_PLAIN.search(name) is None else _NOT_PLAIN.sub(_escape_char, name)


def emit_json(data: Any, stream: TextIO | None = None) -> None:
    """One JSON document per command (``--json``): stable keys, sorted, newline-terminated.

    ASCII only: a name's byte that is not UTF-8 (decoded with surrogateescape) is written as
    the lone surrogate ``\\udcXX``, which ``json.loads`` + ``os.fsencode`` turn back into
    the exact bytes."""
    out = stream or sys.stdout
    out.write(json.dumps(data, sort_keys=True) + "\n")
    out.flush()


def print_error(err: EnvctlError, stream: TextIO | None = None) -> None:
    """``envctl: error: <message>`` and, when there is one, ``  hint: <hint>``."""
    out = stream or sys.stderr
    out.write(f"envctl: error: {err.message}\n")
    if err.hint:
        out.write(f"  hint: {err.hint}\n")


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A plain left-aligned table (no colours, no box drawing: it ends up in emails and logs)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
