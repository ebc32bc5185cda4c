"""Fixtures shared by the whole suite: real throwaway users and groups, cleaned up afterwards.

The suite runs as root (it needs other uids, mounts and sysctls). Users are created with
``useradd`` once per session and removed at the end, whatever happened.

Parallel runs. ``make test`` runs the suite in two passes (the Makefile's ``test`` target):

1. ``pytest -n 3 --dist loadfile --no-loadscope-reorder --serial-tests=exclude``: pytest-xdist
   workers, each its own session (its own accounts, named after the worker's pid), each test
   file on one worker (a module's daemon fixture is started once), handed out in collection
   order — files marked ``slow`` (a minute or more together) first, so that none of them is
   still running alone at the end while the other workers idle;
2. ``pytest --serial-tests=only``: the tests marked ``@pytest.mark.serial``, one process, with
   nothing else of the suite running.

The rule for ``serial``: a test that changes what every process on the machine sees (a sysctl
such as ``fs.inotify.max_user_watches``/``max_queued_events`` or ``fs.protected_hardlinks``, a
mount outside its scratch dir) or whose assertion depends on having the CPUs to itself (a race
that must be lost within a time window, a latency bound, rates compared over time). Everything
else must run beside other tests: its own scratch dir (``scratch``/``tmp_path``), socket paths
under it, port 0, unique names, and it cleans up its processes, mounts and cgroups. Without
``--serial-tests``, every test runs (``pytest tests/test_x.py`` by hand works as before).
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--serial-tests", choices=("include", "exclude", "only"),
                     default="include",
                     help="exclude/only the tests marked serial (make test: a parallel pass "
                          "without them, then a pass of them alone)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Files marked slow first (a stable sort: each file's tests stay together, in order).
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    mode = config.getoption("--serial-tests")
    if mode == "include":
        return
    keep = [i for i in items if (i.get_closest_marker("serial") is not None) == (mode == "only")]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


@contextmanager
def _accounts_lock() -> Iterator[None]:
    """One suite at a time edits /etc/passwd and /etc/group: xdist workers start together, and
    useradd gives up when another holds the shadow lock for long."""
    with open("/run/envctl-tests-accounts.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def accounts() -> Iterator[Accounts]:
    if os.geteuid() != 0:
        pytest.skip("the suite needs root to create users")
    with _accounts_lock():
        _sweep_stale()
        subprocess.run(["groupadd", _GROUP], check=True)
        for name in _USERS:
            extra = [] if name.endswith(("-mallory", "-build")) else ["-G", _GROUP]
            subprocess.run(["useradd", "--no-create-home", "--user-group", "-s", "/bin/sh",
                            *extra, name], check=True)
    try:
        users = [pwd.getpwnam(n) for n in _USERS]
        made = [User(u.pw_name, u.pw_uid, u.pw_gid) for u in users]
        _UIDS.update(u.uid for u in made)
        yield Accounts(*made, shared_group=_GROUP, shared_gid=grp.getgrnam(_GROUP).gr_gid)
    finally:
        _UIDS.clear()
        with _accounts_lock():
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
