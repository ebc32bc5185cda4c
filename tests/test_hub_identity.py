"""Hub users on one shared uid, told apart by a real JupyterHub.

A real ``jupyterhub`` (PyPI, with the PyPI ``configurable-http-proxy`` on PATH, so it starts a
real proxy) runs on loopback with the dummy authenticator and a service whose token may create
users, groups and tokens (carol is made a hub admin by the hub's configuration). Four hub
users get real API tokens from it: alice and bob (hub group
``builders``), carol (hub admin) and dave (no group). Every one of them runs the CLI as the
*same* Unix uid (alice's test account, configured as ``jupyterhub.shared_uids``), each with
their own ``JUPYTERHUB_API_TOKEN``. The daemon must tell them apart through the hub alone;
``JUPYTERHUB_USER`` is set to lies throughout and must change nothing.

The hub is started once for the module (it takes a few seconds); the last test stops it.
``envctl doctor``'s hub identity check is tested against the same hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from envctl_shared.api.client import Client
from envctl_shared.errors import EX_NOPERM, EX_UNAVAILABLE

from tests.api_support import VENV_SPEC, ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import wait_for
from tests.hub_support import SERVER_SCOPES, Hub, start_hub


@dataclass
class World:
    hub: Hub
    api: ApiDaemon
    tokens: dict[str, str]  # hub user -> a real token of theirs
    accounts: Accounts

    def cli(self, hub_user: str | None, *args: str, claim: str | None = None,
            token: str | None = None) -> subprocess.CompletedProcess[str]:
        """``envctl ARGS`` as the shared uid, as ``hub_user`` would run it in their server
        (their token; ``JUPYTERHUB_USER`` set to ``claim``, a lie where the test says so)."""
        env = {}
        if hub_user is not None or token is not None:
            env["JUPYTERHUB_API_TOKEN"] = token or self.tokens[str(hub_user)]
        if claim is not None:
            env["JUPYTERHUB_USER"] = claim
        return self.api.cli(self.accounts.alice, *args, env=env)

    def job(self, job_id: str) -> dict[str, Any]:
        with Client(self.api.sock) as client:  # as root: an admin on an unshared uid
            return dict(client.call("get", id=job_id))


@pytest.fixture(scope="module")
def world(accounts: Accounts) -> Iterator[World]:
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="envctl-hub-"))
    hub = start_hub(base)
    try:
        hub.call("POST", "/users", {"usernames": ["alice", "bob", "dave"]})
        hub.call("POST", "/groups/builders", {"users": ["alice", "bob"]})
        tokens = {name: hub.token(name) for name in ("alice", "carol", "dave")}
        # bob's has only what a single-user server's JUPYTERHUB_API_TOKEN gets by default (the
        # hub's "server" role): enough for the hub to tell the daemon his name and groups.
        tokens["bob"] = hub.token("bob", SERVER_SCOPES)
        extra = {"jupyterhub": {"api_url": hub.api_url, "shared_uids": [accounts.alice.uid],
                                "timeout": 2, "cache_seconds": 60},
                 "kernels": {"dir": str(base / "kernels")},
                 "logging": {"level": "DEBUG"}}
        for api in start_api_daemon(accounts, extra=extra, allow_groups=[],
                                    allow_hub_groups=["builders"]):
            yield World(hub, api, tokens, accounts)
    finally:
        hub.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _slow_job(w: World, user: str, name: str) -> str:
    spec = w.api.write_spec(VENV_SPEC)
    res = w.cli(user, "request", "create", name, "-f", str(spec), "--backend", "venv",
                "--no-wait")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    wait_for(lambda: w.job(job_id)["state"] == "running", 30, what="slow job running")
    return job_id


def test_a_shared_uid_without_a_valid_token_is_refused(world: World) -> None:
    res = world.cli(None, "request", "list", claim="alice")
    assert res.returncode == EX_NOPERM, res.stderr
    assert "shared by the users of JupyterHub" in res.stderr
    assert "hint:" in res.stderr and "JUPYTERHUB_API_TOKEN" in res.stderr
    res = world.cli(None, "request", "create", "x-env", "-f", "/dev/null", claim="alice")
    assert res.returncode == EX_NOPERM, res.stderr
    # A token the hub never issued: the hub says no, and so does the daemon.
    res = world.cli(None, "request", "list", token=secrets.token_hex(16))
    assert res.returncode == EX_NOPERM and "does not accept the API token" in res.stderr
    # whoami still answers, and says nobody was verified.
    res = world.cli(None, "whoami", "--json", claim="alice")
    assert res.returncode == 0, res.stderr
    me = json.loads(res.stdout)
    assert me["shared_uid"] is True and me["hub_verified"] is False
    assert me["hub_user"] is None and me["may_create"] is False and me["is_admin"] is False
    # A peer on another uid keeps the kernel's identity: no token needed.
    assert world.api.cli(world.accounts.bob, "request", "list").returncode == 0


def test_whoami_names_the_hub_user_the_hub_verified(world: World) -> None:
    res = world.cli("bob", "whoami", "--json", claim="alice")
    me = json.loads(res.stdout)
    assert (me["hub_user"], me["hub_verified"], me["hub_groups"]) == ("bob", True, ["builders"])
    assert me["uid"] == world.accounts.alice.uid and me["may_create"] is True
    assert me["is_admin"] is False and me["may_cancel"] == "your own jobs"
    # a server's default token does not show the user's creation time: no hub_id, said once
    assert me["hub_id"] is None
    assert world.api.daemon.log_text().count("hub no-created-time user=bob") == 1
    res = world.cli("carol", "whoami")
    assert res.returncode == 0, res.stderr
    assert "carol (verified by JupyterHub)" in res.stdout and "admin:      yes" in res.stdout
    me = json.loads(world.cli("dave", "whoami", "--json").stdout)
    assert me["hub_user"] == "dave" and me["may_create"] is False
    assert me["hub_id"] == world.hub.call("GET", "/users/dave")["created"]  # a full token
    world.cli("bob", "whoami")
    assert world.api.daemon.log_text().count("hub no-created-time") == 1


def test_two_hub_users_on_one_uid_are_two_owners(world: World) -> None:
    job_id = _slow_job(world, "alice", "slow-alice")
    assert world.job(job_id)["hub_user"] == "alice"
    # bob, same uid, claiming to be alice: alice's job is not his.
    res = world.cli("bob", "request", "list", "--json", claim="alice")
    assert res.returncode == 0, res.stderr
    assert job_id not in [j["id"] for j in json.loads(res.stdout)]
    res = world.cli("bob", "request", "list", "--all", "--json", claim="alice")
    assert job_id in [j["id"] for j in json.loads(res.stdout)]  # a requester sees all
    res = world.cli("bob", "request", "cancel", job_id, claim="alice")
    assert res.returncode == EX_NOPERM, res.stderr
    assert "belongs to hub user alice" in res.stderr
    assert world.job(job_id)["state"] == "running"
    # dave (no hub group) may not even create.
    spec = world.api.write_spec(VENV_SPEC)
    res = world.cli("dave", "request", "create", "dave-env", "-f", str(spec), "--backend",
                    "venv", claim="alice")
    assert res.returncode == EX_NOPERM, res.stderr
    # alice sees and cancels her own; the record names her as the hub verified her.
    res = world.cli("alice", "request", "list", "--json")
    assert [j["id"] for j in json.loads(res.stdout)] == [job_id]
    res = world.cli("alice", "request", "cancel", job_id, claim="somebody-else")
    assert res.returncode == 0, res.stderr
    assert world.job(job_id)["exit_detail"] == \
        f"cancelled by hub user alice (uid {world.accounts.alice.uid})"


def test_a_claim_is_recorded_as_a_claim_and_the_hub_user_as_the_requester(world: World) -> None:
    spec = world.api.write_spec(world.api.hello_spec())
    res = world.cli("bob", "request", "create", "bob-env", "-f", str(spec), "--json",
                    claim="alice")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["state"] == "succeeded" and job["hub_user"] == "bob"
    assert job["claimed_user"] == "alice"  # kept for the audit trail, nothing more
    res = world.cli("bob", "request", "status", job["id"])
    assert f"bob (hub, uid {world.accounts.alice.uid}) (claims alice)" in res.stdout


def test_replace_is_for_the_owner_or_a_hub_admin(world: World) -> None:
    """Who may replace is the daemon's decision before any build: the builds are rattler's
    (under a second each, where a venv costs seconds); the backends are tested elsewhere."""
    spec = world.api.write_spec(world.api.hello_spec())
    res = world.cli("alice", "request", "create", "alice-env", "-f", str(spec))
    assert res.returncode == 0, res.stderr
    res = world.cli("bob", "request", "create", "alice-env", "-f", str(spec), "--replace",
                    claim="alice")
    assert res.returncode == EX_NOPERM, res.stderr
    assert "environment 'alice-env' belongs to hub user alice; only its owner or an envctl " \
        "admin may replace it" in res.stderr
    res = world.cli("alice", "request", "create", "alice-env", "-f", str(spec), "--replace",
                    "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["state"] == "succeeded", res.stderr
    # carol is a hub admin: an envctl admin, with no Unix privilege at all.
    res = world.cli("carol", "request", "create", "alice-env", "-f", str(spec), "--replace",
                    "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["hub_user"] == "carol"
    job_id = _slow_job(world, "bob", "slow-bob")
    res = world.cli("carol", "request", "cancel", job_id)
    assert res.returncode == 0, res.stderr
    assert world.job(job_id)["exit_detail"].startswith("cancelled by hub user carol")
    # Admin ops too: kernels sync is for admins, which alice (same uid) is not.
    res = world.cli("alice", "kernels", "sync")
    assert res.returncode == EX_NOPERM and "only envctl admins" in res.stderr
    res = world.cli("carol", "kernels", "sync", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["written"] == []  # these envs have no ipykernel


def test_the_token_never_reaches_the_log_the_store_or_a_build(world: World) -> None:
    spec = world.api.write_spec(VENV_SPEC)
    res = world.cli("alice", "request", "create", "envdump-env", "-f", str(spec), "--backend",
                    "venv", "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    build_log = Path(job["log_path"]).read_text()
    assert "BUILD ENVIRONMENT:" in build_log and "PATH=" in build_log  # the dump is there
    state = world.api.base / "state"
    with sqlite3.connect(state / "jobs.db") as db:  # the WAL is checkpointed into the file
        db.execute("PRAGMA wal_checkpoint(FULL)")
    places = {"daemon log": world.api.daemon.log_text()}
    for path in state.rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("latin-1")
    assert "hub verified user=alice" in places["daemon log"]  # DEBUG: every request logged
    for user, token in world.tokens.items():
        for where, text in places.items():
            assert token not in text, f"{user}'s token is in {where}"
    assert "JUPYTERHUB" not in build_log


def test_doctor_checks_the_hub_identity_both_ways(world: World) -> None:
    """``envctl doctor`` on a JupyterHub: a server's token the hub verifies, one it does not
    accept, none at all. (Here, not in a module of its own: a hub costs seconds to start.)"""
    def hub_check(hub_user: str | None, token: str | None = None) -> dict[str, Any]:
        res = world.cli(hub_user, "doctor", "--json", token=token)
        return dict({c["check"]: c for c in json.loads(res.stdout)["checks"]}["hub identity"])

    check = hub_check("bob")  # a single-user server's token (SERVER_SCOPES)
    assert check["ok"] and check["summary"] == "hub user bob (verified by JupyterHub)", check
    check = hub_check(None, "0" * 32)  # a token the hub never issued
    assert not check["ok"] and "does not accept the API token" in check["summary"]
    assert check["fix"]
    check = hub_check(None)  # outside a server: no token at all
    assert not check["ok"] and "JUPYTERHUB_API_TOKEN" in check["fix"]


def _asks_the_hub(world: World) -> bool:
    """The daemon holds a connection to the hub's API: a question is with the hub (the
    kernel completes the handshake for a stopped hub). Read from /proc: the established
    TCP connections to the hub's port, and the daemon's open sockets."""
    assert world.api.daemon.proc is not None
    port = urllib.parse.urlparse(world.hub.api_url).port
    to_hub = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()  # sl local rem st ... inode
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                to_hub.add(f"socket:[{fields[9]}]")
    fds = Path(f"/proc/{world.api.daemon.proc.pid}/fd")
    held = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed while listed
            held.add(os.readlink(fd))
    return bool(to_hub & held)


def test_an_unreachable_hub_is_unavailable_and_nothing_is_trusted(world: World) -> None:
    """Last in the module: it stops the hub."""
    fresh = world.hub.token("alice")  # never sent before: not in the daemon's cache
    world.hub.signal(signal.SIGSTOP)  # the hub hangs: the daemon times out, serving others
    try:
        hung = subprocess.Popen(world.api.cli_argv(world.accounts.alice, "request", "list",
                                                   env={"JUPYTERHUB_API_TOKEN": fresh}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: _asks_the_hub(world), 30, 0.05, "the daemon asking the stopped hub")
        with Client(world.api.sock, timeout=5) as client:  # the accept loop is not held up
            assert client.call("status")["pid"] > 0
        assert _asks_the_hub(world), "status was answered only once the hub's question ended"
        _, err = hung.communicate(timeout=30)
        assert hung.returncode == EX_UNAVAILABLE, err
        assert "JupyterHub API" in err and "cannot be reached" in err and "hint:" in err
    finally:
        world.hub.signal(signal.SIGCONT)
    another = world.hub.token("bob")
    world.hub.stop()
    res = world.cli(None, "request", "list", token=another, claim="bob")
    assert res.returncode == EX_UNAVAILABLE, res.stderr
    assert "cannot be reached" in res.stderr
    res = world.cli(None, "request", "cancel", "0", claim="carol")
    assert res.returncode == EX_NOPERM  # no token: refused outright, never trusted
