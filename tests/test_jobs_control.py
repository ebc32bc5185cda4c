"""Controlling builds for real: cancel, timeout, daemon stop, ``kill -9`` of the daemon and
restart, two submits of one name at once, another daemon holding the name lock, tampering
with ``<root>/.envctl``, and the concurrency limit. The slow step that cancel, timeout and
kill interrupt is a real one: ``python -m venv`` seeding pip (seconds on this machine).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from envctl_shared.config import parse
from envctl_shared.errors import Conflict, FilesystemError
from envctl_shared.jobs import JobManager, State

from tests.helpers import live_processes, wait_escapees, wait_for
from tests.jobs_support import (
    ENV_HELLO,
    ENV_VENV,
    ENV_VENV_PIP,
    ESCAPING_PYTHON,
    SETSID,
    JobsEnv,
    daemon_argv,
    full_log,
    wait_done,
)

pytest_plugins = ("tests.fixtures_jobs",)  # the jobs fixtures

LOCK_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(1)
"""


def lock_is_free(root: Path, name: str) -> bool:
    """Probe the name lock from another process (POSIX locks are per process)."""
    path = root / ".envctl" / "locks" / f"{name}.lock"
    return subprocess.run([sys.executable, "-c", LOCK_PROBE, str(path)],
                          check=False).returncode == 0


def procs_of(uid: int, home_under: Path | None = None) -> list[int]:
    """Live processes of ``uid`` (with ``home_under``: only builds of that state dir)."""
    return list(live_processes({uid}, home_under=home_under))


def db_row(state_dir: Path, job_id: str) -> tuple[str, str | None, int | None]:
    db = sqlite3.connect(f"file:{state_dir / 'jobs.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT state, phase, pgid FROM jobs WHERE id=?", (job_id,)).fetchone()
    finally:
        db.close()
    return row


def group_size(pgid: int) -> int:
    """Live members of a process group."""
    return len(live_processes(pgrp=pgid))


def assert_clean(env: JobsEnv, name: str) -> None:
    """No name, no partial version or record, no build process; the name lock is free."""
    assert not os.path.lexists(env.root / name)
    assert os.listdir(env.root / ".envctl" / "envs" / name) == []
    assert lock_is_free(env.root, name)
    wait_for(lambda: not procs_of(env.accounts.builder.uid, env.state_dir), 10,
             what="build processes gone")


def wait_creating(env: JobsEnv, job_id: str) -> int:
    """Wait until ``python -m venv`` really runs (its group has a live process); its pgid."""
    def running() -> bool:
        _, phase, pgid = db_row(env.state_dir, job_id)
        return phase == "creating" and pgid is not None and group_size(pgid) >= 1
    wait_for(running, 60, what="the venv step")
    return db_row(env.state_dir, job_id)[2]  # type: ignore[return-value]


def test_cancel_mid_build(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory()
    alice = jobs_env.requester("alice")  # who may cancel is the API's check (test_api_access)
    job = mgr.submit(alice, "cx", ENV_VENV, backend="venv")
    wait_creating(jobs_env, job.id)
    wait_for(lambda: procs_of(jobs_env.accounts.builder.uid, jobs_env.state_dir), 10,
             what="the filter to see it")  # (once past its namespace's set-up, as root)
    version = jobs_env.root / ".envctl" / "envs" / "cx" / "v1"
    assert version.is_dir() and not os.path.lexists(jobs_env.root / "cx")  # built aside
    assert f'"job": "{job.id}"' in (version.parent / "v1.json").read_text()
    listed = {e["name"]: e for e in mgr.environments.list()}
    assert (listed["cx"]["status"], listed["cx"]["current"]) == ("building", None)
    t0 = time.monotonic()
    done = mgr.cancel(job.id, alice)
    took = time.monotonic() - t0
    assert done.state is State.CANCELLED, full_log(mgr, job.id)
    assert "cancelled by" in (done.exit_detail or "") and took < 10
    assert_clean(jobs_env, "cx")
    assert "cx" not in {e["name"] for e in mgr.environments.list()}
    with pytest.raises(Conflict, match="already ended"):
        mgr.cancel(job.id, alice)
    log = full_log(mgr, job.id)
    assert "stopping the build" in log and "removed the unfinished version v1" in log


def test_admin_cancels_queued_job(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory(jobs_env.config(max_concurrent=1))
    first = mgr.submit(jobs_env.requester("alice"), "one", ENV_VENV, backend="venv")
    second = mgr.submit(jobs_env.requester("alice"), "two", ENV_HELLO)
    wait_creating(jobs_env, first.id)
    assert mgr.get(second.id).state is State.QUEUED  # max_concurrent=1
    admin = jobs_env.requester("mallory", admin=True)
    assert mgr.cancel(second.id, admin).state is State.CANCELLED
    assert mgr.cancel(first.id, admin).state is State.CANCELLED
    assert mgr.counts()["cancelled"] == 2
    assert not (jobs_env.root / "two").exists()
    assert_clean(jobs_env, "one")


def test_timeout_kills_the_group(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory(jobs_env.config(timeout=1.5))
    job = mgr.submit(jobs_env.requester(), "slow", ENV_VENV_PIP, backend="venv")
    done = wait_done(mgr, job.id, 60)
    assert done.state is State.FAILED and "timed out after 1.5s" in (done.exit_detail or "")
    assert done.finished_at and done.started_at and done.finished_at - done.started_at < 10
    assert_clean(jobs_env, "slow")


def test_stop_interrupts_running_build(jobs_env: JobsEnv, accounts) -> None:
    mgr = JobManager(jobs_env.config())
    mgr.start()
    job = mgr.submit(jobs_env.requester(), "st", ENV_VENV, backend="venv")
    wait_creating(jobs_env, job.id)
    mgr.stop(timeout=20)
    again = JobManager(jobs_env.config())
    again.start()
    try:
        done = again.get(job.id)
        assert done.state is State.INTERRUPTED, done
        assert_clean(jobs_env, "st")
    finally:
        again.stop()


def test_kill9_daemon_then_restart(jobs_env: JobsEnv, accounts) -> None:
    """The first manager runs in its own process and is SIGKILLed mid-build; the build's own
    children survive it (only the group leader has a parent-death signal), so the restarted
    manager must find and kill that orphaned group, remove the half-built prefix, mark the job
    interrupted, release the lock and resume the job that was still queued."""
    cfg = jobs_env.raw(max_concurrent=1)
    specs = [["k9", ENV_VENV_PIP, "venv"], ["after", ENV_HELLO, "rattler"]]
    daemon = subprocess.Popen(daemon_argv(cfg, jobs_env.requester(), specs),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        running_id, queued_id = daemon.stdout.readline().strip(), daemon.stdout.readline().strip()
        wait_for(lambda: db_row(jobs_env.state_dir, running_id)[1] == "creating"
                 and db_row(jobs_env.state_dir, running_id)[2] is not None, 60,
                 what="the build to start")
        pgid = db_row(jobs_env.state_dir, running_id)[2]
        wait_for(lambda: len(live_processes({accounts.builder.uid}, pgrp=pgid)) >= 2, 60,
                 what="venv to start ensurepip")  # (past its namespace's set-up, as root)
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    # the leader dies of its parent-death signal; its children do not
    wait_for(lambda: pgid not in live_processes(pgrp=pgid), 10, what="the leader to die")
    assert group_size(pgid) >= 1, "expected an orphaned build process to survive the daemon"
    assert (jobs_env.root / ".envctl" / "envs" / "k9" / "v1").exists()
    assert lock_is_free(jobs_env.root, "k9")  # died with the daemon: no build inherited it
    mgr = JobManager(parse(cfg))
    mgr.start()
    try:
        job = mgr.get(running_id)
        assert job.state is State.INTERRUPTED and "partial output removed" in job.exit_detail
        assert group_size(pgid) == 0
        assert_clean(jobs_env, "k9")
        assert "orphaned process" in full_log(mgr, running_id)
        resumed = wait_done(mgr, queued_id, 60)
        assert resumed.state is State.SUCCEEDED, resumed.exit_detail
    finally:
        mgr.stop()
        if group_size(pgid):  # only if the test failed: leave no process behind
            os.killpg(pgid, signal.SIGKILL)


def test_two_submits_of_one_name_at_once(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory()
    barrier = threading.Barrier(8)
    results: list[object] = []

    def submit(i: int) -> None:
        barrier.wait()
        try:
            results.append(mgr.submit(jobs_env.requester(), "race", ENV_HELLO))
        except Conflict as exc:
            results.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if not isinstance(r, Conflict)]
    assert len(won) == 1 and len(results) == 8
    assert wait_done(mgr, won[0].id).state is State.SUCCEEDED  # type: ignore[attr-defined]
    with pytest.raises(Conflict, match="already exists"):
        mgr.submit(jobs_env.requester(), "race", ENV_HELLO)


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, b"otherhost 4242 j-other\\n")
print("locked", flush=True)
time.sleep(600)
"""


def test_name_locked_by_another_daemon(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory()
    lock = jobs_env.root / ".envctl" / "locks" / "shared.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        job = wait_done(mgr, mgr.submit(jobs_env.requester(), "shared", ENV_HELLO).id)
        assert job.state is State.FAILED
        assert "another envctl daemon is using 'shared'" in (job.exit_detail or "")
        assert "envctld on otherhost (pid 4242, j-other)" in (job.exit_detail or "")
        assert not (jobs_env.root / "shared").exists()
    finally:
        holder.kill()
        holder.wait()
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "shared", ENV_HELLO).id)
    assert job.state is State.SUCCEEDED, job.exit_detail


def test_tampered_area_is_refused(jobs_env: JobsEnv, manager_factory, scratch: Path) -> None:
    """Refused when submitted (the area is checked before a job is queued that could only
    fail), with what is wrong."""
    mgr = manager_factory()
    target = scratch / "target"
    target.mkdir()
    area = jobs_env.root / ".envctl" / "envs"
    area.rmdir()
    area.symlink_to(target)
    with pytest.raises(FilesystemError, match="a symlink or a file where"):
        mgr.submit(jobs_env.requester(), "t", ENV_HELLO)
    assert os.listdir(target) == []
    area.unlink()
    os.mkdir(area)
    os.chown(area, jobs_env.accounts.alice.uid, -1)  # a user's directory in its place
    with pytest.raises(FilesystemError, match="not by the daemon"):
        mgr.submit(jobs_env.requester(), "t", ENV_HELLO)
    assert mgr.list(include_finished=True) == []
    os.rmdir(area)
    assert wait_done(mgr, mgr.submit(jobs_env.requester(), "t", ENV_HELLO).id).state \
        is State.SUCCEEDED


def test_max_concurrent_and_logs(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory(jobs_env.config(max_concurrent=1))
    ids = [mgr.submit(jobs_env.requester(), f"c{i}", ENV_HELLO).id for i in range(3)]
    jobs = [wait_done(mgr, i) for i in ids]
    assert all(j.state is State.SUCCEEDED for j in jobs)
    for a, b in itertools.pairwise(jobs):
        assert a.finished_at is not None and b.started_at is not None
        assert b.started_at >= a.finished_at - 0.05  # one at a time, oldest first
    chunk, nxt = mgr.read_log(ids[0], 0, 10)
    assert len(chunk) == 10 and nxt == 10
    rest, end = mgr.read_log(ids[0], nxt, 1 << 20)
    assert (chunk + rest).decode().endswith(
        f"succeeded: ready at {jobs[0].prefix} (version v1)\n")
    assert mgr.read_log(ids[0], end)[0] == b""
    assert [j.id for j in mgr.list(include_finished=True)] == ids
    assert mgr.list() == []
    assert mgr.list(uid=jobs_env.accounts.bob.uid, include_finished=True) == []


def test_leftovers_of_a_dead_build_elsewhere_are_undone(jobs_env: JobsEnv,
                                                         manager_factory) -> None:
    """Another host's daemon died mid-update: its version v2 is half-built (its record still
    says ``building``). The next build of that name (holding the lock) removes it first and
    builds v2 anew; v1, current all along, is untouched."""
    mgr = manager_factory()
    req = jobs_env.requester()
    assert wait_done(mgr, mgr.submit(req, "lost", ENV_HELLO).id).state is State.SUCCEEDED
    envdir = jobs_env.root / ".envctl" / "envs" / "lost"
    record = json.loads((envdir / "v1.json").read_text())
    (envdir / "v2.json").write_text(json.dumps({**record, "version": "v2", "state": "building",
                                                "job": "0123456789ab", "host": "otherhost"}))
    (envdir / "v2").mkdir()
    (envdir / "v2" / "half").write_text("half-built")
    job = wait_done(mgr, mgr.submit(req, "lost", "dependencies: [libgreet]\n",
                                    replace=True).id)
    assert job.state is State.SUCCEEDED, job.exit_detail
    log = full_log(mgr, job.id)
    assert "removed v2 of 'lost', left half-built by an interrupted build" in log
    assert os.readlink(jobs_env.root / "lost") == ".envctl/envs/lost/v2"
    assert not (envdir / "v2" / "half").exists() and (envdir / "v1" / "bin" / "hello").exists()
    assert json.loads((envdir / "v2.json").read_text())["job"] == job.id


@pytest.mark.parametrize("cancel", [False, True], ids=["succeeds", "cancelled"])
def test_processes_that_leave_the_group_are_killed(jobs_env: JobsEnv, manager_factory,
                                                   scratch: Path, cancel: bool) -> None:
    """A build that daemonizes something (setsid) outlives no step: the daemon is its
    subreaper and sweeps the build user's processes outside running steps' groups."""
    wrapper = scratch / "escaping-python"
    wrapper.write_text(ESCAPING_PYTHON.format(escape=SETSID, python=sys.executable))
    os.chmod(wrapper, 0o755)
    os.chmod(scratch, 0o755)
    mgr = manager_factory(jobs_env.config(venv_python=str(wrapper)))
    alice = jobs_env.requester("alice")
    job = mgr.submit(alice, "esc", ENV_VENV, backend="venv")
    home = jobs_env.state_dir / "jobs" / job.id / "home"
    first = wait_escapees(home)[0]
    assert os.getsid(first) == first  # really out of the build's session and group
    done = mgr.cancel(job.id, alice) if cancel else wait_done(mgr, job.id, 120)
    assert done.state is (State.CANCELLED if cancel else State.SUCCEEDED), full_log(mgr, job.id)
    for pid in map(int, (home / "escapees").read_text().split()):
        assert not os.path.exists(f"/proc/{pid}"), f"escapee {pid} still there"
    assert "that had left the build's process group" in full_log(mgr, job.id)
    assert not procs_of(jobs_env.accounts.builder.uid, jobs_env.state_dir)
