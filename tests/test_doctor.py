"""``envctl doctor``: every check driven both ways, as real users, against real trees, a real
daemon (up, absent, stopped with SIGSTOP) and real ``.condarc`` files found through HOME and
CONDARC as conda would find them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Accounts, User
from tests.daemon_support import Envctld, write_config
from tests.helpers import VENV_BIN

pytest_plugins = ("tests.fixtures_daemon",)
ENVCTL = str(VENV_BIN / "envctl")


def doctor(user: User, *args: str, umask: int = 0o002, groups: bool = True,
           home: Path | None = None,
           env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """``envctl doctor --json ARGS`` as ``user`` with ``umask``; (exit code, checks by name —
    the last of each name, with every one under ``all``)."""
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(home or "/nonexistent"), "LANG": "C.UTF-8",
               **(env or {})}
    argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
            "--init-groups" if groups else "--clear-groups", "env", "-i",
            *(f"{k}={v}" for k, v in environ.items()),
            "sh", "-c", f'umask {umask:03o}; exec "$@"', "sh", ENVCTL, "doctor", "--json", *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
    assert res.stdout, res.stderr
    doc = json.loads(res.stdout)
    assert doc["exit_code"] == res.returncode
    checks: dict[str, Any] = {c["check"]: c for c in doc["checks"]}
    checks["all"] = doc["checks"]
    return res.returncode, checks


@pytest.fixture
def root(scratch: Path, accounts: Accounts) -> Path:
    """A correct shared root: the shared group, 2775."""
    path = scratch / "envs"
    path.mkdir()
    os.chown(path, 0, accounts.shared_gid)
    os.chmod(path, 0o2775)
    return path


def _no_daemon(scratch: Path) -> str:
    return str(scratch / "no-daemon.sock")


def test_all_good_with_a_daemon_whose_roots_it_learns(
        root: Path, scratch: Path, accounts: Accounts,
        envctld: Callable[..., Envctld]) -> None:
    home = scratch / "home-alice"
    home.mkdir()
    (home / ".condarc").write_text(f"channels: [conda-forge]\nenvs_dirs:\n  - {root}\n")
    os.chmod(home, 0o755)
    cfg = write_config(scratch, [(root, accounts.shared_group)],
                       extra={"socket": {"path": str(scratch / "envctld.sock"), "mode": "0666"}})
    envctld(cfg)
    code, c = doctor(accounts.alice, "--socket", str(scratch / "envctld.sock"), home=home)
    assert code == 0, c["all"]
    assert all(x["ok"] for x in c["all"])
    assert c["root"]["subject"] == str(root)  # learned from the daemon: no --root given
    assert "up and ready" in c["daemon"]["summary"]
    assert str(home / ".condarc") in c["envs_dirs"]["summary"]
    # the daemon heals what a umask 077 leaves: still fine, and said so
    code, c = doctor(accounts.alice, "--socket", str(scratch / "envctld.sock"), home=home,
                     umask=0o077)
    assert code == 0 and "heals it" in c["umask"]["summary"]


def test_a_socket_that_keeps_you_out_is_no_daemon_down(
        root: Path, scratch: Path, accounts: Accounts,
        envctld: Callable[..., Envctld]) -> None:
    """The daemon runs and heals; its socket lets in its group only: the fix says whose group,
    not "until it runs nothing heals what you write"."""
    sock = scratch / "envctld.sock"
    cfg = write_config(scratch, [(root, accounts.shared_group)], extra={"socket": {
        "path": str(sock), "mode": "0660", "group": accounts.shared_group}})
    envctld(cfg)
    code, c = doctor(accounts.mallory, "--socket", str(sock), "--root", str(root))
    assert code == 1 and not c["daemon"]["ok"]
    assert "permission denied" in c["daemon"]["summary"]
    assert f"group {accounts.shared_group}" in c["daemon"]["fix"]
    assert "until it runs" not in c["daemon"]["fix"], c["daemon"]


def test_no_daemon_and_no_root(scratch: Path, accounts: Accounts) -> None:
    code, c = doctor(accounts.alice, "--socket", _no_daemon(scratch))
    assert code == 1
    assert not c["daemon"]["ok"] and "not running" in c["daemon"]["summary"]
    assert "systemctl start envctld" in c["daemon"]["fix"] and "until it runs" in c["daemon"]["fix"]
    assert not c["roots"]["ok"] and "--root" in c["roots"]["fix"]


def test_a_stopped_daemon_is_reported(root: Path, scratch: Path, accounts: Accounts,
                                      envctld: Callable[..., Envctld]) -> None:
    """A daemon that holds its socket but answers nothing (here SIGSTOPped: what a wedged one
    looks like from outside) is a problem, not a hang."""
    cfg = write_config(scratch, [(root, accounts.shared_group)],
                       extra={"socket": {"path": str(scratch / "envctld.sock"), "mode": "0666"}})
    d = envctld(cfg)
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        code, c = doctor(accounts.alice, "--socket", str(scratch / "envctld.sock"),
                         "--timeout", "1", "--root", str(root))
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert code == 1 and not c["daemon"]["ok"]
    assert "did not answer" in c["daemon"]["summary"]
    # and the --stale limit: a daemon with any progress age beyond it is called wedged
    code, c = doctor(accounts.alice, "--socket", str(scratch / "envctld.sock"),
                     "--stale", "-1", "--root", str(root))
    assert not c["daemon"]["ok"] and "wedged" in c["daemon"]["summary"]


def test_root_is_told_what_applies_to_root(root: Path, scratch: Path) -> None:
    """An admin's doctor as root: not told to add root to the group (the kernel lets root in),
    nor that the daemon heals what root's umask leaves (root's files are protected)."""
    code, c = doctor(User("root", 0, 0), "--socket", _no_daemon(scratch), "--root", str(root),
                     umask=0o022)
    assert c["group"]["ok"] and c["group"]["fix"] is None, c["group"]
    assert "you are root" in c["group"]["summary"]
    assert c["umask"]["ok"] and "no daemon heals root's files" in c["umask"]["summary"]


def test_group_membership_three_ways(root: Path, scratch: Path, accounts: Accounts) -> None:
    sock = ("--socket", _no_daemon(scratch), "--root", str(root))
    _, c = doctor(accounts.alice, *sock)
    assert c["group"]["ok"], c["group"]
    _, c = doctor(accounts.mallory, *sock)
    assert not c["group"]["ok"]
    assert f"not in group {accounts.shared_group}" in c["group"]["fix"]
    assert "usermod -aG" in c["group"]["fix"]
    _, c = doctor(accounts.alice, *sock, groups=False)  # in /etc/group, not in this session
    assert not c["group"]["ok"] and "log in again" in c["group"]["fix"]
    assert "restart your server" in c["group"]["fix"]


def test_umask_without_a_daemon(root: Path, scratch: Path, accounts: Accounts) -> None:
    sock = ("--socket", _no_daemon(scratch), "--root", str(root))
    _, c = doctor(accounts.alice, *sock, umask=0o002)
    assert c["umask"]["ok"] and "0002" in c["umask"]["summary"]
    _, c = doctor(accounts.alice, *sock, umask=0o077)
    assert not c["umask"]["ok"] and "removes group rwx" in c["umask"]["summary"]
    assert "umask 002" in c["umask"]["fix"]


def test_root_mode_and_sgid(root: Path, scratch: Path, accounts: Accounts) -> None:
    sock = ("--socket", _no_daemon(scratch), "--root", str(root))
    _, c = doctor(accounts.alice, *sock)
    assert c["root mode"]["ok"]
    os.chmod(root, 0o0775)
    _, c = doctor(accounts.alice, *sock)
    assert not c["root mode"]["ok"] and "no SGID" in c["root mode"]["summary"]
    assert "chmod 2775" in c["root mode"]["fix"]


def test_a_world_writable_root_is_a_problem(root: Path, scratch: Path,
                                            accounts: Accounts) -> None:
    """3777 (what ``chmod 1777`` becomes once healed): group, SGID and sticky are right, and
    still anyone on the host may add entries to the shared root."""
    os.chmod(root, 0o3777)
    _, c = doctor(accounts.alice, "--socket", _no_daemon(scratch), "--root", str(root))
    mode = c["root mode"]
    assert not mode["ok"] and "mode 3777" in mode["summary"], mode
    assert "writable by everyone" in mode["summary"]
    assert "chmod 3775" in mode["fix"] and "others: keep" in mode["fix"]


def test_people_are_named_not_printed_as_records() -> None:
    from envctl_shared.accounts import person

    assert person({"uid": 1001, "name": "alice", "hub_user": None,
                   "claimed_user": "bob"}) == "alice (uid 1001)"
    assert person({"uid": 1000, "name": "jovyan", "hub_user": "ann",
                   "claimed_user": None}) == "hub user ann"
    assert person({"uid": 0}) == "root (uid 0)"
    assert person(None) == "unknown"


@pytest.mark.serial  # a machine-wide sysctl
def test_hardlink_protection(root: Path, scratch: Path, accounts: Accounts) -> None:
    """fs.protected_hardlinks=0 lets a member hard-link another user's private file into the
    root, where the healer shares it: doctor says so, with the sysctl that fixes it. Set for
    real, machine-wide: only for the one doctor run, always restored."""
    sock = ("--socket", _no_daemon(scratch), "--root", str(root))
    sysctl = Path("/proc/sys/fs/protected_hardlinks")
    old = sysctl.read_text()
    sysctl.write_text("0")
    try:
        code, c = doctor(accounts.alice, *sock)
    finally:
        sysctl.write_text(old)
    assert code == 1 and not c["hardlinks"]["ok"]
    assert "another user's private file" in c["hardlinks"]["summary"]
    assert "sysctl fs.protected_hardlinks=1" in c["hardlinks"]["fix"]
    _, c = doctor(accounts.alice, *sock)
    assert c["hardlinks"]["ok"] and "= 1" in c["hardlinks"]["summary"]


def test_missing_root(scratch: Path, accounts: Accounts) -> None:
    missing = scratch / "share" / "envs"
    code, c = doctor(accounts.alice, "--socket", _no_daemon(scratch), "--root", str(missing))
    assert code == 1 and not c["root"]["ok"]
    assert "does not exist" in c["root"]["summary"] and "findmnt" in c["root"]["fix"]
    assert "group" not in c  # nothing more to say about a root that is not there


def test_envs_dirs_from_real_condarc_files(root: Path, scratch: Path,
                                           accounts: Accounts) -> None:
    sock = ("--socket", _no_daemon(scratch), "--root", str(root))
    home = scratch / "home"
    home.mkdir()
    os.chmod(home, 0o755)
    _, c = doctor(accounts.alice, *sock, home=home)  # no .condarc at all
    assert not c["envs_dirs"]["ok"]
    assert f"conda config --append envs_dirs {root}" in c["envs_dirs"]["fix"]
    assert f"envctl init {root} --group {accounts.shared_group}'" in c["envs_dirs"]["fix"]
    (home / ".condarc").write_text("envs_dirs:\n  - /somewhere/else\n")
    _, c = doctor(accounts.alice, *sock, home=home)
    assert not c["envs_dirs"]["ok"]
    (home / ".condarc").write_text(f"envs_dirs:\n  - /somewhere/else\n  - {root}/\n")
    _, c = doctor(accounts.alice, *sock, home=home)
    assert c["envs_dirs"]["ok"], c["envs_dirs"]
    # $CONDARC names a file elsewhere; ~ in an entry is the user's home
    (home / ".condarc").unlink()
    link = home / "envs-link"
    link.symlink_to(root)
    other = scratch / "site.condarc"
    other.write_text("envs_dirs: ['~/envs-link']\n")
    _, c = doctor(accounts.alice, *sock, home=home, env={"CONDARC": str(other)})
    assert c["envs_dirs"]["ok"] and str(other) in c["envs_dirs"]["summary"]
    # $CONDA_ENVS_DIRS
    _, c = doctor(accounts.alice, *sock, home=home, env={"CONDA_ENVS_DIRS": f"/x:{root}"})
    assert c["envs_dirs"]["ok"] and "$CONDA_ENVS_DIRS" in c["envs_dirs"]["summary"]
    # a .condarc conda cannot read is a problem of its own
    (home / ".condarc").write_text("envs_dirs: [unclosed\n")
    code, c = doctor(accounts.alice, *sock, home=home)
    assert code == 1 and not c["condarc"]["ok"] and "not valid" in c["condarc"]["summary"]


def test_a_home_it_cannot_look_into(root: Path, scratch: Path, accounts: Accounts) -> None:
    """HOME left as another user's (``su`` without ``-``, ``sudo -u``): its .condarc files are
    not this user's to see, as for conda, nor its kernelspecs, as for Jupyter — doctor ran into
    an internal error (exit 70) on each."""
    home = scratch / "private-home"
    (home / ".config" / "conda").mkdir(parents=True)
    (home / ".local" / "share" / "jupyter" / "kernels").mkdir(parents=True)
    os.chmod(home, 0o700)
    (root / "hand").mkdir()
    code, c = doctor(accounts.alice, "--socket", _no_daemon(scratch), "--root", str(root),
                     "hand", home=home)
    assert code == 1 and not c["envs_dirs"]["ok"], c["all"]
    assert c["kernel"]["ok"] and "no kernel expected" in c["kernel"]["summary"]


def test_one_environment(root: Path, scratch: Path, accounts: Accounts) -> None:
    """NAME: its tree audited as the user (first violations named), its python run."""
    sock = ("--socket", _no_daemon(scratch), "--root", str(root))
    env = root / "analysis"
    (env / "bin").mkdir(parents=True)
    os.symlink("/usr/bin/python3", env / "bin" / "python")
    for d in (env, env / "bin"):
        os.chown(d, accounts.alice.uid, accounts.shared_gid)
        os.chmod(d, 0o2775)
    os.lchown(env / "bin" / "python", accounts.alice.uid, accounts.shared_gid)
    code, c = doctor(accounts.alice, *sock, "analysis")
    assert c["env tree"]["ok"], c["env tree"]
    assert c["python"]["ok"] and c["python"]["summary"].startswith("python 3.")
    assert c["kernel"]["ok"]
    bad = env / "notes.txt"
    bad.write_text("x")
    os.chown(bad, accounts.alice.uid, accounts.alice.gid)
    os.chmod(bad, 0o600)
    (env / "bin" / "python").unlink()
    (env / "bin" / "python").write_text("#!/bin/sh\necho 'broken libpython' >&2\nexit 3\n")
    os.chmod(env / "bin" / "python", 0o775)
    os.chown(env / "bin" / "python", accounts.alice.uid, accounts.shared_gid)
    code, c = doctor(accounts.alice, *sock, "analysis")
    assert code == 1
    assert not c["env tree"]["ok"] and "notes.txt" in c["env tree"]["summary"]
    assert not c["python"]["ok"] and "broken libpython" in c["python"]["summary"]
    code, c = doctor(accounts.alice, *sock, "nothere")
    assert not c["env tree"]["ok"] and "no environment" in c["env tree"]["summary"]


def test_text_report(root: Path, scratch: Path, accounts: Accounts) -> None:
    """People get one line per check, ✓ or ✗, and the fix under a failed one."""
    res = subprocess.run(
        ["setpriv", f"--reuid={accounts.mallory.uid}", f"--regid={accounts.mallory.gid}",
         "--init-groups", "env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", "HOME=/",
         ENVCTL, "doctor", "--socket", _no_daemon(scratch), "--root", str(root)],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert any(line.startswith("✓ root: ") for line in lines)
    i = next(i for i, line in enumerate(lines) if line.startswith("✗ group: "))
    assert lines[i + 1].startswith("    fix: ") and "usermod" in lines[i + 1]


def test_hub_identity_on_a_shared_uid(root: Path, scratch: Path, accounts: Accounts,
                                      envctld: Callable[..., Envctld]) -> None:
    """On a uid the daemon says JupyterHub users share, doctor says the daemon cannot tell who
    you are without the hub's token (a verified hub user is tested with a real hub in
    test_hub_identity); on any other uid there is nothing to check."""
    sock = str(scratch / "envctld.sock")
    cfg = write_config(scratch, [(root, accounts.shared_group)],
                       extra={"socket": {"path": sock, "mode": "0666"},
                              "jupyterhub": {"api_url": "http://127.0.0.1:9/hub/api",
                                             "shared_uids": [accounts.alice.uid]}})
    envctld(cfg)
    code, c = doctor(accounts.alice, "--socket", sock)
    assert code == 1 and not c["hub identity"]["ok"]
    assert "JUPYTERHUB_API_TOKEN" in c["hub identity"]["fix"]
    code, c = doctor(accounts.bob, "--socket", sock)
    assert "hub identity" not in c


def _venv_with_pth(env: Path, marker_dir: Path) -> None:
    """A real env whose site-packages holds a ``.pth`` a member planted: it writes a marker
    named after the uid that ran it."""
    subprocess.run([str(VENV_BIN / "python"), "-m", "venv", "--without-pip", str(env)],
                   check=True, timeout=60)
    site = next(env.glob("lib/python*/site-packages"))
    (site / "zz.pth").write_text(f"import os; open('{marker_dir}/pth-' + str(os.getuid()), "
                                 "'w').close()\n")


def _managed(root: Path, name: str) -> Path:
    """The daemon's layout, as a build leaves it: ``<root>/NAME`` a root-owned symlink to
    ``.envctl/envs/NAME/v1``."""
    version = root / ".envctl" / "envs" / name / "v1"
    version.parent.mkdir(parents=True)
    os.symlink(f".envctl/envs/{name}/v1", root / name)
    return version


def test_doctor_as_root_never_runs_an_envs_code_as_root(root: Path, scratch: Path,
                                                        accounts: Accounts) -> None:
    """A planted ``.pth`` in a hand-made env and in a managed one: doctor as root ran it as
    root. Now root runs no env's python at all (as another account, a process that starts its
    own session would outlive doctor); a user's own run uses -I -S (no .pth at all); a hostile
    bin/python that is not python at all never runs as root."""
    marks = scratch / "marks"
    marks.mkdir(mode=0o777)
    os.chmod(marks, 0o1777)
    _venv_with_pth(root / "hand", marks)
    _venv_with_pth(_managed(root, "shared"), marks)
    rootuser = User("root", 0, 0)
    for name in ("hand", "shared"):
        _, c = doctor(rootuser, "--socket", _no_daemon(scratch), "--root", str(root), name)
        assert c["python"]["ok"] and "not run" in c["python"]["summary"], c["python"]
        assert list(marks.iterdir()) == []
        # ... and as the user who runs it, for their own run: still no .pth
        _, c = doctor(accounts.alice, "--socket", _no_daemon(scratch), "--root", str(root),
                      name)
        assert c["python"]["summary"].startswith("python 3."), c["python"]
        assert list(marks.iterdir()) == []
    evil = root / "evil"
    (evil / "bin").mkdir(parents=True)
    (evil / "bin" / "python").write_text(f"#!/bin/sh\nid -u > {marks}/sh\n")
    os.chmod(evil / "bin" / "python", 0o755)
    doctor(rootuser, "--socket", _no_daemon(scratch), "--root", str(root), "evil")
    assert not (marks / "sh").exists()  # root ran nothing of it
    doctor(accounts.alice, "--socket", _no_daemon(scratch), "--root", str(root), "evil")
    st = (marks / "sh").stat()
    assert st.st_uid == accounts.alice.uid and (marks / "sh").read_text().strip() == str(st.st_uid)


def test_a_read_only_version_explains_permission_denied(root: Path, scratch: Path,
                                                        accounts: Accounts) -> None:
    """A version envctl built is frozen: pip install there says "Permission denied"; doctor
    says why and names the two commands to use instead."""
    version = _managed(root, "team")
    (version / "bin").mkdir(parents=True)
    for d in (version / "bin", version):
        os.chmod(d, 0o2555)
    try:
        _, c = doctor(accounts.alice, "--socket", _no_daemon(scratch), "--root", str(root),
                      "team")
        said = c["installing"]["summary"]
        assert c["installing"]["ok"] and "read-only by design" in said
        assert "Permission denied" in said and "envctl env add team PKG..." in said
        assert "envctl env layer team" in said
        # a hand-made env is the group's to install into: nothing said
        (root / "hand").mkdir()
        _, c = doctor(accounts.alice, "--socket", _no_daemon(scratch), "--root", str(root),
                      "hand")
        assert "installing" not in c
    finally:
        for d in (version, version / "bin"):
            os.chmod(d, 0o755)
