"""The jobs layer's bookkeeping, for real: schema versioning, log retention, reload of limits,
wait() wake-ups, and the orphan killer's refusal to touch a process group that is not ours.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from envctl_shared.errors import Conflict
from envctl_shared.jobs import JobManager, State
from envctl_shared.jobs.procs import BuildUser, kill_orphans, spawn, start_time
from envctl_shared.jobs.store import SCHEMA_VERSION, JobStore

from tests.helpers import REPO, find_violations, live_processes, wait_for
from tests.jobs_support import ENV_HELLO, JobsEnv, wait_done

pytest_plugins = ("tests.fixtures_jobs",)  # the jobs fixtures


def test_schema_version_and_newer_file_refused(scratch) -> None:
    path = scratch / "jobs.db"
    JobStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(Conflict, match="newer envctld"):
        JobStore(path)


@pytest.mark.parametrize("version,dropped", [(1, ("cgroup", "hub_user", "hub_id")),
                                             (2, ("hub_user", "hub_id")), (3, ("hub_id",))])
def test_older_schema_file_is_upgraded(scratch, version: int, dropped: tuple[str, ...]) -> None:
    """A job store written before builds had cgroups (1), before jobs recorded the verified
    hub user (2), or its stable identity (3), gains the columns."""
    path = scratch / "jobs.db"
    JobStore(path).close()
    db = sqlite3.connect(path)
    for column in dropped:
        db.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    db.execute(f"PRAGMA user_version={version}")
    db.close()
    JobStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    assert all(column in columns for column in dropped)
    db.close()


def test_old_logs_pruned_rows_kept(jobs_env: JobsEnv) -> None:
    mgr = JobManager(jobs_env.config(keep_logs_days=1))
    mgr.start()
    try:
        job = wait_done(mgr, mgr.submit(jobs_env.requester(), "old", ENV_HELLO).id)
        fresh = wait_done(mgr, mgr.submit(jobs_env.requester(), "new", ENV_HELLO).id)
    finally:
        mgr.stop()
    db = sqlite3.connect(jobs_env.state_dir / "jobs.db")
    db.execute("UPDATE jobs SET finished_at=? WHERE id=?", (time.time() - 2 * 86400, job.id))
    db.commit()
    db.close()
    mgr = JobManager(jobs_env.config(keep_logs_days=1))
    mgr.start()
    try:
        assert not (jobs_env.state_dir / "jobs" / job.id).exists()
        assert (jobs_env.state_dir / "jobs" / fresh.id / "build.log").exists()
        assert mgr.get(job.id).state is State.SUCCEEDED  # history survives
        assert mgr.read_log(job.id) == (b"", 0)
    finally:
        mgr.stop()


def test_reload_raises_concurrency(jobs_env: JobsEnv, manager_factory, pool) -> None:
    """Three build accounts, so three builds may run at once (one per account)."""
    mgr = manager_factory(jobs_env.config(build_user=None, build_users=list(pool.names),
                                          max_concurrent=1))
    mgr.reload(jobs_env.config(build_user=None, build_users=list(pool.names), max_concurrent=3,
                               allowed_backends=["rattler"]))
    ids = [mgr.submit(jobs_env.requester(), f"r{i}", ENV_HELLO).id for i in range(3)]
    jobs = [wait_done(mgr, i) for i in ids]
    assert all(j.state is State.SUCCEEDED for j in jobs)
    # with three slots the three builds overlapped
    assert max(j.started_at or 0 for j in jobs) < min(j.finished_at or 0 for j in jobs)


def test_wait_wakes_on_change_and_times_out(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory()
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "w", ENV_HELLO).id)
    t0 = time.monotonic()
    assert mgr.wait(job.id, 5).state is State.SUCCEEDED  # terminal: returns at once
    assert time.monotonic() - t0 < 0.5
    queued = mgr.submit(jobs_env.requester(), "w2", ENV_HELLO)
    t0 = time.monotonic()
    changed = mgr.wait(queued.id, 10)
    assert changed.state is not State.QUEUED or changed.phase is not None or \
        mgr.read_log(queued.id)[0]
    assert time.monotonic() - t0 < 5
    wait_done(mgr, queued.id)


def test_orphan_killer_only_kills_our_group(accounts) -> None:
    """A live group of another uid, or with a different leader start time, is left alone."""
    a = accounts.alice
    proc = subprocess.Popen(["setpriv", f"--reuid={a.uid}", f"--regid={a.gid}",
                             "--clear-groups", "sleep", "60"], start_new_session=True)
    try:
        # setpriv has switched to alice and exec'd sleep (before that the pid is root's)
        wait_for(lambda: os.stat(f"/proc/{proc.pid}").st_uid == a.uid and
                 os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"), 5)
        started = start_time(proc.pid)
        assert started is not None
        assert kill_orphans(proc.pid, started, accounts.builder.uid) == 0  # wrong uid
        assert kill_orphans(proc.pid, started + 1, a.uid) == 0  # a recycled pid
        assert proc.poll() is None
        assert kill_orphans(proc.pid, started, a.uid) == 1
        assert proc.wait(5) == -9
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()



def _builder(accounts) -> BuildUser:
    b = accounts.builder
    return BuildUser(b.uid, b.gid, b.name, True)


def test_step_runs_only_after_release(accounts, scratch) -> None:
    """Held at its gate the command has not run; released, it runs as the build user with
    /dev/null as stdin; a gate closed without release exits 125 and runs nothing."""
    os.chmod(scratch, 0o777)
    script = 'cat; id -u > "$1"'  # cat returns at once on /dev/null, so stdin is not the gate
    step = spawn(["sh", "-c", script, "sh", str(scratch / "ran")], _builder(accounts), scratch)
    time.sleep(0.3)
    assert step.proc.poll() is None and not (scratch / "ran").exists()
    step.release()
    assert step.proc.wait(10) == 0
    assert (scratch / "ran").read_text().strip() == str(accounts.builder.uid)
    held = spawn(["touch", str(scratch / "never")], _builder(accounts), scratch)
    held.close_gate()
    assert held.proc.wait(10) == 125 and not (scratch / "never").exists()


DIES_BEFORE_RELEASE = """
import os, sys
from pathlib import Path
from envctl_shared.jobs.procs import BuildUser, spawn
step = spawn(["sh", "-c", "sleep 60 & touch " + sys.argv[2]], BuildUser(*map(int, sys.argv[3:5]),
             "b", True), Path(sys.argv[1]))
print(step.proc.pid, flush=True)
os._exit(0)  # a daemon killed between spawn and recording the group
"""


def test_daemon_dying_before_release_leaves_nothing(accounts, scratch) -> None:
    """The window a restarted daemon cannot see (group not yet on disk) runs no build code."""
    os.chmod(scratch, 0o777)
    b = accounts.builder
    out = subprocess.run([sys.executable, "-c", DIES_BEFORE_RELEASE, str(scratch),
                          str(scratch / "ran"), str(b.uid), str(b.gid)], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    gate = int(out)
    wait_for(lambda: gate not in live_processes(), 10, what="the gate to exit")
    assert not (scratch / "ran").exists()


NONROOT = """
import json, sys
from envctl_shared.config import parse
from envctl_shared.jobs import JobManager, Requester
sys.path.insert(0, sys.argv[3])
from tests.jobs_support import wait_done
mgr = JobManager(parse(json.loads(sys.argv[1])))
mgr.start()
me = json.loads(sys.argv[2])
job = wait_done(mgr, mgr.submit(Requester(**me), "mine", "dependencies: [hello]\\n").id)
print(json.dumps(job.to_dict()))
mgr.stop()
"""


def test_non_root_daemon_builds_as_itself(scratch, accounts, channel_dir) -> None:
    """A daemon that is not root builds as its own user (no build_user needed)."""
    a = accounts.alice
    home = scratch / "alice"
    home.mkdir()
    os.chown(home, a.uid, a.gid)
    root = home / "root"
    root.mkdir()
    os.chown(root, a.uid, accounts.shared_gid)
    os.chmod(root, 0o2775)
    cfg = {"roots": [{"path": str(root), "group": accounts.shared_group}],
           "requests": {"state_dir": str(home / "state"), "channels": [str(channel_dir)],
                        "default_channels": [str(channel_dir)]}}
    me = {"uid": a.uid, "gid": a.gid, "groups": [accounts.shared_gid], "pid": 1,
          "username": a.name, "claimed_user": None, "is_admin": False}
    out = subprocess.run(["setpriv", f"--reuid={a.uid}", f"--regid={a.gid}",
                          f"--groups={accounts.shared_gid}", "--", sys.executable, "-c",
                          NONROOT, json.dumps(cfg), json.dumps(me), str(REPO)],
                         cwd=str(home), timeout=120, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout.splitlines()[-1])
    assert job["state"] == "succeeded", (job, out.stderr)
    assert os.stat(root / "mine" / "bin" / "hello").st_uid == a.uid
    assert find_violations(root / "mine", accounts.shared_gid) == []
