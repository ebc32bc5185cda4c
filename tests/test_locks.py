"""Every lock file and state file is the daemon's alone; a lock held by someone else is named.

Before, name locks were ``.envctl/locks/NAME.lock``, 0644 in a 0755 directory: any member
could open one and hold a shared lock on it for ever; ``--replace``, rollback, remove of that
env then failed with "another envctl daemon is building" and GC skipped it. Now the lock files
are 0600 in a 0700 directory (a real member, through ``setpriv``, cannot open them at all), an
old open lock file a member holds is replaced by a fresh inode when the daemon needs it, and a
holder is told apart: this daemon, another daemon (host, pid, job), or a process that is none.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from envctl_shared import locks
from envctl_shared.jobs.model import State

from tests.conftest import Accounts
from tests.helpers import as_user
from tests.jobs_support import ENV_HELLO, JobsEnv, wait_done

pytest_plugins = ("tests.fixtures_jobs",)  # jobs_env, manager_factory

# A member holding a shared record lock on a file it could open (the system python: a user
# can run it), until its stdin closes.
HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


def _hold(accounts: Accounts, path: Path) -> subprocess.Popen[str]:
    a = accounts.alice
    proc = subprocess.Popen(["setpriv", f"--reuid={a.uid}", f"--regid={a.gid}",
                             "--init-groups", "/usr/bin/python3", "-c", HOLD, str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "held\n", line
    return proc


def _cannot_open(accounts: Accounts, path: Path) -> None:
    a = accounts.alice
    res = as_user(a.uid, a.gid, ["sh", "-c", f'exec 3< "{path}"'], check=False,
                  init_groups=True)
    assert res.returncode != 0 and "Permission denied" in res.stderr, (path, res)


def test_a_member_cannot_open_any_lock_or_state_file(jobs_env: JobsEnv, manager_factory,
                                                    accounts: Accounts) -> None:
    mgr = manager_factory()
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "mine", ENV_HELLO).id)
    assert job.state is State.SUCCEEDED, job.exit_detail
    area = jobs_env.root / ".envctl"
    assert (area / "locks").stat().st_mode & 0o777 == 0o700
    assert (area / "locks" / "mine.lock").stat().st_mode & 0o777 == 0o600
    jobs = area / "jobs"
    assert jobs.stat().st_mode & 0o777 == 0o700
    mine = next(p for p in jobs.iterdir() if p.is_dir())
    files = [area / "locks" / "mine.lock", mine / "alive.lock", mine / f"{job.id}.json",
             mine / f"{job.id}.log", jobs_env.state_dir / "envctld.lock",
             jobs_env.state_dir / "daemon-id"]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path
        _cannot_open(accounts, path)


def test_an_old_open_lock_file_a_member_holds_is_replaced(jobs_env: JobsEnv, manager_factory,
                                                         accounts: Accounts) -> None:
    """The lock file an older daemon left open to all (0644 in a 0755 directory), held by a
    member since before this daemon started: the build of that name goes ahead (on a fresh
    inode); the member's lock is left on the old one, which nothing uses any more."""
    area = jobs_env.root / ".envctl"
    area.mkdir(mode=0o755)
    (area / "locks").mkdir(mode=0o755)
    lock = area / "locks" / "victim.lock"
    lock.touch(mode=0o644)
    old = lock.stat().st_ino
    holder = _hold(accounts, lock)
    try:
        mgr = manager_factory()
        st = lock.stat()  # replaced at start, before any use of the name
        assert st.st_ino != old and st.st_mode & 0o777 == 0o600
        job = wait_done(mgr, mgr.submit(jobs_env.requester(), "victim", ENV_HELLO).id)
        assert job.state is State.SUCCEEDED, job.exit_detail
        assert holder.poll() is None  # still holding, harmlessly
        again = wait_done(mgr, mgr.submit(jobs_env.requester(), "victim", ENV_HELLO,
                                          replace=True).id)
        assert again.state is State.SUCCEEDED, again.exit_detail
    finally:
        holder.communicate("")


def test_who_holds_a_lock_is_named(accounts: Accounts, scratch: Path) -> None:
    """A daemon holder writes who it is (a second open in the same process sees "here"); a
    member's lock is found on this host with its pid and uid."""
    dfd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = locks.LockFile(dfd, "a.lock", "a.lock")
        assert first.acquire("job 1") is None
        by = locks.LockFile(dfd, "a.lock", "a.lock").acquire("job 2")
        assert by is not None and by.here and by.what == "job 1", by
        first.release()
        assert (scratch / "a.lock").read_bytes() == b""  # the line goes with the lock
        assert locks.LockFile(dfd, "a.lock", "a.lock").acquire() is None  # closed: freed

        open_file = scratch / "open.lock"
        open_file.touch(mode=0o644)
        holder = _hold(accounts, open_file)
        try:
            fd = os.open(open_file, os.O_RDONLY)
            try:
                assert locks.is_locked(fd)
                who = locks.holder(fd)
            finally:
                os.close(fd)
            assert (who.pid, who.uid, who.daemon) == (holder.pid, accounts.alice.uid, False)
            assert who.describe() == f"process {holder.pid} (uid {accounts.alice.uid}) on " \
                "this host"
        finally:
            holder.communicate("")
    finally:
        os.close(dfd)


def test_a_lock_held_by_a_process_that_is_no_daemon_is_named(jobs_env: JobsEnv,
                                                             manager_factory) -> None:
    """Whoever can still hold a name lock (root's own processes: a backup, an admin's
    script) is named with pid and uid, never reported as "another envctl daemon"."""
    mgr = manager_factory()
    lock = jobs_env.root / ".envctl" / "locks" / "held.lock"
    lock.touch(mode=0o600)
    proc = subprocess.Popen(["/usr/bin/python3", "-c", HOLD, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        job = wait_done(mgr, mgr.submit(jobs_env.requester(), "held", ENV_HELLO).id)
        assert job.state is State.FAILED
        detail = job.exit_detail or ""
        assert f"is held by process {proc.pid} (uid 0) on this host, not by an envctl " \
            "daemon" in detail and "another envctl daemon" not in detail, detail
    finally:
        proc.communicate("")
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "held", ENV_HELLO).id)
    assert job.state is State.SUCCEEDED, job.exit_detail
