"""A build cannot take the machine: ``requests.limits`` (issue 19 item 3).

A real daemon with small limits builds real venvs (offline) whose ``--test`` commands go past
each limit: allocating past ``memory`` (the kernel's OOM killer in the build's cgroup), forking
past ``tasks`` (``pids.max``), writing past ``disk`` into the build's HOME and then sleeping
(the daemon's walk while the step runs stops it). Each fails its build with a message naming
the limit, and the daemon lives on: ``status`` answers with the limits and the controllers that
enforce them, ``doctor`` says so in one line, and a plain build still succeeds. The build
cgroups (v2 and any v1 hierarchy the host binds a controller to) are gone afterwards.
A build that prints more than a quarter of ``requests.max_log_bytes`` keeps going with its log
truncated and a note; the kept job directories together stay under ``max_log_bytes`` (oldest
finished first, their rows stay). ``requests.max_versions`` caps an env's versions even inside
``gc_grace``: a build at the cap removes the oldest first, and GC under a lowered cap too —
never the current one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from envctl_shared.api.client import Client
from envctl_shared.config import parse
from envctl_shared.errors import ConfigError
from envctl_shared.jobs import State
from envctl_shared.jobs import cgroup as cgroups

from tests.api_support import VENV_SPEC, ApiDaemon, start_api_daemon
from tests.conftest import Accounts, User
from tests.helpers import wait_for
from tests.jobs_support import ENV_HELLO, JobsEnv, full_log, wait_done

pytest_plugins = ("tests.fixtures_jobs",)  # the jobs fixtures

MEMORY = "256M"
TASKS = 64
DISK = "60M"


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts, max_log_bytes="2M", limits={
        "memory": MEMORY, "tasks": TASKS, "disk": DISK, "cpu_weight": 50})


def _build(api: ApiDaemon, user: User, name: str, *tests: str) -> dict:
    """Request a venv build of ``name`` with ``tests`` and wait for its end; the job."""
    argv = ["request", "create", name, "-f", str(api.write_spec(VENV_SPEC)), "--backend",
            "venv", "--no-wait"]
    for command in tests:
        argv += ["--test", command]
    res = api.cli(user, *argv)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        job = api.job(job_id)
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {api.job(job_id)}")


def _alive(api: ApiDaemon) -> dict:
    with Client(api.sock) as client:
        return client.call("status")


def _tag(api: ApiDaemon) -> str:
    """The name of the daemon's cgroup tree (``cgroup.setup``: by its state dir)."""
    return "envctl-" + hashlib.sha256(str(api.base / "state").encode()).hexdigest()[:12]


def _job_cgroups(api: ApiDaemon) -> list[Path]:
    """Every cgroup of this daemon's tree, in every hierarchy (v2 and v1)."""
    return [p for p in Path("/sys/fs/cgroup").rglob(_tag(api) + "*")]


def test_status_and_doctor_name_the_limits(api: ApiDaemon, accounts: Accounts) -> None:
    limits = json.loads(api.cli(accounts.alice, "status", "--json").stdout)["limits"]
    assert limits["memory"] == 256 << 20 and limits["tasks"] == TASKS
    assert limits["disk"] == 60 << 20 and limits["cpu_weight"] == 50
    assert sorted(limits["controllers"] + limits["missing"]) == ["cpu", "memory", "pids"]
    res = api.cli(accounts.alice, "doctor")
    line = next(x for x in res.stdout.splitlines() if "build limits:" in x)
    assert "memory 256M" in line and f"tasks {TASKS}" in line and "disk 60M" in line
    assert ("NOT enforced" in line) == bool(limits["missing"])


def _enforced(api: ApiDaemon, controller: str) -> None:
    if controller in _alive(api)["limits"]["missing"]:
        pytest.skip(f"no {controller} controller for the daemon on this host")


def test_allocating_past_the_memory_limit_fails_the_build(api: ApiDaemon,
                                                         accounts: Accounts) -> None:
    _enforced(api, "memory")
    job = _build(api, accounts.alice, "memhog", "python -c \"b = b'x' * (1 << 30)\"")
    assert job["state"] == "failed"
    assert f"the build exceeded requests.limits.memory = {MEMORY}" in job["exit_detail"]
    assert not (api.root / "memhog").exists()
    # the daemon lives on and builds
    assert _alive(api)["limits"]["memory"] == 256 << 20
    assert _build(api, accounts.alice, "aftermem", "python -c 'import greetlib'")["state"] \
        == "succeeded"
    assert not _job_cgroups(api)  # an idle daemon holds no build cgroup


def test_forking_past_the_tasks_limit_fails_the_build(api: ApiDaemon,
                                                      accounts: Accounts) -> None:
    _enforced(api, "pids")
    fork = ("python -c \"import subprocess\n"
            "procs = [subprocess.Popen(['sleep', '60']) for _ in range(300)]\"")
    job = _build(api, accounts.bob, "forker", fork)
    assert job["state"] == "failed"
    assert f"the build exceeded requests.limits.tasks = {TASKS}" in job["exit_detail"]
    assert not _job_cgroups(api)


def _fails_on_the_disk_limit(api: ApiDaemon, user: User, name: str, write: str) -> None:
    """A build of ``name`` whose test step runs ``write`` fails, naming ``limits.disk``."""
    job = _build(api, user, name, write)
    assert job["state"] == "failed", job
    assert f"the build exceeded requests.limits.disk = {DISK}" in job["exit_detail"]


def test_writing_past_the_disk_limit_stops_the_running_build(api: ApiDaemon,
                                                            accounts: Accounts) -> None:
    """The step would sleep for minutes after writing: the walk while it runs stops it."""
    write = ("python -c \"import os, time\n"
             "with open(os.path.expanduser('~/big'), 'wb') as f:\n"
             "    [f.write(b'x' * (1 << 20)) for _ in range(100)]\n"
             "time.sleep(300)\"")
    started = time.monotonic()
    _fails_on_the_disk_limit(api, accounts.alice, "diskhog", write)
    assert time.monotonic() - started < 100
    assert _alive(api)["limits"]["disk"] == 60 << 20


def test_a_deleted_file_held_open_counts_against_the_disk_limit(api: ApiDaemon,
                                                                 accounts: Accounts) -> None:
    """Attack: the step unlinks its file and keeps writing through the open fd (and a
    mapping of another, its fd closed). The walk of version and HOME never sees either, so
    a step could fill the state disk (or the shared root) for as long as its timeout allowed.
    Files the build's processes hold open or mapped, linked nowhere, count too."""
    write = ("python -c \"import mmap, os, time\n"
             "path = os.path.expanduser('~/gone')\n"
             "f = open(path, 'wb')\n"
             "os.unlink(path)\n"
             "[f.write(b'x' * (1 << 20)) for _ in range(40)]\n"
             "f.flush()\n"
             "fd = os.open(path, os.O_RDWR | os.O_CREAT)\n"
             "os.ftruncate(fd, 40 << 20)\n"
             "m = mmap.mmap(fd, 40 << 20)\n"
             "os.close(fd)\n"
             "os.unlink(path)\n"
             "m[:] = b'y' * (40 << 20)\n"
             "time.sleep(45)\"")
    _fails_on_the_disk_limit(api, accounts.alice, "hiddenhog", write)


def test_many_small_files_count_the_disk_they_take(api: ApiDaemon, accounts: Accounts) -> None:
    """Attack: 24,000 one-byte files take ~94M of disk (a block each) but were counted as
    24K (their sizes): ``limits.disk`` was no limit for a tree of small files. Each file
    counts what it takes on disk (its blocks) when that is more than its size."""
    write = ("python -c \"import os\n"
             "home = os.path.expanduser('~')\n"
             "for i in range(24000):\n"
             "    with open(os.path.join(home, str(i)), 'wb') as f: f.write(b'x')\n"
             "import time; time.sleep(45)\"")
    _fails_on_the_disk_limit(api, accounts.alice, "smallhog", write)


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (``VmHWM``), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) << 10


def test_one_endless_output_line_costs_the_daemon_no_memory(api: ApiDaemon,
                                                             accounts: Accounts) -> None:
    """Attack: a step prints 300M without a line break. The daemon read its output by lines,
    so the whole "line" grew in the daemon's own memory (no build limit applies there): a
    few GB of zeros took the daemon, and every build, down. Output is read in bounded
    pieces; the log is cut at its cap as for any output."""
    assert api.daemon.proc is not None
    before = _peak_rss(api.daemon.proc.pid)
    job = _build(api, accounts.bob, "oneline", "head -c 300000000 /dev/zero")
    assert job["state"] == "succeeded", job
    grew = _peak_rss(api.daemon.proc.pid) - before
    assert grew < 64 << 20, f"the daemon's peak memory grew by {grew >> 20}M"


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FLOOD_S = 5  # seconds of ``yes``: long enough that a per-line cost would show as seconds of CPU


def test_a_flood_past_the_log_cap_costs_the_daemon_little_cpu(api: ApiDaemon,
                                                               accounts: Accounts) -> None:
    """Attack: a step prints short lines as fast as it can (``yes``) for as long as it runs.
    Past its log cap the output is dropped, but the daemon still split it line by line:
    Python work per two bytes, under the daemon's one GIL, for the whole step — a core of
    the daemon's, and every other thread of it slowed. Past the cap it is drained in large
    pieces."""
    assert api.daemon.proc is not None
    pid = api.daemon.proc.pid
    used = {}
    for name, test in (("quiet", f"sleep {FLOOD_S}"), ("flood", f"timeout {FLOOD_S} yes || true")):
        before = _cpu_seconds(pid)
        job = _build(api, accounts.bob, name, test)
        assert job["state"] == "succeeded", job
        used[name] = _cpu_seconds(pid) - before
    extra = used["flood"] - used["quiet"]
    # split line by line, the flood cost the daemon most of a core for all its FLOOD_S
    assert extra < 0.1 * FLOOD_S, \
        f"the daemon used {extra:.1f}s more CPU on a {FLOOD_S} s flood ({used})"


def test_a_build_printing_past_its_log_cap_goes_on(api: ApiDaemon, accounts: Accounts) -> None:
    """A quarter of max_log_bytes (2M): 512K of the build's output, then a note."""
    job = _build(api, accounts.bob, "chatty", "head -c 3000000 /dev/zero | tr '\\0' 'y'")
    assert job["state"] == "succeeded", job["exit_detail"]
    log = api.cli(accounts.bob, "request", "logs", job["id"]).stdout
    assert "log truncated at 512K" in log
    assert len(log.encode()) < (512 << 10) + 8192


# A job manager in its own process (run in a mount namespace): prints its status limits, then
# the state of one build with a --test; argv = config, requester fields, spec.
WITHOUT = """
import json, sys, time
from envctl_shared.config import parse
from envctl_shared.jobs import JobManager, Requester
mgr = JobManager(parse(json.loads(sys.argv[1])))
mgr.start()
try:
    print(json.dumps(mgr.limits()), flush=True)
    job = mgr.submit(Requester(**json.loads(sys.argv[2])), "nolimits", sys.argv[3],
                     tests=["true"])
    while not mgr.get(job.id).terminal:
        time.sleep(0.1)
    print(mgr.get(job.id).state.value, flush=True)
finally:
    mgr.stop()
"""


def _v1_mounts() -> list[str]:
    """Mount points of the cgroup v1 hierarchies that hold a limit controller."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        kind, _source, options = (tail.split() + ["", "", ""])[:3]
        if kind == "cgroup" and set(options.split(",")) & set(cgroups.LIMITED_BY):
            out.append(fields.split()[4])
    return out


def test_missing_controllers_are_reported_and_builds_still_run(jobs_env: JobsEnv) -> None:
    """The v1 hierarchies read-only (as in a container that does not delegate them): the
    controllers are missing, the build runs without those limits, and succeeds."""
    mounts = _v1_mounts()
    tree, how = cgroups.setup(jobs_env.state_dir / "probe")
    if tree is None or not mounts or set(tree.controllers) - set(tree.v1):
        pytest.skip(f"the limit controllers are not (only) in v1 hierarchies here: {how}")
    tree.clear()
    who = jobs_env.requester()
    fields = {k: getattr(who, k) for k in ("uid", "gid", "groups", "pid", "username",
                                           "claimed_user", "is_admin")}
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'while [ "$1" != -- ]; do mount -o remount,bind,ro "$1" || exit 1; shift; done; '
            'shift; exec "$@"', "sh", *mounts, "--", sys.executable, "-c", WITHOUT,
            json.dumps(jobs_env.raw()), json.dumps(fields), ENV_HELLO]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    limits, state = res.stdout.splitlines()
    assert json.loads(limits)["missing"] == ["memory", "pids", "cpu"]
    assert json.loads(limits)["controllers"] == []
    assert state == "succeeded"


def test_config_refuses_limits_it_cannot_mean() -> None:
    base = {"roots": [{"path": "/tmp", "group": "root"}]}
    for bad, said in [({"memory": "4"}, "4 bytes is less than the least allowed, 16M"),
                      ({"memory": "4 gigs"}, "is not a size"),
                      ({"disk": True}, "not a boolean"),
                      ({"cpu_weight": 20000}, "must be 1 to 10000"),
                      ({"tasks": 2}, "must be at least 8"),
                      ({"swap": "1G"}, "requests.limits.swap: unknown key")]:
        with pytest.raises(ConfigError, match=said):
            parse({**base, "requests": {"limits": bad}})
    cfg = parse({**base, "requests": {"limits": {"memory": "1536M", "disk": 1 << 30},
                                      "max_log_bytes": "2G", "max_versions": 4}})
    assert cfg.requests.limits.memory == 1536 << 20
    assert cfg.requests.limits.named("memory") == "requests.limits.memory = 1536M"
    assert cfg.requests.limits.named("disk") == "requests.limits.disk = 1G"
    assert cfg.requests.max_log_bytes == 2 << 30
    with pytest.raises(ConfigError, match="must be less than requests.max_versions"):
        parse({**base, "requests": {"keep_versions": 4, "max_versions": 4}})


def test_the_tree_leaves_no_cgroup_behind(scratch: Path) -> None:
    """``setup`` makes the tree's bases (v2, and v1 where a limit controller lives there);
    a job's cgroups carry the limits; discarding the last job removes them all."""
    from envctl_shared.config import BuildLimits

    tree, how = cgroups.setup(scratch / "state")
    if tree is None:
        pytest.skip(f"no writable cgroup v2 here ({how})")
    job = tree.create("probe", BuildLimits(memory=64 << 20, tasks=99, cpu_weight=200))
    try:
        if "pids" in tree.controllers:
            where = job.v1.get("pids", job.path)
            assert (where / "pids.max").read_text().strip() == "99"
        if "memory" in tree.controllers:
            where = job.v1.get("memory", job.path)
            name = "memory.limit_in_bytes" if "memory" in job.v1 else "memory.max"
            assert (where / name).read_text().strip() == str(64 << 20)
        if "cpu" in tree.controllers:
            where = job.v1.get("cpu", job.path)
            name, value = ("cpu.shares", "2048") if "cpu" in job.v1 else ("cpu.weight", "200")
            assert (where / name).read_text().strip() == value
        assert job.hits() == {"memory": 0, "tasks": 0}
    finally:
        tree.discard(job.path)
    assert not job.path.exists() and not any(p.exists() for p in job.v1.values())
    assert not tree.base.exists() or (tree.base / cgroups.DAEMON_LEAF).exists()
    assert not any(p.exists() for p in tree.v1.values())


def _versions(jobs_env: JobsEnv, name: str) -> list[str]:
    found = (jobs_env.root / ".envctl" / "envs" / name).iterdir()
    return sorted((p.name for p in found if p.is_dir() and p.name.startswith("v")),
                  key=lambda v: int(v[1:]))


def test_versions_are_capped_even_inside_the_grace(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory(jobs_env.config(max_versions=3, keep_versions=1, gc_grace=86400))
    alice = jobs_env.requester()
    for i in range(5):  # a --test makes every build a new version
        job = wait_done(mgr, mgr.submit(alice, "capped", ENV_HELLO, replace=i > 0,
                                        tests=["hello"]).id)
        assert job.state is State.SUCCEEDED, job.exit_detail
        assert len(_versions(jobs_env, "capped")) <= 3
    assert _versions(jobs_env, "capped") == ["v3", "v4", "v5"]
    assert "removed v2 of 'capped': at most 3 versions" in full_log(mgr, job.id)
    assert (jobs_env.root / "capped").resolve().name == "v5"
    # GC under a lower cap: the oldest go, grace or not; the current one stays
    mgr.reload(jobs_env.config(max_versions=2, keep_versions=1, gc_grace=86400))
    assert mgr.environments.gc(dry_run=True)["removed"] == [{"name": "capped", "version": "v3"}]
    assert mgr.environments.gc()["removed"] == [{"name": "capped", "version": "v3"}]
    assert _versions(jobs_env, "capped") == ["v4", "v5"]
    assert (jobs_env.root / "capped").resolve().name == "v5"


def test_kept_logs_stay_under_their_total_cap(jobs_env: JobsEnv, manager_factory) -> None:
    """1M for all job directories: each build logs its 256K (a quarter), so the oldest
    finished jobs' directories go; their rows, and the newest logs, stay."""
    mgr = manager_factory(jobs_env.config(max_log_bytes="1M"))
    alice = jobs_env.requester()
    ids = []
    for i in range(6):
        job = wait_done(mgr, mgr.submit(alice, f"chat{i}", ENV_HELLO,
                                        tests=["head -c 400000 /dev/zero | tr '\\0' y"]).id)
        assert job.state is State.SUCCEEDED, job.exit_detail
        ids.append(job.id)
    jobs = jobs_env.state_dir / "jobs"

    def total() -> int:  # while the daemon prunes: a directory may go under the walk
        size = 0
        for top, _dirs, files in os.walk(jobs):  # os.walk skips what vanished
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    size += os.lstat(os.path.join(top, name)).st_size
        return size

    # pruned right after the job's state is written (which wait_done saw)
    wait_for(lambda: total() <= 1 << 20, 10, what="job directories under the cap")
    assert not (jobs / ids[0]).exists()
    assert "log truncated at 256K" in full_log(mgr, ids[-1])
    assert mgr.get(ids[0]).state is State.SUCCEEDED  # the row stays


def test_the_disk_walk_survives_a_build_changing_its_tree(scratch: Path) -> None:
    """Entries vanish, and directories turn into files or symlinks, under the walk (a build
    is still writing): they are skipped, never an error that would fail the build."""
    import os
    import threading

    from envctl_shared.jobs.runner import tree_bytes

    top = scratch / "version"
    top.mkdir()
    for i in range(300):
        (top / f"d{i}").mkdir()
        (top / f"d{i}" / "f").write_bytes(b"y" * 100)
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            d = top / f"d{i % 300}"
            if d.is_symlink() or d.is_file():
                d.unlink()
            elif d.is_dir():
                (d / "f").unlink(missing_ok=True)
                d.rmdir()
                (os.symlink if i % 2 else lambda _t, p: Path(p).write_bytes(b"x"))("/", d)
            else:
                d.mkdir()
                (d / "f").write_bytes(b"y" * 100)

    worker = threading.Thread(target=churn)
    worker.start()
    sizes = []
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            sizes.append(tree_bytes(top))
    finally:
        stop.set()
        worker.join()
    assert all(s >= 0 for s in sizes) and max(sizes) > 0


def test_held_use_marks_cannot_lift_the_version_cap(jobs_env: JobsEnv, manager_factory,
                                                     accounts: Accounts) -> None:
    """Attack: bob (any user: marks are 0644 for every kernel's sake) holds the use mark of
    each version of alice's env as it becomes current, as a kernel would, and never lets go.
    GC and the cap never remove a held version, so every ``--replace`` added one: the hard
    cap bounded nothing. Now the build that finds no room fails at once, naming the cap and
    who holds each old version (pid and uid), and the versions on disk stay within it."""
    mgr = manager_factory(jobs_env.config(max_versions=3, keep_versions=1, gc_grace=86400))
    alice = jobs_env.requester()
    env_dir = jobs_env.root / ".envctl" / "envs" / "held"
    hold = ("import fcntl, os, struct, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.fcntl(fd, 37, struct.pack('hhqqi4x', fcntl.F_RDLCK, 0, 0, 0, 0))\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    holders = []
    try:
        for i in range(5):
            job = wait_done(mgr, mgr.submit(alice, "held", ENV_HELLO, replace=i > 0,
                                            tests=["hello"]).id)
            assert len(_versions(jobs_env, "held")) <= 3
            if job.state is not State.SUCCEEDED:
                break
            cur = (jobs_env.root / "held").resolve().name
            proc = subprocess.Popen(
                ["setpriv", f"--reuid={accounts.bob.uid}", f"--regid={accounts.bob.gid}",
                 "--clear-groups", sys.executable, "-c", hold, str(env_dir / f"{cur}.use")],
                stdout=subprocess.PIPE, text=True)
            holders.append(proc)
            assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        assert job.state is State.FAILED, "a build past the cap went through"
        assert "requests.max_versions" in (job.exit_detail or ""), job.exit_detail
        assert f"uid {accounts.bob.uid}" in (job.exit_detail or ""), job.exit_detail
        assert _versions(jobs_env, "held") == ["v1", "v2", "v3"]
        assert (jobs_env.root / "held").resolve().name == "v3"
        for proc in holders[:2]:  # v1's and v2's kernels end: room for the next build
            proc.kill()
            proc.wait()
        job = wait_done(mgr, mgr.submit(alice, "held", ENV_HELLO, replace=True,
                                        tests=["hello"]).id)
        assert job.state is State.SUCCEEDED, job.exit_detail
        assert len(_versions(jobs_env, "held")) <= 3
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
