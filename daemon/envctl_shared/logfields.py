"""Structured logs shared by every layer: a logger bound to what it speaks of (a root, a job).

Why a module of its own at the bottom of the stack: the jobs and watch layers tag their records
without importing the daemon that chooses the sink. A :class:`Subject` names its subject once,
where it is made, and every line it logs carries it twice over: in the text (``event root=/x
key=value ...``, right after the event's name, where a reader of the stderr log looks) and as
journal fields (``ENVCTL_ROOT``, ``ENVCTL_JOB``; ``ENVCTL_PATH`` per call through ``fields``:
``journalctl ENVCTL_JOB=...``). Before it, each call named its root or job twice by hand, and a
line that forgot one could not be found by it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

# Where the subject goes in a message: before its first ``key=`` (the event's name is what
# comes before it), else at the end.
_FIRST_KEY = re.compile(r" [a-z_]+=")


def fields(root: Path | str | None = None, path: str | None = None,
           job: str | None = None) -> dict[str, Any]:
    """Journal fields for ``extra=``: ENVCTL_ROOT, ENVCTL_PATH, ENVCTL_JOB (only those given)."""
    out: dict[str, Any] = {}
    if root is not None:
        out["ENVCTL_ROOT"] = str(root)
    if path is not None:
        out["ENVCTL_PATH"] = path
    if job is not None:
        out["ENVCTL_JOB"] = job
    return out


class Subject(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``logger`` speaking of one root or job: ``Subject(log, root=path).info("fixed path=%s",
    rel)`` logs ``fixed root=<path> path=<rel>`` with ``ENVCTL_ROOT`` set."""

    def __init__(self, logger: logging.Logger, root: Path | str | None = None,
                 job: str | None = None) -> None:
        super().__init__(logger, fields(root=root, job=job))
        self._text = " ".join(f"{k}={v}" for k, v in (("root", root), ("job", job))
                              if v is not None)

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        """(Every level's method comes here.) The subject goes into the text after the event's
        name; where the text is a format (it has ``args``), a ``%`` in the subject is escaped."""
        if not self.isEnabledFor(level):
            return
        text = str(msg)
        found = _FIRST_KEY.search(text)
        at = found.start() if found else len(text)
        subject = self._text.replace("%", "%%") if args else self._text
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        self.logger.log(level, f"{text[:at]} {subject}{text[at:]}", *args, **kwargs)
