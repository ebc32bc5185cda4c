"""The concurrent walk through FUSE (latencyfs, 0.2 ms per metadata call): same results, safely.

latencyfs is our latency-injecting passthrough (``bench/latencyfs/``); going through it
exercises real overlapping requests against a filesystem that answers slowly, as EFS does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from envctl_shared.config import RootConfig
from envctl_shared.fsinfo import mount_of, walk_concurrency
from envctl_shared.heal import Healer

from bench.latencyfs import latencyfs

from .conftest import Accounts
from .helpers import as_user, find_violations, snapshot
from .trees import build_tree

pytestmark = pytest.mark.fuse


def _root(path: Path, gid: int) -> RootConfig:
    return RootConfig(path=path, group=str(gid), gid=gid, exclude=("env/share/excluded",))


def test_fuse_detected_as_remote_and_walked_concurrently(scratch: Path) -> None:
    backing = scratch / "b"
    backing.mkdir()
    with latencyfs(backing, scratch / "m", 0.2) as fs:
        mnt = fs.path
        assert mount_of(mnt).fstype.startswith("fuse")
        assert mount_of(mnt).remote and walk_concurrency(mnt) == 16
        assert walk_concurrency(mnt, 4) == 4
    assert not mount_of(scratch).remote and walk_concurrency(scratch, 32) == 1


def test_concurrency_1_and_32_identical_through_latencyfs(scratch: Path,
                                                       accounts: Accounts) -> None:
    results = []
    for conc in (1, 32):
        area = scratch / f"c{conc}"
        area.mkdir()
        backing, outside = build_tree(area, accounts)
        # latencyfs serves the tree; the outside targets stay reachable only via their symlinks.
        before_outside = snapshot(outside)
        with latencyfs(backing, area / "mnt", 0.2) as fs:
            stats = Healer(_root(fs.path, accounts.shared_gid), concurrency=conc).run()
            again = Healer(_root(fs.path, accounts.shared_gid), concurrency=conc).run()
        assert snapshot(outside) == before_outside
        assert again.writes == 0 and stats.errors == 0
        shape = {Path(p).relative_to(backing).as_posix(): v for p, v in snapshot(backing).items()}
        results.append((shape, stats.to_dict() | {"duration_s": 0}))
    assert results[0] == results[1]
    left = {Path(p).relative_to(scratch / "c1/root").as_posix()
            for p in find_violations(scratch / "c1/root", accounts.shared_gid)}
    assert left == {"env/hardlink-to-passwd", "env/share/excluded",
                    "env/share/excluded/deep", "env/share/excluded/deep/file"}


def test_wide_directory_bounded_and_complete(scratch: Path, accounts: Accounts) -> None:
    """A 3000-entry directory through latencyfs: every entry healed, no fd or task blow-up."""
    backing = scratch / "b"
    backing.mkdir()
    os.chown(backing, accounts.alice.uid, accounts.alice.gid)
    as_user(accounts.alice.uid, accounts.alice.gid,
            f"cd {backing} && mkdir wide && cd wide && seq 3000 | xargs touch")
    fds_before = len(os.listdir("/proc/self/fd"))
    with latencyfs(backing, scratch / "m", 0.2) as fs:
        stats = Healer(_root(fs.path, accounts.shared_gid), concurrency=32).run()
    # The walk's calls overlapped on the server (one directory: the lookups ran in parallel).
    assert fs.final is not None and fs.final.inflight_max >= 16, fs.final
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every directory fd closed
    assert stats.fixed_kinds["file"] == 3000 and stats.errors == 0
    assert find_violations(backing, accounts.shared_gid) == []
    shutil.rmtree(backing)
