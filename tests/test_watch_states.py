"""RootWatcher's life as an explicit state machine: one state, moved only along the edges of
``TRANSITIONS``, the status ``mode`` derived from it. Driven on a real root through the hooks
the inotify reader calls (the end of a watch, a watch that could not be added), with the real
maintenance thread doing the rebuild, the fall-back to polling and the return to inotify."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from envctl_shared.config import WatchConfig, parse
from envctl_shared.heal.stats import HealStats
from envctl_shared.watch.service import TRANSITIONS, RootWatcher, WatchState, mode_of

from tests.conftest import Accounts
from tests.helpers import as_user, find_violations, wait_for
from tests.watch_support import make_root

S = WatchState


def test_the_table_and_the_modes() -> None:
    assert set(TRANSITIONS) == set(WatchState)
    assert TRANSITIONS[S.FAILED] == frozenset()  # final
    assert all(S.FAILED in TRANSITIONS[s] for s in WatchState if s is not S.FAILED)
    assert S.STARTING not in set().union(*TRANSITIONS.values())  # never entered again
    # the mode strings status has always shown, now derived
    assert mode_of(S.STARTING, False, True) == "starting"
    assert mode_of(S.WATCHING, False, True) == "inotify"
    assert mode_of(S.WATCHING, True, True) == "inotify+poll"
    assert mode_of(S.WATCHING, True, False) == "inotify+standby"
    assert mode_of(S.REBUILDING, False, True) == "rebuilding"
    assert mode_of(S.REBUILDING, True, False) == "rebuilding+standby"
    assert mode_of(S.STARVED, True, True) == "poll"
    assert mode_of(S.POLLING, True, False) == "standby"
    assert mode_of(S.FAILED, True, True) == "failed"


class _Recorded(RootWatcher):
    """The real watcher, with every state it moved to recorded (some last only milliseconds)."""

    seen: list[WatchState]

    def _to(self, new: WatchState, only_from: tuple[WatchState, ...] | None = None) -> bool:
        moved = super()._to(new, only_from)
        if moved and new is not self.seen[-1]:
            self.seen.append(new)
        return moved


def _watcher(root: Path, group: str, mode: str = "auto") -> _Recorded:
    cfg = parse({"roots": [{"path": str(root), "group": group}],
                 "requests": {"enabled": False}})
    w = _Recorded(cfg.roots[0], WatchConfig(mode=mode, poll_interval=0.2,  # type: ignore
                                            full_scan_interval=0.5, workers=1), concurrency=1)
    w.seen = [w.state]
    return w


def test_a_root_lives_through_every_state(scratch: Path, accounts: Accounts) -> None:
    root = make_root(scratch, accounts)
    (root / "sub").mkdir()
    w = _watcher(root, accounts.shared_group)
    assert w.state is S.STARTING and w.status(watches=False).mode == "starting"
    fatal: list[str] = []
    w._on_fatal = fatal.append
    w.start()
    try:
        assert w.state is S.WATCHING and w.status().mode == "inotify"
        # the watch ends by itself (an overflow): rebuilding, then the maint thread rebuilds
        w.on_end("overflow", None)
        wait_for(lambda: w.state is S.WATCHING and w.status().rebuilds == 1, 10, 0.02,
                 "rebuilt")
        # a directory got no watch: polling instead (mode "poll"), inotify retried at the next
        # full pass, which gets every watch here: back to inotify, the poller dropped
        w.on_watch_failed("sub", 28)
        wait_for(lambda: w.seen[-1] is S.WATCHING and S.STARVED in w.seen, 10, 0.02,
                 "starved, then inotify restored")
        assert w.seen == [S.STARTING, S.WATCHING, S.REBUILDING, S.WATCHING, S.STARVED,
                          S.WATCHING]
        assert w.status().mode == "inotify" and w.status().poll_dirs == 0
        # an edge the table does not have is a bug, said at once
        with pytest.raises(RuntimeError, match="watching cannot become starting"):
            w._to(S.STARTING)
        w._fail("test: gone")
        assert w.state is S.FAILED and w.status().mode == "failed" and fatal == ["test: gone"]
        w.on_end("overflow", None)  # a late hook changes nothing: failed is final
        assert w.state is S.FAILED
    finally:
        w.stop(5)


def test_configured_polling_is_its_own_state(scratch: Path, accounts: Accounts) -> None:
    root = make_root(scratch, accounts)
    w = _watcher(root, accounts.shared_group, mode="poll")
    w.start()
    try:
        assert w.state is S.POLLING and w.status().mode == "poll"
        assert TRANSITIONS[S.POLLING] == {S.FAILED}
    finally:
        w.stop(5)


@contextmanager
def _burst_held(scratch: Path, accounts: Accounts,
                plant: Callable[[list[str]], None]) -> Iterator[tuple[RootWatcher, Path,
                                                                     list[str],
                                                                     list[list[str]]]]:
    """A real watcher on a root of 20 directories (d0..d19) whose batch heals go through
    ``plant(parents)`` first (it raises the planted bug) — the first one held until alice's
    burst (a file in each) is all held by the worker or queued, so that the rest comes as
    batches. Yields the watcher, the root, the names and the parents of every batch."""
    root = make_root(scratch, accounts)
    alice = accounts.alice
    names = [f"d{i}" for i in range(20)]
    as_user(alice.uid, alice.gid, ["mkdir", *(str(root / n) for n in names)])
    w = _watcher(root, accounts.shared_group)
    w.watch_cfg = w.watch_cfg._replace(full_scan_interval=3600.0)  # type: ignore[attr-defined]
    real = w._healer.run_entries
    release = threading.Event()
    batches: list[list[str]] = []

    def run_entries(groups: Iterable[tuple[str, list[str]]]) -> HealStats:
        listed = list(groups)
        batches.append([parent for parent, _ in listed])
        release.wait(30)  # the first call holds the worker while the burst queues up
        plant([parent for parent, _ in listed])
        return real(listed)

    # Every directory of the burst held by the worker or waiting. Not a count of the queue:
    # the first hand-out takes every directory settled by then, one or many.
    def held_or_queued() -> set[str]:
        with w.queue._cond:
            queued = {d.name for d in w.queue._siblings}
        return queued | {parent for batch in batches for parent in batch}

    w._healer.run_entries = run_entries  # type: ignore[method-assign]
    w.start()
    try:
        as_user(alice.uid, alice.gid, ["touch", *(str(root / n / "f") for n in names)])
        wait_for(lambda: held_or_queued() >= set(names), 10, 0.01, "the burst queued")
        release.set()
        yield w, root, names, batches
    finally:
        release.set()
        w.stop(5)


def _bug_in_d7(parents: list[str]) -> None:
    if "d7" in parents:
        raise RuntimeError("planted bug")


def _bug_in_batches(parents: list[str]) -> None:
    if len(parents) > 1:
        raise RuntimeError("planted batch bug")


def test_a_bug_healing_one_directory_costs_no_other_of_its_batch(scratch: Path,
                                                                  accounts: Accounts) -> None:
    """A worker heals the entries of up to ENTRY_DIRS directories in one call. An exception
    there (a bug: planted here, for ``d7`` only, since no real input is known to raise) is
    logged and counted once, and the other directories of that batch are healed anyway — not
    left for the next full pass (hours away here)."""
    with _burst_held(scratch, accounts, _bug_in_d7) as (w, root, names, batches):
        wait_for(lambda: not find_violations(root, accounts.shared_gid,
                                             [str(root / n / "f") for n in names
                                              if n != "d7"]), 10, 0.02, "the others healed")
        assert any("d7" in b and len(b) > 1 for b in batches), batches  # d7 came in a batch
        assert find_violations(root, accounts.shared_gid, [str(root / "d7" / "f")])
        # Each failure counted once: d7's heals alone, each of which raised. Usually one, but
        # its events may come in two reads (the create, then the close), and d7 is handed out
        # again — so the count is taken of what happened, once nothing is left to heal.
        assert w.queue.wait_idle(10)
        assert w.status().errors == sum(b == ["d7"] for b in batches) >= 1, batches


def test_a_bug_only_batches_hit_is_logged_though_each_directory_heals_alone(
        scratch: Path, accounts: Accounts, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the batch itself (one no single directory shows: every batch raises, each of
    its directories then heals alone) is logged with its traceback: it went unsaid — no line,
    no count —, while every batch cost ENTRY_DIRS + 1 heals instead of one."""
    caplog.set_level(logging.INFO, logger="envctl_shared")
    with _burst_held(scratch, accounts, _bug_in_batches) as (w, root, names, batches):
        wait_for(lambda: not find_violations(root, accounts.shared_gid,
                                             [str(root / n / "f") for n in names]),
                 10, 0.02, "all healed")
        assert any(len(b) > 1 for b in batches), batches
        said = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert said and all(r.exc_info and "planted batch bug" in str(r.exc_info[1])
                            for r in said), [r.getMessage() for r in said]
        assert w.status().errors == 0  # every directory healed
