"""The daemon's own writes in a watched root against its healer: no chmod of ours undone.

Found by a flaky end-to-end test: a version directory made ``mkdir 0700`` → ``chown`` →
``chmod 0755`` was sometimes left ``2770`` (other users locked out of an env), because the
healer read ``0700`` after the ``chown`` and wrote ``2770`` after our ``chmod``. The layout now
gives the mode at ``mkdir``, so the mode only ever grows; this test makes the same directories
the daemon makes, as fast as it can, next to a real daemon healing them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from envctl_shared.jobs.layout import make_owned_dir

from tests.conftest import Accounts
from tests.daemon_support import Envctld, write_config
from tests.helpers import SYSTEM_PYTHON, as_user, wait_for
from tests.watch_support import make_root

pytest_plugins = ("tests.fixtures_daemon",)
pytestmark = pytest.mark.serial  # races a daemon's healer: needs the CPUs to itself
DIRS = 1500  # the old code lost bits on ~1 in 200


def test_owned_dirs_keep_their_mode_under_the_healer(scratch: Path, accounts: Accounts,
                                                      envctld: Callable[..., Envctld]) -> None:
    root = make_root(scratch, accounts)
    envctld(write_config(scratch, [(root, accounts.shared_group)]))
    parent = root / "versions"
    parent.mkdir()
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(DIRS):
            make_owned_dir(fd, f"v{i}", accounts.builder.uid, accounts.builder.gid, 0o755)
    finally:
        os.close(fd)

    def modes() -> list[int]:
        return [stat.S_IMODE(os.stat(parent / f"v{i}").st_mode) for i in range(DIRS)]

    # healed: the root's group, SGID and group write added, nothing taken away
    wait_for(lambda: all(m & 0o2070 == 0o2070 for m in modes()), 30, what="dirs healed")
    lost = [f"v{i}={m:04o}" for i, m in enumerate(modes()) if m & 0o755 != 0o755]
    assert not lost, f"{len(lost)} of {DIRS} lost bits: {lost[:5]}"


WRITER = """
import os, sys
os.umask(0o077)
base = sys.argv[1]
for i in range(int(sys.argv[2])):
    d = os.path.join(base, f"d{i}")
    os.mkdir(d)                        # 0700: the umask
    os.chmod(d, 0o755)                 # then what tar/pip do: the archive's mode
    f = os.path.join(d, "script")
    os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o644))
    os.chmod(f, 0o755)
"""


def test_a_writers_chmod_after_create_is_not_undone(scratch: Path, accounts: Accounts,
                                                    envctld: Callable[..., Envctld]) -> None:
    """tar and pip create an entry, then chmod it to the archive's mode: the heal triggered by
    the create must not write a mode computed before that chmod (x bits lost on a script, o+rx
    on a directory)."""
    root = make_root(scratch, accounts)
    envctld(write_config(scratch, [(root, accounts.shared_group)]))
    a = accounts.alice
    as_user(a.uid, a.gid, [SYSTEM_PYTHON, "-c", WRITER, str(root), str(DIRS)])

    def modes() -> list[tuple[str, int]]:
        out = []
        for i in range(DIRS):
            for p in (root / f"d{i}", root / f"d{i}/script"):
                out.append((str(p.relative_to(root)), stat.S_IMODE(os.stat(p).st_mode)))
        return out

    wait_for(lambda: all(m & 0o060 == 0o060 for _, m in modes()), 30, what="tree healed")
    lost = [f"{p}={m:04o}" for p, m in modes() if m & 0o755 != 0o755]
    # A window remains between the fd's statx and its chmod in C: a healer thread preempted
    # right there (a loaded machine: 2 of ~11 runs here lost one entry of 3,000) writes a
    # mode judged before the writer's chmod. A mode computed in Python lost 2-10 per run.
    assert len(lost) <= 1, f"{len(lost)} of {2 * DIRS} lost bits: {lost[:5]}"
