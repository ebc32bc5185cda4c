"""Show a value a peer sent inside an error message, at a bounded cost.

Why: messages that quote the offending input are what make a refusal actionable, but the input
is the attacker's. ``repr`` of a YAML alias bomb walks gigabytes, of a 256 KiB string returns
256 KiB (into the log and back over the socket), and of a deeply nested list recurses.
:func:`brief` uses :mod:`reprlib` limits — a few levels, a few items, a few dozen characters —
so its cost and its length are bounded whatever the value is.

And read a JSON document someone else wrote (:func:`load_json`) at a bounded depth: Python's
decoder recurses once per level and raises ``RecursionError`` — not ``ValueError`` — past
about a thousand, which callers catching ``ValueError`` turned into "internal error" (a
``conda-meta/*.json`` of 100,000 ``[`` in a build failed the build that way, and any later
inventory of the version would have too).
"""

from __future__ import annotations

import json
import re
import reprlib
from array import array
from itertools import accumulate
from typing import Any

from .errors import ValidationError

MAX_JSON_DEPTH = 64  # a conda-meta record needs 4 levels, a kernel.json 3
# Every byte but the six that decide JSON's nesting: quotes and backslashes (where strings
# end) and brackets; then a JSON string (an unterminated one runs to the end: no match is
# retried from a later quote, so linear time); then each bracket as a step of depth (+1, -1
# as a signed byte).
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"\\[]{}')
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_STEP = bytes(1 if chr(b) in "[{" else 255 if chr(b) in "]}" else 0 for b in range(256))


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


def load_json(data: bytes, shown: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(data)``, refused with a ValidationError naming ``shown`` when it is not
    JSON or nests deeper than ``max_depth`` (counted before decoding, over the brackets
    outside strings alone, so the decoder never recurses past it)."""
    steps = array("b", _JSON_STRING.sub(b"", data.translate(None, _NOT_STRUCTURE))
                  .translate(_STEP))
    if max(accumulate(steps), default=0) > max_depth:  # C loops, ~30 ns a bracket
        raise ValidationError(f"{shown} nests deeper than {max_depth} levels: not a document "
                              "envctl reads", hint="remove or fix that file")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValidationError(f"{shown} is not valid JSON ({brief(str(exc))})",
                              hint="remove or fix that file") from None
