"""A hostile member against the daemon's event path (inotify read batch -> C reduction -> queue ->
``run_entries``' scan of entries through their O_PATH fds).

A real daemon, alice writing with umask 077. Names no decoder expects (not UTF-8, a newline,
255 bytes); directories swapped for symlinks to trees outside the root between their events and
their heal (the daemon frozen in between, so the heal comes after the swap); a watched directory
deleted, and its name taken again, while its entries wait. Each test checks what the brief of
the event path promises: everything inside ends compliant (the independent ``find`` audit),
nothing outside changes (modes, owners, groups, symlink targets), the daemon stays up and holds
no more fds than before.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.daemon_support import Envctld, write_config
from tests.helpers import as_user, wait_for
from tests.watch_support import (
    REALTIME,
    SETTLE,
    alice_sh,
    alice_tmp,
    daemon_status,
    make_root,
    scaled,
    settled,
    sysctl,
)

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture

# Names as bytes: not UTF-8, a newline, the longest a name may be (ASCII and 2-byte UTF-8).
HOSTILE = [b"\xff\xfe-not-utf8", b"line\nbreak", b"x" * 255, "\u00e9".encode() * 127 + b"z",
           b"\xc3(", b"-dash", b" *glob?[", b"\\back"]

# ``python3 -c MAKE ROOT``: as alice, each hostile name as a file and as a directory holding a
# file of every hostile name, then a chmod of each (an attribute event of its own).
MAKE = ("import os,sys\n"
        f"names={HOSTILE!r}\n"
        "root=os.fsencode(sys.argv[1])\n"
        "for i,n in enumerate(names):\n"
        "    d=os.path.join(root,b'd'+n[:250]); os.mkdir(d)\n"
        "    open(os.path.join(root,b'f'+n[:250]),'w').close()\n"
        "    for m in names: open(os.path.join(d,m),'w').close()\n"
        "    os.chmod(d,0o700); os.chmod(os.path.join(root,b'f'+n[:250]),0o600)\n")


def _fds(d: Envctld) -> int:
    assert d.proc is not None
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def _fds_back(d: Envctld, before: int) -> None:
    """The daemon's fds back to ``before`` (its reader releases idle directory fds each TICK)."""
    wait_for(lambda: _fds(d) <= before, SETTLE, 0.1, f"daemon fds back to {before}")


def _snapshot(top: Path) -> dict[bytes, tuple[int, int, int, bytes | None]]:
    """Every entry below ``top`` (bytes paths): mode, uid, gid, symlink target."""
    out: dict[bytes, tuple[int, int, int, bytes | None]] = {}
    for dirpath, dirs, files in os.walk(os.fsencode(top)):
        for n in (dirpath, *(os.path.join(dirpath, e) for e in (*dirs, *files))):
            st = os.lstat(n)
            out[n] = (st.st_mode, st.st_uid, st.st_gid,
                      os.readlink(n) if os.path.islink(n) else None)
    return out


def _start(scratch: Path, accounts: Accounts, envctld: Callable[..., Envctld]) -> Envctld:
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]))
    settled(root, accounts, "empty root quiet")
    return d


def test_hostile_names_healed_in_real_time(accounts: Accounts, scratch: Path, envctld) -> None:
    d = _start(scratch, accounts, envctld)
    root = scratch / "root"
    before = _fds(d)
    a = accounts.alice
    as_user(a.uid, a.gid, ["/usr/bin/python3", "-c", MAKE, str(root)])
    took = settled(root, accounts, "hostile names healed in real time", REALTIME)
    print(f"healed {took:.3f}s after the writer's end")
    st = daemon_status(scratch / "envctld.sock")
    r = st["roots"][0]
    assert (st["ready"], r["mode"], r["overflows"], r["watch_errors"]) == \
        (True, "inotify", 0, 0), st
    assert r["watches"] == 1 + len(HOSTILE)  # the root and every hostile directory
    _fds_back(d, before)
    d.stop()


def test_directories_swapped_for_symlinks_before_their_heal(accounts: Accounts, scratch: Path,
                                                           envctld) -> None:
    """Frozen, the daemon reads nothing while alice makes wrong entries in directories and then
    swaps each directory for a symlink: to a tree of root's (an /etc), to a tree of her own
    outside the root (wrong by the policy: healed if anything followed the link), to a
    directory of the root. And a directory deleted and made again under the same name while its
    entries wait. Its queued batches name the old places; nothing behind a link changes."""
    d = _start(scratch, accounts, envctld)
    root = scratch / "root"
    a = accounts.alice
    etc = scratch / "etc"
    etc.mkdir()
    for i in range(5):
        (etc / f"conf{i}").write_text("x")
        (etc / f"conf{i}").chmod(0o644)
    (etc / "sub").mkdir()
    (etc / "sub" / "f0").write_text("x")
    own = alice_tmp(scratch, accounts, "alice-own")
    as_user(a.uid, a.gid, f"cd {own} && mkdir f0 sub && echo > f1 && echo > sub/f0 && "
                          "chmod 0700 . sub")
    outside = {etc: _snapshot(etc), own: _snapshot(own)}
    before = _fds(d)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    try:
        as_user(a.uid, a.gid, f"cd {root} && "
                "mkdir -p e/sub o/sub i/sub keep gone && "
                "for n in e o i gone; do for f in f0 f1 f2; do echo > $n/$f; done; "
                "echo > $n/sub/f0; chmod 0600 $n/f1; done && "
                f"mv e e.old && ln -s {etc} e && "
                f"mv o o.old && ln -s {own} o && "
                "mv i i.old && ln -s keep i && "
                "rm -r gone && mkdir gone && echo > gone/f0 && echo > gone/new")
    finally:
        d.proc.send_signal(signal.SIGCONT)
    settled(root, accounts, "the moved directories and the new one healed")
    for top, snap in outside.items():
        assert _snapshot(top) == snap, f"{top} changed through a symlink in the root"
    assert {os.readlink(root / n) for n in "eoi"} == {str(etc), str(own), "keep"}
    st = daemon_status(scratch / "envctld.sock")
    assert (st["ready"], st["roots"][0]["mode"]) == (True, "inotify"), st
    _fds_back(d, before)
    d.stop()


# ``python3 -c CHURN ROOT SECONDS``: nested directories made and removed as fast as a member can.
CHURN = ("import os,sys,time\n"
         "end=time.monotonic()+float(sys.argv[2])\n"
         "while time.monotonic()<end:\n"
         "    for i in range(20):\n"
         "        p=os.path.join(sys.argv[1],f'c{i}','u','v','w'); os.makedirs(p)\n"
         "        os.removedirs(p)\n")


def test_directories_made_and_removed_fast_never_end_the_watch(accounts: Accounts,
                                                                scratch: Path, envctld) -> None:
    """A directory removed between the watcher's open and its listing (getdents64 then fails
    with ENOENT) is a directory gone, as one gone before the open is: it ended the reader
    (FileNotFoundError), five in ten minutes made the daemon exit, and any member can make
    directories and remove them."""
    d = _start(scratch, accounts, envctld)
    root = scratch / "root"
    a = accounts.alice
    before = _fds(d)
    as_user(a.uid, a.gid, ["/usr/bin/python3", "-c", CHURN, str(root), "3"])
    assert d.alive, d.log_text()[-3000:]
    alice_sh(accounts, root, "mkdir -p n/m && echo > n/m/f")
    settled(root, accounts, "the churn's leftovers healed", REALTIME)
    r = daemon_status(scratch / "envctld.sock")["roots"][0]
    assert (r["mode"], r["watch_errors"], r["rebuilds"]) == ("inotify", 0, 0), \
        d.log_text()[-3000:]
    _fds_back(d, before)
    d.stop()

# ``python3 -c DEEP ROOT OUT SECONDS``: a chain deeper than the walks' fd windows moved into the
# root, and at once out again or removed level by level from the bottom, over and over.
DEEP = ("import os,sys,time\n"
        "root,out,end=sys.argv[1],sys.argv[2],time.monotonic()+float(sys.argv[3])\n"
        "n=0\n"
        "while time.monotonic()<end:\n"
        "    n+=1; top=os.path.join(out,f'k{n}'); p=os.path.join(top,*['d']*100)\n"
        "    os.makedirs(p); open(os.path.join(p,'f'),'w').close()\n"
        "    inside=os.path.join(root,f'k{n}'); os.rename(top,inside)\n"
        "    if n%2: os.rename(inside,top); continue\n"
        "    p=os.path.join(inside,*['d']*100); os.remove(os.path.join(p,'f')); os.removedirs(p)\n")


def test_deep_trees_moved_in_and_away_under_the_walk(accounts: Accounts, scratch: Path,
                                                      envctld) -> None:
    """Chains of 100 levels (past the list walk's fd window, so levels are reopened through
    ``..``) moved into the root and at once out again or removed under the watcher's walk:
    the watch never ends, no watch is left on a chain gone, no fd kept."""
    d = _start(scratch, accounts, envctld)
    root = scratch / "root"
    out = alice_tmp(scratch, accounts, "alice-out")
    before = _fds(d)
    a = accounts.alice
    as_user(a.uid, a.gid, ["/usr/bin/python3", "-c", DEEP, str(root), str(out), "2"])
    settled(root, accounts, "what stayed in the root healed")
    r = daemon_status(scratch / "envctld.sock")["roots"][0]
    assert (r["mode"], r["watch_errors"], r["rebuilds"]) == ("inotify", 0, 0), \
        d.log_text()[-3000:]
    # Only the root watched in the end: every chain left or was removed (the count follows
    # the reader, which may still be reading the storm's last events when the audit is clean).
    wait_for(lambda: daemon_status(scratch / "envctld.sock")["roots"][0]["watches"] == 1,
             SETTLE, 0.05, "only the root watched")
    _fds_back(d, before)
    d.stop()

# ``python3 -c SWAP ROOT SECONDS OUT...``: directories filled with wrong entries and swapped for
# symlinks to each OUT (and back) as fast as a member can, for SECONDS.
SWAP = ("import os,sys,time\n"
        "root,end,outs=sys.argv[1],time.monotonic()+float(sys.argv[2]),sys.argv[3:]\n"
        "n=0\n"
        "while time.monotonic()<end:\n"
        "    for i,out in enumerate(outs):\n"
        "        d=os.path.join(root,f's{i}'); n+=1\n"
        "        os.mkdir(d); os.mkdir(os.path.join(d,'sub'))\n"
        "        for f in ('f0','f1','sub/f0'): open(os.path.join(d,f),'w').close()\n"
        "        os.chmod(os.path.join(d,'f1'),0o600)\n"
        "        os.rename(d,d+f'.{n}'); os.symlink(out,d)\n"
        "        os.chmod(d+f'.{n}',0o700); open(os.path.join(d+f'.{n}','f2'),'w').close()\n"
        "        os.unlink(d)\n"
        "        os.symlink(out,d+'.l'); os.rename(d+'.l',d); os.unlink(d)\n")


def test_directories_swapped_for_symlinks_while_healed_change_nothing_outside(
        accounts: Accounts, scratch: Path, envctld) -> None:
    """Live, not frozen: alice swaps directories for symlinks to trees outside the root (one of
    root's, one of her own that is wrong by the policy) while the daemon heals their entries;
    whatever a worker resolves, nothing outside changes, and the root ends compliant."""
    d = _start(scratch, accounts, envctld)
    root = scratch / "root"
    a = accounts.alice
    etc = scratch / "etc"
    (etc / "sub").mkdir(parents=True)
    for f in ("f0", "f1", "f2", "sub/f0"):
        (etc / f).write_text("x")
    own = alice_tmp(scratch, accounts, "alice-own")
    as_user(a.uid, a.gid, f"cd {own} && mkdir sub && echo > f0 && echo > f1 && echo > f2 && "
                          "echo > sub/f0 && chmod 0700 . sub")
    outside = {etc: _snapshot(etc), own: _snapshot(own)}
    before = _fds(d)
    as_user(a.uid, a.gid, ["/usr/bin/python3", "-c", SWAP, str(root), "2", str(etc), str(own)])
    settled(root, accounts, "the swapped directories healed")
    for top, snap in outside.items():
        assert _snapshot(top) == snap, f"{top} changed through a symlink in the root"
    r = daemon_status(scratch / "envctld.sock")["roots"][0]
    assert (r["mode"], r["watch_errors"]) == ("inotify", 0), d.log_text()[-3000:]
    _fds_back(d, before)
    d.stop()

# ``python3 -c STORM ROOT OUT N``: N directories of 100 files under ROOT/b, and meanwhile
# directories renamed back and forth, out of the root (to OUT) and back, and small directories
# made and removed.
STORM = ("import os,sys\n"
         "root,out,n=sys.argv[1],sys.argv[2],int(sys.argv[3])\n"
         "b=os.path.join(root,'b'); os.mkdir(b)\n"
         "for i in range(n):\n"
         "    d=os.path.join(b,f'd{i}'); os.mkdir(d)\n"
         "    for f in range(100): open(os.path.join(d,f'f{f}'),'w').close()\n"
         "    t=os.path.join(root,f't{i}'); os.makedirs(os.path.join(t,'u','v'))\n"
         "    open(os.path.join(t,'u','g'),'w').close()\n"
         "    if i%3: os.remove(os.path.join(t,'u','g')); os.removedirs(os.path.join(t,'u','v'))\n"
         "    if i>=5:\n"
         "        old=os.path.join(b,f'd{i-5}')\n"
         "        os.rename(old,old+'x'); os.rename(old+'x',old)\n"
         "        os.rename(old,os.path.join(out,'away'))\n"
         "        open(os.path.join(out,'away',f'back{i}'),'w').close()\n"
         "        os.rename(os.path.join(out,'away'),old)\n"
         "        os.rename(old,os.path.join(root,'mv'))\n"
         "        os.rename(os.path.join(root,'mv'),old)\n")


@pytest.mark.serial  # a machine-wide sysctl
def test_rename_storm_in_an_overflowing_burst(accounts: Accounts, scratch: Path,
                                              envctld) -> None:
    """A 20k-file burst with directories renamed back and forth, out of the root and back, and
    small directories made and removed, into a queue of 512 events: it overflows; the
    reconcile heals the root, the daemon stays up on inotify, a tree outside never touched."""
    root = make_root(scratch, accounts)
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    with sysctl("max_queued_events", 512):  # applies to inotify instances created now
        d = envctld(cfg)
    out = alice_tmp(scratch, accounts, "alice-out")
    control = alice_tmp(scratch, accounts, "alice-control")
    a = accounts.alice
    as_user(a.uid, a.gid, f"cd {control} && mkdir sub && echo > sub/f && echo > f")
    snap = _snapshot(control)
    before = _fds(d)
    storm = threading.Thread(target=as_user, args=(a.uid, a.gid, [
        "/usr/bin/python3", "-c", STORM, str(root), str(out), str(scaled(200))]))
    storm.start()
    assert d.proc is not None
    time.sleep(0.3)
    d.proc.send_signal(signal.SIGSTOP)  # reads nothing for a while: the queue overflows
    try:
        time.sleep(1.0)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    storm.join()
    settled(root, accounts, "the storm healed", SETTLE * 2)
    assert _snapshot(control) == snap
    assert os.listdir(out) == []
    sock = scratch / "envctld.sock"
    st = daemon_status(sock)
    r = st["roots"][0]
    assert (st["ready"], r["mode"], r["watch_errors"]) == (True, "inotify", 0), st
    assert r["overflows"] >= 1 and r["rebuilds"] >= 1, r
    _fds_back(d, before)
    # Still in real time afterwards: the rebuilt watch follows the renamed directories.
    as_user(a.uid, a.gid, f"cd {root} && echo > b/d0/after && mkdir b/d7/new && echo > b/d7/new/f")
    settled(root, accounts, "after the storm: healed in real time", REALTIME)
    d.stop()
