"""Show a value a peer sent inside an error message, at a bounded cost.

Why: messages that quote the offending input are what make a refusal actionable, but the input
is the attacker's. ``repr`` of a YAML alias bomb walks gigabytes, of a 256 KiB string returns
256 KiB (into the log and back over the socket), and of a deeply nested list recurses.
:func:`brief` uses :mod:`reprlib` limits — a few levels, a few items, a few dozen characters —
so its cost and its length are bounded whatever the value is.
"""

from __future__ import annotations

import reprlib


class _Brief(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        """An int too long for ``repr`` (sys.get_int_max_str_digits) is described instead."""
        if x.bit_length() > 4 * self.maxlong:
            return f"<a {x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_REPR = _Brief()
_REPR.maxlevel = 2
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxlong = 40


def brief(value: object) -> str:
    """``repr(value)``, shortened with ``...`` where it would be long (at most ~300 chars)."""
    return _REPR.repr(value)
