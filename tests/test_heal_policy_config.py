"""The policy's rules and the config loader's refusals, without touching any tree."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from envctl_shared import config
from envctl_shared.errors import ConfigError
from envctl_shared.policy import Kind, Rules, Verdict, wanted_mode

from .helpers import VENV_BIN

D, F = stat.S_IFDIR, stat.S_IFREG


@pytest.mark.parametrize("kind,mode,others,want", [
    (Kind.DIR, 0o700, "keep", 0o2770),
    (Kind.DIR, 0o755, "keep", 0o2775),
    (Kind.DIR, 0o1777, "keep", 0o3777),  # sticky is left alone
    (Kind.DIR, 0o700, "read", 0o2775),
    (Kind.DIR, 0o777, "none", 0o2770),
    (Kind.DIR, 0o757, "read", 0o2775),  # read means r-x for others, never w
    (Kind.FILE, 0o600, "keep", 0o660),
    (Kind.FILE, 0o700, "keep", 0o770),  # group x mirrors user x
    (Kind.FILE, 0o671, "keep", 0o661),  # group x removed when user has none
    (Kind.FILE, 0o4755, "keep", 0o4775),  # setuid kept, never added
    (Kind.FILE, 0o600, "read", 0o664),
    (Kind.FILE, 0o700, "read", 0o775),
    (Kind.FILE, 0o666, "none", 0o660),
])
def test_wanted_mode(kind: Kind, mode: int, others: str, want: int) -> None:
    assert wanted_mode(mode, kind, others) == want


def _root(others: str = "keep") -> config.RootConfig:
    return config.RootConfig(path=Path("/r"), group="g", gid=100, others=others)  # type: ignore[arg-type]


def judge(st_mode: int, st_gid: int, root: config.RootConfig, is_root: bool = False) -> Verdict:
    return Rules.of(root).verdict(st_mode, st_gid, is_root)


def test_judge_kinds() -> None:
    assert judge(D | 0o2770, 100, _root()).ok
    v = judge(F | 0o600, 5, _root())
    assert (v.kind, v.gid, v.mode) == (Kind.FILE, 100, 0o660)
    assert v.problems(5, F | 0o600) == ["group 5, want 100", "mode 0600, want 0660"]
    link = judge(stat.S_IFLNK | 0o777, 5, _root())
    assert (link.kind, link.gid, link.mode) == (Kind.SYMLINK, 100, None)
    fifo = judge(stat.S_IFIFO | 0o600, 5, _root())
    assert fifo.kind is Kind.SPECIAL and fifo.gid is None and fifo.mode is None  # never changed
    assert not fifo.ok  # but always reported


def test_the_requests_roots_own_rule_is_in_its_rules() -> None:
    """The requests root's directory is sticky (its own table); nothing below it is."""
    root = _root()._replace(holds_requests=True)
    assert judge(D | 0o2770, 100, root, is_root=True).mode == 0o3770
    assert judge(D | 0o2770, 100, root).ok
    assert judge(D | 0o2770, 100, _root(), is_root=True).ok


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "envctld.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("roots:\n  - path: /srv/x\n    group: root\n    exlude: []\n",
     "roots[0].exlude: unknown key"),
    ("roots:\n  - path: /srv/x\n", "roots[0].group: is required"),
    ("roots:\n  - path: srv/x\n    group: root\n", "roots[0].path: must be an absolute path"),
    ("roots:\n  - path: /srv/x\n    group: no-such-group-here\n", "no such group"),
    ("roots:\n  - {path: /srv/x, group: root}\n  - {path: /srv/x/y, group: root}\n",
     "roots[1].path: /srv/x/y overlaps roots[0]"),
    ("roots:\n  - {path: /srv/x, group: root, others: all}\n", "must be keep, none or read"),
    ("roots: []\n", "at least one root is required"),
    ("roots:\n  - {path: /srv/x, group: root}\nwatch: {mode: fast}\n", "watch.mode"),
    ("roots:\n  - {path: /srv/x, group: root}\nwatch: {poll_interval: -1}\n",
     "watch.poll_interval: must be greater than zero"),
    ("roots:\n  - {path: /srv/x, group: root}\nrequests: {backend: pip}\n", "unknown backend"),
    ("roots:\n  - {path: /srv/x, group: root}\nrequests: {build_user: nobody-here-x}\n",
     "no such user"),
    ("roots:\n  - {path: /srv/x, group: root\n", "not valid YAML at line"),
    ("roots:\n  - {path: /srv/x, group: root, exclude: ['../etc']}\n", "relative to the root"),
    ('<?xml version="1.0"?><config/>\n', "the file must be a mapping, not str (roots:,"),
])
def test_config_errors_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(p)
    assert str(p) in err.value.message and needle in err.value.message


def test_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    p = _write(tmp_path, "roots:\n  - {path: ./envs, group: 0}\nsocket: {path: ./run/s.sock, "
               "mode: '0600'}\nrequests: {state_dir: ./state}\n")
    c = config.load(p)
    assert c.roots[0].path == tmp_path / "envs" and c.roots[0].gid == 0
    assert c.roots[0].protected_owners == (0,)
    assert c.socket.path == tmp_path / "run/s.sock" and c.socket.mode == 0o600
    assert c.requests.state_dir == tmp_path / "state"
    assert c.requests_root.path == tmp_path / "envs"
    assert c.watch.mode == "auto" and c.walk.concurrency is None


def test_shipped_configs_load() -> None:
    repo = Path(__file__).resolve().parent.parent
    for name in ("dev.yaml", "envctld.yaml"):
        text = (repo / "config" / name).read_text()
        # The shipped files name site groups/users that need not exist on a test machine.
        text = text.replace("@GROUP@", "root").replace("group: users", "group: root")
        data = __import__("yaml").safe_load(text)
        data["requests"].pop("build_user", None)
        config.parse(data, source=name)


def test_cli_config_error_exit_code(tmp_path: Path) -> None:
    p = _write(tmp_path, "roots:\n  - {path: /srv/x, group: root, bogus: 1}\n")
    r = subprocess.run([str(VENV_BIN / "envctl"), "check", "--config", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 78
    assert r.stderr.startswith("envctl: error: ") and "Traceback" not in r.stderr
    assert "roots[0].bogus" in r.stderr
