"""``roots[].owners: members``: only the group's members' entries are changed.

The attack it closes: a member makes a drop box outside the root (``0777``), a non-member
writes a private tree into it, the member moves the box into the root — and with ``owners:
any`` (the default, for sites whose owners the daemon cannot look up) the healer shares the
non-member's files with the group. Here with a real daemon, real users and a real ``mv``.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml
from envctl_shared import config

from tests.conftest import Accounts
from tests.daemon_support import Envctld, write_config
from tests.helpers import VENV_BIN, as_user, wait_for
from tests.watch_support import alice_tmp, make_root

pytest_plugins = ("tests.fixtures_daemon",)


def _members_config(scratch: Path, root: Path, accounts: Accounts) -> Path:
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    data = yaml.safe_load(cfg.read_text())
    data["roots"][0]["owners"] = "members"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def test_members_are_read_from_the_group_database(scratch: Path, accounts: Accounts) -> None:
    root = make_root(scratch, accounts)
    loaded = config.load(_members_config(scratch, root, accounts)).roots[0]
    assert loaded.member_uids is not None
    assert {accounts.alice.uid, accounts.bob.uid, os.geteuid()} <= loaded.member_uids
    assert accounts.mallory.uid not in loaded.member_uids
    assert config.load(write_config(scratch, [(root, accounts.shared_group)],
                                    name="any.yaml")).roots[0].member_uids is None


def test_a_non_members_tree_moved_in_is_left_alone(scratch: Path, accounts: Accounts,
                                                   envctld: Callable[..., Envctld]) -> None:
    a, m = accounts.alice, accounts.mallory
    root = make_root(scratch, accounts)
    cfg = _members_config(scratch, root, accounts)
    envctld(cfg)
    drop = alice_tmp(scratch, accounts) / "drop"
    as_user(a.uid, a.gid, f"mkdir -m 777 {drop} && echo mine > {drop}/alice-file", umask=0o077)
    as_user(m.uid, m.gid, f"mkdir {drop}/priv && echo key > {drop}/priv/secret", umask=0o077)
    as_user(a.uid, a.gid, ["mv", str(drop), str(root / "drop")])
    moved = root / "drop"
    wait_for(lambda: os.stat(moved / "alice-file").st_gid == accounts.shared_gid, 10,
             what="alice's own file healed")
    priv, secret = os.stat(moved / "priv"), os.stat(moved / "priv/secret")
    assert (priv.st_gid, stat.S_IMODE(priv.st_mode)) == (m.gid, 0o700)
    assert (secret.st_gid, stat.S_IMODE(secret.st_mode)) == (m.gid, 0o600)
    assert as_user(a.uid, a.gid, ["cat", str(moved / "priv/secret")], init_groups=True,
                   check=False).returncode != 0
    # a one-shot heal keeps to the rule too, and check names what it left and why
    subprocess.run([str(VENV_BIN / "envctl"), "heal", "--config", str(cfg)],
                   capture_output=True, text=True, timeout=60)
    assert stat.S_IMODE(os.stat(moved / "priv/secret").st_mode) == 0o600
    res = subprocess.run([str(VENV_BIN / "envctl"), "check", "-v", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert "foreign 2" in res.stdout and "drop/priv/secret" in res.stdout, res.stdout


def test_the_fast_path_finds_an_owner_among_many_members(tmp_path: Path,
                                                         accounts: Accounts) -> None:
    """C looks owners up by binary search: an owner anywhere in a long sorted list is a
    member, a uid between two members is not."""
    from envctl_shared.heal.fsops import Engine, MountRef, stat_at
    from envctl_shared.policy import Rules

    for name, owner in (("mine", accounts.alice.uid), ("theirs", accounts.mallory.uid)):
        (tmp_path / name).write_text("x")
        os.chown(tmp_path / name, owner, owner)
        os.chmod(tmp_path / name, 0o600)
    alice = accounts.alice.uid  # in the middle of 1,000 others; mallory between two of them
    members = sorted({*range(alice - 999, alice + 1000, 2), alice} - {accounts.mallory.uid},
                     reverse=True)  # the engine sorts them itself
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = stat_at(fd)
        engine = Engine(Rules(gid=accounts.shared_gid, members=tuple(members)))
        found = engine.scan(fd, ["mine", "theirs"], MountRef.of(st), fix=False)
    finally:
        os.close(fd)
    assert [f[1] for f in found.fixed] == ["mine"]  # would be fixed
    assert [(s[1], s[2]) for s in found.skipped] == [("theirs", "foreign")]
