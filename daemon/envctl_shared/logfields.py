"""Structured log fields shared by every layer: ENVCTL_ROOT, ENVCTL_PATH, ENVCTL_JOB.

Why a module of its own at the bottom of the stack: the jobs and watch layers tag their records
(``log.info(..., extra=fields(job=...))``) without importing the daemon that chooses the sink.
The journal handler stores them as journal fields (``journalctl ENVCTL_JOB=...``); the stderr
formatter ignores them, since each message already says ``job=...`` in key=value form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
