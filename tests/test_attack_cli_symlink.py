"""``envctl heal PATH`` follows a symlink in PATH's parents (found attacking issue 10's fixes).

A symlink as the last component is refused ("is a symlink", naming the real directory), but one
earlier in the path is followed: when an admin heals ``<root>/alices-dir/sub``, and
``alices-dir`` is alice's symlink to bob's private directory, bob's files are chgrp'ed to the
shared group and made group-readable and -writable, for alice to read. With ``--config`` the same
path is reported as "scanned 0, skipped: vanished 1" and exit 0: a clean result for a path that
was not audited. Each component of PATH should be opened no-follow like every other step of a
walk (or the path refused when it resolves elsewhere, as for the last component).

Marked ``xfail(strict=True)``: it fails on the code as it is; remove the mark with the fix.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.helpers import VENV_BIN, as_user
from tests.watch_support import make_root


@pytest.mark.xfail(strict=True, reason="heal resolves symlinks in the parents of the path it "
                   "is given and heals what lies outside the root")
def test_heal_does_not_follow_a_symlink_in_the_paths_parents(accounts: Accounts,
                                                              scratch: Path) -> None:
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
    res = subprocess.run([str(VENV_BIN / "envctl"), "heal", str(root / "alices-dir" / "sub"),
                          "--group", accounts.shared_group], capture_output=True, text=True)
    after = [(p.stat().st_gid, p.stat().st_mode) for p in (private / "sub",
                                                            private / "sub" / "key")]
    assert after == before, f"bob's files changed through alice's symlink: {res.stdout}"
    assert res.returncode != 0, res.stdout
