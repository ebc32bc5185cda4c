"""Logging for envctld: key=value lines on stderr, or structured records in the journal.

Why two sinks: an admin greps stderr/container logs for ``root=/shared/envs``; under systemd the
same facts are better as journal fields (``journalctl ENVCTL_ROOT=/shared/envs``). Call sites pass
those fields with ``extra=envctl_shared.logfields.fields(root=..., path=..., job=...)``; the stderr
formatter ignores them (the message already says ``root=...``), the journal handler stores them and
sets
``PRIORITY`` from the level. Python warnings go through logging too, so a library's warning
flood cannot bypass the level.
"""

from __future__ import annotations

import logging
import sys
import time

from ..config import LoggingConfig
from . import systemd

_HANDLER_NAME = "envctld"


class KeyValueFormatter(logging.Formatter):
    """``2026-01-01T12:00:00Z INFO envctl_shared.watch reconcile root=/x fixed=3``."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(cfg: LoggingConfig, debug: bool = False) -> str:
    """(Re)configure the root logger; returns the sink used (``journal`` or ``stderr``)."""
    level = logging.DEBUG if debug else getattr(logging, cfg.level)
    use_journal = cfg.journal == "true" or (cfg.journal == "auto" and systemd.stderr_is_journal())
    handler: logging.Handler | None = systemd.journal_handler() if use_journal else None
    sink = "journal"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(KeyValueFormatter())
        sink = "stderr"
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    if use_journal and sink == "stderr":
        logging.getLogger(__name__).warning(
            "journal logging requested but systemd-python is not installed: using stderr")
    return sink
