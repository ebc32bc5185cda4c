"""Events belong to directories, not to paths: renames never leave a blind spot.

A real daemon, alice writing with umask 077, and the exact rename sequences that broke the old
path-keyed watch: a directory renamed away and back, renamed out of the root and back, moved
from one watched directory to another, two directories swapped through a third name, and all of
that followed by an inotify queue overflow. After each, new entries under the renamed
directories (and their subdirectories) must be healed in real time: within ``REALTIME``, far
below anything else that could heal them here (a local disk has no poller, and the full
reconcile is hourly), so a miss is the blind spot itself. Every check is the independent
```find`` audit.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.daemon_support import Envctld, write_config
from tests.helpers import SYSTEM_PYTHON, as_user, find_violations, wait_for
from tests.watch_support import (
    SETTLE,
    alice_sh,
    alice_tmp,
    daemon_status,
    make_root,
    new_entries_healed,
    scaled,
    settled,
    sysctl,
)

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture


def _start(scratch: Path, accounts: Accounts, envctld: Callable[..., Envctld],
           setup: str) -> tuple[Path, Envctld]:
    """A root, a daemon on it, and alice's ``setup`` shell script run in it, healed."""
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]))
    alice_sh(accounts, root, setup)
    settled(root, accounts, "set-up healed")
    return root, d


def test_renamed_away_and_back(accounts: Accounts, scratch: Path, envctld) -> None:
    root, d = _start(scratch, accounts, envctld, "mkdir -p rb/sub/deeper && echo > rb/f")
    alice_sh(accounts, root, "mv rb rb2 && mv rb2 rb && mv rb/sub rb/s2 && mv rb/s2 rb/sub")
    settled(root, accounts, "renames settled")
    took = new_entries_healed(root, accounts, ["rb", "rb/sub", "rb/sub/deeper"])
    print(f"healed {took:.3f}s after the writer's end")
    d.stop()


def test_renamed_out_of_the_root_and_back(accounts: Accounts, scratch: Path, envctld) -> None:
    root, d = _start(scratch, accounts, envctld, "mkdir -p rc/sub")
    sock = scratch / "envctld.sock"
    outside = alice_tmp(scratch, accounts)
    watched = daemon_status(sock)["roots"][0]["watches"]
    alice_sh(accounts, root, f"mv rc {outside}/rc && echo > {outside}/rc/sub/while-out")
    # Out of the root, its watches go: nothing from outside may be taken for the inside.
    wait_for(lambda: daemon_status(sock)["roots"][0]["watches"] == watched - 2, SETTLE, 0.05,
             "the watches of the moved-out directories removed")
    assert find_violations(outside, accounts.shared_gid)  # never healed out there
    alice_sh(accounts, root, f"mv {outside}/rc rc")
    settled(root, accounts, "moved back in: reconciled")
    assert daemon_status(sock)["roots"][0]["watches"] == watched
    new_entries_healed(root, accounts, ["rc", "rc/sub"])
    d.stop()


def test_moved_across_two_watched_directories(accounts: Accounts, scratch: Path,
                                              envctld) -> None:
    root, d = _start(scratch, accounts, envctld, "mkdir -p a/x/sub b")
    alice_sh(accounts, root, "mv a/x b/x && mkdir a/x")  # a new directory takes the old name
    settled(root, accounts, "move settled")
    new_entries_healed(root, accounts, ["b/x", "b/x/sub", "a/x"])
    d.stop()


def test_two_directories_swapped_through_a_third_name(accounts: Accounts, scratch: Path,
                                                      envctld) -> None:
    root, d = _start(scratch, accounts, envctld, "mkdir -p p/sub q/sub")
    alice_sh(accounts, root, "mv p t && mv q p && mv t q")
    settled(root, accounts, "swap settled")
    new_entries_healed(root, accounts, ["p", "p/sub", "q", "q/sub"])
    d.stop()


@pytest.mark.serial  # a machine-wide sysctl
def test_renames_then_overflow_keep_healing_in_real_time(accounts: Accounts, scratch: Path,
                                                         envctld) -> None:
    root = make_root(scratch, accounts)
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    with sysctl("max_queued_events", 16):  # applies to inotify instances created now
        d = envctld(cfg)
    alice_sh(accounts, root, "mkdir -p ra/sub rb/sub rc/sub")
    settled(root, accounts, "set-up healed")
    # Frozen, the daemon reads nothing while the renames and a burst happen: the kernel keeps
    # the first 16 events and reports an overflow. The old watch thread died here (KeyError).
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    try:
        alice_sh(accounts, root, "mv ra ra2 && mv ra2 ra && mv rb t && mv rc rb && mv t rc && "
                                  "for i in $(seq 40); do echo > ra/sub/f$i; done && "
                                  "mkdir -p rb/sub/n1/n2 && echo > rb/sub/n1/n2/g")
    finally:
        d.proc.send_signal(signal.SIGCONT)
    settled(root, accounts, "healed by the reconcile after the overflow")
    sock = scratch / "envctld.sock"
    wait_for(lambda: daemon_status(sock)["roots"][0]["rebuilds"] >= 1, SETTLE, 0.05,
             "the watch rebuilt after the overflow")
    st = daemon_status(sock)
    r = st["roots"][0]
    assert (st["ready"], r["mode"], r["watch_errors"]) == (True, "inotify", 0), st
    assert r["overflows"] >= 1 and r["rebuilds"] >= 1, r
    assert "inotify queue overflow" in d.log_text()
    new_entries_healed(root, accounts, ["ra", "ra/sub", "rb", "rb/sub", "rb/sub/n1/n2", "rc",
                                         "rc/sub"])
    # Renames after the rebuild are followed too.
    alice_sh(accounts, root, "mv ra ra2 && mv ra2 ra")
    settled(root, accounts, "renames after the rebuild settled")
    new_entries_healed(root, accounts, ["ra", "ra/sub"], tag="again")
    d.stop()


RENAME_FUZZ = r"""
import os, random, sys
root, outside, ops, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)

def dirs(top):
    out = []
    for dirpath, dirnames, _ in os.walk(top):
        out += [os.path.join(dirpath, d) for d in dirnames]
    return out

for i in range(ops):
    inside, out = dirs(root), dirs(outside)
    op = rnd.random()
    try:
        if op < 0.5 and inside + out:  # rename anything anywhere (not below itself)
            src = rnd.choice(inside + out)
            dst = rnd.choice([root, outside] + inside + out)
            if dst != src and not dst.startswith(src + "/"):  # few names: paths recur,
                os.rename(src, os.path.join(dst, rnd.choice("pqrs")))  # empty dirs replaced
        elif op < 0.75:
            os.mkdir(os.path.join(rnd.choice([root] + inside + out), f"m{i}"))
        else:
            open(os.path.join(rnd.choice([root] + inside + out), f"f{i}"), "w").close()
    except OSError:
        pass  # a rename onto a non-empty directory, and the like
"""


@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_rename_fuzz_leaves_every_directory_watched_in_place(accounts: Accounts, scratch: Path,
                                                             envctld, frozen: bool) -> None:
    """Random renames inside, out of and into the root (with creations all along): afterwards
    the kernel holds exactly one watch per directory of the root (none left on directories
    moved out, none missing), and new entries in every directory are healed in real time.
    ``frozen``: the daemon reads the events only once the disk is far ahead of them (every
    directory they name may have moved again since)."""
    root, d = _start(scratch, accounts, envctld, "mkdir -p a/b/c d/e f")
    outside = alice_tmp(scratch, accounts)
    a = accounts.alice
    assert d.proc is not None
    if frozen:
        d.proc.send_signal(signal.SIGSTOP)
    try:
        as_user(a.uid, a.gid, [SYSTEM_PYTHON, "-c", RENAME_FUZZ, str(root), str(outside),
                               str(scaled(400)), "10"])
    finally:
        d.proc.send_signal(signal.SIGCONT)
    settled(root, accounts, "everything renamed or created in healed")
    inside = [p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()]
    sock = scratch / "envctld.sock"
    wait_for(lambda: daemon_status(sock)["roots"][0]["watches"] == 1 + len(inside), SETTLE,
             0.05, f"one watch per directory ({1 + len(inside)})")
    r = daemon_status(sock)["roots"][0]
    assert (r["watch_errors"], r["mode"]) == (0, "inotify"), r
    new_entries_healed(root, accounts, ["."] + [str(p.relative_to(root)) for p in inside])
    d.stop()
