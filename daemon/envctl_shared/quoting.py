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


# What text may show as is: newline, tab, printable ASCII (backslash included: log text is not a
# name, and doubling every backslash of a Windows path or a regex would only obscure it).
_NOT_TEXT = re.compile(r"[^\n\t -~]")


def quote_text(text: str) -> str:
    """Someone else's program output (a build log) made safe for a terminal, lines kept.

    Like :func:`quote_name` but newline and tab pass and backslash is not escaped: escape
    sequences (OSC titles and clipboard writes, screen clears), carriage returns (which would
    overwrite a line with a forged one), other control characters and bidi overrides are shown
    as ``\\033``, ``\\r``, ``\\ooo``... Stateless per character, so chunks can be quoted as
    they arrive.
    """
    return text if _NOT_TEXT.search(text) is None else _NOT_TEXT.sub(_escape_char, text)
