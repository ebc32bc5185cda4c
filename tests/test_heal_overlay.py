"""An overlayfs root (any container's own filesystem) is healed like any other.

On overlayfs a regular file reports the st_dev of the layer it lives in, not the overlay's:
judged by st_dev, every file was "on another mount", skipped, never healed, and ``check`` said
"0 wrong", exit 0. Another mount is another mount id. And an entry that really is on another
mount (never entered, never audited) must never let ``check`` call a tree clean.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.helpers import VENV_BIN, as_user, find_violations


def _envctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "envctl"), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def overlay(scratch: Path, accounts: Accounts) -> Iterator[Path]:
    """An overlay with a tmpfs upper layer, files in both layers written by alice (umask 077);
    unmounted afterwards whatever happened."""
    a = accounts.alice
    lower, up, merged = scratch / "lower", scratch / "up", scratch / "merged"
    for d in (lower, up, merged):
        d.mkdir()
    os.chown(lower, a.uid, a.gid)
    as_user(a.uid, a.gid, f"cd {lower} && mkdir ld && echo l > ld/lf && echo l > lf && "
            "printf '#!/bin/sh\\n' > ltool && chmod 700 ltool")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(up)], check=True)
    try:
        (up / "upper").mkdir()
        (up / "work").mkdir()
        os.chown(up / "upper", a.uid, a.gid)
        as_user(a.uid, a.gid, f"cd {up / 'upper'} && mkdir ud && echo u > ud/uf && echo u > uf")
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={up / 'upper'},workdir={up / 'work'}",
                        str(merged)], check=True)
        try:
            yield merged
        finally:
            subprocess.run(["umount", str(merged)], check=True)
    finally:
        subprocess.run(["umount", str(up)], check=True)


def test_files_in_both_layers_are_checked_and_healed(overlay: Path,
                                                     accounts: Accounts) -> None:
    group = ["--group", accounts.shared_group, str(overlay)]
    files = {"lf", "ld/lf", "ltool", "uf", "ud/uf"}
    assert os.lstat(overlay / "lf").st_dev != os.lstat(overlay).st_dev  # the trap itself

    r = _envctl("check", "--json", *group)
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and not doc["ok"], r.stdout
    wrong = {os.path.relpath(f["path"], overlay) for f in doc["paths"][0]["findings"]
             if f["action"] == "would-fix"}
    assert files <= wrong  # every regular file, lower and upper layer alike
    assert doc["totals"]["skipped"].get("mount", 0) == 0

    r = _envctl("heal", *group)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in files:  # lower-layer files were copied up and fixed there: fine
        st = os.lstat(overlay / f)
        assert st.st_gid == accounts.shared_gid and st.st_uid == accounts.alice.uid, f
    assert os.lstat(overlay / "ltool").st_mode & 0o7777 == 0o770

    r = _envctl("check", *group)
    assert r.returncode == 0 and ", 0 wrong, skipped: none" in r.stdout, r.stdout
    assert find_violations(overlay, accounts.shared_gid) == []


def test_an_entry_on_another_mount_makes_check_incomplete(scratch: Path,
                                                          accounts: Accounts) -> None:
    """A bind mount inside a compliant root: not entered, so not audited. ``check`` exits 74
    (incomplete) and says so, instead of 0 (clean)."""
    root = scratch / "root"
    (root / "mnt").mkdir(parents=True)
    other = scratch / "other"
    other.mkdir()
    (other / "secret").write_text("x")
    os.chmod(other / "secret", 0o600)
    for p in (root, root / "mnt"):
        os.chown(p, accounts.alice.uid, accounts.shared_gid)
        os.chmod(p, 0o2770)
    group = ["--group", accounts.shared_group, str(root)]
    assert _envctl("check", *group).returncode == 0  # compliant before the mount
    subprocess.run(["mount", "--bind", str(other), str(root / "mnt")], check=True)
    try:
        r = _envctl("check", *group)
        rj = _envctl("check", "--json", *group)
        rv = _envctl("check", "-v", *group)
        rh = _envctl("heal", *group)
    finally:
        subprocess.run(["umount", str(root / "mnt")], check=True)
    assert r.returncode == 74, r.stdout
    assert "0 wrong, skipped: mount 1" in r.stdout
    assert "INCOMPLETE: 1 entries on another mount not audited" in r.stdout
    doc = json.loads(rj.stdout)
    assert rj.returncode == 74 and doc["exit_code"] == 74 and doc["ok"] is False
    assert doc["totals"]["skipped"] == {"mount": 1}
    assert [(f["path"], f["reason"]) for f in doc["paths"][0]["findings"]] == [
        (str(root / "mnt"), "mount")]
    assert f"{root / 'mnt'}: skipped (mount)" in rv.stdout
    assert rh.returncode == 74 and "not healed" in rh.stdout
    assert os.lstat(other / "secret").st_mode & 0o777 == 0o600  # never entered
