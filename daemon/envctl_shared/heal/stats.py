"""Counters and findings a heal or check pass returns.

Why separate: the CLI prints them, the daemon adds them to its status, benchmarks read them;
none of those should import the walker to do so. Plain classes, not dataclasses: ``envctl
check`` imports this (why that matters: :mod:`envctl_shared.cli.main`). Workers each fill their own
:class:`HealStats` and merge at the end, so counting needs no lock on the hot path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple


class Finding(NamedTuple):
    """One entry worth reporting: fixed, would be fixed (check/dry-run), skipped or failed."""

    path: str  # relative to the root; "" is the root itself
    kind: str  # dir | file | symlink | special
    action: str  # fixed | would-fix | skipped | error
    problems: tuple[str, ...] = ()
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "action": self.action}
        if self.problems:
            out["problems"] = list(self.problems)
        if self.reason:
            out["reason"] = self.reason
        return out


FindingSink = Callable[[Finding], None]


class HealStats:
    """What one pass saw and did.

    ``violations`` counts entries found wrong (whether or not they were fixed); ``fixed`` counts
    the writes made, by what was changed (``group``/``mode``) and by kind (``dir``/``file``/
    ``symlink``); ``skipped`` counts entries left alone on purpose, by reason.
    """

    __slots__ = ("scanned", "violations", "fixed", "fixed_kinds", "skipped", "errors", "dirs",
                 "duration")

    def __init__(self, scanned: int = 0, dirs: int = 0) -> None:
        self.scanned = scanned
        self.violations = 0
        self.fixed: Counter[str] = Counter()
        self.fixed_kinds: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.errors = 0
        self.dirs = dirs
        self.duration = 0.0

    def __repr__(self) -> str:
        return f"HealStats({self.to_dict()})"

    @property
    def entries_fixed(self) -> int:
        """Entries changed, each once however many writes it took: what every report calls
        "fixed" (``writes`` counts the calls)."""
        return sum(self.fixed_kinds.values())

    @property
    def writes(self) -> int:
        """Metadata calls that changed something (each chgrp or chmod is one)."""
        return sum(self.fixed.values())

    def merge(self, other: HealStats) -> None:
        self.scanned += other.scanned
        self.violations += other.violations
        self.fixed.update(other.fixed)
        self.fixed_kinds.update(other.fixed_kinds)
        self.skipped.update(other.skipped)
        self.errors += other.errors
        self.dirs += other.dirs

    def to_dict(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "dirs": self.dirs,
            "violations": self.violations,
            "fixed": {"group": self.fixed["group"], "mode": self.fixed["mode"],
                      "by_kind": dict(sorted(self.fixed_kinds.items()))},
            "skipped": dict(sorted(self.skipped.items())),
            "errors": self.errors,
            "duration_s": round(self.duration, 4),
        }
