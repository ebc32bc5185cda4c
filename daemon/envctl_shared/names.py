"""What an environment name may be: the one rule, for the socket protocol, the job layer and
the inventory of a root.

Why one place: a name becomes ``<root>/<name>``, ``.envctl/envs/<name>``, a lock file and a
kernelspec name. The protocol refusing what the job layer accepts (or the inventory listing as
an env what no request could have made) would let a name slip past one of them, so all three
ask this module. Hand-made envs may carry other names: they are listed, never built.
"""

from __future__ import annotations

import re

from .errors import ValidationError
from .untrusted import brief

# No '/', no leading dot (so never '.', '..' or the daemon's own '.envctl'), at most 64.
ENV_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENV_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_env_name(name: object) -> bool:
    """A name the request API could have created."""
    return isinstance(name, str) and ENV_NAME_RE.fullmatch(name) is not None


def env_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as an env name (the protocol's argument check), or None."""
    return None if is_env_name(name) else f"must be {ENV_NAME_RULE}"


def validate_name(name: object) -> str:
    """The env name, or ValidationError: it becomes ``<root>/<name>``, so no traversal."""
    if not isinstance(name, str) or not is_env_name(name):
        shown = brief(name) if isinstance(name, str) else type(name).__name__
        raise ValidationError(f"invalid environment name {shown}",
                              hint=f"use {ENV_NAME_RULE} (no '/', no leading dot)")
    return name
