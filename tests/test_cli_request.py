"""``envctl request`` end to end: real builds by a real daemon, asked for by real other users.

Each test drives the CLI as alice/bob/mallory (``setpriv``) against one module daemon and checks
what a user sees (stdout, stderr, exit code) *and* what really happened (the prefix on disk, the
job's record). Builds are offline: rattler from a local channel, venv from a wheelhouse.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from envctl_shared.api.client import Client
from envctl_shared.errors import (
    EX_CONFIG,
    EX_FAILURE,
    EX_NOPERM,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
)

from tests.api_support import VENV_SPEC, ApiDaemon, start_api_daemon
from tests.conftest import Accounts, User
from tests.helpers import find_violations, wait_for


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)



def _slow_job(api: ApiDaemon, accounts: Accounts, name: str) -> str:
    """Queue a venv build that hangs in its first phase (see api_support); wait until running."""
    spec = api.write_spec(VENV_SPEC)
    res = api.cli(accounts.alice, "request", "create", name, "-f", str(spec), "--backend",
                  "venv", "--no-wait")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    wait_for(lambda: api.job(job_id)["state"] == "running", 30, what="slow job running")
    return job_id


def test_rattler_build_end_to_end(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec(api.hello_spec())
    res = api.cli(accounts.bob, "request", "create", "hello-env", "-f", str(spec),
                  env={"JUPYTERHUB_USER": "bob-on-the-hub"})
    assert res.returncode == 0, res.stderr + res.stdout
    prefix = api.root / "hello-env"
    job_id = res.stdout.splitlines()[0]
    assert f"environment hello-env is ready: {prefix}" in res.stdout
    assert f"conda activate {prefix}" in res.stdout
    assert "==> running" in res.stderr  # live phases were followed
    # Really built at its version's own path (where <root>/NAME points), healed before "ready".
    out = subprocess.run([str(prefix / "bin" / "hello")], text=True, capture_output=True)
    assert out.stdout == "hello from envctl\n"
    assert str(prefix.resolve()) in (prefix / "bin" / "hello").read_text()
    assert find_violations(prefix, accounts.shared_gid) == []
    assert os.stat(prefix.resolve()).st_uid == 0  # linked by the trusted step: the daemon's
    # The kernel identity and the unverified claim are both on the record.
    res = api.cli(accounts.bob, "request", "status", job_id, "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["state"] == "succeeded" and job["prefix"] == str(prefix)
    assert job["requester"]["uid"] == accounts.bob.uid
    assert job["requester"]["name"] == accounts.bob.name
    assert accounts.shared_gid in job["requester"]["groups"]
    assert job["claimed_user"] == "bob-on-the-hub"
    # Building the same name again without --replace is a conflict, with the way out.
    res = api.cli(accounts.alice, "request", "create", "hello-env", "-f", str(spec))
    assert res.returncode == EX_TEMPFAIL and "already exists" in res.stderr
    assert "--replace" in res.stderr
    # Replacing is for the environment's owner (bob built it) or admins.
    res = api.cli(accounts.alice, "request", "create", "hello-env", "-f", str(spec),
                  "--replace")
    assert res.returncode == EX_NOPERM and "only its owner or an envctl admin may replace it" \
        in res.stderr
    res = api.cli(accounts.bob, "request", "create", "hello-env", "-f", str(spec),
                  "--replace", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["replace"] is True
    assert (prefix / "bin" / "hello").exists()
    # The log is there, for the owner and for other requesters, not for outsiders.
    assert "hello" in api.cli(accounts.alice, "request", "logs", job_id).stdout
    res = api.cli(accounts.alice, "request", "logs", job_id, "--json")  # was the raw text
    assert res.returncode == 0 and "hello" in json.loads(res.stdout)["text"]
    res = api.cli(accounts.alice, "request", "logs", job_id, "-f", "--json")
    assert res.returncode == EX_USAGE and "cannot follow" in res.stdout
    res = api.cli(accounts.mallory, "request", "logs", job_id)
    assert res.returncode == EX_NOPERM and "own jobs" in res.stderr


def test_venv_build_end_to_end_with_json(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec(VENV_SPEC)
    res = api.cli(accounts.alice, "request", "create", "venv-env", "-f", str(spec),
                  "--backend", "venv", "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)  # --json: exactly one JSON document, nothing else on stdout
    prefix = Path(job["prefix"])
    assert job["state"] == "succeeded" and job["backend"] == "venv"
    out = subprocess.run([str(prefix / "bin" / "python"), "-c",
                          "import greetlib; print(greetlib.GREETING)"],
                         text=True, capture_output=True)
    assert out.stdout == "hi\n", out.stderr
    res = api.cli(accounts.alice, "request", "list", "--finished")
    assert "venv-env" in res.stdout and "succeeded" in res.stdout


def test_failed_build_exits_nonzero_with_the_reason(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec(f"channels: [{api.channel.as_uri()}]\ndependencies: [no-such-pkg]\n")
    res = api.cli(accounts.alice, "request", "create", "broken-env", "-f", str(spec))
    assert res.returncode == EX_FAILURE, res.stderr
    assert "failed" in res.stderr and "envctl request logs" in res.stderr
    assert not (api.root / "broken-env").exists()
    job_id = res.stdout.splitlines()[0]
    assert api.cli(accounts.alice, "request", "status", job_id).returncode == EX_FAILURE


def test_cancel_mid_build_over_the_socket(api: ApiDaemon, accounts: Accounts) -> None:
    job_id = _slow_job(api, accounts, "slow-cancel")
    # Not yours: a fellow requester and an outsider are both refused.
    for user in (accounts.bob, accounts.mallory):
        res = api.cli(user, "request", "cancel", job_id)
        assert res.returncode == EX_NOPERM, res.stderr
    res = api.cli(accounts.alice, "request", "cancel", job_id)
    assert res.returncode == 0, res.stderr
    assert "cancelled" in res.stdout
    job = api.job(job_id)
    assert job["state"] == "cancelled" and accounts.alice.name in job["exit_detail"]
    assert not (api.root / "slow-cancel").exists()
    # Cancelling again is a conflict, not a success; its hint is no "wait, then retry".
    res = api.cli(accounts.alice, "request", "cancel", job_id)
    assert res.returncode == EX_TEMPFAIL and "already ended" in res.stderr
    assert f"'envctl request status {job_id}' says how it ended" in res.stderr
    assert "retry" not in res.stderr


def test_follower_vanishing_mid_stream_harms_nobody(api: ApiDaemon, accounts: Accounts) -> None:
    job_id = _slow_job(api, accounts, "slow-follow")
    followers = [subprocess.Popen(api.cli_argv(accounts.alice, "request", "logs", job_id, "-f"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
    try:
        wait_for(lambda: api.daemon.alive and _connections_to(api) >= 2, 10,
                 what="followers connected")
        followers[0].send_signal(signal.SIGKILL)  # vanishes mid-stream
        followers[0].wait(10)
        # The daemon notices and frees that connection while the job is still running...
        wait_for(lambda: _connections_to(api) == 1, 10, what="dead follower's slot freed")
        res = api.cli(accounts.bob, "status")  # ...serves others...
        assert res.returncode == 0, res.stderr
        assert followers[1].poll() is None  # ...and the other follower is still attached.
        with Client(api.sock) as client:  # root is an admin: may cancel alice's job
            assert client.call("cancel", id=job_id)["state"] == "cancelled"
        _out, err = followers[1].communicate(timeout=30)  # the follower sees the stream end
        assert followers[1].returncode == 0, err
    finally:
        for p in followers:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _connections_to(api: ApiDaemon) -> int:
    """Connected peers of the daemon's socket, from the kernel's table (ss)."""
    out = subprocess.run(["ss", "-xH", "state", "connected", "src", str(api.sock)], text=True,
                         capture_output=True).stdout
    return len(out.splitlines())


def test_two_creates_of_one_name_exactly_one_wins(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec(api.hello_spec())
    procs = [subprocess.Popen(api.cli_argv(user, "request", "create", "race-env", "-f",
                                           str(spec)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for user in (accounts.alice, accounts.bob)]
    results = [(p.wait(120), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for rc, _, err in results if rc != 0)
    assert "race-env" in loser and ("exists" in loser or "already" in loser), loser
    assert (api.root / "race-env" / "bin" / "hello").exists()
    assert find_violations(api.root / "race-env", accounts.shared_gid) == []


def test_list_shows_own_jobs_all_for_requesters(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec(api.hello_spec())
    res = api.cli(accounts.bob, "request", "create", "bob-listed", "-f", str(spec))
    assert res.returncode == 0, res.stderr
    mine = json.loads(api.cli(accounts.alice, "request", "list", "--finished", "--json").stdout)
    assert all(j["requester"]["uid"] == accounts.alice.uid for j in mine)
    everyone = json.loads(api.cli(accounts.alice, "request", "list", "--all", "--finished",
                                  "--json").stdout)
    assert "bob-listed" in {j["name"] for j in everyone}
    res = api.cli(accounts.mallory, "request", "list", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []
    res = api.cli(accounts.mallory, "request", "status", "nonexistent")
    assert res.returncode != 0 and "nonexistent" in res.stderr


def test_daemon_killed_mid_build_then_restarted(api: ApiDaemon, accounts: Accounts) -> None:
    """A follower learns the daemon died (exit 69, not a hang); after a restart on the same
    socket path (stale socket replaced) the job reads ``interrupted``, exit 1, nothing left."""
    spec = api.write_spec(VENV_SPEC)
    follower = subprocess.Popen(api.cli_argv(accounts.alice, "request", "create", "slow-killed",
                                             "-f", str(spec), "--backend", "venv"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = ""

        def running() -> bool:
            nonlocal job_id
            with Client(api.sock) as client:
                jobs = [j for j in client.call("list", all=True) if j["name"] == "slow-killed"]
            job_id = jobs[0]["id"] if jobs else ""
            return bool(jobs) and jobs[0]["state"] == "running"

        wait_for(running, 30, what="slow build running")
        api.daemon.kill9()
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == EX_UNAVAILABLE, err
        assert "closed the connection" in err and out.splitlines()[0] == job_id
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
    assert api.sock.exists()  # the dead daemon's stale socket...
    api.daemon.restart()  # ...is replaced by the new daemon
    res = api.cli(accounts.alice, "request", "status", job_id)
    assert res.returncode == EX_FAILURE and "interrupted" in res.stdout, res.stdout + res.stderr
    assert not (api.root / "slow-killed").exists()
    res = api.cli(accounts.alice, "status")
    assert res.returncode == 0 and "ready" in res.stdout and str(api.root) in res.stdout


def test_kernels_sync_on_a_daemon_without_kernels_dir_is_its_configuration(
        api: ApiDaemon, accounts: Accounts) -> None:
    """An admin's ``kernels sync`` where the daemon keeps no kernelspecs: the daemon's
    configuration decides (78, as the web's 503 "an admin must look"), not a request to change
    (65)."""
    res = api.cli(User("root", 0, 0), "kernels", "sync")
    assert res.returncode == EX_CONFIG, res.stderr
    assert "kernels.dir is not set" in res.stderr and "sets kernels.dir" in res.stderr
