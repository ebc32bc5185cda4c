"""A hostile requester's spec against a real build: what a package of an allowed channel can
plant in the version the build then writes into, and which ``variables:`` a shared env may set.
Each case was an attack on the merged conda+pip build before it was refused here."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from envctl_shared.jobs import JobManager, State

from tests.jobs_support import CondaPackage, JobsEnv, build_channel, full_log, wait_done

pytest_plugins = ("tests.fixtures_jobs",)
Factory = Callable[..., JobManager]


def test_a_packaged_state_symlink_does_not_redirect_the_variables(
        jobs_env: JobsEnv, scratch: Path, manager_factory: Factory) -> None:
    """A package shipping ``conda-meta/state`` as a symlink made the rattler step write the
    spec's variables through it: over any file that step may write (the build user's today,
    every file once that step runs as the daemon). The link is replaced, its target kept."""
    victim = scratch / "victim"
    victim.write_text("precious\n")
    os.chown(victim, jobs_env.accounts.builder.uid, jobs_env.accounts.builder.gid)
    channel = build_channel(scratch / "statechan", [
        CondaPackage("stateln", links={"conda-meta/state": str(victim)})])
    mgr = manager_factory(jobs_env.config(channels=[str(channel)],
                                          default_channels=[str(channel)]))
    job = mgr.submit(jobs_env.requester(), "statevars",
                     "dependencies: [stateln]\nvariables: {MODE: offline}\n")
    assert wait_done(mgr, job.id).state is State.SUCCEEDED, full_log(mgr, job.id)
    assert victim.read_text() == "precious\n"
    state = jobs_env.root / "statevars" / "conda-meta" / "state"
    assert not state.is_symlink()
    assert json.loads(state.read_text()) == {"env_vars": {"MODE": "offline"}}
