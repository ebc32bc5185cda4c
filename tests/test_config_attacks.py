"""Configurations that passed validation and then made the daemon or the CLI misbehave.

Found by attacking the loader: two roots overlapping through a symlink (each root's watcher
heals what the other's reports: the daemon fights itself forever), ``path: "//"`` (normpath
keeps it, so the whole filesystem became a root), ``group: -1`` (chown(-1) changes nothing:
heal "fixes" the same entries on every pass) and gids beyond 32 bits (they wrap: 2**32 and
2**40 are gid 0, so files became group root while the report named another group). Each is
now an error naming the file, the key and the problem; a bare numeric gid that the group
database does not know is still accepted (NFS sites share gids, not names).
"""

from __future__ import annotations

import grp
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from envctl_shared import config
from envctl_shared.errors import ConfigError

from tests.conftest import Accounts
from tests.helpers import VENV_BIN

ENVCTL = str(VENV_BIN / "envctl")


def _load(tmp: Path, data: dict[str, object]) -> config.Config:
    path = tmp / "envctld.yaml"
    path.write_text(yaml.safe_dump({"requests": {"enabled": False}, **data}))
    return config.load(path)


def _refused(tmp: Path, data: dict[str, object], key: str, *needles: str) -> str:
    """The loader's message for ``data``: it names the file and ``key``, and says ``needles``."""
    with pytest.raises(ConfigError) as err:
        _load(tmp, data)
    message = err.value.message
    assert message.startswith(f"{tmp / 'envctld.yaml'}: {key}: "), message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("order", ["real first", "link first"])
def test_roots_overlapping_through_a_symlink(scratch: Path, order: str) -> None:
    (scratch / "r" / "sub").mkdir(parents=True)
    (scratch / "lnk").symlink_to("r")
    roots = [{"path": str(scratch / "r"), "group": 0},
             {"path": str(scratch / "lnk" / "sub"), "group": 0}]
    if order == "link first":
        roots.reverse()
    i = roots.index(next(r for r in roots if "lnk" in str(r["path"])))
    message = _refused(scratch, {"roots": roots}, f"roots[{i}].path",
                       f"{scratch / 'lnk'} is a symlink", f"real directory, {scratch}/r/sub")
    assert str(scratch / "lnk" / "sub") in message


def test_a_root_through_a_symlink_alone_is_refused(scratch: Path) -> None:
    """Even with nothing to overlap: the link's owner would choose where the root is; the root
    not existing yet does not matter (the components that exist are looked at)."""
    (scratch / "real").mkdir()
    (scratch / "lnk").symlink_to(scratch / "real")
    for path in (scratch / "lnk", scratch / "lnk" / "envs", scratch / "lnk" / "not" / "yet"):
        _refused(scratch, {"roots": [{"path": str(path), "group": 0}]}, "roots[0].path",
                 "is a symlink")
    # the real directory, existing or not, is fine
    conf = _load(scratch, {"roots": [{"path": str(scratch / "real" / "envs"), "group": 0}]})
    assert conf.roots[0].path == scratch / "real" / "envs"


@pytest.mark.parametrize("path", ["//", "///", "/./", "//.//", "/.."])
def test_slash_in_disguise_is_refused(scratch: Path, path: str) -> None:
    message = _refused(scratch, {"roots": [{"path": path, "group": 0}]}, "roots[0].path")
    assert "must not be '/'" in message or "must not contain '..'" in message


def test_leading_double_slash_is_normalised(scratch: Path) -> None:
    (scratch / "envs").mkdir()
    conf = _load(scratch, {"roots": [{"path": "/" + str(scratch / "envs"), "group": 0}]})
    assert str(conf.roots[0].path) == str(scratch / "envs")


@pytest.mark.parametrize("group", [-1, 4294967295, 4294967296, 1099511627776, "4294967296",
                                   "1099511627776"])
def test_gids_that_chown_would_ignore_or_wrap_are_refused(scratch: Path,
                                                          group: int | str) -> None:
    _refused(scratch, {"roots": [{"path": str(scratch / "envs"), "group": group}]},
             "roots[0].group", "out of range", "0 to 4294967294")
    _refused(scratch, {"roots": [{"path": str(scratch / "envs"), "group": 0}],
                       "socket": {"group": group}}, "socket.group", "out of range")


def test_a_bare_gid_unknown_to_the_group_database_is_accepted(scratch: Path) -> None:
    gid = next(g for g in range(3_999_000, 4_000_000) if not _has_entry(g))
    for group in (gid, str(gid), 4294967294):
        conf = _load(scratch, {"roots": [{"path": str(scratch / "envs"), "group": group}]})
        assert conf.roots[0].gid == int(group)
    # a name is another matter
    _refused(scratch, {"roots": [{"path": str(scratch / "envs"), "group": "no-such-grp-x"}]},
             "roots[0].group", "no such group 'no-such-grp-x'")


def _has_entry(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


def test_heal_group_beyond_32_bits_does_not_wrap_to_root(scratch: Path,
                                                         accounts: Accounts) -> None:
    """``envctl heal --group 4294967296`` made alice's files group root (the gid wrapped to
    0) while saying it had set group 4294967296; now it is refused and nothing changes."""
    tree = scratch / "tree"
    tree.mkdir()
    (tree / "f").write_text("x\n")
    for p in (tree, tree / "f"):
        os.chown(p, accounts.alice.uid, accounts.shared_gid)
    for group in ("4294967296", "1099511627776"):
        res = subprocess.run([ENVCTL, "heal", str(tree), "--group", group],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 64, (res.stdout, res.stderr)  # the flag's, as for init
        assert "--group: numeric gid" in res.stderr and "out of range" in res.stderr
        assert "Traceback" not in res.stderr
        assert os.stat(tree / "f").st_gid == accounts.shared_gid
        assert os.stat(tree).st_gid == accounts.shared_gid


def test_init_group_beyond_32_bits_is_a_usage_error(scratch: Path) -> None:
    res = subprocess.run([ENVCTL, "init", str(scratch / "envs"), "--group", "4294967296",
                          "--condarc", str(scratch / "rc"), "--kernels-dir",
                          str(scratch / "k")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 64, res.stderr
    assert "out of range" in res.stderr and "internal error" not in res.stderr
    assert os.listdir(scratch) == []
