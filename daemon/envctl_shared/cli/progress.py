"""A one-line progress display for long walks on a terminal (``envctl heal``/``check``).

Why: on EFS a large tree takes minutes, and a command that prints nothing for minutes looks
hung. The line goes to stderr, only when stderr is a terminal (never into a pipe, a log or a
``--json`` document), is redrawn a few times a second from a thread that only *reads* the
healer's counters (``Healer.progress``), and is erased before anything else is printed and at
the end, so the report itself reads exactly as without it. A walk of a local disk runs in one
C call, so its counts arrive at its end; the spinner and the clock still move.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from .output import quote_name

INTERVAL = 0.25  # seconds between redraws
SPINNER = "|/-\\"
CLEAR = "\r\x1b[K"  # carriage return, erase to the end of the line

Counts = Callable[[], tuple[int, int, int, int]]  # scanned, violations, fixed, errors


class Progress:
    """``with Progress(path, counts, dry_run, enabled):`` shows the line while the body runs."""

    def __init__(self, path: str, counts: Counts, dry_run: bool, enabled: bool,
                 stream: TextIO | None = None) -> None:
        self.path = quote_name(path)
        self.counts = counts
        self.dry_run = dry_run
        self.enabled = enabled
        self.out = stream or sys.stderr
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0
        self._drawn = False

    def __enter__(self) -> Progress:
        if self.enabled:
            self._start = time.monotonic()
            self._draw(0)
            self._thread = threading.Thread(target=self._run, name="envctl-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.clear()

    def _run(self) -> None:
        tick = 1
        while not self._stop.wait(INTERVAL):
            self._draw(tick)
            tick += 1

    def line(self, tick: int) -> str:
        scanned, wrong, fixed, errors = self.counts()
        elapsed = max(time.monotonic() - self._start, 1e-6)
        what = f"{wrong:,} wrong" if self.dry_run else f"{fixed:,} fixed"
        return (f"{SPINNER[tick % len(SPINNER)]} {self.path}: {scanned:,} entries "
                f"({scanned / elapsed:,.0f}/s), {what}, {errors:,} errors, {elapsed:.0f}s")

    def _draw(self, tick: int) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        text = self.line(tick)[:max(width - 1, 10)]  # one line: never wrap
        with self._lock:
            self.out.write(CLEAR + text)
            self.out.flush()
            self._drawn = True

    def clear(self) -> None:
        """Erase the line (before a finding is printed, and at the end)."""
        with self._lock:
            if self._drawn:
                self.out.write(CLEAR)
                self.out.flush()
                self._drawn = False
