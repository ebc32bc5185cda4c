"""``envctl heal PATH`` follows a symlink in PATH's parents (found attacking issue 10's fixes).

A symlink as the last component is refused ("is a symlink", naming the real directory), but one
earlier in the path is followed: when an admin heals ``<root>/alices-dir/sub``, and
``alices-dir`` is alice's symlink to bob's private directory, bob's files are chgrp'ed to the
shared group and made group-readable and -writable, for alice to read. With ``--config`` the same
path is reported as "scanned 0, skipped: vanished 1" and exit 0: a clean result for a path that
was not audited. Each component of PATH should be opened no-follow like every other step of a
walk (or the path refused when it resolves elsewhere, as for the last component).

Now refused: with ``--group`` when any component of PATH is a symlink, with ``--config`` when one
below the configured root is; the error names the link and the hint the real directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.daemon_support import write_config
from tests.helpers import VENV_BIN, as_user
from tests.watch_support import make_root


@pytest.mark.parametrize("policy", ["group", "config"])
def test_heal_does_not_follow_a_symlink_in_the_paths_parents(accounts: Accounts,
                                                              scratch: Path,
                                                              policy: str) -> None:
    root = make_root(scratch, accounts)
    private = scratch / "bob-private"
    private.mkdir(mode=0o711)
    (private / "sub").mkdir(mode=0o700)
    (private / "sub" / "key").write_text("secret\n")
    os.chmod(private / "sub" / "key", 0o600)
    b = accounts.bob
    for p in (private, private / "sub", private / "sub" / "key"):
        os.chown(p, b.uid, b.gid)
    a = accounts.alice
    as_user(a.uid, a.gid, ["ln", "-s", str(private), str(root / "alices-dir")])
    before = [(p.stat().st_gid, p.stat().st_mode) for p in (private / "sub",
                                                             private / "sub" / "key")]
    how = (["--group", accounts.shared_group] if policy == "group" else
           ["--config", str(write_config(scratch, [(root, accounts.shared_group)]))])
    res = subprocess.run([str(VENV_BIN / "envctl"), "heal", str(root / "alices-dir" / "sub"),
                          *how], capture_output=True, text=True)
    after = [(p.stat().st_gid, p.stat().st_mode) for p in (private / "sub",
                                                            private / "sub" / "key")]
    assert after == before, f"bob's files changed through alice's symlink: {res.stdout}"
    assert res.returncode == 74, (res.returncode, res.stdout, res.stderr)  # refused, not clean
    assert f"{root / 'alices-dir'} is a symlink" in res.stderr, res.stderr
    assert str(private / "sub") in res.stderr, res.stderr  # the hint: the real directory
