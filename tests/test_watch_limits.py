"""Where inotify fails: FUSE (writes it cannot see), queue overflow, running out of watches.

Each test reproduces the failure for real (a bindfs mount, a tiny ``max_queued_events``, a tiny
``max_user_watches``), restores what it changed in a ``finally``, and checks by an independent
``find`` audit that the daemon still healed everything. The sysctls are machine-wide (the watch
limit even counts every root process), so they are lowered only for the moment they must be.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.daemon_support import write_config
from tests.helpers import VENV_BIN, as_user, find_violations, wait_for
from tests.watch_support import (
    daemon_status,
    make_root,
    make_source,
    out_of_watches,
    scaled,
    sysctl,
    wait_poll_passes,
    watches_of_uid0,
)

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture


@pytest.mark.fuse
def test_bindfs_writes_through_backing_are_healed_by_polling(accounts: Accounts, scratch: Path,
                                                              envctld) -> None:
    backing = make_root(scratch, accounts, "backing")
    mnt = scratch / "mnt"
    mnt.mkdir()
    subprocess.run(["bindfs", str(backing), str(mnt)], check=True)
    try:
        cfg = write_config(scratch, [(mnt, accounts.shared_group)],
                           watch={"mode": "auto", "poll_interval": 1})
        d = envctld(cfg)
        assert "mode=inotify+poll" in d.log_text()  # fuse.bindfs detected as remote
        a = accounts.alice
        src = make_source(scratch, scaled(40), 5)
        as_user(a.uid, a.gid, ["cp", "-r", str(src), str(backing / "via-backing")])
        as_user(a.uid, a.gid, f"mkdir {backing}/x && echo > {backing}/x/f && chmod 600 "
                              f"{backing}/x/f")
        took = wait_for(lambda: not find_violations(backing, accounts.shared_gid), 1 + 8, 0.1,
                        "writes through the backing dir healed by polling")
        assert not find_violations(mnt, accounts.shared_gid)
        print(f"bindfs heal after writer end: {took:.2f}s")
        d.stop()
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], check=False)


@pytest.mark.serial  # a machine-wide sysctl
def test_queue_overflow_triggers_reconcile(accounts: Accounts, scratch: Path, envctld) -> None:
    root = make_root(scratch, accounts)
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    src = make_source(scratch, scaled(100), 10)
    with sysctl("max_queued_events", 16):  # applies to inotify instances created now
        d = envctld(cfg)
    a = accounts.alice
    as_user(a.uid, a.gid, ["mkdir", str(root / "copy")])
    wait_for(lambda: not find_violations(root, accounts.shared_gid), 15, 0.05, "copy/ healed")
    # The daemon is frozen while the writer runs: the kernel keeps the first 16 events (the
    # first loose files) and drops the rest, so only the overflow's reconcile can heal the
    # later files and the copied trees.
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    try:
        as_user(a.uid, a.gid, f"for i in $(seq 40); do echo > {root}/copy/f$i; done; "
                              f"cp -r {src}/. {root}/copy")
    finally:
        d.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: not find_violations(root, accounts.shared_gid), 15, 0.1,
             "healed despite the overflow")
    assert "inotify queue overflow" in d.log_text()
    d.stop()


@pytest.mark.serial  # a machine-wide sysctl
def test_watch_exhaustion_falls_back_to_polling(accounts: Accounts, scratch: Path,
                                                envctld) -> None:
    root = make_root(scratch, accounts)
    cfg = write_config(scratch, [(root, accounts.shared_group)],
                       watch={"mode": "inotify", "poll_interval": 1})
    d = envctld(cfg)
    a = accounts.alice
    dirs = 400
    with out_of_watches(d.log_text, root, accounts, dirs):
        pass  # the fallback itself is what is checked; the limit is back after the block
    assert d.log_text().count("inotify watch limit reached") == 1  # one clear line
    wait_for(lambda: not find_violations(root, accounts.shared_gid), 15, 0.1,
             "healed after the fallback")
    # A file in a directory that got no watch: no event can come; only polling sees it.
    as_user(a.uid, a.gid, f"echo > {root}/many/d{dirs - 1}/late")
    wait_for(lambda: not find_violations(root, accounts.shared_gid), 10, 0.1,
             "a write in an unwatched directory healed by polling")
    assert d.alive
    d.stop()


def test_poll_mode_and_periodic_full_reconcile(accounts: Accounts, scratch: Path,
                                               envctld) -> None:
    root = make_root(scratch, accounts)
    a = accounts.alice
    cfg = write_config(scratch, [(root, accounts.shared_group)],
                       watch={"mode": "poll", "poll_interval": 0.5, "full_scan_interval": 3})
    d = envctld(cfg)
    assert "mode=poll watches=0" in d.log_text()
    as_user(a.uid, a.gid, f"mkdir -p {root}/p/q && echo > {root}/p/q/f && echo > {root}/g")
    wait_for(lambda: not find_violations(root, accounts.shared_gid), 5, 0.05, "healed by a poll")
    # a few more passes: the table now holds the stamps our own heal left
    wait_poll_passes(scratch / "envctld.sock", 3, "three poll passes after the heal")
    fixes = re.compile(r"reconcile root=\S+ scanned=\d+ fixed=[1-9]")
    before = len(fixes.findall(d.log_text()))
    # A file's own chmod changes no directory: only the periodic full reconcile can see it.
    as_user(a.uid, a.gid, f"chmod g-w {root}/p/q/f")
    wait_for(lambda: not find_violations(root, accounts.shared_gid), 10, 0.05,
             "healed by the periodic full reconcile")
    # Only a reconcile that fixed something logs at INFO (polls' heals do not log).
    wait_for(lambda: len(fixes.findall(d.log_text())) > before, 5, 0.05, "the reconcile's line")
    d.stop()


@pytest.mark.serial  # a machine-wide sysctl
def test_watches_needed_against_the_limit_at_start_and_in_status(accounts: Accounts,
                                                                  scratch: Path,
                                                                  envctld) -> None:
    """An admin sizes fs.inotify.max_user_watches from what the daemon says it needs: one
    watch per directory of every root, said at start (a WARNING with the value to set when the
    limit is short) and in ``envctl status``, also once the root fell back to polling."""
    root = make_root(scratch, accounts)
    dirs = 300
    for i in range(dirs):
        (root / "many" / f"d{i}").mkdir(parents=True)
    cfg = write_config(scratch, [(root, accounts.shared_group)], watch={"mode": "auto"})
    with sysctl("max_user_watches", watches_of_uid0() + dirs // 2) as old:
        d = envctld(cfg)
        limit = int((Path("/proc/sys/fs/inotify/max_user_watches")).read_text())
    line = re.search(r"WARNING \S+ inotify watches needed=(\d+) max_user_watches=(\d+) "
                     r"hint=raise fs.inotify.max_user_watches above (\d+)", d.log_text())
    assert line, d.log_text()[-3000:]
    assert int(line[1]) >= dirs + 2 and int(line[2]) == limit
    status = daemon_status(scratch / "envctld.sock")
    assert status["inotify"]["needed"] == status["roots"][0]["watches_needed"] == int(line[1])
    assert status["inotify"]["max_user_watches"] == old  # restored: read live
    assert status["roots"][0]["mode"] == "poll"
    text = subprocess.run([str(VENV_BIN / "envctl"), "status", "--socket",
                           str(scratch / "envctld.sock")], capture_output=True, text=True).stdout
    assert f"inotify watches: {int(line[1]):,} needed, fs.inotify.max_user_watches {old:,}" \
        in text, text
    d.stop()
