"""latencyfs itself (``bench/latencyfs/``): the tool the FUSE tests and the benchmarks trust.

If it did not delay, did not overlap, miscounted, or answered differently from a local disk
for what the healer relies on (no-follow calls, O_PATH fds, ownership of entries other uids
create, identity), every number and every FUSE test built on it would be wrong silently.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from envctl_shared.locks import Kind, try_lock

from bench.latencyfs import latencyfs, stat_storm

from .conftest import Accounts
from .helpers import as_user, wait_for

pytestmark = pytest.mark.fuse

O_PATH = getattr(os, "O_PATH", 0o10000000)
AT_EMPTY_PATH = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


def _fchown_empty_path(fd: int, gid: int) -> None:
    """``fchownat(fd, "", -1, gid, AT_EMPTY_PATH)``: Python's os has no AT_EMPTY_PATH."""
    if _libc.fchownat(fd, b"", -1, gid, AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _files(backing: Path, n: int, prefix: str = "f") -> list[str]:
    names = [f"{prefix}{i}" for i in range(n)]
    for name in names:
        (backing / name).touch()
    return names


def test_latency_applied_counted_and_overlapping(scratch: Path) -> None:
    backing = scratch / "b"
    backing.mkdir()
    names = _files(backing, 40)
    _files(backing, 32, "g")
    # 4 workers: replies wait in latencyfs's queue, not in its threads, so requests in flight are
    # bounded by the callers (as on a real server), not by the filesystem's thread count.
    with latencyfs(backing, scratch / "m", 20.0, threads=4) as fs:
        start = time.perf_counter()
        os.lstat(fs.path / names[0])  # one LOOKUP, never cached before
        one = time.perf_counter() - start
        assert 0.020 <= one < 0.5

        rate, served = stat_storm(fs, "g", 32, 32)
        # 32 stats at 20 ms each: serially 640 ms, in 4 threads 160 ms; overlapped, ~20 ms.
        assert 32 / rate < 0.12, f"32 parallel stats took {32 / rate:.3f}s"
        assert served.ops["getattr"] == 32 and served.total == 32 and served.errors == 0
        assert served.inflight_max >= 16

        before = fs.counters()
        with pytest.raises(FileNotFoundError):
            os.lstat(fs.path / "missing")
        os.mkdir(fs.path / "d")
        os.chmod(fs.path / "d", 0o2770)
        os.rename(fs.path / names[35], fs.path / "d" / "moved")
        delta = fs.counters().since(before)
        assert delta.errors == 3  # ENOENT lookups: 'missing'; 'd', 'moved' before they exist
        assert delta.ops["mkdir"] == 1 and delta.ops["chmod"] == 1 and delta.ops["rename"] == 1
        assert delta.total == sum(delta.ops.values())
    assert not os.path.ismount(scratch / "m")
    assert fs.final is not None and fs.final.total >= before.total + delta.total
    assert stat.S_IMODE((backing / "d").stat().st_mode) == 0o2770
    assert (backing / "d" / "moved").is_file()


def test_zero_latency_is_fast_and_history_is_a_time_series(scratch: Path) -> None:
    backing = scratch / "b"
    backing.mkdir()
    names = _files(backing, 200)
    history = scratch / "history.jsonl"
    with latencyfs(backing, scratch / "m", 0, history=history, stats_interval=0.1) as fs:
        start = time.perf_counter()
        for name in names:
            os.lstat(fs.path / name)
        assert time.perf_counter() - start < 0.5  # no hidden delay at latency 0
        wait_for(lambda: history.exists() and len(history.read_text().splitlines()) >= 2, 10,
                 what="two periodic snapshots")
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(lines) >= 3 and lines[-1]["final"] is True
    totals = [line["total"] for line in lines]
    assert totals == sorted(totals) and totals[-1] >= 200
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))


def test_what_the_healer_relies_on(scratch: Path, accounts: Accounts) -> None:
    """Other uids write through the mount (allow_other, default_permissions) and own what they
    create; O_PATH-fd chown/chmod as the healer does them; symlinks never followed; special
    files, hardlinks and identity as on a local disk."""
    backing = scratch / "b"
    backing.mkdir()
    alice, bob, g = accounts.alice, accounts.bob, accounts.shared_gid
    shared = backing / "shared"
    shared.mkdir()
    os.chown(shared, bob.uid, g)
    shared.chmod(0o2770)  # writable by alice only through her supplementary group
    secret = scratch / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    with latencyfs(backing, scratch / "m", 0.2) as fs:
        mnt = fs.path / "shared"
        as_user(alice.uid, alice.gid, f"mkdir {mnt}/d && echo hi > {mnt}/d/f && "
                f"ln -s {secret} {mnt}/link && mkfifo {mnt}/fifo && ln {mnt}/d/f {mnt}/hard && "
                f"mv {mnt}/d/f {mnt}/d/g", init_groups=True)
        # Ownership and SGID inheritance as a real server gives them (umask 077 applied).
        d, g_file = (backing / "shared/d").lstat(), (backing / "shared/d/g").lstat()
        assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (alice.uid, g, 0o2700)
        assert (g_file.st_uid, g_file.st_gid, stat.S_IMODE(g_file.st_mode)) == (alice.uid, g,
                                                                                0o600)
        assert stat.S_ISFIFO((backing / "shared/fifo").lstat().st_mode)
        # mallory (not in the group) is refused by the kernel's permission check.
        denied = as_user(accounts.mallory.uid, accounts.mallory.gid, f"touch {mnt}/x",
                         check=False)
        assert denied.returncode != 0 and not (backing / "shared/x").exists()

        # Identity: an O_PATH fd's fstat and the name's lstat agree; hardlinks share st_ino.
        # Changes go through O_PATH fds as the C healer makes them: fchownat(fd, "",
        # AT_EMPTY_PATH) and chmod of /proc/self/fd/N.
        fd = os.open(mnt / "hard", O_PATH | os.O_NOFOLLOW)
        try:
            by_fd, by_name = os.fstat(fd), os.lstat(mnt / "d" / "g")
            assert (by_fd.st_ino, by_fd.st_dev) == (by_name.st_ino, by_name.st_dev)
            assert by_fd.st_dev == os.lstat(fs.path).st_dev and by_fd.st_nlink == 2
            _fchown_empty_path(fd, alice.gid)
            os.chmod(f"/proc/self/fd/{fd}", 0o660)
        finally:
            os.close(fd)
        # A symlink: its own group changes, chmod is refused, its target is never touched.
        fd = os.open(mnt / "link", O_PATH | os.O_NOFOLLOW)
        try:
            _fchown_empty_path(fd, g)
            with pytest.raises(OSError) as err:
                os.chmod(f"/proc/self/fd/{fd}", 0o777)
            assert err.value.errno == errno.EOPNOTSUPP
        finally:
            os.close(fd)
    hard = (backing / "shared/d/g").lstat()
    assert (hard.st_gid, stat.S_IMODE(hard.st_mode)) == (alice.gid, 0o660)
    assert (backing / "shared/link").lstat().st_gid == g
    target = secret.lstat()
    assert (target.st_uid, target.st_gid, stat.S_IMODE(target.st_mode)) == (0, 0, 0o600)


def test_concurrent_writers_and_a_clean_exit(scratch: Path) -> None:
    """Creates from many threads at once land, and nothing (mount, process) outlives the block."""
    backing = scratch / "b"
    backing.mkdir()
    with latencyfs(backing, scratch / "m", 1.0) as fs:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: (fs.path / f"n{i}").write_text(str(i)), range(200)))
        pid = fs._proc.pid
    assert sorted(int(p.read_text()) for p in backing.iterdir()) == list(range(200))
    assert not os.path.ismount(scratch / "m") and not Path(f"/proc/{pid}").exists()
    assert fs.final is not None and fs.final.ops["create"] == 200


def test_two_mounts_of_one_backing_directory_share_locks(scratch: Path) -> None:
    """Hosts sharing an export see each other's record locks through the server; so must two
    latencyfs mounts of one backing directory (separate servers), or every cluster test built
    on them would elect a leader per mount. Fails without latencyfs's lock operation: each
    kernel mount then grants locks on its own."""
    import fcntl

    backing = scratch / "b"
    backing.mkdir()
    (backing / "lock").touch()
    with latencyfs(backing, scratch / "m1", 0.2) as a, latencyfs(backing, scratch / "m2", 0.2) as b:
        fa = os.open(a.path / "lock", os.O_RDWR)
        fb = os.open(b.path / "lock", os.O_RDWR)
        try:
            before = a.counters()
            assert try_lock(fa, Kind.EXCLUSIVE)  # an OFD lock, as the daemons take
            assert a.counters().since(before).ops["lock"] == 1
            # A forked child closing its copy of the descriptor (at exec) sends a FLUSH, on
            # which libfuse unlocks "the closing owner": the open file's lock must survive it.
            subprocess.run(["true"], check=True)
            assert not try_lock(fb, Kind.EXCLUSIVE)
            with pytest.raises(BlockingIOError):  # classic POSIX locks (lockf) too
                fcntl.lockf(fb, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fd = os.open(backing / "lock", os.O_RDWR)  # and a third party on the backing file
            try:
                assert not try_lock(fd, Kind.EXCLUSIVE)
            finally:
                os.close(fd)
            os.close(fa)  # the holder's close releases it (so does its death: same path)
            fa = -1
            # The kernel sends the RELEASE that drops it after close() returned (FUSE's
            # release is asynchronous): the lock is free once latencyfs has handled it.
            wait_for(lambda: try_lock(fb, Kind.EXCLUSIVE), 10, 0.01,
                     "the lock free after the close")
        finally:
            for fd in (fa, fb):
                if fd >= 0:
                    os.close(fd)
