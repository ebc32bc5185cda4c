"""``envctl init``: a fresh root set up in one go, a second run that changes nothing, a dry run
that touches nothing, real ``.condarc`` files (the user's through HOME, an explicit one) kept
as they were apart from the one entry, and a root the daemon's own loader and ``doctor`` accept.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import yaml
from envctl_shared import config as cfgmod

from tests.conftest import Accounts
from tests.daemon_support import Envctld
from tests.helpers import VENV_BIN

ENVCTL = str(VENV_BIN / "envctl")


def init(*args: str, home: Path | None = None,
         build_user: str = "nobody") -> subprocess.CompletedProcess[str]:
    """``envctl init ARGS`` as root; ``build_user``: an account that exists (init as root
    creates a missing one, which a test must then remove)."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home or "/nonexistent")}
    return subprocess.run([ENVCTL, "init", *args, "--build-user", build_user],
                          capture_output=True, text=True, env=env, timeout=60)


def _state(*paths: Path) -> dict[str, tuple[int, int, int, float]]:
    """What a second run must not change: mode, group, size and mtime of each path."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[str(p)] = (st.st_mode, st.st_gid, st.st_size, st.st_mtime)
    return out


def test_fresh_then_again_then_doctor(scratch: Path, accounts: Accounts) -> None:
    root = scratch / "shared" / ".conda" / "envs"
    rc = scratch / "condarc"
    cfg = scratch / "etc" / "envctld.yaml"
    args = (str(root), "--group", accounts.shared_group, "--condarc", str(rc),
            "--write-config", str(cfg), "--parents")
    res = init(*args)
    assert res.returncode == 0, res.stderr
    st = os.stat(root)
    assert st.st_gid == accounts.shared_gid
    assert stat.S_IMODE(st.st_mode) == 0o3775  # SGID and sticky
    assert yaml.safe_load(rc.read_text()) == {"envs_dirs": [str(root)]}
    kernels = scratch / "shared" / "share" / "jupyter" / "kernels"
    assert kernels.is_dir()
    conf = cfgmod.load(cfg)  # the daemon's own strict loader accepts it
    assert conf.roots[0].path == root and conf.roots[0].gid == accounts.shared_gid
    assert conf.kernels.dir == kernels
    steps, after = res.stdout.split("\n\n")
    assert [line.split()[0] for line in steps.splitlines()] == \
        ["created", "unchanged", "created", "changed", "created"]
    # what to do next, with what was written: run it, the kernels' path, doctor
    assert f"'envctld --config {cfg}'" in after and f"JUPYTER_PATH={kernels.parent}" in after
    assert after.strip().endswith(f"'envctl doctor' as a member of {accounts.shared_group}")
    before = _state(root, rc, cfg, kernels)
    res = init(*args, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["changed"] is False
    assert {s["outcome"] for s in doc["steps"]} == {"unchanged"}
    assert _state(root, rc, cfg, kernels) == before
    # what init set up, doctor calls good (as a member of the group, with that .condarc)
    res = subprocess.run(
        ["setpriv", f"--reuid={accounts.alice.uid}", f"--regid={accounts.alice.gid}",
         "--init-groups", "env", "-i", "PATH=/usr/bin:/bin", "HOME=/", f"CONDARC={rc}",
         "sh", "-c", "umask 002; exec \"$@\"", "sh", ENVCTL, "doctor", "--json", "--config",
         str(cfg), "--socket", str(scratch / "none.sock")],
        capture_output=True, text=True, timeout=60)
    checks = {c["check"]: c for c in json.loads(res.stdout)["checks"]}
    for name in ("root", "group", "umask", "root mode", "envs_dirs"):
        assert checks[name]["ok"], checks[name]


def test_dry_run_changes_nothing(scratch: Path, accounts: Accounts) -> None:
    root = scratch / "envs"
    rc = scratch / "condarc"
    res = init(str(root), "--group", accounts.shared_group, "--condarc", str(rc),
               "--kernels-dir", str(scratch / "kernels"), "--mode", "2770", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(scratch)) == []
    lines = res.stdout.splitlines()
    assert lines[0] == f"would create {root} (group {accounts.shared_group}, mode 3770)"
    assert lines[1] == "unchanged    build account nobody"
    assert lines[2].startswith("would change envs_dirs in")
    assert lines[3].startswith("would create kernels directory")
    assert "others: none" in res.stdout  # the printed daemon configuration


def test_existing_root_and_condarc_are_fixed_not_replaced(scratch: Path,
                                                          accounts: Accounts) -> None:
    root = scratch / "envs"
    root.mkdir(mode=0o755)  # wrong group, no SGID
    home = scratch / "home"
    home.mkdir()
    user_rc = home / ".condarc"
    user_rc.write_text("# my settings\nchannels:\n  - conda-forge\n")
    res = init(str(root), "--group", accounts.shared_group, "--user",
               "--kernels-dir", str(scratch / "k"), home=home)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("changed ")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o3775  # SGID and sticky
    text = user_rc.read_text()
    assert text.startswith("# my settings\n")  # appended, comments kept
    assert yaml.safe_load(text) == {"channels": ["conda-forge"], "envs_dirs": [str(root)]}
    # a .condarc that lists other envs_dirs (and the root with a trailing slash): no duplicate
    user_rc.write_text(f"envs_dirs: [/other, {root}/]\n")
    res = init(str(root), "--group", accounts.shared_group, "--user",
               "--kernels-dir", str(scratch / "k"), home=home)
    assert "unchanged    envs_dirs" in res.stdout
    user_rc.write_text("envs_dirs: [/other]\n")
    init(str(root), "--group", accounts.shared_group, "--user", "--kernels-dir",
         str(scratch / "k"), home=home)
    assert yaml.safe_load(user_rc.read_text()) == {"envs_dirs": ["/other", str(root)]}


def test_refusals_say_what_to_do(scratch: Path, accounts: Accounts) -> None:
    res = init(str(scratch / "not-mounted" / "envs"), "--group", accounts.shared_group,
               "--condarc", str(scratch / "rc"))
    assert res.returncode == 74 and "findmnt" in res.stderr and "--parents" in res.stderr
    assert not (scratch / "not-mounted").exists()
    res = init(str(scratch / "envs"), "--group", "no-such-group-xyz")
    assert res.returncode == 64 and "groupadd" in res.stderr
    cfg = scratch / "envctld.yaml"
    cfg.write_text("roots: []\n")
    res = init(str(scratch / "envs"), "--group", accounts.shared_group, "--write-config",
               str(cfg), "--condarc", str(scratch / "rc"), "--kernels-dir", str(scratch / "k"))
    assert res.returncode == 74 and "other settings" in res.stderr
    assert cfg.read_text() == "roots: []\n"


def test_the_written_config_starts(scratch: Path, accounts: Accounts) -> None:
    """What ``init --write-config`` writes, as written (the socket in a directory that does
    not exist yet, as /run/envctl outside systemd; the state dir moved to scratch, so that tests
    can run side by side): the build account is made, and the daemon starts on it."""
    builder = f"envctl-t{os.getpid()}b"
    root = scratch / "shared" / ".conda" / "envs"
    cfg = scratch / "etc" / "envctld.yaml"
    try:
        res = init(str(root), "--group", accounts.shared_group, "--condarc",
                   str(scratch / "rc"), "--write-config", str(cfg), "--parents",
                   build_user=builder)
        assert res.returncode == 0, res.stderr
        assert f"created      build account {builder}" in res.stdout.splitlines()
        data = yaml.safe_load(cfg.read_text())
        assert data["requests"]["build_user"] == builder
        run = scratch / "run"
        data["socket"]["path"] = str(run / "envctld.sock")
        data["requests"]["state_dir"] = str(scratch / "state")
        cfg.write_text(yaml.safe_dump(data))
        daemon = Envctld(cfg, scratch).start()
        try:
            st = os.stat(run)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)  # RuntimeDirectory=
            res = subprocess.run([ENVCTL, "status", "--json", "--socket",
                                  str(run / "envctld.sock")], capture_output=True, text=True,
                                 timeout=30)
            assert res.returncode == 0 and json.loads(res.stdout)["ready"] is True, res.stderr
            daemon.stop()
        finally:
            daemon.cleanup()
    finally:
        subprocess.run(["userdel", "-f", builder], capture_output=True)
        subprocess.run(["groupdel", builder], capture_output=True)
