"""One requester cannot fill the daemon's queue: ``requests.max_queued_per_user``.

A real daemon, the CLI as real users: alice's third job is refused while two of hers are queued
or running (exit 75, ``limit-reached``, saying what to do), bob is counted apart, an admin is
not limited, and a cancelled job frees alice's slot at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.api_support import VENV_SPEC, ApiDaemon, start_api_daemon
from tests.conftest import Accounts, User

EX_TEMPFAIL = 75


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts, max_concurrent=1, max_queued_per_user=2)


def _submit(api: ApiDaemon, user: User, name: str, *extra: str) -> str:
    """A venv job that stays in its first phase (the test python sleeps for "slow" names)."""
    res = api.cli(user, "request", "create", name, "-f", str(api.write_spec(VENV_SPEC)),
                  "--backend", "venv", "--no-wait", *extra)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_a_requester_has_a_bounded_share_of_the_queue(api: ApiDaemon,
                                                      accounts: Accounts) -> None:
    a = accounts
    root = User("root", 0, 0)
    try:
        first = _submit(api, a.alice, "slowq1")
        _submit(api, a.alice, "slowq2")
        spec = str(api.write_spec(VENV_SPEC))
        res = api.cli(a.alice, "request", "create", "slowq3", "-f", spec, "--backend", "venv",
                      "--no-wait")
        assert res.returncode == EX_TEMPFAIL, res.stderr
        assert "already has 2 jobs queued or running" in res.stderr
        assert "requests.max_queued_per_user = 2" in res.stderr and "hint:" in res.stderr
        res = api.cli(a.alice, "--json", "request", "create", "slowq3", "-f", spec, "--backend",
                      "venv", "--no-wait")
        assert res.returncode == EX_TEMPFAIL
        assert json.loads(res.stdout or res.stderr)["error"]["code"] == "limit-reached"
        # bob has a share of his own; an admin is not limited
        _submit(api, a.bob, "slowq4")
        for i in (5, 6, 7):
            _submit(api, root, f"slowq{i}")
        # nothing was created for the refused request, and a cancel frees alice's slot
        listed = json.loads(api.cli(root, "request", "list", "--all", "--json").stdout)
        assert "slowq3" not in {j["name"] for j in listed}
        assert api.cli(a.alice, "request", "cancel", first).returncode == 0
        _submit(api, a.alice, "slowq3")
    finally:  # no build may outlive the test, whatever failed
        for job in json.loads(api.cli(root, "request", "list", "--all", "--json").stdout):
            api.cli(root, "request", "cancel", job["id"])
