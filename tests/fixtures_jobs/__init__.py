"""pytest fixtures for the test_jobs_* modules, loaded with ``pytest_plugins``.

Kept apart from ``tests.jobs_support`` (plain helpers the tests import) so that pytest imports
this module itself and rewrites its asserts. Everything is real: a channel indexed by rattler,
a root owned by the shared group, JobManagers stopped (builds killed) at the end of each test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envctl_shared.config import Config
from envctl_shared.jobs import JobManager

from tests.jobs_support import (
    JobsEnv,
    Pool,
    build_channel,
    hello_packages,
    python_channel,
    write_wheel,
)


@pytest.fixture(scope="session")
def channel_dir() -> Iterator[Path]:
    """The local conda channel, built and indexed once per session (world-readable)."""
    base = Path("/tmp/envctl-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=base, prefix="channel-"))
    os.chmod(path, 0o755)
    build_channel(path, hello_packages())
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def py_channel() -> Path:
    """The channel with a real python and pip (``jobs_support.python_channel``): built once,
    kept between sessions under /tmp/envctl-tests by a hash of its inputs."""
    return python_channel()


@pytest.fixture
def jobs_env(scratch: Path, accounts: Any, channel_dir: Path) -> JobsEnv:
    root = scratch / "root"
    root.mkdir()
    os.chown(root, 0, accounts.shared_gid)
    os.chmod(root, 0o2775)
    wheels = scratch / "wheels"
    write_wheel(wheels, "envctl_demo", "1.0", "GREETING = 'hello from a wheel'\n")
    return JobsEnv(root, scratch / "state", channel_dir, wheels, accounts)


@pytest.fixture
def manager_factory(jobs_env: JobsEnv) -> Iterator[Callable[..., JobManager]]:
    """Started JobManagers for a config; every one is stopped at the end of the test."""
    made: list[JobManager] = []

    def make(config: Config | None = None) -> JobManager:
        mgr = JobManager(config or jobs_env.config())
        mgr.start()
        made.append(mgr)
        return mgr

    yield make
    for mgr in made:
        mgr.stop(timeout=20)


@pytest.fixture(scope="session")
def pool(accounts: Any) -> Iterator[Pool]:
    """Build accounts ``envt<pid>-pool1..3``, members of the shared group; removed at the end
    (their processes first: the accounts are the tests' alone)."""
    names = tuple(f"envt{os.getpid()}-pool{i}" for i in (1, 2, 3))
    for name in names:
        subprocess.run(["userdel", "-f", name], capture_output=True, check=False)
        subprocess.run(["useradd", "--no-create-home", "--user-group", "-s", "/bin/sh",
                        "-G", accounts.shared_group, name], check=True)
    try:
        pws = [pwd.getpwnam(n) for n in names]
        yield Pool(names, tuple(p.pw_uid for p in pws), tuple(p.pw_gid for p in pws))
    finally:
        for name in names:
            subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, check=False)
            subprocess.run(["userdel", "-f", name], capture_output=True, check=False)
            subprocess.run(["groupdel", name], capture_output=True, check=False)
