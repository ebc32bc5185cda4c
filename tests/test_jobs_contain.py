"""Nothing of a build outlives it, not even a ``kill -9`` of the daemon and the restart.

The escapees are real processes of the real build user, started by a real build step (the venv
backend's ``requests.venv_python``, pointed at a wrapper that leaves a process behind and then
runs the real python): one ``setsid sleep 333``, as a package's setup.py did in the issue, and
one that tries hard — it double-forks, makes a session and then a process group of its own,
and turns non-dumpable (the files in its ``/proc/<pid>`` then show as root's). The daemon that
started them is SIGKILLed mid-build (with this test process not a subreaper, so the escapees
end up below PID 1, as in production); the daemon restarted on the same state dir must kill
them: through the build's cgroup where cgroup v2 is writable, through its start-up sweep of
the build user where it is not (the first daemon runs in a mount namespace whose cgroup2
mounts are read-only, as in an unprivileged container). Whether a process is alive, and as
whom it runs, is read here from ``/proc/<pid>/status``, not through envctl's own process code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from envctl_shared.jobs import JobManager, State
from envctl_shared.jobs import cgroup as cgroups
from envctl_shared.jobs.procs import BuildUser, spawn, sweep_orphans

from tests.conftest import Accounts
from tests.helpers import wait_escapees, wait_for
from tests.jobs_support import (
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

TRIES_HARD = """
import ctypes, os, time
if os.fork():
    os._exit(0)
os.setsid()  # a session of its own...
if os.fork():
    os._exit(0)  # ...whose leader leaves at once: the grandchild is no session leader,
os.setpgid(0, 0)  # so it can make a process group of its own in it as well
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: its /proc files are root's now
with open(os.path.join(os.environ["HOME"], "escapees"), "a") as fh:
    fh.write(f"{os.getpid()}\\n")
time.sleep(333)
"""


def tries_hard(scratch: Path) -> Path:
    script = scratch / "tries-hard.py"
    script.write_text(TRIES_HARD)
    os.chmod(script, 0o644)
    return script


def escape_command(kind: str, scratch: Path) -> str:
    return SETSID if kind == "setsid" else f"{sys.executable} {tries_hard(scratch)}"


def wrapper(scratch: Path, kind: str) -> str:
    """A ``venv_python`` that leaves an escapee of ``kind`` behind at every call."""
    path = scratch / f"escaping-python-{kind}"
    path.write_text(ESCAPING_PYTHON.format(escape=escape_command(kind, scratch),
                                           python=sys.executable))
    os.chmod(path, 0o755)
    os.chmod(scratch, 0o755)
    return str(path)


def status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict; empty when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def runs_as(pid: int, uid: int) -> bool:
    """Alive (not a zombie) with real uid ``uid``."""
    st = status(pid)
    return bool(st) and not st["State"].startswith("Z") and int(st["Uid"].split()[0]) == uid


def procs_of(uid: int) -> list[int]:
    """Every live process whose real uid is ``uid`` (non-dumpable ones included)."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and runs_as(int(e), uid)]


def cgroup_of(pid: int) -> str:
    """The cgroup v2 path of a process, as /proc shows it ("" when gone)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return ""
    return next((line[3:] for line in lines if line.startswith("0::")), "")


def cgroup_writable() -> bool:
    """Whether this host lets root create a cgroup v2 below its own (probed for real)."""
    mine = cgroups.own_cgroup()
    if mine is None:
        return False
    probe = mine / f"envctl-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


def cgroup2_mounts() -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        if tail.startswith("cgroup2 "):
            out.append(fields.split()[4])
    return out


def without_cgroups(argv: list[str]) -> list[str]:
    """``argv`` in a mount namespace whose cgroup2 mounts are read-only (as in an unprivileged
    container): a daemon run so finds no writable cgroup."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'while [ "$1" != -- ]; do mount -o remount,bind,ro "$1" || exit 1; shift; done; '
            'shift; exec "$@"', "sh", *cgroup2_mounts(), "--", *argv]


def job_row(state_dir: Path, job_id: str) -> tuple[str, str | None, int | None, str | None]:
    db = sqlite3.connect(f"file:{state_dir / 'jobs.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT state, phase, pgid, cgroup FROM jobs WHERE id=?",
                          (job_id,)).fetchone()
    finally:
        db.close()


@contextmanager
def not_a_subreaper() -> Iterator[None]:
    """While inside, orphans of our children go to PID 1 (or the nearest subreaper above us),
    not to this test process — which a job manager started earlier made a subreaper."""
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int()
    libc.prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    libc.prctl(36, 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    try:
        yield
    finally:
        libc.prctl(36, flag.value, 0, 0, 0)


def kill_all(pids: list[int]) -> None:
    """Test cleanup only: the test failed and left these behind."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("kind,mechanism", [("setsid", "cgroup"), ("tries-hard", "cgroup"),
                                            ("tries-hard", "sweep")])
def test_escapee_does_not_survive_kill9_and_restart(jobs_env: JobsEnv,
                                                    manager_factory: Callable[..., JobManager],
                                                    scratch: Path, kind: str,
                                                    mechanism: str) -> None:
    if mechanism == "cgroup" and not cgroup_writable():
        pytest.skip("no writable cgroup v2 here: the sweep variant covers this host")
    builder = jobs_env.accounts.builder.uid
    cfg = jobs_env.raw(venv_python=wrapper(scratch, kind))
    # pip seeded: the step still runs when the daemon is killed (the venv on uv ends first)
    argv = daemon_argv(cfg, jobs_env.requester(), [["k9", ENV_VENV_PIP, "venv"]])
    if mechanism == "sweep":
        argv = without_cgroups(argv)
    escapees: list[int] = []
    recorded: str | None = None
    with not_a_subreaper():  # the dead daemon's orphans go where they go in production
        daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            assert daemon.stdout is not None
            job_id = daemon.stdout.readline().strip()
            escapees = wait_escapees(jobs_env.state_dir / "jobs" / job_id / "home")
            wait_for(lambda: job_row(jobs_env.state_dir, job_id)[1] == "creating", 10,
                     what="the venv step")
        finally:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
    try:
        _, _, leader, recorded = job_row(jobs_env.state_dir, job_id)
        assert (recorded is not None) == (mechanism == "cgroup")
        assert leader is not None
        wait_for(lambda: not runs_as(leader, builder), 10, what="the step to die with it")
        (escapee,) = escapees
        assert runs_as(escapee, builder), "the escapee did not survive the daemon"
        assert int(status(escapee)["PPid"]) != daemon.pid
        assert os.getsid(escapee) != leader  # out of the step's session (the leader's pid)
        if kind == "tries-hard":
            assert os.stat(f"/proc/{escapee}/status").st_uid == 0  # its /proc files: root's
            assert os.getpgid(escapee) == escapee != os.getsid(escapee)  # a group of its own
        if recorded is not None:
            assert cgroup_of(escapee).endswith(f"/job-{job_id}")
            assert recorded.endswith(cgroup_of(escapee))
        mgr = manager_factory(jobs_env.config(venv_python=cfg["requests"]["venv_python"]))
        wait_for(lambda: not runs_as(escapee, builder), 10, what="the escapee to die")
        job = mgr.get(job_id)
        assert job.state is State.INTERRUPTED, job
        log = full_log(mgr, job_id)
        if recorded is not None:
            assert "killed 0 process(es) in the build's cgroup" not in log, log
            assert "process(es) in the build's cgroup" in log
            assert not Path(recorded).exists()
        else:
            assert "orphaned build-user process(es) that had left every group " \
                   "(start-up sweep)" in log, log
        assert not (jobs_env.root / "k9").exists()
        wait_for(lambda: not procs_of(builder), 10, what="every build process gone")
    finally:  # what a failure before the restart would leave
        kill_all([p for p in escapees if runs_as(p, builder)])
        if recorded is not None:
            cgroups.CgroupTree(Path(recorded).parent).clear()


def test_build_runs_in_its_cgroup_which_goes_with_it(jobs_env: JobsEnv, scratch: Path) -> None:
    """Step and escapee are in the job's cgroup (recorded before the step ran); when the job
    ends the escapee is dead and the cgroup removed, and with the last one the daemon's base."""
    if not cgroup_writable():
        pytest.skip("no writable cgroup v2 here")
    builder = jobs_env.accounts.builder.uid
    mgr = JobManager(jobs_env.config(venv_python=wrapper(scratch, "tries-hard")))
    mgr.start()
    try:
        assert mgr.containment == "cgroup"
        job = mgr.submit(jobs_env.requester(), "cg", ENV_VENV, backend="venv")
        (escapee,) = wait_escapees(jobs_env.state_dir / "jobs" / job.id / "home")
        _, _, leader, recorded = job_row(jobs_env.state_dir, job.id)
        assert recorded is not None and Path(recorded).name == f"job-{job.id}"
        assert escapee in cgroups.members(Path(recorded))
        assert recorded.endswith(cgroup_of(escapee))
        if leader is not None and runs_as(leader, builder):  # the step may be over already
            assert cgroup_of(leader) == cgroup_of(escapee)
        done = wait_done(mgr, job.id, 120)
        assert done.state is State.SUCCEEDED, full_log(mgr, job.id)
        assert not runs_as(escapee, builder)
        assert "1 build process(es) that had left the build's process group" in \
            full_log(mgr, job.id)
        assert not Path(recorded).exists()
        assert not Path(recorded).parent.exists()  # an idle daemon holds no cgroup at all
        assert job_row(jobs_env.state_dir, job.id)[3] is None
    finally:
        mgr.stop()


def test_freezer_kills_everything_in_the_cgroup(accounts: Accounts, scratch: Path) -> None:
    """The path of kernels without ``cgroup.kill`` (< 5.14): freeze, SIGKILL each, thaw."""
    if not cgroup_writable():
        pytest.skip("no writable cgroup v2 here")
    b = accounts.builder
    tree, _ = cgroups.setup(scratch / "state")
    assert tree is not None
    job = tree.create("freeze")
    path = job.path
    step = spawn(["sh", "-c", "setsid sleep 333 & setsid sleep 333 & exec sleep 333"],
                 BuildUser(b.uid, b.gid, b.name, True), scratch, job)
    try:
        step.release()
        wait_for(lambda: len(cgroups.members(path)) >= 3, 10, what="three sleeps")
        pids = cgroups.members(path)
        assert cgroups.kill(path, freeze=True) == len(pids)
        assert not [p for p in pids if runs_as(p, b.uid)]
        assert (path / "cgroup.freeze").read_text().strip() == "0"  # thawed for the next step
        assert step.wait() == -signal.SIGKILL
    finally:
        kill_all([p for p in cgroups.members(path) if runs_as(p, b.uid)])
        step.wait()
        tree.clear()
    assert not tree.base.exists()


def test_start_sweep_kills_orphans_and_spares_held_builds(accounts: Accounts,
                                                          scratch: Path) -> None:
    """The fallback's rule: a build-user process that no live process holds any more (below
    init, or below us) is killed, even non-dumpable in a session and group of its own; one
    that a live process other than us holds (another daemon's build) is spared."""
    b = accounts.builder
    drop = ["setpriv", f"--reuid={b.uid}", f"--regid={b.gid}", "--clear-groups"]
    home = scratch / "home"
    home.mkdir()
    os.chown(home, b.uid, b.gid)
    held = subprocess.Popen(["sh", "-c", f"{' '.join(drop)} sleep 333 & echo $!; wait"],
                            stdout=subprocess.PIPE, text=True)
    orphans: list[int] = []
    try:
        assert held.stdout is not None
        held_pid = int(held.stdout.readline())
        subprocess.run([*drop, "env", f"HOME={home}", sys.executable, tries_hard(scratch)],
                       check=True)
        orphans = wait_escapees(home, 10)
        assert sweep_orphans(BuildUser(b.uid, b.gid, b.name, True)) == 1
        wait_for(lambda: not runs_as(orphans[0], b.uid), 5, what="the orphan to die")
        assert runs_as(held_pid, b.uid)
    finally:
        kill_all([p for p in [*orphans, *procs_of(b.uid)] if runs_as(p, b.uid)])
        held.wait(10)


def test_step_end_kills_escapees_without_cgroups(jobs_env: JobsEnv, scratch: Path) -> None:
    """No writable cgroup: the end of each step still kills what left the step's group, and
    the hardest escapee too (the daemon is its subreaper and sweeps the build user below it)."""
    builder = jobs_env.accounts.builder.uid
    cfg = jobs_env.raw(venv_python=wrapper(scratch, "tries-hard"))
    daemon = subprocess.Popen(without_cgroups(daemon_argv(cfg, jobs_env.requester(),
                                                          [["nc", ENV_VENV, "venv"]])),
                              stdout=subprocess.PIPE, text=True)
    escapees: list[int] = []
    try:
        assert daemon.stdout is not None
        job_id = daemon.stdout.readline().strip()
        escapees = wait_escapees(jobs_env.state_dir / "jobs" / job_id / "home")
        wait_for(lambda: job_row(jobs_env.state_dir, job_id)[0] not in ("queued", "running"),
                 120, what="the build to end")
        log = (jobs_env.state_dir / "jobs" / job_id / "build.log").read_text()
        state, _, _, recorded = job_row(jobs_env.state_dir, job_id)
        assert state == "succeeded" and recorded is None, log
        assert not [p for p in escapees if runs_as(p, builder)]
        assert "killed 1 build process(es) that had left the build's process group" in log
    finally:
        daemon.kill()
        daemon.wait()
        kill_all([p for p in escapees if runs_as(p, builder)])


def test_step_that_cannot_enter_its_cgroup_never_runs(accounts: Accounts, scratch: Path) -> None:
    """The move into the cgroup comes before the gate opens: when it fails, the step is killed
    at its gate and the error raised — the command never ran outside its cgroup."""
    b = accounts.builder
    os.chmod(scratch, 0o777)
    gone = cgroups.JobCgroup(scratch / "no-such-cgroup")
    with pytest.raises(FileNotFoundError):
        spawn(["touch", str(scratch / "ran")], BuildUser(b.uid, b.gid, b.name, True), scratch,
              gone)
    assert not (scratch / "ran").exists() and not procs_of(b.uid)
