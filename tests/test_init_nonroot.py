"""``envctl init`` run by a user, not root: what the kernel would refuse is said first.

Found by attacking init as a user: with a group she is not in, "internal error: PermissionError
... Operation not permitted" (exit 70) and a private 0700 root left behind; with the default
kernels directory (``ROOT/../../share/jupyter/kernels``, where she may not write), the same
internal error after the root was created and her ``~/.condarc`` changed. ``--dry-run``
predicted neither. Now every step is checked before any is done: a refusal is exit 77 with the
fix, nothing is left half-done, and the dry run says the same. What she may do, she can.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import yaml

from tests.conftest import Accounts, User
from tests.helpers import VENV_BIN, as_user

ENVCTL = str(VENV_BIN / "envctl")


def init(user: User, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``envctl init ARGS`` as ``user`` (her groups from /etc/group, as a login has them)."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home)}
    return as_user(user.uid, user.gid, [ENVCTL, "init", *args], umask=0o022, check=False,
                   init_groups=True, env=env, timeout=60)


def _home(scratch: Path, user: User) -> Path:
    home = scratch / user.name
    home.mkdir()
    os.chown(home, user.uid, user.gid)
    (home / ".condarc").write_text("channels: [conda-forge]\n")
    os.chown(home / ".condarc", user.uid, user.gid)
    return home


def _refused(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 77, (res.stdout, res.stderr)
    assert res.stderr.startswith("envctl: error: "), res.stderr
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr
    assert "\n  hint: " in res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    assert res.stdout == ""  # not one step reported done


def test_a_group_she_is_not_in(scratch: Path, accounts: Accounts) -> None:
    a = accounts.alice
    home = _home(scratch, a)
    rc_before = (home / ".condarc").read_bytes()
    args = (str(home / "envs"), "--group", accounts.mallory.name, "--user",
            "--kernels-dir", str(home / "kernels"))
    for extra in ((), ("--dry-run",)):
        res = init(a, home, *args, *extra)
        _refused(res, f"cannot give {home / 'envs'} to group {accounts.mallory.name}",
                 "usermod -aG", "sudo envctl init")
        assert sorted(os.listdir(home)) == [".condarc"]  # no 0700 root left behind
        assert (home / ".condarc").read_bytes() == rc_before


def test_the_default_kernels_directory_where_she_may_not_write(scratch: Path,
                                                               accounts: Accounts) -> None:
    """ROOT/../../share/jupyter/kernels is under the root-owned scratch directory: refused
    before the root exists and before ~/.condarc changes."""
    a = accounts.alice
    home = _home(scratch, a)
    rc_before = (home / ".condarc").read_bytes()
    args = (str(home / "envs"), "--group", accounts.shared_group, "--user")
    for extra in (("--dry-run",), ()):
        res = init(a, home, *args, *extra)
        _refused(res, f"cannot create {scratch / 'share' / 'jupyter' / 'kernels'}",
                 f"may not write in {scratch}", "--kernels-dir")
        assert sorted(os.listdir(home)) == [".condarc"]
        assert (home / ".condarc").read_bytes() == rc_before
        assert not (scratch / "share").exists()


def test_the_system_condarc_needs_root(scratch: Path, accounts: Accounts) -> None:
    a = accounts.alice
    home = _home(scratch, a)
    res = init(a, home, str(home / "envs"), "--group", accounts.shared_group,
               "--kernels-dir", str(home / "kernels"))
    _refused(res, "/etc/conda", "--user")
    assert sorted(os.listdir(home)) == [".condarc"]


def test_a_root_someone_else_owns(scratch: Path, accounts: Accounts) -> None:
    a, b = accounts.alice, accounts.bob
    home = _home(scratch, a)
    root = scratch / "bobs-envs"
    root.mkdir(mode=0o755)
    os.chown(root, b.uid, accounts.shared_gid)
    res = init(a, home, str(root), "--group", accounts.shared_group, "--user",
               "--kernels-dir", str(home / "kernels"))
    _refused(res, f"{root} belongs to {b.name}", f"ask {b.name}")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    assert sorted(os.listdir(home)) == [".condarc"]


def test_what_she_may_do_she_does(scratch: Path, accounts: Accounts) -> None:
    """Her own directory, a group she is in: the dry run lists the steps in plain words, the
    real run does them, a second run changes nothing."""
    a = accounts.alice
    home = _home(scratch, a)
    root, kernels = home / "envs", home / "kernels"
    args = (str(root), "--group", accounts.shared_group, "--user", "--kernels-dir", str(kernels))
    res = init(a, home, *args, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:3] == [
        f"would create {root} (group {accounts.shared_group}, mode 3775)",
        f"would change envs_dirs in {home / '.condarc'}: append {root}",
        f"would create kernels directory {kernels}"]
    assert sorted(os.listdir(home)) == [".condarc"]
    res = init(a, home, *args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1] == f"changed      envs_dirs in {home / '.condarc'}: " \
        f"appended {root}"
    st = os.stat(root)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == \
        (a.uid, accounts.shared_gid, 0o3775)
    assert yaml.safe_load((home / ".condarc").read_text()) == \
        {"channels": ["conda-forge"], "envs_dirs": [str(root)]}
    assert kernels.is_dir()
    res = init(a, home, *args)
    assert res.returncode == 0, res.stderr
    assert [line.split()[0] for line in res.stdout.splitlines()[:3]] == ["unchanged"] * 3
