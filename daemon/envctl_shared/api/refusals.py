"""Refusal log lines that stay bounded under a flood.

Why: every refused request is worth a line (who was refused, and why: an administrator reads
them to find a misconfigured allow list or an attack), but a peer sending thousands of bad
tokens a second must not turn the log into hundreds of megabytes an hour. So each line carries
the peer (uid, pid) and what was refused, and past :data:`BURST` lines in an
:data:`INTERVAL`, the rest of that interval is counted instead and told in one summary line when
it ends: at most ``BURST + 1`` lines per interval, whatever the rate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from ..errors import EnvctlError
from .peercred import PeerCred

log = logging.getLogger(__name__)

BURST = 10  # refusals logged one by one per interval
INTERVAL = 60.0  # seconds


class Refusals:
    """Logs refusals one by one, then summarised (thread-safe)."""

    def __init__(self, burst: int = BURST, interval: float = INTERVAL) -> None:
        self.burst, self.interval = burst, interval
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._logged = 0
        self._held: Counter[tuple[str, int]] = Counter()  # (code, uid) -> refusals not logged
        self._timer: threading.Timer | None = None

    def note(self, op: str, cred: PeerCred, err: EnvctlError, hub_user: str | None) -> None:
        """One refusal of ``op`` for the peer ``cred`` (hub_user: whom the hub verified)."""
        with self._lock:
            now = time.monotonic()
            if now - self._started >= self.interval and self._timer is None:
                self._started, self._logged = now, 0
            if self._logged < self.burst:
                self._logged += 1
                level = logging.WARNING if err.code == "daemon-unavailable" else logging.INFO
                log.log(level, "api refused op=%s code=%s uid=%d pid=%d hub_user=%s "
                        "reason=%r", op, err.code, cred.uid, cred.pid, hub_user,
                        err.message)
                return
            self._held[(err.code, cred.uid)] += 1
            if self._timer is None:
                self._timer = threading.Timer(self._started + self.interval - now, self._flush)
                self._timer.daemon = True
                self._timer.start()

    def _flush(self) -> None:
        """The summary of what the interval held back; a new interval starts."""
        with self._lock:
            held, self._held = self._held, Counter()
            self._timer = None
            self._started, self._logged = time.monotonic(), 0
        if held:
            by = ",".join(f"{code}:uid{uid}={n}" for (code, uid), n in held.most_common(8))
            log.warning("api refusals-summarised count=%d seconds=%g by=%s",
                        sum(held.values()), self.interval, by)

    def close(self) -> None:
        """Tell what is held back now (at shutdown)."""
        with self._lock:
            timer = self._timer
        if timer is not None:
            timer.cancel()
            self._flush()
