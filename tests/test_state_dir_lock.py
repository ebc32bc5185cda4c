"""One daemon per state dir: a second one refuses to start and touches nothing of the first's.

Before, a second ``envctld`` given the same ``requests.state_dir`` (another config, only its
socket differing) logged a WARNING and started; its recovery then killed the first daemon's
running builds (same cgroup names) and told their requesters "interrupted: the daemon stopped
during the build". Now it exits 75 naming the state dir and the holder's pid, before it opens
the store or recovers anything; the first daemon's build runs on and is cancelled as usual.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from envctl_shared.errors import EX_TEMPFAIL

from tests.api_support import VENV_SPEC, ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.daemon_support import Envctld
from tests.helpers import live_processes, wait_for


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)



def _second_config(api: ApiDaemon) -> Path:
    """The first daemon's config with only the socket moved (the state dir is the same)."""
    cfg = yaml.safe_load(api.config.read_text())
    run = api.base / "run2"
    run.mkdir(mode=0o755)
    cfg["socket"]["path"] = str(run / "envctld.sock")
    path = api.base / "second.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_second_daemon_on_the_same_state_dir_leaves_the_first_alone(
        api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec(VENV_SPEC)
    res = api.cli(accounts.alice, "request", "create", "slow-locked", "-f", str(spec),
                  "--backend", "venv", "--no-wait")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    wait_for(lambda: api.job(job_id)["state"] == "running", 30, what="slow job running")
    home = api.base / "state" / "jobs" / job_id  # the build's HOME is its home/ below
    wait_for(lambda: bool(live_processes({accounts.builder.uid}, home_under=home)), 30,
             what="the build's processes")
    build = live_processes({accounts.builder.uid}, home_under=home)

    second = Envctld(_second_config(api), api.base)
    rc = second.start_failing()
    log = second.log_text()
    assert rc == EX_TEMPFAIL, log[-3000:]
    assert api.daemon.proc is not None
    assert (f"another envctld (pid {api.daemon.proc.pid}) is using the state dir "
            f"{api.base / 'state'}") in log
    assert "requests.state_dir of its own" in log  # the hint
    assert "jobs-start" not in log and "recover" not in log  # nothing was opened or recovered
    assert os.stat(api.base / "state" / "envctld.lock").st_mode & 0o777 == 0o600

    # The first daemon's build was not touched: same processes, still running, no false story.
    assert set(build) <= set(live_processes({accounts.builder.uid}, home_under=home))
    job = api.job(job_id)
    assert job["state"] == "running", job
    assert "interrupted" not in (api.base / "state" / "jobs" / job_id / "build.log").read_text()
    # ...and it is cancelled as usual by its requester.
    res = api.cli(accounts.alice, "request", "cancel", job_id)
    assert res.returncode == 0, res.stderr
    job = api.job(job_id)
    assert job["state"] == "cancelled" and accounts.alice.name in job["exit_detail"], job
    wait_for(lambda: not live_processes({accounts.builder.uid}, home_under=home), 10,
             what="the cancelled build to end")
