"""Soak: many real rattler builds through one JobManager with cancels landing at random points
(queued, preparing, solving, linking, healing, finalizing). Whatever the timing, every job ends
in a terminal state that matches the disk: succeeded ⇒ a compliant prefix under its name,
anything else ⇒ nothing under its name and no version; no half-built version or build process
is left.

Scale with ENVCTL_SOAK_SCALE (default 1: 12 jobs, a few seconds; 10 gives 120 jobs).
"""

from __future__ import annotations

import os
import random
import threading

import pytest
from envctl_shared.errors import Conflict
from envctl_shared.jobs import State

from tests.helpers import live_processes, wait_for
from tests.jobs_support import ENV_HELLO, JobsEnv, full_log, wait_done

pytest_plugins = ("tests.fixtures_jobs",)  # the jobs fixtures

SCALE = max(1, int(os.environ.get("ENVCTL_SOAK_SCALE", "1")))


@pytest.mark.soak
def test_builds_with_random_cancels(jobs_env: JobsEnv, manager_factory, accounts) -> None:
    # one requester submits the whole soak at once: not held to the per-user share
    mgr = manager_factory(jobs_env.config(max_concurrent=2, max_queued_per_user=1000))
    rng = random.Random(4)
    req = jobs_env.requester()
    jobs = [mgr.submit(req, f"soak{i}", ENV_HELLO) for i in range(12 * SCALE)]
    cancellers = []
    for job in jobs:
        if rng.random() < 0.4:
            delay = rng.uniform(0, 0.3 * SCALE)

            def cancel(job_id: str = job.id, delay: float = delay) -> None:
                threading.Event().wait(delay)
                try:
                    mgr.cancel(job_id, req)
                except Conflict:
                    pass  # it had already ended: fine

            t = threading.Thread(target=cancel)
            t.start()
            cancellers.append(t)
    for t in cancellers:
        t.join()
    done = [wait_done(mgr, j.id, 60 * SCALE) for j in jobs]
    states = {j.state for j in done}
    assert states <= {State.SUCCEEDED, State.CANCELLED}, [
        (j.id, j.exit_detail, full_log(mgr, j.id)) for j in done if j.state is State.FAILED]
    for job in done:
        prefix = jobs_env.root / job.name
        envdir = jobs_env.root / ".envctl" / "envs" / job.name  # none if cancelled queued
        versions = sorted(os.listdir(envdir)) if envdir.exists() else []
        if job.state is State.SUCCEEDED:
            assert (prefix / "bin" / "hello").is_file(), job
            assert os.stat(prefix.resolve()).st_uid == 0  # linked by the trusted step
            assert versions == ["env.json", "v1", "v1.json", "v1.use"], job
        else:
            assert not os.path.lexists(prefix) and versions == [], job
    counts = mgr.counts()
    assert counts["succeeded"] + counts["cancelled"] == len(jobs)
    assert counts["queued"] == counts["running"] == 0

    wait_for(lambda: not live_processes({accounts.builder.uid}, home_under=jobs_env.state_dir),
             10, what="no build processes left")
