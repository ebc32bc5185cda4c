"""``env layer`` as a hostile neighbour would set it up: a layer runs from its directory at
every start (its ``bin/python``, its ``site-packages``, its kernel), so a layer made in a
directory another user owns or may rename entries in is that user's to swap. Real users, a
real hand-made shared env (a stdlib venv), the CLI as the user; no daemon (the path form)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Accounts, User
from tests.helpers import VENV_BIN


def _layer(user: User, home: Path, shared: Path, prefix: Path) -> subprocess.CompletedProcess:
    env = ["PATH=/usr/bin:/bin", f"HOME={home}", "LANG=C.UTF-8"]
    return subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                           "--init-groups", "env", "-i", *env, str(VENV_BIN / "envctl"), "env",
                           "layer", str(shared), "--prefix", str(prefix), "--no-kernel"],
                          capture_output=True, text=True, timeout=120, cwd="/", check=False)


@pytest.fixture
def shared(scratch: Path) -> Path:
    env = scratch / "root" / "shared"
    env.parent.mkdir()
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(env)], check=True)
    for dirpath, _dirs, _files in os.walk(scratch):
        os.chmod(dirpath, 0o755)
    return env


def _home(scratch: Path, user: User) -> Path:
    home = scratch / f"home-{user.name}"
    home.mkdir(mode=0o700)
    os.chown(home, user.uid, user.gid)
    return home


def _trap(scratch: Path, owner: User, name: str, mode: int = 0o777) -> Path:
    """A directory of ``owner``'s in a sticky, world-writable place (as /tmp)."""
    tmp = scratch / "tmp"
    tmp.mkdir(mode=0o1777, exist_ok=True)
    os.chmod(tmp, 0o1777)
    path = tmp / name
    path.mkdir()
    os.chown(path, owner.uid, owner.gid)
    os.chmod(path, mode)
    return path


def test_a_layer_is_never_made_where_another_user_can_swap_it(
        scratch: Path, shared: Path, accounts: Accounts) -> None:
    bob, mallory = accounts.bob, accounts.alice
    home = _home(scratch, bob)
    # an empty directory mallory made ahead of bob, at the path bob will give: refused
    trap = _trap(scratch, mallory, "layer")
    res = _layer(bob, home, shared, trap)
    assert res.returncode != 0 and "owned by uid" in res.stderr, res.stderr + res.stdout
    assert os.listdir(trap) == []
    # her symlink at that path, to her directory: refused, nothing made through it
    target = _trap(scratch, mallory, "target")
    link = trap.parent / "link"
    os.symlink(target, link)
    os.lchown(link, mallory.uid, mallory.gid)
    res = _layer(bob, home, shared, link)
    assert res.returncode != 0 and "is a symlink" in res.stderr, res.stderr + res.stdout
    assert os.listdir(target) == []
    # a new directory inside one of hers (she could rename bob's layer away and plant hers)
    res = _layer(bob, home, shared, trap / "inner")
    assert res.returncode != 0 and "could swap your layer" in res.stderr, res.stderr
    assert os.listdir(trap) == []
    # a directory of bob's that a group of others may write (a shared project dir): refused;
    # his own group's (a user private group, umask 002): fine
    shared_dir = home / "project"
    shared_dir.mkdir()
    os.chown(shared_dir, bob.uid, accounts.shared_gid)
    os.chmod(shared_dir, 0o2775)
    res = _layer(bob, home, shared, shared_dir / "layer")
    assert res.returncode != 0 and "writable by others" in res.stderr, res.stderr
    os.chown(shared_dir, bob.uid, bob.gid)
    assert _layer(bob, home, shared, shared_dir / "layer").returncode == 0
    # bob's own directory in the sticky /tmp-like place, and his home: made
    assert _layer(bob, home, shared, trap.parent / "bobs").returncode == 0
    res = _layer(bob, home, shared, home / "layers" / "mine")
    assert res.returncode == 0, res.stderr
    assert (home / "layers" / "mine" / "bin" / "python").is_symlink()
