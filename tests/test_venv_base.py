"""A venv's base interpreter must be one every consumer of a shared root can run.

A venv runs its base interpreter for life (``pyvenv.cfg`` ``home``). On a root that other hosts
and user pods mount (NFS, EFS, FUSE), the daemon's own ``/usr/bin/python3`` is one they may not
have: loading a configuration that would build such venvs is refused, naming the key and the
way out. The network filesystem here is a real FUSE mount (bindfs), which the daemon treats as
remote like NFS; the same root reached without FUSE is local and keeps the old default.

The way out, ``requests.venv_base``, for real: a daemon builds its base Python into the root
with rattler — from a local channel holding a real ``python`` conda package made of this
machine's Debian interpreter and stdlib (``jobs_support.python_package``; conda-forge is not
reachable here) — and builds a venv on it; that venv then runs, as a user, in a mount namespace
where the host's Python is hidden, as in a user pod whose image has none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envctl_shared.config import parse, single_root
from envctl_shared.errors import EX_CONFIG, ConfigError
from envctl_shared.jobs import JobManager, State, base_python, envs, layout

from tests.api_support import VENV_SPEC, ApiDaemon, start_api_daemon
from tests.conftest import Accounts, User
from tests.helpers import VENV_BIN
from tests.jobs_support import (
    ENV_VENV,
    HOST_PYTHON,
    HOST_STDLIB,
    JobsEnv,
    Pool,
    build_channel,
    full_log,
    python_package,
    wait_done,
)

pytest_plugins = ("tests.fixtures_jobs",)  # jobs_env, manager_factory


@pytest.fixture
def network_root(scratch: Path) -> Iterator[tuple[Path, Path]]:
    """(backing directory, the same directory through a bindfs mount)."""
    backing, mnt = scratch / "backing", scratch / "mnt"
    backing.mkdir()
    mnt.mkdir()
    subprocess.run(["bindfs", str(backing), str(mnt)], check=True)
    try:
        yield backing, mnt
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], check=False)


def _raw(root: Path, accounts: Accounts, **requests: Any) -> dict[str, Any]:
    return {"roots": [{"path": str(root), "group": accounts.shared_group}],
            "requests": {"build_user": accounts.builder.name,
                         "allowed_backends": ["rattler", "venv"], **requests}}


@pytest.mark.fuse
def test_venv_python_outside_a_network_root_is_refused_at_load(
        network_root: tuple[Path, Path], accounts: Accounts, scratch: Path) -> None:
    backing, mnt = network_root
    with pytest.raises(ConfigError) as err:
        parse(_raw(mnt, accounts), source="envctld.yaml")  # the default /usr/bin/python3
    msg = err.value.message
    assert msg.startswith("envctld.yaml: requests.venv_python: /usr/bin/python3 is outside")
    assert "network filesystem" in msg and "requests.venv_base" in msg
    # A Python env inside the root is what every consumer has.
    bindir = mnt / "python" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python3").write_text("")
    parse(_raw(mnt, accounts, venv_python=str(bindir / "python3")))
    # ... but not one that only looks inside: the interpreter's real path counts.
    os.symlink("/usr/bin/python3", bindir / "host-python")
    with pytest.raises(ConfigError, match="outside the requests root"):
        parse(_raw(mnt, accounts, venv_python=str(bindir / "host-python")))
    # A base the daemon keeps in the root is the way out; it names python, and is the only
    # interpreter a venv could run.
    base = {"dependencies": ["python=3.12"]}
    assert parse(_raw(mnt, accounts, venv_base=base)).requests.venv_base is not None
    with pytest.raises(ConfigError, match="requests.venv_base: set either venv_base"):
        parse(_raw(mnt, accounts, venv_base=base, venv_python=str(bindir / "python3")))
    with pytest.raises(ConfigError, match="venv_base.dependencies: must list python"):
        parse(_raw(mnt, accounts, venv_base={"dependencies": ["pythonista"]}))
    # No venv builds, or a local root: nothing to refuse.
    parse(_raw(mnt, accounts, allowed_backends=["rattler"]))
    single_root(mnt, accounts.shared_group)  # `envctl heal PATH --group G` builds nothing
    parse(_raw(backing, accounts))
    # The daemon's commands say so and exit 78 (configuration).
    cfg = scratch / "envctld.yaml"
    cfg.write_text(yaml.safe_dump(_raw(mnt, accounts)))
    res = subprocess.run([str(VENV_BIN / "envctl"), "check", "--config", str(cfg)], text=True,
                         capture_output=True, timeout=60)
    assert res.returncode == EX_CONFIG and "requests.venv_python" in res.stderr, res.stderr


# -- the base Python the daemon keeps in the root ------------------------------------------------


@pytest.fixture(scope="module")
def python_channel() -> Iterator[Path]:
    """A local channel with the machine's Python as a linux-64 ``python`` package."""
    base = Path("/tmp/envctl-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=base, prefix="pychannel-"))
    os.chmod(path, 0o755)
    try:
        yield build_channel(path, [python_package()])
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def base_api(accounts: Accounts, python_channel: Path) -> Iterator[ApiDaemon]:
    """A real daemon whose venvs are built on a base Python it keeps in the root."""
    yield from start_api_daemon(accounts, venv_python=None, venv_base={
        "dependencies": ["python 3.11.*"], "channels": [str(python_channel)]})


def _hidden_host_python(user: User, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``user`` in a mount namespace without the host's Python — an empty
    directory over its stdlib, /dev/null over its interpreter —, as in a user pod whose image
    has none. The namespace (and its mounts) ends with the command."""
    empty = tempfile.mkdtemp(dir="/tmp/envctl-tests")
    hide = (f"mount --bind {empty} {HOST_STDLIB} && mount --bind /dev/null {HOST_PYTHON} && "
            f"exec setpriv --reuid={user.uid} --regid={user.gid} --clear-groups \"$@\"")
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               hide, "sh", *argv], text=True, capture_output=True, timeout=60,
                              cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    finally:
        os.rmdir(empty)


def _home(prefix: Path) -> str:
    lines = (prefix / "pyvenv.cfg").read_text().splitlines()
    return next(line.split("=", 1)[1].strip() for line in lines if line.startswith("home"))


def test_venv_on_the_base_python_in_the_root_runs_without_the_host_python(
        base_api: ApiDaemon, accounts: Accounts, scratch: Path) -> None:
    api = base_api
    spec = api.write_spec(VENV_SPEC)  # pip: [greetlib], from the daemon's wheelhouse
    res = api.cli(accounts.alice, "request", "create", "pyenv", "-f", str(spec), "--backend",
                  "venv", "--json", timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout
    log = Path(json.loads(res.stdout)["log_path"]).read_text()
    # The daemon built its base with rattler into the root, froze it, and recorded it.
    bases = [p for p in (api.root / ".envctl" / "base").iterdir() if p.is_dir()]
    assert len(bases) == 1 and bases[0].name.startswith("python-"), bases
    base = bases[0]
    assert f"building the venv base {base.name}" in log and "link python" in log, log
    assert f"froze {base}:" in log, log
    record = json.loads((base.parent / f"{base.name}.json").read_text())
    assert record["state"] == "ready" and record["kind"] == "venv-base"
    assert record["digest"].startswith("sha256:") and base.stat().st_uid == 0
    assert [p["name"] for p in record["packages"]] == ["python"]
    assert base.stat().st_gid == accounts.shared_gid  # frozen for the root's group
    # The venv runs that base for life.
    version = (api.root / "pyenv").resolve()
    assert _home(version) == str(base / "bin")
    assert os.readlink(version / "bin" / "python3") == str(base / "bin" / "python3")
    # ... and runs, for a user, where the host's Python is not.
    code = "import sys, greetlib; print(sys.prefix, greetlib.GREETING)"
    run = _hidden_host_python(accounts.alice, str(api.root / "pyenv" / "bin" / "python"),
                              "-c", code)
    assert run.returncode == 0, run.stderr
    prefix, greeting = run.stdout.split()
    assert Path(prefix).resolve() == version and greeting == "hi", run.stdout
    # The same run fails for a venv on the host's Python (the old venv_python, /usr/bin/python3):
    # its interpreter is not there (here /dev/null: cannot be executed).
    old = scratch / "old-venv"
    subprocess.run([str(HOST_PYTHON), "-m", "venv", "--without-pip", str(old)], check=True)
    assert _home(old) == str(HOST_PYTHON.parent)
    broken = _hidden_host_python(accounts.alice, str(old / "bin" / "python"), "-c", code)
    assert broken.returncode != 0 and not broken.stdout, broken.stderr
    # A second venv is built on the same base, not on a new one.
    res = api.cli(accounts.bob, "request", "create", "pyenv2", "-f", str(spec), "--backend",
                  "venv", "--json", timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout
    log = Path(json.loads(res.stdout)["log_path"]).read_text()
    assert f"venv base: {base}/bin/python3 (built before)" in log, log
    assert _home((api.root / "pyenv2").resolve()) == str(base / "bin")
    assert [p.name for p in (api.root / ".envctl" / "base").iterdir() if p.is_dir()] == [
        base.name]


def test_one_base_for_venv_jobs_at_once_and_a_dead_builds_base_is_replaced(
        jobs_env: JobsEnv, manager_factory: Callable[..., JobManager],
        python_channel: Path, pool: Pool) -> None:
    """Two venv jobs started together (two build accounts) need the same base: one builds it,
    the other waits for it and reuses it (one base, built once). A base a dead build left
    (record still ``building``) is removed and built again by the next venv job."""
    cfg = jobs_env.config(max_concurrent=2, build_user=None, build_users=list(pool.names),
                          venv_python=None, venv_base={
        "dependencies": ["python"], "channels": [str(python_channel)]})
    area = layout.RootArea(jobs_env.root)
    name = base_python.base_name(cfg.requests)
    with area.open() as fds:  # as a build killed mid-way leaves it
        base_fd = layout.checked_dir(fds.area, "base", 0o755, "base")
        envs.begin(base_fd, name, {"name": name}, 0, 0)
        os.close(base_fd)
    (area.path("base", name) / "half-linked").write_text("")
    mgr = manager_factory(cfg)
    who = jobs_env.requester("alice")
    jobs = [mgr.submit(who, f"twin{i}", ENV_VENV, backend="venv") for i in (1, 2)]
    logs = []
    for job in jobs:
        assert wait_done(mgr, job.id, 300).state == State.SUCCEEDED, full_log(mgr, job.id)
        logs.append(full_log(mgr, job.id))
    built = [log for log in logs if f"building the venv base {name}" in log]
    assert len(built) == 1, logs
    assert "left half-built by an interrupted build" in built[0]
    waited = [log for log in logs if "(built before)" in log]
    assert len(waited) == 1 and "waiting for the venv base" in waited[0], logs
    assert sorted(p.name for p in area.path("base").iterdir()) == [name, f"{name}.json"]
    assert not (area.path("base", name) / "half-linked").exists()
    for i in (1, 2):
        cfg_text = ((jobs_env.root / f"twin{i}").resolve() / "pyvenv.cfg").read_text()
        assert f"home = {area.path('base', name, 'bin')}\n" in cfg_text


def test_a_base_that_cannot_be_built_fails_the_venv_job_and_leaves_nothing(
        jobs_env: JobsEnv, manager_factory: Callable[..., JobManager],
        python_channel: Path) -> None:
    """No such Python in the channel: the job fails saying why, and neither a base nor the
    version is left behind (the next venv job tries again)."""
    cfg = jobs_env.config(venv_python=None, venv_base={
        "dependencies": ["python=9.9"], "channels": [str(python_channel)]})
    mgr = manager_factory(cfg)
    job = mgr.submit(jobs_env.requester("alice"), "nopy", ENV_VENV, backend="venv")
    done = wait_done(mgr, job.id, 120)
    log = full_log(mgr, job.id)
    assert done.state == State.FAILED and "solving step failed" in (done.exit_detail or ""), log
    assert "python=9.9" in log and "removed the unfinished venv base" in log, log
    assert list(layout.RootArea(jobs_env.root).path("base").iterdir()) == []
    assert not (jobs_env.root / "nopy").exists()
