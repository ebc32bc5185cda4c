"""The healer on real trees written by another uid with umask 077, and attacks on it.

Every assertion is on the filesystem itself (exact modes and groups, an independent ``find``
audit, snapshots of what lies outside the root), never only on envctl's own counters. Each
adversarial case runs with concurrency 1 and 32: the results must be identical.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from envctl_shared.config import RootConfig
from envctl_shared.heal import Healer

from .conftest import Accounts
from .helpers import VENV_BIN, as_user, find_violations, snapshot
from .trees import build_tree as _build_tree

CONCURRENCY = [1, 32]


def _root(path: Path, gid: int, **kw: object) -> RootConfig:
    return RootConfig(path=path, group=str(gid), gid=gid, **kw)  # type: ignore[arg-type]


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_heal_tree_written_with_umask_077(scratch: Path, accounts: Accounts,
                                          concurrency: int) -> None:
    root, outside = _build_tree(scratch, accounts)
    gid = accounts.shared_gid
    before_outside = snapshot(outside)
    before_etc = snapshot(Path("/etc/passwd"))
    cfg = _root(root, gid, exclude=("env/share/excluded",))
    assert find_violations(root, gid)

    stats = Healer(cfg, concurrency=concurrency).run()

    assert stats.errors == 0
    env = root / "env"
    assert _mode(root) == 0o2770 and os.lstat(root).st_gid == gid
    assert _mode(env / "bin") == 0o2770
    assert _mode(env / "bin/tool") == 0o770
    assert _mode(env / "lib/python3.11/site-packages/pkg/__init__.py") == 0o660
    assert _mode(env / "locked") == 0o2070  # user bits kept as the owner set them
    assert _mode(env / "locked/inside") == 0o660
    assert os.lstat(env / "link-to-file").st_gid == gid  # the link itself...
    assert snapshot(outside) == before_outside  # ...never its target
    assert snapshot(Path("/etc/passwd")) == before_etc
    assert os.lstat(env / "hardlink-to-passwd").st_gid == 0
    fifo = os.lstat(env / "fifo")
    assert (stat.S_IMODE(fifo.st_mode), fifo.st_gid) == (0o600, accounts.alice.gid)
    excluded = env / "share/excluded/deep/file"
    assert _mode(excluded) == 0o600 and os.lstat(excluded).st_gid == accounts.alice.gid
    assert stats.skipped["protected"] == 1 and stats.skipped["special"] == 1
    assert stats.skipped["excluded"] == 1
    # Independent audit: nothing but the protected, excluded and special entries is wrong.
    left = {Path(p).relative_to(root).as_posix() for p in find_violations(root, gid)}
    assert left == {"env/hardlink-to-passwd", "env/share/excluded",
                    "env/share/excluded/deep", "env/share/excluded/deep/file"}
    # Owners never change.
    assert all(os.lstat(p).st_uid == accounts.alice.uid for p in
               [env, env / "bin/tool", env / "link-to-file", env / "locked/inside"])


@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_second_pass_writes_nothing(scratch: Path, accounts: Accounts, concurrency: int) -> None:
    root, _ = _build_tree(scratch, accounts)
    cfg = _root(root, accounts.shared_gid)
    Healer(cfg, concurrency=concurrency).run()
    before = _ctimes(root)
    again = Healer(cfg, concurrency=concurrency).run()
    assert again.writes == 0 and again.violations == 0
    assert _ctimes(root) == before  # no inode touched


def _ctimes(root: Path) -> dict[str, tuple[int, int, int] | int]:
    """The ctime of every entry, but (mode, uid, gid) of the hard link to /etc/passwd: that
    inode's link count changes with every useradd of a suite running beside this one."""
    return {p: meta if p.endswith("/hardlink-to-passwd") else os.lstat(p).st_ctime_ns
            for p, meta in snapshot(root).items()}


def test_zero_metadata_syscalls_on_compliant_tree(scratch: Path, accounts: Accounts) -> None:
    """Counted by strace on the real CLI, not by our own counters."""
    root, _ = _build_tree(scratch, accounts)
    g = str(accounts.shared_gid)
    subprocess.run([VENV_BIN / "envctl", "heal", "--group", g, str(root)], check=True,
                   capture_output=True)
    out = scratch / "strace.txt"
    subprocess.run(["strace", "-f", "-qq", "-o", str(out), "-e",
                    "trace=chmod,fchmod,fchmodat,chown,fchown,lchown,fchownat",
                    str(VENV_BIN / "envctl"), "heal", "--group", g, str(root)],
                   check=True, capture_output=True)
    calls = [line for line in out.read_text().splitlines() if "(" in line]
    assert calls == []


@pytest.mark.parametrize("others,dir_mode,file_mode", [("none", 0o2770, 0o660),
                                                        ("read", 0o2775, 0o664)])
def test_others_policy(scratch: Path, accounts: Accounts, others: str, dir_mode: int,
                       file_mode: int) -> None:
    root = scratch / "r"
    root.mkdir()
    (root / "d").mkdir(mode=0o757)
    (root / "d/f").write_text("x")
    os.chmod(root / "d", 0o757)
    os.chmod(root / "d/f", 0o646)
    for p in (root / "d", root / "d/f"):
        os.chown(p, accounts.alice.uid, accounts.alice.gid)
    Healer(_root(root, accounts.shared_gid, others=others)).run()
    assert _mode(root / "d") == dir_mode and _mode(root / "d/f") == file_mode


@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_bind_mounts_inside_root_are_not_entered(scratch: Path, accounts: Accounts,
                                                 concurrency: int) -> None:
    """A bind mount of a directory on the same device (same st_dev) is still a mount."""
    root = scratch / "r"
    (root / "mnt").mkdir(parents=True)
    (root / "filemnt").write_text("")
    victim = scratch / "victim"
    victim.mkdir()
    (victim / "f").write_text("x")
    os.chmod(victim / "f", 0o600)
    vfile = scratch / "victim-file"
    vfile.write_text("y")
    os.chmod(vfile, 0o600)
    for p in (victim, victim / "f", vfile):
        os.chown(p, accounts.alice.uid, accounts.alice.gid)
    before = snapshot(victim) | snapshot(vfile)
    subprocess.run(["mount", "--bind", str(victim), str(root / "mnt")], check=True)
    try:
        subprocess.run(["mount", "--bind", str(vfile), str(root / "filemnt")], check=True)
        try:
            stats = Healer(_root(root, accounts.shared_gid), concurrency=concurrency).run()
        finally:
            subprocess.run(["umount", str(root / "filemnt")], check=True)
    finally:
        subprocess.run(["umount", str(root / "mnt")], check=True)
    assert snapshot(victim) | snapshot(vfile) == before
    assert stats.skipped["mount"] == 2


def test_event_path_through_symlink_is_not_followed(scratch: Path, accounts: Accounts) -> None:
    """A root-relative path from an event is re-resolved without following symlinks."""
    root = scratch / "r"
    root.mkdir()
    outside = scratch / "out"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub/f").write_text("x")
    os.chown(outside / "sub/f", accounts.alice.uid, accounts.alice.gid)
    os.chmod(outside / "sub/f", 0o600)
    os.symlink(outside, root / "link")
    before = snapshot(outside)
    healer = Healer(_root(root, accounts.shared_gid))
    healer.run("link/sub/f", recursive=False)
    healer.run("link/sub")
    assert snapshot(outside) == before
    with pytest.raises(ValueError):
        healer.run("../out/sub")


@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_symlink_swap_race(scratch: Path, accounts: Accounts, concurrency: int) -> None:
    """alice swaps files and dirs for symlinks to her private outside data while we heal."""
    root = scratch / "r"
    root.mkdir()
    outside = scratch / "out"
    outside.mkdir()
    os.chown(root, accounts.alice.uid, accounts.alice.gid)
    os.chown(outside, accounts.alice.uid, accounts.alice.gid)
    as_user(accounts.alice.uid, accounts.alice.gid,
            f"mkdir {outside}/d && echo s > {outside}/secret && echo t > {outside}/d/t")
    before = snapshot(outside)
    swapper = (
        f"cd {root}; end=$(($(date +%s)+4)); i=0; while [ $(date +%s) -lt $end ]; do "
        "mkdir -p a/b; echo x > a/f; mkdir -p a/d; echo y > a/d/g; "
        f"rm -rf a/f a/d; ln -sfn {outside}/secret a/f; ln -sfn {outside}/d a/d; "
        "rm -f a/f a/d; mv a a.old 2>/dev/null; "
        f"ln -sfn {outside} a; rm -f a; rm -rf a.old; i=$((i+1)); done; echo $i")
    proc = subprocess.Popen(["setpriv", f"--reuid={accounts.alice.uid}",
                             f"--regid={accounts.alice.gid}", "--clear-groups",
                             "sh", "-c", f"umask 077; {swapper}"], stdout=subprocess.PIPE,
                            text=True)
    healer = Healer(_root(root, accounts.shared_gid), concurrency=concurrency)
    passes = 0
    while proc.poll() is None:
        healer.run()
        passes += 1
    assert int(proc.stdout.read().strip()) > 10 and passes > 10  # type: ignore[union-attr]
    assert snapshot(outside) == before


def test_concurrency_gives_identical_results(scratch: Path, accounts: Accounts) -> None:
    trees = []
    for conc in CONCURRENCY:
        sub = scratch / f"c{conc}"
        sub.mkdir()
        root, outside = _build_tree(sub, accounts)
        stats = Healer(_root(root, accounts.shared_gid, exclude=("env/share/*",)),
                       concurrency=conc).run()
        shape = {Path(p).relative_to(root).as_posix(): v for p, v in snapshot(root).items()}
        trees.append((shape, stats.to_dict() | {"duration_s": 0}))
    assert trees[0] == trees[1]


def test_unreadable_dir_as_non_root_is_an_error_not_an_abort(scratch: Path,
                                                             accounts: Accounts) -> None:
    """Run by bob (no CAP_DAC_*): a dir he cannot read is counted, the walk goes on."""
    root = scratch / "r"
    root.mkdir()
    os.chown(root, accounts.bob.uid, accounts.shared_gid)
    as_user(accounts.bob.uid, accounts.bob.gid,
            f"cd {root} && mkdir ok closed && echo x > ok/f && chmod 000 closed")
    r = as_user(accounts.bob.uid, accounts.bob.gid,
                [str(VENV_BIN / "envctl"), "heal", "--json", "--group",
                 accounts.shared_group, str(root)], check=False, init_groups=True)
    assert r.returncode == 74, r.stderr
    doc = json.loads(r.stdout)
    assert doc["totals"]["errors"] == 1, doc["paths"][0]["findings"]
    assert [f["path"] for f in doc["paths"][0]["findings"] if f["action"] == "error"] == [
        str(root / "closed")]
    assert _mode(root / "ok/f") == 0o660 and os.lstat(root / "ok/f").st_gid == accounts.shared_gid


def test_heal_follows_no_race_with_many_writers(scratch: Path, accounts: Accounts) -> None:
    """Healing while alice writes: afterwards one more pass leaves zero violations."""
    root = scratch / "r"
    root.mkdir()
    os.chown(root, accounts.alice.uid, accounts.alice.gid)
    writer = subprocess.Popen(["setpriv", f"--reuid={accounts.alice.uid}",
                               f"--regid={accounts.alice.gid}", "--clear-groups", "sh", "-c",
                               f"umask 077; cd {root}; for i in $(seq 200); do mkdir -p d$i/e; "
                               "echo $i > d$i/e/f; done"])
    healer = Healer(_root(root, accounts.shared_gid), concurrency=8)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            healer.run()

    t = threading.Thread(target=loop)
    t.start()
    writer.wait()
    stop.set()
    t.join()
    healer.run()
    assert find_violations(root, accounts.shared_gid) == []



@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_a_directory_removed_between_its_open_and_its_listing_is_empty(
        scratch: Path, accounts: Accounts, concurrency: int) -> None:
    """A member's ``rmdir`` between the walk's open of a directory and its listing: the
    listing (C's getdents64) fails with ENOENT. The directory is empty, not an error, which
    would make ``envctl heal`` exit 74 and could be had at will. The removal is made at that
    very moment, through the progress hook a walk calls once it has opened a directory."""
    root = scratch / "r"
    (root / "victim").mkdir(parents=True)
    opened: list[int] = []

    def opened_one() -> None:
        opened.append(1)
        (root / "victim").rmdir()

    stats = Healer(_root(root, accounts.shared_gid), concurrency=concurrency,
                   on_progress=opened_one).run("victim")
    assert len(opened) == 1 and not (root / "victim").exists()
    assert stats.errors == 0 and stats.dirs == 1, stats.to_dict()
