"""Setuid/setgid files are never widened, by the daemon or by ``envctl heal``: only reported.

Found by an attack: a member's private ``4700`` copy of ``id`` was healed to ``4770`` and another
member ran it as the first (with ``others: read``, ``4755``: anyone). Here alice (umask 077)
makes such files in a watched root; bob, in the group, must not get to run them as alice.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from envctl_shared import config
from envctl_shared.policy import NEVER_FIXED, Kind, Rules, mode_table

from tests.conftest import Accounts
from tests.daemon_support import Envctld, write_config
from tests.helpers import VENV_BIN, as_user, wait_for
from tests.watch_support import make_root

pytest_plugins = ("tests.fixtures_daemon",)
F = stat.S_IFREG


@pytest.mark.parametrize("others", ["keep", "none", "read"])
@pytest.mark.parametrize("perm", [0o4700, 0o2700, 0o6755, 0o2640, 0o4000])
def test_setid_files_are_never_fixed(perm: int, others: str) -> None:
    root = config.RootConfig(path=Path("/r"), group="g", gid=100, others=others)  # type: ignore[arg-type]
    v = Rules.of(root).verdict(F | perm, 5)
    assert v.kind is Kind.SPECIAL and v.gid is None and v.mode is None and not v.ok
    table = memoryview(mode_table(others)).cast("H")
    assert table[F | perm] == NEVER_FIXED  # the C fast path hands it back too
    assert table[F | (perm & 0o777)] != NEVER_FIXED  # the same file without the bits is healed


def test_daemon_and_heal_leave_setid_files_alone(scratch: Path, accounts: Accounts,
                                                 envctld: Callable[..., Envctld]) -> None:
    root = make_root(scratch, accounts)
    envctld(write_config(scratch, [(root, accounts.shared_group)], others="read"))
    a, b = accounts.alice, accounts.bob
    as_user(a.uid, a.gid, f"mkdir {root}/a && cp /usr/bin/id {root}/a/suid && "
                          f"cp /usr/bin/id {root}/a/sgid && chmod 4700 {root}/a/suid && "
                          f"chmod 2700 {root}/a/sgid && echo x > {root}/a/plain",
            init_groups=True)  # in the root's group: else the kernel drops the chmod's g+s
    wait_for(lambda: stat.S_IMODE(os.stat(root / "a/plain").st_mode) == 0o664, 10,
             what="the plain sibling healed")
    assert stat.S_IMODE(os.stat(root / "a/suid").st_mode) == 0o4700
    assert stat.S_IMODE(os.stat(root / "a/sgid").st_mode) == 0o2700
    res = as_user(b.uid, b.gid, [str(root / "a/suid"), "-u"], init_groups=True, check=False)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    # a one-shot heal (as root) does not widen them either, and says what it left
    heal = subprocess.run([str(VENV_BIN / "envctl"), "heal", "--group", accounts.shared_group,
                           "--others", "read", str(root)], capture_output=True, text=True)
    assert stat.S_IMODE(os.stat(root / "a/suid").st_mode) == 0o4700, heal.stdout + heal.stderr
    check = subprocess.run([str(VENV_BIN / "envctl"), "check", "-v", "--group",
                            accounts.shared_group, str(root)], capture_output=True, text=True)
    out = check.stdout + check.stderr
    assert "skipped: special 2" in out and "a/suid" in out and "a/sgid" in out, out
