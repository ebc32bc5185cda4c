"""Fixtures shared by the whole suite: real throwaway users and groups, cleaned up afterwards.

The suite runs as root (it needs other uids, mounts and sysctls). Users are created with
``useradd`` once per session and removed at the end, whatever happened.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import live_processes


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int  # primary group (a private group of the same name)


@dataclass(frozen=True)
class Accounts:
    """Two unprivileged users, a shared group they are both in, and an outsider."""

    alice: User
    bob: User
    mallory: User  # not in the shared group
    builder: User  # the daemon's build user
    shared_group: str
    shared_gid: int


# Names carry this pytest process's pid, so several suites can run side by side; accounts
# left behind by a killed run (its pid gone) are swept at the next start.
_TAG = f"{os.getpid()}"
_ROLES = ("alice", "bob", "mallory", "build")
_USERS = tuple(f"envt{_TAG}-{role}" for role in _ROLES)
_GROUP = f"envt{_TAG}-shared"
_UIDS: set[int] = set()  # filled once the accounts exist: whose processes must not outlive a test


def _remove_accounts(tag: str) -> None:
    for role in _ROLES:
        # -f: a zombie not yet reaped by init must not keep the account ("user is in use")
        subprocess.run(["userdel", "-f", f"envt{tag}-{role}"], capture_output=True)
        subprocess.run(["groupdel", f"envt{tag}-{role}"], capture_output=True)
    subprocess.run(["groupdel", f"envt{tag}-shared"], capture_output=True)


def _sweep_stale() -> None:
    for entry in pwd.getpwall():
        name = entry.pw_name
        if name.startswith("envt") and "-" in name:
            tag = name[4:].split("-", 1)[0]
            if tag.isdigit() and not os.path.exists(f"/proc/{tag}"):
                _remove_accounts(tag)


@pytest.fixture(scope="session")
def accounts() -> Iterator[Accounts]:
    if os.geteuid() != 0:
        pytest.skip("the suite needs root to create users")
    _sweep_stale()
    subprocess.run(["groupadd", _GROUP], check=True)
    for name in _USERS:
        extra = [] if name.endswith(("-mallory", "-build")) else ["-G", _GROUP]
        subprocess.run(["useradd", "--no-create-home", "--user-group", "-s", "/bin/sh", *extra,
                        name], check=True)
    try:
        users = [pwd.getpwnam(n) for n in _USERS]
        made = [User(u.pw_name, u.pw_uid, u.pw_gid) for u in users]
        _UIDS.update(u.uid for u in made)
        yield Accounts(*made, shared_group=_GROUP, shared_gid=grp.getgrnam(_GROUP).gr_gid)
    finally:
        _UIDS.clear()
        _remove_accounts(_TAG)


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail the test that leaves a process of a test account running (and kill it).

    A leaked build or writer would otherwise be blamed on a later test, keep ``userdel`` from
    removing its account, and break the rule that tests clean up after themselves.
    """
    yield
    if not _UIDS:
        return
    deadline = time.monotonic() + 5.0  # a killed group may take a moment to die
    while (left := live_processes(_UIDS, reap_adopted=True)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail("processes of test accounts outlived the test: " +
                    "; ".join(f"pid={pid} {what}" for pid, what in left.items()))


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A world-traversable scratch dir outside /root (other uids can reach it), removed after."""
    base = Path("/tmp/envctl-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    os.chmod(base, 0o755)
    path = Path(tempfile.mkdtemp(dir=base))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
