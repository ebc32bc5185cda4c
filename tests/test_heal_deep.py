"""A directory chain 20,000 levels deep, made by a group member: no crash, no freeze.

``mkdir d && cd d`` in a loop is all it takes; the old C walk recursed once per level and
segfaulted ``envctl heal``/``check`` (exit 139) and the daemon's reconcile, and ``check`` spent
minutes re-resolving each deep entry from the root. Here the CLI and a real ``envctld`` must
finish such a tree in seconds, with the right counts, every level healed — the bottom ones far
deeper than PATH_MAX — and the independent ``find`` audit clean afterwards.
"""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from envctl_shared.config import RootConfig
from envctl_shared.heal import Healer
from envctl_shared.heal.walker import FD_BUDGET

from tests.conftest import Accounts
from tests.daemon_support import Envctld, write_config
from tests.helpers import VENV_BIN, find_violations
from tests.trees import make_chain, remove_tree, unheal_chain

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture
pytestmark = pytest.mark.slow

LEVELS = 20_000
WRONG = 1_000  # the deepest levels are broken (each with its file): 2,000 violations
BOUND = 60.0  # seconds: generous on a shared 2-core machine; quadratic behaviour blows it


@pytest.fixture(scope="module")
def deep_chain(accounts: Accounts) -> Iterator[Path]:
    """The chain, made once for the module (seconds for 20,000 levels) and removed with
    ``rm -rf`` (deeper than rmtree goes); each test gets it broken through :func:`chain`."""
    tests_base = Path("/tmp/envctl-tests")
    tests_base.mkdir(mode=0o755, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=tests_base, prefix="deep-"))
    os.chmod(base, 0o755)  # alice reaches the chain
    root = base / "deep"
    root.mkdir()
    try:
        make_chain(root, LEVELS, accounts.alice.uid, accounts.alice.gid, side="f",
                   shared_gid=accounts.shared_gid, wrong_from=LEVELS - WRONG)
        os.chown(root, accounts.alice.uid, accounts.shared_gid)
        os.chmod(root, 0o2770)
        yield root
    finally:
        remove_tree(base)


@pytest.fixture
def chain(deep_chain: Path, accounts: Accounts) -> Path:
    """The root of the chain: compliant down to level 19,000, broken below (alice, umask 077,
    her own group), a file at every level — broken again if an earlier test healed it."""
    unheal_chain(deep_chain, LEVELS, accounts.alice.uid, accounts.alice.gid, side="f",
                 wrong_from=LEVELS - WRONG)
    return deep_chain


def _cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    r = subprocess.run([str(VENV_BIN / "envctl"), *args], capture_output=True, text=True,
                       timeout=BOUND * 3)
    return r, time.monotonic() - start


def test_check_and_heal_a_20000_level_chain(chain: Path, accounts: Accounts) -> None:
    group = ["--group", accounts.shared_group, str(chain)]
    entries = 1 + 2 * LEVELS  # the root, each level and its file

    r, took = _cli("check", *group)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[-1].startswith(f"{chain}: scanned {entries}, {2 * WRONG} wrong, skipped: none,")
    assert len(lines) == 2 * WRONG + 1  # one line per violation, the deepest included
    assert max(len(line) for line in lines) > 2 * LEVELS > os.pathconf("/", "PC_PATH_MAX")
    assert took < BOUND, f"check took {took:.1f}s"

    r, took = _cli("heal", *group)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"scanned {entries}, fixed {2 * WRONG} (group {2 * WRONG}, mode {2 * WRONG})" in \
        r.stdout
    assert took < BOUND, f"heal took {took:.1f}s"

    r, _ = _cli("check", *group)
    assert r.returncode == 0 and f"scanned {entries}, 0 wrong" in r.stdout, r.stdout[-2000:]
    assert find_violations(chain, accounts.shared_gid) == []  # GNU find agrees, to the bottom


def test_daemon_reconciles_a_20000_level_chain(chain: Path, accounts: Accounts, scratch: Path,
                                               envctld: Callable[..., Envctld]) -> None:
    """The startup reconcile is the daemon's full pass through the healer: it must survive
    the chain and heal it before READY=1, and the daemon must still stop cleanly."""
    cfg = write_config(scratch, [(chain, accounts.shared_group)])
    assert len(find_violations(chain, accounts.shared_gid)) == 2 * WRONG
    start = time.monotonic()
    d = envctld(cfg, timeout=BOUND * 2)
    assert time.monotonic() - start < BOUND * 2
    assert find_violations(chain, accounts.shared_gid) == []
    assert d.alive
    d.stop()


@pytest.mark.parametrize("concurrency", [1, 8])
def test_python_walk_of_a_deep_comb_keeps_its_fds_bounded(scratch: Path, accounts: Accounts,
                                                          concurrency: int) -> None:
    """The Python walk (exclude patterns, NFS/FUSE concurrency, the poller's planner) queues a
    task at each level of a comb — a chain with a second subdirectory at every level — and a
    queued task pins its directory: 3,000 levels held ~1,500 fds, EMFILE under a normal limit.
    Run here under a limit of FD_BUDGET + 64 fds: every level must be healed, no error. 1,000
    levels are enough for that: with the budget lifted the walk holds ~2,000 fds at its peak,
    ten times the limit."""
    levels = 1000
    root = scratch / "comb"
    root.mkdir()
    try:
        make_chain(root, levels, accounts.alice.uid, accounts.alice.gid, side="f", sibling="s")
        cfg = RootConfig(path=root, group=accounts.shared_group, gid=accounts.shared_gid,
                         exclude=("no/such/*",))  # type: ignore[arg-type]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + FD_BUDGET + 64, hard))
        try:
            start = time.monotonic()
            stats = Healer(cfg, concurrency=concurrency).run()
            took = time.monotonic() - start
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert stats.errors == 0
        assert stats.dirs == 1 + 2 * levels and stats.scanned == 1 + 3 * levels
        assert took < BOUND, f"{took:.1f}s"
        assert find_violations(root, accounts.shared_gid) == []
    finally:
        remove_tree(root)
