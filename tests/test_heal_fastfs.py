"""The C fast path (``envctl_shared.heal._fastfs`` via ``fsops``) on its own, on real directories.

The walker's tree tests exercise it end to end; these pin down its contract: the policy table
means what ``policy.wanted_mode`` means, wrong entries are fixed through a proven fd, special files,
protected owners and other mounts are skipped untouched (a protected directory still entered),
and the walk keeps going at any depth with a bounded number of fds — in each of its visit modes
(heal/check, the poller's stamp check, the watcher's directory listing).
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import subprocess
from array import array
from pathlib import Path

import pytest
from envctl_shared.config import RootConfig
from envctl_shared.heal.fsops import (
    Engine,
    MountRef,
    NodePaths,
    ScanResult,
    Stamp,
    WalkResult,
    list_dirs,
    open_dir,
    stat_at,
    window,
)
from envctl_shared.policy import NEVER_FIXED, Kind, Rules, kind_of, mode_table, wanted_mode

from .conftest import Accounts
from .helpers import snapshot
from .trees import make_chain, remove_tree


@pytest.mark.parametrize("others", ["keep", "none", "read"])
def test_mode_table_agrees_with_wanted_mode(others: str) -> None:
    table = array("H")
    table.frombytes(mode_table(others))
    rules = Rules.of(RootConfig(path=Path("/x"), group="0", gid=0,
                                others=others))  # type: ignore[arg-type]
    for fmt in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK):
        for perm in range(0o10000):
            mode = fmt | perm
            kind = kind_of(mode)
            want = perm if kind is Kind.SYMLINK else NEVER_FIXED if kind is Kind.SPECIAL \
                else wanted_mode(perm, kind, others)
            assert table[mode] == want, oct(mode)
            assert rules.verdict(mode, 0).ok == (want == perm), oct(mode)
    for fmt in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK, 0):
        assert table[fmt | 0o755] == NEVER_FIXED


def _engine(gid: int, **kw: object) -> Engine:
    return Engine(Rules(gid=gid, **kw))  # type: ignore[arg-type]


def _scan(d: Path, gid: int, names: list[str] | None = None, fix: bool = True,
          root_mnt: int = -1) -> ScanResult:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _engine(gid).scan(fd, names, MountRef(os.fstat(fd).st_dev, root_mnt), fix=fix)
    finally:
        os.close(fd)


def _populate(d: Path, accounts: Accounts) -> None:
    uid, ugid = accounts.alice.uid, accounts.alice.gid
    for name, mode in (("broken", 0o600), ("exe", 0o700), ("setgid", 0o2750)):
        (d / name).touch()
        os.chmod(d / name, mode)
        os.chown(d / name, uid, ugid)
    (d / "good").touch()
    os.chmod(d / "good", 0o660)
    os.chown(d / "good", uid, accounts.shared_gid)
    os.symlink("/etc/passwd", d / "link")
    os.lchown(d / "link", uid, ugid)
    (d / "sub").mkdir(mode=0o700)
    os.mkfifo(d / "fifo")
    (d / "rootfile").touch()
    os.chmod(d / "rootfile", 0o600)  # owned by uid 0: protected


def test_scan_fixes_plain_entries_and_hands_back_the_rest(scratch: Path,
                                                          accounts: Accounts) -> None:
    gid = accounts.shared_gid
    _populate(scratch, accounts)
    # what the healer could change (the inode itself is replaced by every useradd of a suite
    # running beside this one)
    passwd = snapshot(Path("/etc/passwd"))

    found = _scan(scratch, gid)

    assert found.scanned == 7  # "good", the four fixed, fifo and rootfile (skipped)
    assert found.subdirs == ["sub"]  # listed, not inspected or changed
    assert stat.S_IMODE(os.lstat(scratch / "sub").st_mode) == 0o700
    assert found.attention == []
    assert sorted((s[1], s[2]) for s in found.skipped) == [("fifo", "special"),
                                                           ("rootfile", "protected")]
    fixed = {f[1]: f for f in found.fixed}
    assert sorted(fixed) == ["broken", "exe", "link", "setgid"]
    assert fixed["broken"][2:] == (stat.S_IFREG | 0o600, accounts.alice.gid, 1, 0o660)
    assert fixed["link"][4:] == (1, -1)  # a symlink: its group only
    assert os.lstat(scratch / "link").st_gid == gid
    assert snapshot(Path("/etc/passwd")) == passwd  # never its target
    assert stat.S_IMODE(os.lstat(scratch / "exe").st_mode) == 0o770
    # chown cleared setgid on a file; the bits were judged afresh, and setgid is never added
    assert stat.S_IMODE(os.lstat(scratch / "setgid").st_mode) == 0o770
    for name in ("broken", "exe", "setgid"):
        assert os.lstat(scratch / name).st_gid == gid
    assert stat.S_IMODE(os.lstat(scratch / "rootfile").st_mode) == 0o600  # untouched
    assert os.lstat(scratch / "rootfile").st_gid == 0

    again = _scan(scratch, gid)  # a second pass: nothing left to fix
    assert again.fixed == [] and again.scanned == 7 and len(again.skipped) == 2


def test_scan_with_dirs_heals_a_directory_entry_not_its_contents(scratch: Path,
                                                                 accounts: Accounts) -> None:
    """The daemon's batches of named entries: a directory named is judged and healed like a
    file (through its proven O_PATH fd), never entered; a symlink to a directory is the link."""
    gid, uid = accounts.shared_gid, accounts.alice.uid
    (scratch / "sub").mkdir(mode=0o700)
    (scratch / "sub" / "inner").touch(mode=0o600)
    os.chown(scratch / "sub", uid, accounts.alice.gid)
    os.chown(scratch / "sub" / "inner", uid, accounts.alice.gid)
    (scratch / "elsewhere").mkdir(mode=0o700)
    os.symlink(scratch / "elsewhere", scratch / "dirlink")
    os.lchown(scratch / "dirlink", uid, accounts.alice.gid)
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = _engine(gid).scan(fd, ["sub", "dirlink"], MountRef(os.fstat(fd).st_dev, -1),
                                  fix=True, dirs=True)
    finally:
        os.close(fd)
    assert found.subdirs == [] and found.attention == [] and found.scanned == 2
    fixed = {f[1]: f for f in found.fixed}
    assert fixed["sub"][2:] == (stat.S_IFDIR | 0o700, accounts.alice.gid, 1, 0o2770)
    assert os.lstat(scratch / "sub").st_gid == gid
    assert stat.S_IMODE(os.lstat(scratch / "sub" / "inner").st_mode) == 0o600  # not entered
    assert os.lstat(scratch / "sub" / "inner").st_gid == accounts.alice.gid
    assert os.lstat(scratch / "dirlink").st_gid == gid  # the link itself
    assert os.lstat(scratch / "elsewhere").st_gid != gid  # never its target
    assert stat.S_IMODE(os.lstat(scratch / "elsewhere").st_mode) == 0o700


def test_scan_without_fix_changes_nothing(scratch: Path, accounts: Accounts) -> None:
    _populate(scratch, accounts)
    before = {p.name: os.lstat(p) for p in scratch.iterdir()}
    found = _scan(scratch, accounts.shared_gid, fix=False)
    # reported as they are (would-fix), none fixed
    assert sorted(f[1] for f in found.fixed) == ["broken", "exe", "link", "setgid"]
    assert all(f[4:] == (0, -1) for f in found.fixed)
    assert sorted(s[1] for s in found.skipped) == ["fifo", "rootfile"]
    assert {p.name: os.lstat(p) for p in scratch.iterdir()} == before


def test_scan_of_named_entries_reports_vanished_and_directories(scratch: Path,
                                                                accounts: Accounts) -> None:
    _populate(scratch, accounts)
    found = _scan(scratch, accounts.shared_gid, names=["broken", "gone", "sub"])
    assert found.subdirs == ["sub"]
    assert [f[1] for f in found.fixed] == ["broken"]
    assert [(a[1], a[2]) for a in found.attention] == [("gone", errno.ENOENT)]
    with pytest.raises(UnicodeEncodeError):
        _scan(scratch, accounts.shared_gid, names=["bad\udcff\ud800"])


def test_scan_skips_a_bind_mounted_file(scratch: Path, accounts: Accounts) -> None:
    """Same device, other mount: only the mount id tells, and the fast path checks it."""
    d = scratch / "root"
    d.mkdir()
    victim = scratch / "victim"
    victim.touch()
    os.chmod(victim, 0o600)
    os.chown(victim, accounts.alice.uid, accounts.alice.gid)
    (d / "mnt").touch()
    subprocess.run(["mount", "--bind", str(victim), str(d / "mnt")], check=True)
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            found = _engine(accounts.shared_gid).scan(fd, None, MountRef.of(stat_at(fd)),
                                                      fix=True)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", str(d / "mnt")], check=True)
    assert [(s[1], s[2]) for s in found.skipped] == [("mnt", "mount")] and found.fixed == []
    assert stat.S_IMODE(os.lstat(victim).st_mode) == 0o600


def test_judge_acts_on_the_inode_behind_an_o_path_fd(scratch: Path,
                                                    accounts: Accounts) -> None:
    """The slow path's one entry heals the very inode behind an O_PATH fd: a symlink's fd
    changes the link's group only, never its target, and its mode is never asked for."""
    target = scratch / "target"
    target.touch()
    os.chmod(target, 0o600)
    os.chown(target, accounts.alice.uid, accounts.alice.gid)
    link = scratch / "link"
    os.symlink(target, link)
    os.lchown(link, accounts.alice.uid, accounts.alice.gid)
    engine = _engine(accounts.shared_gid)
    sfd = os.open(scratch, os.O_PATH)
    mount = MountRef.of(stat_at(sfd))
    os.close(sfd)
    lfd = os.open(link, os.O_PATH | os.O_NOFOLLOW)
    try:
        judged = engine.judge(lfd, mount, fix=True)
    finally:
        os.close(lfd)
    assert (judged.outcome, judged.set_gid, judged.set_mode) == ("fixed", True, -1)
    assert os.lstat(link).st_gid == accounts.shared_gid
    assert os.lstat(target).st_gid == accounts.alice.gid  # nothing followed
    fd = os.open(target, os.O_PATH | os.O_NOFOLLOW)
    try:
        assert engine.judge(fd, mount, fix=False).outcome == "would-fix"
        judged = engine.judge(fd, mount, fix=True)
        assert engine.judge(fd, mount, fix=True).outcome == "compliant"
    finally:
        os.close(fd)
    assert (judged.outcome, judged.mode, judged.set_gid, judged.set_mode) == \
        ("fixed", stat.S_IFREG | 0o600, True, 0o660)
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o660


def test_tallied_and_laned_scans_do_what_a_listed_scan_does(scratch: Path,
                                                            accounts: Accounts) -> None:
    """``tally`` only counts the entries fixed, ``lanes`` shares the names among C threads:
    the same entries end up healed, skipped and handed back, and the counts add up."""
    dirs = [scratch / "listed", scratch / "tallied"]
    for d in dirs:
        d.mkdir()
        _populate(d, accounts)
        for i in range(20):  # enough names for every lane
            (d / f"f{i}").touch()
            os.chmod(d / f"f{i}", 0o600 if i % 3 else 0o660)
            os.chown(d / f"f{i}", accounts.alice.uid, accounts.alice.gid if i % 2 else
                     accounts.shared_gid)
    engine = _engine(accounts.shared_gid)
    results = []
    for d, tally, lanes in ((dirs[0], False, 1), (dirs[1], True, 3)):
        names = sorted(os.listdir(d)) + ["gone"]
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            results.append(engine.scan(fd, names, MountRef(os.fstat(fd).st_dev, -1), fix=True,
                                       tally=tally, lanes=lanes))
        finally:
            os.close(fd)
    listed, tallied = results
    assert listed.tallied == [] and tallied.fixed == []
    assert tallied.tallied == [(stat.S_IFREG, len(listed.fixed) - 1,
                                sum(f[4] for f in listed.fixed if f[1] != "link"),
                                sum(f[5] >= 0 for f in listed.fixed), len(listed.fixed) - 1),
                               (stat.S_IFLNK, 1, 1, 0, 1)]
    assert tallied.scanned == listed.scanned and tallied.subdirs == listed.subdirs == ["sub"]
    assert sorted(tallied.skipped) == sorted(listed.skipped)
    assert [a[1:3] for a in tallied.attention] == [a[1:3] for a in listed.attention] == [
        ("gone", errno.ENOENT)]
    assert {p.name: (os.lstat(p).st_mode, os.lstat(p).st_gid) for p in dirs[0].iterdir()} == \
        {p.name: (os.lstat(p).st_mode, os.lstat(p).st_gid) for p in dirs[1].iterdir()}


def _walk(top: Path, gid: int, fix: bool = True) -> WalkResult:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = stat_at(fd)
        return _engine(gid).walk(fd, MountRef.of(st), fix=fix)
    finally:
        os.close(fd)


def test_walk_heals_a_subtree_and_skips_what_it_must(scratch: Path, accounts: Accounts) -> None:
    """``walk`` takes directories too: healed through their own fd and entered; a protected
    directory is left as it is but entered (its content is healed), a mount is not entered."""
    uid, ugid, gid = accounts.alice.uid, accounts.alice.gid, accounts.shared_gid
    top = scratch / "top"
    for d in ("a", "a/b", "a/b/c", "prot", "prot/inner", "mnt"):
        (top / d).mkdir(parents=True, mode=0o700)
    for d in ("a", "a/b", "a/b/c", "mnt", "prot/inner"):
        os.chown(top / d, uid, ugid)
    for f in ("a/f", "a/b/c/g", "prot/inner/h"):
        (top / f).touch()
        os.chmod(top / f, 0o600)
        os.chown(top / f, uid, ugid)
    os.symlink(top / "a", top / "a/b/loop")  # a symlink to a directory: never entered
    os.lchown(top / "a/b/loop", uid, ugid)
    other = scratch / "other"
    other.mkdir(mode=0o700)
    (other / "x").touch()
    subprocess.run(["mount", "--bind", str(other), str(top / "mnt")], check=True)
    try:
        found = _walk(top, gid)
    finally:
        subprocess.run(["umount", str(top / "mnt")], check=True)
    paths = NodePaths(found.nodes)
    assert sorted(paths(f[0], f[1]) for f in found.fixed) == [
        "a", "a/b", "a/b/c", "a/b/c/g", "a/b/loop", "a/f", "prot/inner", "prot/inner/h"]
    assert sorted((paths(s[0], s[1]), s[2]) for s in found.skipped) == [
        ("mnt", "mount"), ("prot", "protected")]
    assert found.attention == []
    assert found.dirs == 6 and found.scanned == 6 + 4
    for d in ("a", "a/b", "a/b/c"):
        assert stat.S_IMODE(os.lstat(top / d).st_mode) == 0o2770
        assert os.lstat(top / d).st_gid == gid
    assert stat.S_IMODE(os.lstat(top / "a/b/c/g").st_mode) == 0o660
    assert stat.S_IMODE(os.lstat(top / "prot/inner/h").st_mode) == 0o660  # below a protected dir
    assert stat.S_IMODE(os.lstat(top / "prot").st_mode) == 0o700  # the protected dir: as it was
    assert stat.S_IMODE(os.lstat(other / "x").st_mode) != 0o660 or \
        os.lstat(other / "x").st_gid != gid  # not entered: the mount's content is untouched
    assert stat.S_IMODE(os.lstat(other).st_mode) == 0o700

    # a check (fix off): a wrong directory is reported and entered, nothing changes
    os.chmod(top / "a/b", 0o2700)
    os.chmod(top / "a/b/c/g", 0o600)
    audit = _walk(top, gid, fix=False)
    apaths = NodePaths(audit.nodes)
    # (and "mnt": the directory the mount hid, now unmounted, never healed)
    assert sorted(apaths(f[0], f[1]) for f in audit.fixed) == ["a/b", "a/b/c/g", "mnt"]
    assert stat.S_IMODE(os.lstat(top / "a/b").st_mode) == 0o2700


def test_walk_of_a_chain_deeper_than_the_fd_window(scratch: Path, accounts: Accounts) -> None:
    """Far more levels than the walk keeps fds for (and than PATH_MAX allows in a path): each
    level is healed, the ones closed on the way down are reopened through ".." and proven."""
    gid = accounts.shared_gid
    levels = 3000  # > WINDOW, and 3000 x 9 bytes > PATH_MAX
    top = scratch / "top"
    top.mkdir()
    try:
        make_chain(top, levels, accounts.alice.uid, accounts.alice.gid, name="level-xx",
                   side="s")
        found = _walk(top, gid)
        again = _walk(top, gid)
    finally:
        remove_tree(top)
    assert found.attention == [] and found.skipped == []
    assert found.dirs == levels and len(found.fixed) == 2 * levels  # each level and its file
    paths = NodePaths(found.nodes)
    deepest = max((paths(f[0], f[1]) for f in found.fixed), key=len)
    assert deepest.count("/") == levels and deepest.endswith("level-xx/s")
    assert again.fixed == [] and again.scanned == 2 * levels  # healed down to the bottom




def test_open_dir_resolves_beneath_without_symlinks_or_mounts(scratch: Path,
                                                              accounts: Accounts) -> None:
    """The event path's resolver: one kernel walk, paths longer than PATH_MAX included, and
    a symlink or a mount anywhere on the way refused (ELOOP, EXDEV), never followed."""
    top = scratch / "top"
    (top / "a/b").mkdir(parents=True)
    os.symlink(scratch, top / "a/link")
    (top / "a/mnt").mkdir()
    levels = 1500  # "level-xx/" x 1500 > PATH_MAX: resolved in chunks
    try:
        make_chain(top / "a/b", levels, accounts.alice.uid, accounts.alice.gid, name="level-xx")
        subprocess.run(["mount", "--bind", str(top / "a/b"), str(top / "a/mnt")], check=True)
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        try:
            deep = "a/b/" + "/".join(["level-xx"] * levels)
            assert len(deep) > os.pathconf("/", "PC_PATH_MAX")
            dfd = open_dir(fd, deep)
            try:
                assert os.listdir(f"/proc/self/fd/{dfd}") == []  # the bottom of the chain
            finally:
                os.close(dfd)
            for rel, err in (("a/link", errno.ELOOP), ("a/link/top", errno.ELOOP),
                             ("a/mnt", errno.EXDEV), ("a/mnt/level-xx", errno.EXDEV),
                             ("a/missing", errno.ENOENT)):
                with pytest.raises(OSError) as exc:
                    os.close(open_dir(fd, rel))
                assert exc.value.errno == err, rel
        finally:
            os.close(fd)
            subprocess.run(["umount", str(top / "a/mnt")], check=False)
    finally:
        remove_tree(top)


def test_check_stamps_of_a_chain_deeper_than_the_fd_window(scratch: Path,
                                                           accounts: Accounts) -> None:
    """The poller's stamp check descends on an explicit stack: thousands of levels, no
    recursion, a bounded number of fds; a changed level deep down is found, nothing else."""
    gid, levels = accounts.shared_gid, 2000
    top = scratch / "top"
    top.mkdir()
    try:
        make_chain(top, levels, accounts.alice.uid, accounts.alice.gid)
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = stat_at(fd)
            engine = _engine(gid)
            engine.walk(fd, MountRef.of(st), fix=True)  # compliant
            os.chown(top, accounts.alice.uid, gid)
            os.chmod(top, 0o2770)
            stamps: dict[int, Stamp] = {}
            cur, rel = os.dup(fd), ""
            for i in range(levels + 1):  # stamp every level, fd by fd (paths > PATH_MAX)
                st = stat_at(cur)
                last = i == levels
                stamps[st.st_ino] = Stamp.of(st, () if last else ("d",))
                nxt = -1 if last else os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
                os.close(cur)
                cur, rel = nxt, f"{rel}/d" if rel else "d"
            marked = "/".join(["d"] * (levels - 10))
            mfd = open_dir(fd, marked)
            os.mkdir("new", dir_fd=mfd)  # a change after its stamp
            os.close(mfd)
            st = stat_at(fd)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE,  # an fd per level would not fit
                               (len(os.listdir("/proc/self/fd")) + 100, hard))
            try:
                visited, stale = engine.check_stamps(fd, stamps, MountRef.of(st))
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        finally:
            os.close(fd)
    finally:
        remove_tree(top)
    assert stale == [marked]  # its mtime changed after it was stamped
    assert visited == levels - 10 + 1  # the root and every level down to it, none below


def test_list_dirs_walks_a_comb_past_its_window_and_never_follows_a_link(scratch: Path) -> None:
    """The walk's list mode (the inotify watcher's walk): every directory of a comb deeper than
    the fd window is handed to ``visit`` with an fd on that very inode, levels past the window
    are reopened through "..", no symlink is followed and no file taken for a directory, a
    directory ``visit`` declines is not entered, the fds held stay bounded, and an exception in
    ``visit`` ends the walk with no fd left open."""
    depth = 2 * window() + 5
    top = scratch / "comb"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        cur = os.dup(fd)
        for i in range(depth):  # a side directory before and after the chain at every level
            for name in (f"s{i}a", f"n{i}", f"s{i}z"):
                os.mkdir(name, dir_fd=cur)
            nxt = os.open(f"n{i}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = nxt
        os.close(cur)
        for name in ("empty", "skip", "skip/below"):
            (top / name).mkdir()
        (top / "file").write_text("x")
        os.symlink("/etc", top / "link")
        seen: dict[str, tuple[int, int]] = {}
        base = len(os.listdir("/proc/self/fd"))
        held: list[int] = []

        def visit(parent: str, name: str, dfd: int, dev: int, ino: int) -> str | None:
            rel = f"{parent}/{name}" if parent else name
            st = os.fstat(dfd)
            assert (st.st_dev, st.st_ino) == (dev, ino) and stat.S_ISDIR(st.st_mode), rel
            seen[rel] = (dev, ino)
            held.append(len(os.listdir("/proc/self/fd")) - base)
            return None if name == "skip" else rel

        listed = list_dirs(fd, "", None, MountRef.of(stat_at(fd)), visit)
        chain = ["/".join(f"n{j}" for j in range(i + 1)) for i in range(depth)]
        want = {"empty", "skip", *chain,
                *(f"{c.rpartition('/')[0]}/s{i}{x}".lstrip("/") for i, c in enumerate(chain)
                  for x in "az")}
        assert set(seen) == want and listed.visited == len(want)
        assert sorted(listed.entered) == [("empty", True), ("n0", False), ("s0a", True),
                                          ("s0z", True)]
        assert listed.reopened > 0  # the way back up the chain went through ".."
        assert max(held) <= window() + 4, max(held)
        os.stat(top / "skip/below")  # there, and not visited: its parent was declined
        assert all(os.stat(top / rel).st_ino == ino for rel, (_, ino) in seen.items())
        # Only the names asked for, and an exception ends the walk with every fd closed.
        with pytest.raises(ZeroDivisionError):
            list_dirs(fd, "", ["n0", "link", "file", "gone"], MountRef.of(stat_at(fd)),
                      lambda *a: 1 // (a[1] == "deep"))
        assert len(os.listdir("/proc/self/fd")) == base
    finally:
        os.close(fd)
        remove_tree(top)
