"""Real builds, offline, as the build user: rattler against a hand-made local channel, venv from
a hand-made wheelhouse; the results are relocated, healed (checked independently with GNU find)
and usable by group members. Also: replace keeps the old env until the new one succeeded.
The conda/mamba/micromamba backends cannot run here (no conda is installable on this machine):
their command lines are unit-tested instead.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from envctl_shared.errors import ConfigError
from envctl_shared.jobs import State
from envctl_shared.jobs.backends import PHASES, BuildContext, get_backend
from envctl_shared.jobs.spec import parse_spec

from tests.helpers import as_user
from tests.jobs_support import ENV_HELLO, ENV_VENV, JobsEnv, full_log, wait_done

pytest_plugins = ("tests.fixtures_jobs",)  # the jobs fixtures


def test_rattler_build_end_to_end(jobs_env: JobsEnv, manager_factory, accounts) -> None:
    mgr = manager_factory()
    req = jobs_env.requester("alice", claimed="jupyter-alice")
    job = mgr.submit(req, "hello-env", ENV_HELLO)
    assert job.state is State.QUEUED and job.claimed_user == "jupyter-alice"
    phases: set[str] = set()
    seen = mgr.get(job.id)
    while not seen.terminal:
        seen = mgr.wait(job.id, 10)
        if seen.phase:
            phases.add(seen.phase)
    log = full_log(mgr, job.id)
    assert seen.state is State.SUCCEEDED, (seen.exit_detail, log)
    prefix = jobs_env.root / "hello-env"
    assert seen.prefix == str(prefix)
    # Followers see the phase of the moment: a step lasting a few ms (freezing this tiny env) may
    # be over before they look, so the log proves it ran; solving runs a process, long enough.
    assert "solving" in phases and phases <= set(PHASES), phases
    assert re.search(r"froze \S+/\.envctl/envs/hello-env/v1: \d+ entries, \d+ file\(s\) shared "
                     r"with the store, digest sha256:[0-9a-f]{64}", log), log
    assert "link hello" in log and "ENVCTL-PHASE" not in log  # phases go to the job only
    # built as the build user at the version's own path, which the stable name points to
    assert os.readlink(prefix) == ".envctl/envs/hello-env/v1"
    version = jobs_env.root / ".envctl" / "envs" / "hello-env" / "v1"
    assert os.stat(prefix / "bin" / "hello").st_uid == 0  # linked by the trusted step, frozen
    script = (prefix / "bin" / "hello").read_text()
    assert f"cat {version}/share/greet/message" in script  # the prefix baked in is the version's
    assert sorted(os.listdir(version.parent)) == ["env.json", "v1", "v1.json", "v1.use"]
    # a group member can run it; the claimed user is recorded, not trusted
    out = as_user(accounts.bob.uid, accounts.bob.gid, [str(prefix / "bin" / "hello")])
    assert out.stdout == "hello from envctl\n"
    assert seen.to_dict()["claimed_user"] == "jupyter-alice"
    assert seen.to_dict()["requester"]["uid"] == accounts.alice.uid
    assert mgr.counts()["succeeded"] == 1


def test_job_files_private_to_build_user(jobs_env: JobsEnv, manager_factory, accounts) -> None:
    mgr = manager_factory()
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "priv", ENV_HELLO).id)
    assert job.state is State.SUCCEEDED
    spec = jobs_env.state_dir / "jobs" / job.id / "environment.yml"
    assert spec.read_text() == ENV_HELLO
    a = accounts
    assert as_user(a.builder.uid, a.builder.gid, ["cat", str(spec)]).stdout == ENV_HELLO
    denied = as_user(a.alice.uid, a.alice.gid, ["cat", str(spec)], check=False)
    assert denied.returncode != 0
    denied = as_user(a.alice.uid, a.alice.gid, ["cat", job.log_path], check=False)
    assert denied.returncode != 0
    assert stat.S_IMODE(os.stat(jobs_env.state_dir).st_mode) == 0o711
    assert os.stat(jobs_env.state_dir / "jobs.db").st_uid == 0
    # the store (every job's spec and requester) is the daemon's alone, its WAL files too
    for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm"):
        assert stat.S_IMODE(os.stat(jobs_env.state_dir / name).st_mode) == 0o600, name
    assert as_user(a.alice.uid, a.alice.gid, ["cat", str(jobs_env.state_dir / "jobs.db")],
                   check=False).returncode != 0


def test_venv_build_then_failed_replace_restores_it(jobs_env: JobsEnv, manager_factory,
                                                     accounts) -> None:
    """One venv build (a venv costs seconds), then a replace whose pip step fails."""
    mgr = manager_factory()
    job = mgr.submit(jobs_env.requester("bob"), "webenv", ENV_VENV, backend="venv")
    done = wait_done(mgr, job.id, 180)
    assert done.state is State.SUCCEEDED, (done.exit_detail, full_log(mgr, job.id))
    prefix = jobs_env.root / "webenv"
    writable = subprocess.run(["find", str(prefix.resolve()), "!", "-type", "l", "-perm", "/222"],
                              capture_output=True, text=True, check=True).stdout
    assert writable == ""  # frozen: no write bit anywhere
    py = prefix / "bin" / "python"
    out = as_user(accounts.alice.uid, accounts.alice.gid,
                  [str(py), "-c", "import envctl_demo; print(envctl_demo.GREETING)"])
    assert out.stdout == "hello from a wheel\n"
    before = os.lstat(py).st_ino
    bad = mgr.submit(jobs_env.requester("bob"), "webenv",
                     "dependencies:\n  - pip: [not-in-wheelhouse]\n", backend="venv",
                     replace=True)
    failed = wait_done(mgr, bad.id, 180)
    assert failed.state is State.FAILED and "installing step failed" in failed.exit_detail
    assert os.lstat(py).st_ino == before  # the very same old env, never moved
    assert os.readlink(prefix) == ".envctl/envs/webenv/v1"
    assert sorted(os.listdir(prefix.resolve().parent)) == ["env.json", "v1", "v1.json", "v1.use"]


def test_replace_keeps_old_until_new_succeeds(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory()
    req = jobs_env.requester()
    first = wait_done(mgr, mgr.submit(req, "rep", ENV_HELLO).id)
    assert first.state is State.SUCCEEDED, full_log(mgr, first.id)
    prefix = jobs_env.root / "rep"
    marker = prefix / "share" / "greet" / "message"
    old_inode = os.stat(marker).st_ino
    # a replace that fails (unsatisfiable) leaves the old env untouched
    bad = wait_done(mgr, mgr.submit(req, "rep", "dependencies: [nosuchpkg]\n",
                                    replace=True).id)
    assert bad.state is State.FAILED
    assert os.stat(marker).st_ino == old_inode
    # a replace that succeeds switches the name to the new version; the old one stays (GC)
    good = wait_done(mgr, mgr.submit(req, "rep", "dependencies: [libgreet]\n",
                                     replace=True).id)
    assert good.state is State.SUCCEEDED, good.exit_detail
    assert not (prefix / "bin" / "hello").exists() and (prefix / "lib" / "greet").is_dir()
    assert os.readlink(prefix) == ".envctl/envs/rep/v2"
    assert os.stat(jobs_env.root / ".envctl/envs/rep/v1/share/greet/message").st_ino \
        == old_inode


def test_refuses_to_build_as_root_without_build_user(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory(jobs_env.config(build_user=None))
    with pytest.raises(ConfigError, match="never builds environments as root"):
        mgr.submit(jobs_env.requester(), "x", ENV_HELLO)
    assert mgr.list(include_finished=True) == []


@pytest.mark.parametrize("flavour,expected", [
    ("conda", ["env", "create", "--prefix", "{p}", "--file", "{f}"]),
    ("mamba", ["env", "create", "--yes", "--prefix", "{p}", "--file", "{f}"]),
    ("micromamba", ["create", "--yes", "--prefix", "{p}", "--file", "{f}"]),
])
def test_conda_family_command_lines(jobs_env: JobsEnv, flavour: str, expected: list[str]) -> None:
    """No conda can be installed here, so the command line and the spec file are what we test."""
    cfg = jobs_env.config(allowed_backends=[flavour], backend=flavour,
                          conda_exe=f"/opt/{flavour}/bin/{flavour}").requests
    backend = get_backend(flavour, cfg)
    spec = parse_spec("dependencies: [hello, {pip: [envctl_demo]}]\n", cfg)
    backend.check(spec, cfg)
    files = backend.files(spec, cfg)
    ctx = BuildContext(spec, cfg, Path("/state/jobs/j1"), Path("/state/jobs/j1/home"),
                       Path("/root/env"), Path("/state/cache"))
    steps = backend.steps(ctx)
    assert len(steps) == 1
    want = [x.format(p="/root/env", f="/state/jobs/j1/home/environment.yml") for x in expected]
    assert list(steps[0].argv) == [f"/opt/{flavour}/bin/{flavour}", *want]
    import yaml

    doc = yaml.safe_load(files["home/environment.yml"])
    assert doc == {"channels": [str(jobs_env.channel), "nodefaults"],
                   "dependencies": ["hello", {"pip": ["envctl_demo"]}]}
