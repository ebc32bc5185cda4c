"""The concurrent walk through FUSE (slowfs, 0.2 ms per metadata call): same results, safely.

slowfs is the team's latency-injecting passthrough (../shared/tools/slowfs.py); going through
it exercises real overlapping requests against a filesystem that answers slowly, as EFS does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench.slowfs import slowfs
from envctl_shared.config import RootConfig
from envctl_shared.fsinfo import mount_of, walk_concurrency
from envctl_shared.heal import Healer

from .conftest import Accounts
from .helpers import as_user, find_violations, snapshot
from .trees import build_tree

pytestmark = pytest.mark.fuse


def _root(path: Path, gid: int) -> RootConfig:
    return RootConfig(path=path, group=str(gid), gid=gid, exclude=("env/share/excluded",))


def test_fuse_detected_as_remote_and_walked_concurrently(scratch: Path) -> None:
    backing = scratch / "b"
    backing.mkdir()
    with slowfs(backing, scratch / "m", 0.2) as mnt:
        assert mount_of(mnt).fstype.startswith("fuse")
        assert mount_of(mnt).remote and walk_concurrency(mnt) == 16
        assert walk_concurrency(mnt, 4) == 4
    assert not mount_of(scratch).remote and walk_concurrency(scratch, 32) == 1


def test_concurrency_1_and_32_identical_through_slowfs(scratch: Path,
                                                       accounts: Accounts) -> None:
    results = []
    for conc in (1, 32):
        area = scratch / f"c{conc}"
        area.mkdir()
        backing, outside = build_tree(area, accounts)
        # slowfs serves the tree; the outside targets stay reachable only via their symlinks.
        before_outside = snapshot(outside)
        with slowfs(backing, area / "mnt", 0.2) as mnt:
            stats = Healer(_root(mnt, accounts.shared_gid), concurrency=conc).run()
            again = Healer(_root(mnt, accounts.shared_gid), concurrency=conc).run()
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
    """A 3000-entry directory through slowfs: every entry healed, no fd or task blow-up."""
    backing = scratch / "b"
    backing.mkdir()
    os.chown(backing, accounts.alice.uid, accounts.alice.gid)
    as_user(accounts.alice.uid, accounts.alice.gid,
            f"cd {backing} && mkdir wide && cd wide && seq 3000 | xargs touch")
    fds_before = len(os.listdir("/proc/self/fd"))
    with slowfs(backing, scratch / "m", 0.2) as mnt:
        stats = Healer(_root(mnt, accounts.shared_gid), concurrency=32).run()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every directory fd closed
    assert stats.fixed_kinds["file"] == 3000 and stats.errors == 0
    assert find_violations(backing, accounts.shared_gid) == []
    shutil.rmtree(backing)
