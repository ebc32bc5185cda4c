"""``make run`` as a demo of the whole product: the rendered demo configuration starts a daemon
without a single warning (first start and restart), and config/quickstart.sh — what ``make run``
prints, and what the README's quick start shows verbatim — runs as written, from a shell whose
PATH has no envctl: a file written with a private umask is healed in the root and left alone
elsewhere, an environment is built, and ``envctl doctor`` names who built it. As root the demo
root's group is the demo group, whose member the demo account writes in it (never ``root``'s
group, and never a world-writable root).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.daemon_support import Envctld
from tests.helpers import REPO, wait_for

QUICKSTART = REPO / "config" / "quickstart.sh"


def _warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) ", line)]


def test_readme_quick_start_is_what_make_run_prints() -> None:
    text = QUICKSTART.read_text()
    assert text in (REPO / "README.md").read_text()
    res = subprocess.run(["make", "-n", "run"], cwd=REPO, capture_output=True, text=True)
    assert "cat config/quickstart.sh" in res.stdout


DEMO_ACCOUNT = "envctl-demo"  # the demo account and group, as the quick start names them


@pytest.fixture
def demo_account() -> Iterator[None]:
    """``make demo-config`` as root creates the demo group and account: removed after the test
    unless they existed before (a developer's own ``make run``)."""
    def exists() -> tuple[bool, bool]:
        try:
            pwd.getpwnam(DEMO_ACCOUNT)
            user = True
        except KeyError:
            user = False
        try:
            grp.getgrnam(DEMO_ACCOUNT)
            return user, True
        except KeyError:
            return user, False

    had_user, had_group = exists()
    yield
    if not had_user:
        subprocess.run(["userdel", "-f", DEMO_ACCOUNT], capture_output=True)
    if not had_group:
        subprocess.run(["groupdel", DEMO_ACCOUNT], capture_output=True)


def test_make_run_demo_end_to_end(scratch: Path, demo_account: None) -> None:
    checkout = scratch / "checkout"  # stands for the checkout: var/ and .venv as make run has
    checkout.mkdir()
    os.chmod(checkout, 0o755)
    (checkout / ".venv").symlink_to(REPO / ".venv")
    var = checkout / "var"
    res = subprocess.run(["make", "-s", "--no-print-directory", "demo-config", f"DEMO={var}"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ,
                                                                         "SUDO_USER": ""})
    assert res.returncode == 0, res.stderr + res.stdout
    rendered = (var / "dev.yaml").read_text()
    assert f'build_user: "{DEMO_ACCOUNT}"' in rendered and "@" not in rendered
    assert f'group: "{DEMO_ACCOUNT}"' in rendered  # the demo group, not root's
    demo = pwd.getpwnam(DEMO_ACCOUNT)
    assert demo.pw_gid == grp.getgrnam(DEMO_ACCOUNT).gr_gid  # the account's own group is it
    daemon = Envctld(var / "dev.yaml", scratch).start()
    try:
        assert _warnings(daemon.log_text()) == [], daemon.log_text()
        res = subprocess.run(["bash", "-e", str(QUICKSTART)], cwd=checkout, capture_output=True,
                             text=True, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                          "HOME": str(scratch),
                                                          "LANG": "C.UTF-8"})
        assert res.returncode == 0, res.stderr + res.stdout
        out = res.stdout
        assert re.search(r"^-rw------- .* var/elsewhere/a\.csv$", out, re.M), out
        assert re.search(rf"^-rw-rw---- 1 {DEMO_ACCOUNT} {DEMO_ACCOUNT} .* var/envs/demo/a\.csv$",
                         out, re.M), out
        assert re.search(r"^/\S+/var/envs  inotify .*", out, re.M), out
        assert f"environment demo-env is ready: {var}/envs/demo-env" in out
        assert f"\n{var}/envs/demo-env\n" in out  # its python runs
        st = os.stat(var / "envs")  # the demo root: the demo group's, not world-writable
        assert st.st_gid == demo.pw_gid and stat.S_IMODE(st.st_mode) == 0o3775
        # doctor, as printed (envctl on PATH): people, not records; the root's mode is fine
        assert re.search(r"^✓ env: demo-env: ready; version v1 built by root \(uid 0\) on .*, "
                         r"owner root \(uid 0\)$", out, re.M), out
        assert re.search(rf"^✓ root mode: .*var/envs: group {DEMO_ACCOUNT}, mode 3775$", out,
                         re.M), out
        assert "{" not in out.split("✓ env:")[1].splitlines()[0]
        # the demo account, a member of the root's group, may use the CLI as allow_groups
        # says: the socket is the demo group's (it was root's group's: exit 77)
        res = subprocess.run(["setpriv", f"--reuid={DEMO_ACCOUNT}", f"--regid={DEMO_ACCOUNT}",
                              "--init-groups", str(REPO / ".venv" / "bin" / "envctl"),
                              "--socket", str(var / "run" / "envctld.sock"), "whoami"],
                             cwd="/", capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "may create: yes" in res.stdout, res.stdout
        version = os.path.realpath(var / "envs" / "demo-env")
        st = os.stat(version)  # built as the build account, then frozen: the daemon's
        assert st.st_uid == 0 and st.st_mode & 0o222 == 0
        daemon.stop()
        daemon.start()  # a restart is as quiet
        assert _warnings(daemon.log_text()) == [], daemon.log_text()
    finally:
        daemon.cleanup()  # stops it if still running


def test_make_run_demo_as_a_normal_user(scratch: Path, accounts: Accounts) -> None:
    """Not root: the daemon runs as you and builds as you; the quick start works as written and
    the daemon's log has no warning (its own .envctl is not a protected owner's here)."""
    alice = accounts.alice
    checkout = scratch / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(REPO / ".venv")
    os.chown(checkout, alice.uid, alice.gid)
    var = checkout / "var"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(checkout), "LANG": "C.UTF-8"}
    as_alice = ["setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}", "--init-groups",
                "env", "-i", *(f"{k}={v}" for k, v in env.items())]
    res = subprocess.run([*as_alice, "make", "-s", "--no-print-directory", "-C", str(REPO),
                          "demo-config", f"DEMO={var}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout
    assert f'build_user: "{alice.name}"' in (var / "dev.yaml").read_text()
    log = scratch / "envctld.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen([*as_alice, str(REPO / ".venv" / "bin" / "envctld"),
                                   "--config", "var/dev.yaml"], stdout=out, stderr=out,
                                  stdin=subprocess.DEVNULL, start_new_session=True,
                                  cwd=checkout)  # as make run starts it
    try:
        wait_for(lambda: " ready " in log.read_text(), 30, what="the daemon ready")
        res = subprocess.run([*as_alice, "bash", "-e", str(QUICKSTART)], cwd=checkout,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr + res.stdout + log.read_text()
        assert re.search(r"^-rw-rw---- .* var/envs/demo/a\.csv$", res.stdout, re.M), res.stdout
        assert f"environment demo-env is ready: {var}/envs/demo-env" in res.stdout
        assert re.search(rf"^✓ env: demo-env: ready; version v1 built by {alice.name} "
                         rf"\(uid {alice.uid}\)", res.stdout, re.M), res.stdout
        assert re.search(r"^✓ python: python 3\.", res.stdout, re.M), res.stdout
        assert os.stat(os.path.realpath(var / "envs" / "demo-env")).st_uid == alice.uid
        res = subprocess.run([*as_alice, str(REPO / ".venv" / "bin" / "envctl"), "--socket",
                              str(var / "run" / "envctld.sock"), "status", "--json"],
                             capture_output=True, text=True, timeout=60)
        assert json.loads(res.stdout)["config"] == str(var / "dev.yaml")  # was "var/dev.yaml"
        # run again, as people do: the same, and a second version (was 'mkdir: File exists')
        res = subprocess.run([*as_alice, "bash", "-e", str(QUICKSTART)], cwd=checkout,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr + res.stdout
        assert re.search(r"^-rw-rw---- .* var/envs/demo/a\.csv$", res.stdout, re.M), res.stdout
        assert re.search(r"^✓ env: demo-env: ready; version v2 ", res.stdout, re.M), res.stdout
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert _warnings(log.read_text()) == [], log.read_text()
