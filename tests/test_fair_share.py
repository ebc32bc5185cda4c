"""Free build slots go round robin across requesters, not first come first served.

Why: with FIFO, one requester's queue of slow builds held both slots while another user's
4-second build waited for all of them (issue 19 item 3). Real builds in a real JobManager
with a pool of build accounts and two slots: alice queues three slow builds, then bob one; when
alice's first ends, the slot goes to bob, not to alice's third.
"""

from __future__ import annotations

from dataclasses import replace

from envctl_shared.jobs import State
from envctl_shared.jobs.manager import fair_order

from tests.helpers import wait_for
from tests.jobs_support import ENV_HELLO, JobsEnv, wait_done

pytest_plugins = ("tests.fixtures_jobs",)  # the jobs fixtures


def test_a_freed_slot_goes_to_the_requester_who_has_none(jobs_env: JobsEnv, manager_factory,
                                                         pool) -> None:
    mgr = manager_factory(jobs_env.config(build_user=None, build_users=list(pool.names),
                                          max_concurrent=2))
    alice, bob = jobs_env.requester("alice"), jobs_env.requester("bob")
    first = mgr.submit(alice, "fair-a1", ENV_HELLO, tests=["sleep 2"])
    second = mgr.submit(alice, "fair-a2", ENV_HELLO, tests=["sleep 100"])
    third = mgr.submit(alice, "fair-a3", ENV_HELLO, tests=["sleep 100"])
    wait_for(lambda: {mgr.get(j.id).state for j in (first, second)} == {State.RUNNING}, 30,
             what="alice's first two builds running")
    theirs = mgr.submit(bob, "fair-b", ENV_HELLO)
    done = wait_done(mgr, theirs.id, timeout=60)  # FIFO: after alice's second (100 s)
    assert done.state is State.SUCCEEDED, done.exit_detail
    assert mgr.get(first.id).state is State.SUCCEEDED
    late = mgr.get(third.id)
    assert late.state is State.QUEUED or (late.started_at or 0) > (done.started_at or 0)
    for job in (second, third):
        mgr.cancel(job.id, jobs_env.requester("alice"))


def test_fair_order_serves_each_requester_in_turn() -> None:
    """The rule alone: fewest running first, then least recently started, then oldest job."""
    from envctl_shared.jobs import Job

    def job(n: int, uid: int, hub: str | None = None) -> Job:
        return Job(id=f"j{n}", name=f"n{n}", state=State.QUEUED, phase=None, backend="venv",
                   requester_uid=uid, requester_gid=uid, requester_groups=(),
                   requester_name=str(uid), claimed_user=None, replace=False,
                   created_at=float(n), started_at=None, finished_at=None, prefix="/p",
                   exit_detail=None, log_path="/l", hub_user=hub)

    a1, a2, a3, b1, c1 = job(1, 1000), job(2, 1000), job(3, 1000), job(4, 1001), job(5, 1001, "c")
    queued = [a1, a2, a3, b1, c1]
    # nothing runs: one each, in order of age; then alice again
    assert [j.id for j in fair_order(queued, [], {}, 4)] == ["j1", "j4", "j5", "j2"]
    # alice holds two slots: bob and hub user c (who shares bob's uid) come first
    running = [replace(a1, state=State.RUNNING), replace(a2, state=State.RUNNING)]
    assert [j.id for j in fair_order([a3, b1, c1], running, {}, 2)] == ["j4", "j5"]
    # equal loads: the requester whose build started longest ago
    assert [j.id for j in fair_order([a3, b1], [], {(1001, None): 5.0, (1000, None): 9.0},
                                     1)] == ["j4"]
