"""A logger bound to its subject names it once per line, where readers look, and as fields."""

from __future__ import annotations

import logging

import pytest
from envctl_shared.logfields import Subject


def test_the_subject_follows_the_event_and_fills_the_journal_fields(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("envctl_shared.test_logfields")
    caplog.set_level(logging.DEBUG, logger=log.name)
    root = Subject(log, root="/efs/100%s shared")  # a % in a path is not a format directive
    root.info("inotify rebuilt rebuilds=%d watches=%d", 2, 7)
    root.warning("worker wedged")
    Subject(log, job="ab12").info("job-end name=%s state=%s", "x", "ready")
    first, second, third = caplog.records
    assert first.getMessage() == "inotify rebuilt root=/efs/100%s shared rebuilds=2 watches=7"
    assert first.ENVCTL_ROOT == "/efs/100%s shared"  # type: ignore[attr-defined]
    assert second.getMessage() == "worker wedged root=/efs/100%s shared"
    assert third.getMessage() == "job-end job=ab12 name=x state=ready"
    assert third.ENVCTL_JOB == "ab12" and not hasattr(third, "ENVCTL_ROOT")  # type: ignore
    assert first.name == "envctl_shared.test_logfields"  # one namespace: envctl_shared.*
