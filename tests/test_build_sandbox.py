"""Builds cannot touch each other, nor anything but their own version (issue 17, items 3-4).

Each attack runs for real against a job manager, as a requester's build would: ``--test``
commands and a pip sdist's ``setup.py`` (package code, run as the build uid), with build
accounts that are members of the root's group (as an admin who wants builds to reach a
``2770`` root makes them). Before the sandbox every one of these writes went through: the
versions were the one build user's, and so were its package cache and its jobs' homes.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from envctl_shared.jobs import JobManager, State, procs
from envctl_shared.jobs.procs import BuildUser, Sandbox, spawn

from tests.conftest import Accounts
from tests.helpers import as_user
from tests.jobs_support import ENV_HELLO, JobsEnv, Pool, full_log, wait_done

pytest_plugins = ("tests.fixtures_jobs",)  # jobs_env, manager_factory, pool

pytestmark = pytest.mark.skipif(procs.namespaces() is not None,
                                reason=f"no mount namespace here: {procs.namespaces()}")


def _build(mgr: JobManager, jobs_env: JobsEnv, name: str, spec: str = ENV_HELLO,
           tests: tuple[str, ...] = (), backend: str | None = None) -> Any:
    job = mgr.submit(jobs_env.requester(), name, spec, backend=backend, tests=tests)
    return wait_done(mgr, job.id, 120)


def _attempt(label: str, command: str) -> str:
    """A shell line that tries a write and says which way it went (and the error)."""
    return (f'if out=$({{ {command}; }} 2>&1); then echo "WROTE {label}"; '
            f'else echo "REFUSED {label}: $out"; fi')


def test_a_build_writes_nothing_but_its_own(jobs_env: JobsEnv, manager_factory: Any,
                                            accounts: Accounts, pool: Pool) -> None:
    """A build's ``--test`` tries to write another env's version (and through it the cached
    file it links), a hand-made env, the root's top level, the package cache, another job's
    home in the state dir, the kernels dir and a file another build left in /tmp: each is
    refused (read-only file system), and each target is unchanged."""
    root = jobs_env.root
    kernels = jobs_env.state_dir.parent / "kernels"
    kernels.mkdir(mode=0o2775)
    os.chown(kernels, 0, accounts.shared_gid)
    os.chmod(kernels, 0o2775)
    handmade = root / "handmade"
    as_user(accounts.alice.uid, accounts.shared_gid, f"umask 002; mkdir {handmade}")
    raw = jobs_env.raw(build_user=pool.names[0])
    raw["kernels"] = {"dir": str(kernels)}
    from envctl_shared.config import parse

    mgr = manager_factory(parse(raw))
    victim = _build(mgr, jobs_env, "victim")
    assert victim.state is State.SUCCEEDED, victim.exit_detail
    message = root / "victim" / "share" / "greet" / "message"
    cached = [p for p in (root / ".envctl" / "cache" / "conda").rglob("message")
              if p.is_file()]
    left = Path("/tmp") / f"envctl-left-{os.getpid()}"
    left.write_text("left by another build\n")
    os.chown(left, pool.uids[0], pool.gids[0])
    try:  # the file in the host's /tmp goes, whatever happens
        victim_home = jobs_env.state_dir / "jobs" / victim.id / "home"
        targets = {
            "version": f"touch {root}/victim/zz.pth",
            "linked": f"echo evil >> {message}",
            "handmade": f"touch {handmade}/x",
            "rename": f"mv {root}/victim {root}/victim2",
            "cache": (f"echo evil >> {cached[0]}" if cached else "false"),
            "cache-dir": f"touch {root}/.envctl/cache/conda/x",
            "state": f"touch {victim_home}/x",
            "kernels": f"mkdir {kernels}/envctl-evil",
            "tmp": f"echo evil > {left}",
        }
        job = _build(mgr, jobs_env, "attacker",
                     tests=tuple(_attempt(k, v) for k, v in targets.items()))
        log = full_log(mgr, job.id)
        assert job.state is State.SUCCEEDED, (job.exit_detail, log)
        said = [x for x in log.splitlines() if x.startswith(("WROTE ", "REFUSED "))]
        assert said[-1] == "WROTE tmp" and len(said) == len(targets), said  # /tmp: a private one
        for line in said[:-1]:  # a file not the build's: no permission, before the read-only mount
            assert line.endswith(("Read-only file system", "Permission denied")), line
        assert cached and message.read_text() == "hello from envctl\n" == cached[0].read_text()
        assert os.listdir(root / "victim") == os.listdir(root / ".envctl/envs/victim/v1")
        assert not (root / "victim" / "zz.pth").exists() and os.path.islink(root / "victim")
        assert os.listdir(handmade) == [] and os.listdir(kernels) == []
        assert not (victim_home / "x").exists()
        assert left.read_text() == "left by another build\n"
    finally:
        left.unlink(missing_ok=True)


def test_world_writable_places_are_private_to_the_step(jobs_env: JobsEnv, manager_factory: Any,
                                                       pool: Pool) -> None:
    """Attack: a build writes what it wants to keep (or what fills the disk) in the host's
    other world-writable directories, ``/var/tmp`` and ``/run/lock``: outside its version and
    HOME, so ``limits.disk`` never counts it, it outlives the build, and the next build of the
    same pool account (another requester's) finds it. Each is a fresh one of the step's own:
    nothing reaches the host's, and nothing left there by a build is seen by the next."""
    mgr = manager_factory(jobs_env.config(build_user=pool.names[0]))
    tag = f"envctl-atk-{os.getpid()}"
    places = [Path(d) for d in ("/var/tmp", "/run/lock") if os.path.isdir(d)]
    left = places[0] / f"{tag}-left"
    left.write_text("left by an earlier build\n")
    os.chown(left, pool.uids[0], pool.gids[0])
    try:
        tests = [*(f"echo kept > {d}/{tag}" for d in places),
                 f"if [ -e {left} ]; then echo SAW-LEFT; fi"]
        job = _build(mgr, jobs_env, "stasher", tests=tuple(tests))
        assert job.state is State.SUCCEEDED, (job.exit_detail, full_log(mgr, job.id))
        assert "SAW-LEFT" not in full_log(mgr, job.id).splitlines()
        assert not [d for d in places if (d / tag).exists()], "a build wrote the host's"
    finally:
        left.unlink(missing_ok=True)
        for d in places:
            (d / tag).unlink(missing_ok=True)


def test_the_cache_is_the_daemons_and_read_only_to_builds(jobs_env: JobsEnv,
                                                          manager_factory: Any,
                                                          pool: Pool) -> None:
    """The trusted step fills ``<root>/.envctl/cache/conda``: every entry is the daemon's
    with no group or other write bit, so a build uid (outside any namespace, too) can read
    and link its files, never change them; the version's directories were handed over to
    the build uid, the files linked from the cache were not."""
    mgr = manager_factory(jobs_env.config(build_user=pool.names[0]))
    job = _build(mgr, jobs_env, "cached")
    assert job.state is State.SUCCEEDED, job.exit_detail
    cache = jobs_env.root / ".envctl" / "cache" / "conda"
    entries = list(cache.rglob("*"))
    files = [p for p in entries if p.is_file() and not p.is_symlink()]
    assert files
    for path in [cache, *entries]:
        st = path.lstat()
        assert st.st_uid == 0 and not st.st_mode & 0o022 or path.is_symlink(), path
    for path in files:
        res = as_user(pool.uids[0], pool.gids[0], f"echo evil >> '{path}'", check=False)
        assert res.returncode != 0 and "Permission denied" in res.stderr, (path, res)


SLOW_SETUP = """
import os, sys, time
from setuptools import setup
release = {release!r}
deadline = time.time() + 60
while not os.path.exists(release) and time.time() < deadline:
    time.sleep(0.1)
setup(name={name!r}, version="1.0", py_modules=[])
"""

PROBE_SETUP = """
import glob, os, sys, time
other = {other!r}
deadline = time.time() + 60
while not glob.glob(other + "/lib/python3*/site-packages") and time.time() < deadline:
    time.sleep(0.1)
site = glob.glob(other + "/lib/python3*/site-packages")[0]
tried = [site] + [f"/proc/{{p}}/root{{site}}" for p in os.listdir("/proc") if p.isdigit()]
for where in tried:
    try:
        with open(where + "/zz_evil.pth", "w") as fh:
            fh.write("import os\\n")
        print("WROTE", where, flush=True)
    except OSError as exc:
        if where == site:
            print("REFUSED", where, exc.strerror, flush=True)
print("OTHER-OWNER", os.stat(other).st_uid, "ME", os.getuid(), flush=True)
sys.exit(1)  # pip shows a failing setup.py's output: the build log has it
"""


def _sdist(wheelhouse: Path, name: str, setup_py: str) -> None:
    """A plain setuptools sdist (setup.py + PKG-INFO) in the wheelhouse."""
    out = wheelhouse / f"{name}-1.0.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for rel, text in (("setup.py", setup_py),
                          ("PKG-INFO", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")):
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-1.0/{rel}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.chmod(out, 0o644)


def test_two_builds_at_once_cannot_write_each_other(jobs_env: JobsEnv, manager_factory: Any,
                                                    pool: Pool) -> None:
    """Two requesters' venv builds run at once, each as its own account of the pool. A's
    ``setup.py`` tries to write a ``.pth`` into B's version while B's own ``setup.py`` is
    still running (B's version is writable to B at that moment) — directly and through every
    ``/proc/<pid>/root``: refused, and B's version ends without it."""
    release = jobs_env.root / "release-b"
    b_version = jobs_env.root / ".envctl" / "envs" / "envb" / "v1"
    _sdist(jobs_env.wheelhouse, "slowpkg", SLOW_SETUP.format(release=str(release),
                                                              name="slowpkg"))
    _sdist(jobs_env.wheelhouse, "probepkg", PROBE_SETUP.format(other=str(b_version)))
    cfg = jobs_env.raw(build_users=list(pool.names), max_concurrent=4)
    cfg["requests"].pop("build_user")
    # pip (a pip-only option picks it): the venv's old setuptools builds these sdists without
    # the wheel package, which uv's build frontend would need
    cfg["requests"]["pip_args"] = [*cfg["requests"]["pip_args"], "--no-build-isolation",
                                   "--prefer-binary"]
    from envctl_shared.config import parse

    mgr = manager_factory(parse(cfg))
    assert mgr.max_builds() == 3 and mgr.sandbox == "mount-namespace"
    b = mgr.submit(jobs_env.requester("bob"), "envb",
                   "dependencies:\n  - pip\n  - pip:\n    - slowpkg\n", backend="venv")
    a = mgr.submit(jobs_env.requester("alice"), "enva",
                   "dependencies:\n  - pip\n  - pip:\n    - probepkg\n", backend="venv")
    try:
        a_done = wait_done(mgr, a.id, 120)
    finally:
        release.touch()
    b_done = wait_done(mgr, b.id, 120)
    a_log = full_log(mgr, a.id)
    assert b_done.state is State.SUCCEEDED, (b_done.exit_detail, full_log(mgr, b.id))
    assert a_done.state is State.FAILED and "REFUSED" in a_log, a_log
    assert "WROTE" not in a_log, a_log
    assert "Read-only file system" in a_log, a_log
    assert not list(b_version.glob("lib/python3*/site-packages/zz_evil.pth"))
    uids = {mgr.store.process(a.id)[0], mgr.store.process(b.id)[0]}
    assert len(uids) == 2 and uids <= set(pool.uids), uids


def test_one_build_user_builds_one_at_a_time(jobs_env: JobsEnv, manager_factory: Any,
                                              pool: Pool) -> None:
    """Processes of one uid reach each other (``ptrace``, ``/proc/<pid>/root``), namespace
    or not: one build account means one build at a time, whatever max_concurrent says."""
    assert manager_factory(jobs_env.config(max_concurrent=4)).max_builds() == 1


def _sandboxed(user: BuildUser, home: Path, sandbox: Sandbox, script: str) -> tuple[int, str]:
    step = spawn(["/bin/sh", "-c", script], user, home, sandbox=sandbox)
    step.release()
    assert step.proc.stdout is not None
    out = step.proc.stdout.read().decode()
    return step.wait(), out


@pytest.mark.fuse
def test_no_step_can_remount_not_even_a_trusted_one(scratch: Path, pool: Pool) -> None:
    """The root read-only and a subdirectory writable again, on a FUSE root (bindfs) as on a
    local one; a trusted step (root, as the daemon) and a build-uid step alike cannot remount
    it writable, unmount it or lift it from a user namespace of their own."""
    backing, mnt, home = scratch / "backing", scratch / "mnt", scratch / "home"
    for d in (backing, mnt, home):
        d.mkdir()
    (backing / "own").mkdir()
    os.chmod(backing / "own", 0o777)
    os.chmod(home, 0o777)
    subprocess.run(["bindfs", str(backing), str(mnt)], check=True)
    try:
        for root in (backing, mnt):
            sandbox = Sandbox((root,), (root / "own", home))
            script = (f"touch {root}/own/ok-$(id -u) && echo OWN-OK; "
                      f"touch {root}/top || echo TOP-RO; "
                      f"mount -o remount,rw {root} && echo REMOUNTED; "
                      f"umount -l {root} && echo UNMOUNTED; "
                      f"unshare -Urm sh -c 'mount -o remount,rw {root}' && echo LIFTED; "
                      f"touch {root}/top2 && echo WROTE-TOP")
            for user in (procs.daemon_user(),
                         BuildUser(pool.uids[0], pool.gids[0], pool.names[0], True)):
                _code, out = _sandboxed(user, home, sandbox, script)
                assert "OWN-OK" in out and "TOP-RO" in out, (root, user, out)
                for bad in ("REMOUNTED", "UNMOUNTED", "LIFTED", "WROTE-TOP"):
                    assert bad not in out, (root, user, out)
                assert not (backing / "top").exists() and not (backing / "top2").exists()
            made = sorted(p.name for p in (backing / "own").iterdir())
            assert made == sorted(f"ok-{uid}" for uid in (0, pool.uids[0])), made
            for p in (backing / "own").iterdir():
                p.unlink()
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], check=False)


def test_hand_over_gives_directories_only(scratch: Path, pool: Pool) -> None:
    """A version a trusted step made: its directories become the build uid's (so pip can add
    to them), its files stay the daemon's and read-only, a symlink is neither followed nor
    changed, and nothing outside moves (a link to a directory outside is not entered)."""
    from envctl_shared.jobs import layout

    outside = scratch / "outside"
    outside.mkdir()
    version = scratch / "v1"
    (version / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (version / "lib" / "data.txt").write_text("cached\n")
    (version / "lib" / "out").symlink_to(outside)
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert layout.hand_over(fd, "v1", pool.uids[0], pool.gids[0]) == 4
        assert layout.hand_over(fd, "v1", pool.uids[0], pool.gids[0]) == 0
    finally:
        os.close(fd)
    for d in (version, version / "lib", version / "lib" / "python3.11",
              version / "lib" / "python3.11" / "site-packages"):
        assert (d.stat().st_uid, d.stat().st_gid) == (pool.uids[0], pool.gids[0]), d
    assert (version / "lib" / "data.txt").stat().st_uid == 0
    assert (version / "lib" / "out").lstat().st_uid == 0 and outside.stat().st_uid == 0


def test_seal_cache_takes_group_and_other_write_off_what_is_new(jobs_env: JobsEnv) -> None:
    """What a trusted step added to the cache with a group/other write bit (a package's
    tarball says 0666) loses it; older entries are not walked again."""
    from envctl_shared.jobs import layout

    area = layout.RootArea(jobs_env.root)
    with area.open() as fds:
        cache = area.conda_cache(fds)
        pkg = cache / "pkg-1.0-0"
        (pkg / "bin").mkdir(parents=True)
        (pkg / "bin" / "tool").write_text("#!/bin/sh\n")
        os.chmod(pkg / "bin" / "tool", 0o777)
        os.chmod(pkg / "bin", 0o777)
        (pkg / "lnk").symlink_to("bin/tool")
        assert layout.seal_cache(fds, time.time() - 5) == 2
        assert stat.S_IMODE((pkg / "bin" / "tool").stat().st_mode) == 0o755
        assert stat.S_IMODE((pkg / "bin").stat().st_mode) == 0o755
        assert layout.seal_cache(fds, time.time() + 5) == 0


FALLBACK = """
import json, sys
from envctl_shared.config import parse
from envctl_shared.jobs import JobManager, Requester
from tests.jobs_support import wait_done
cfg, who = json.loads(sys.argv[1]), json.loads(sys.argv[2])
mgr = JobManager(parse(cfg))
mgr.start()
try:
    job = mgr.submit(Requester(**who), "plain", "dependencies: [hello]\\n",
                     tests=['test ! -w "$CONDA_PREFIX"'])  # the daemon's, not the build's
    done = wait_done(mgr, job.id, 120)
    print(json.dumps({"sandbox": mgr.sandbox, "max_builds": mgr.max_builds(),
                      "state": done.state.value, "detail": done.exit_detail}), flush=True)
finally:
    mgr.stop(timeout=20)
"""


def test_without_namespaces_builds_run_and_status_says_so(jobs_env: JobsEnv,
                                                           pool: Pool) -> None:
    """A daemon that may not make mount namespaces (no ``CAP_SYS_ADMIN``, as under the shipped
    unit or in a container) still builds — as its pool's accounts, uids and modes keeping
    builds apart — and says ``sandbox: none``."""
    cfg = jobs_env.raw(build_users=list(pool.names))
    cfg["requests"].pop("build_user")
    who = jobs_env.requester()
    fields = {k: getattr(who, k) for k in ("uid", "gid", "groups", "pid", "username",
                                           "claimed_user", "is_admin")}
    res = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin",
                          sys.executable, "-c", FALLBACK, json.dumps(cfg), json.dumps(fields)],
                         capture_output=True, text=True, timeout=300, check=False,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"sandbox": "none", "max_builds": 2, "state": "succeeded",
                   "detail": out["detail"]}, out


def test_status_says_how_builds_are_kept_apart(accounts: Accounts) -> None:
    """``envctl status --json`` of a real daemon: steps in mount namespaces, and one build at
    a time with its one build user, whatever ``max_concurrent`` (4 here) says."""
    from tests.api_support import start_api_daemon

    fixture = start_api_daemon(accounts)
    api = next(fixture)
    try:
        res = api.cli(accounts.alice, "status", "--json")
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        assert (status["sandbox"], status["max_builds"]) == ("mount-namespace", 1), status
    finally:
        fixture.close()
