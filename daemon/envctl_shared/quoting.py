"""Names from the tree as one unambiguous line, for people and for logs.

Why a module of its own at the bottom of the stack: file names come from users, and the CLI's
human output and the daemon's key=value log lines both print them. A newline in a name would
forge a line (an output row, a log record), a terminal escape sequence would rewrite the screen.
JSON output and journal fields are never escaped this way: they carry the exact name.
"""

from __future__ import annotations

import re

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
