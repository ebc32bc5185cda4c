"""``env add``: the current version's environment.yml with packages added, as new spec text.

Why in the daemon and as text: the version record (``vN.json`` ``spec``) is the one copy of a
spec the daemon trusts, and the new text is what the new version's record keeps and what
``parse_spec`` validates like any request's — so nothing here judges a package, it only places
it. A package already listed (the same conda name, or the same pip project name after PEP 503
normalisation) is replaced in place by the new entry, so ``env add x 'numpy>=2'`` moves a pin
instead of listing numpy twice; anything else is appended (conda match specs before the
``pip:`` mapping, pip requirements to the ``pip:`` list, which is created when there is none).
The result is YAML dumped from the parsed document: comments of the old text are not kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .. import safeyaml
from ..errors import ValidationError

# A conda match spec's package name: after an optional ``channel::``, up to the first version,
# build or bracket part (``numpy``, ``numpy >=1``, ``numpy=1.2=py_0``, ``c-f::numpy[build=x]``).
_CONDA_NAME = re.compile(r"(?:.*::)?\s*([A-Za-z0-9_.+-]+?)\s*(?:[=<>!~\[\s]|$)")


def conda_name(spec: str) -> str | None:
    m = _CONDA_NAME.match(spec.strip())
    return m.group(1).lower() if m else None


def pip_name(line: str) -> str | None:
    """The project name of a requirement line (None for option lines, URLs, paths: those are
    never taken for another entry)."""
    try:
        return canonicalize_name(Requirement(line.split(" #")[0].strip()).name)
    except InvalidRequirement:
        return None


def _merge(entries: list[Any], new: Sequence[str],
           name_of: Callable[[str], str | None]) -> list[Any]:
    """``entries`` with each of ``new`` replacing the string entry of the same name (in place)
    or inserted after the last string entry. Each entry is named once (a request may carry
    tens of thousands: naming every pair would hold a parse turn for hours)."""
    out = list(entries)
    strings = [i for i, e in enumerate(out) if isinstance(e, str)]
    at = {}  # name -> index of the first string entry of that name
    for i in reversed(strings):
        if (key := name_of(out[i])) is not None:
            at[key] = i
    last = strings[-1] if strings else -1
    for item in new:
        key = name_of(item)
        if key is not None and key in at:
            out[at[key]] = item
            continue
        last += 1  # only mappings follow the last string: no index in ``at`` moves
        out.insert(last, item)
        if key is not None:
            at[key] = last
    return out


def add_packages(text: str, conda: Sequence[str], pip: Sequence[str]) -> str:
    """The spec ``text`` with ``conda`` match specs and ``pip`` requirements added."""
    try:
        doc = safeyaml.safe_load(text, text_scalars=True) or {}  # as parse_spec reads it
    except safeyaml.YAMLError as exc:
        raise ValidationError(f"the current version's spec cannot be read: {exc}",
                              hint="replace the environment with 'envctl request create "
                                   "--replace'") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("dependencies") or [], list):
        raise ValidationError("the current version's spec has no dependencies list to add to",
                              hint="replace the environment with 'envctl request create "
                                   "--replace'")
    deps = _merge(list(doc.get("dependencies") or []), [c.strip() for c in conda], conda_name)
    if pip:
        at = next((i for i, d in enumerate(deps) if isinstance(d, dict) and "pip" in d), None)
        if at is None:
            deps.append({"pip": []})
            at = len(deps) - 1
        old = deps[at]["pip"] if isinstance(deps[at]["pip"], list) else []
        deps[at] = {**deps[at], "pip": _merge(old, [p.strip() for p in pip], pip_name)}
    return str(yaml.safe_dump({**doc, "dependencies": deps}, sort_keys=False,
                              default_flow_style=False, allow_unicode=True))
