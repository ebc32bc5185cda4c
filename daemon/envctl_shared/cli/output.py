"""Formatting shared by every command: JSON for scripts, short aligned text for people."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from ..errors import EnvctlError


def emit_json(data: Any, stream: TextIO | None = None) -> None:
    """One JSON document per command (``--json``): stable keys, sorted, newline-terminated."""
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
