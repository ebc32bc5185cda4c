"""Hub tokens as an attacker on the shared uid would send them, and a hub that changes under us.

A real JupyterHub (``hub_support``) behind a counting door: the daemon's questions to the hub
are counted per token. On the shared uid (alice's account, as every hub user's server would
run): 32 threads sending invented tokens cost the hub at most one question per distinct token
(then a rate per uid) and the log a bounded number of lines; a revoked token is refused at the
next change; a user renamed on the hub keeps their environment and a new user given the old
name does not get it; and with the hub down, what needs no identity still answers.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from envctl_shared.api import refusals
from envctl_shared.errors import EX_DATAERR, EX_NOPERM, EX_UNAVAILABLE

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.hub_support import Hub, HubDoor, start_hub

BURST, RATE = 20, 2.0  # jupyterhub.verify_burst, verify_rate of these daemons
FLOOD = """
import json, os, socket, sys, threading, time
path, seconds, pool = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
codes, lock = {}, threading.Lock()
def flood(i):
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        token = pool[(i + n) % len(pool)] if pool else os.urandom(16).hex()
        op, args = (("create", {"name": "flood", "spec": "dependencies: []"}) if n % 2 else
                    ("list", {}))
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(json.dumps({"v": 1, "op": op, "args": args,
                                  "hub_token": token}).encode() + b"\\n")
            reply = json.loads(s.makefile().readline())
        code = "ok" if reply["ok"] else reply["error"]["code"]
        with lock:
            codes[code] = codes.get(code, 0) + 1
        n += 1
threads = [threading.Thread(target=flood, args=(i,)) for i in range(32)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(codes))
"""


@dataclass
class World:
    hub: Hub
    door: HubDoor
    accounts: Accounts

    def daemon(self) -> Iterator[ApiDaemon]:
        """A daemon that asks the hub through the door; hub group ``builders`` may build."""
        extra = {"jupyterhub": {"api_url": self.door.api_url,
                                "shared_uids": [self.accounts.alice.uid], "timeout": 2,
                                "cache_seconds": 60, "refusal_cache_seconds": 30,
                                "verify_rate": RATE, "verify_burst": BURST}}
        return start_api_daemon(self.accounts, extra=extra, allow_groups=[],
                                allow_hub_groups=["builders"])


@pytest.fixture(scope="module")
def world(accounts: Accounts) -> Iterator[World]:
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="envctl-hub-"))
    hub = start_hub(base)
    try:
        hub.call("POST", "/users", {"usernames": ["erin", "gil"]})
        hub.call("POST", "/groups/builders", {"users": ["erin", "gil"]})
        yield World(hub, HubDoor(hub), accounts)
    finally:
        hub.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def api(world: World) -> Iterator[ApiDaemon]:
    yield from world.daemon()


def _cli(api: ApiDaemon, accounts: Accounts, token: str | None,
         *args: str) -> subprocess.CompletedProcess[str]:
    """``envctl ARGS`` on the shared uid, as a hub user's server runs it (its token)."""
    return api.cli(accounts.alice, *args, env={"JUPYTERHUB_API_TOKEN": token} if token else {})


def _flood(api: ApiDaemon, accounts: Accounts, seconds: float,
           pool: list[str]) -> dict[str, int]:
    argv = [*api.cli_argv(accounts.alice)[:-1], "/usr/bin/python3", "-c", FLOOD, str(api.sock),
            str(seconds), json.dumps(pool)]
    out = subprocess.run(argv, text=True, capture_output=True, check=True, timeout=120)
    return dict(json.loads(out.stdout))


def test_a_token_flood_costs_the_hub_and_the_log_little(world: World) -> None:
    accounts, door = world.accounts, world.door
    gen = world.daemon()
    api = next(gen)
    try:
        erin = world.hub.token("erin")
        first, started = door.total(), time.monotonic()
        assert _cli(api, accounts, erin, "whoami").returncode == 0  # erin is known
        # 32 threads cycling 16 invented tokens: each costs the hub one question, once
        before = door.total()
        codes = _flood(api, accounts, 2.0, [secrets.token_hex(16) for _ in range(16)])
        assert set(codes) == {"not-authorised"} and codes["not-authorised"] > 200, codes
        assert door.total() - before == 16
        # fresh invented tokens every time: the uid's burst, then its rate (since its first)
        codes = _flood(api, accounts, 2.0, [])
        asked = door.total() - first
        assert asked <= BURST + RATE * (time.monotonic() - started), (asked, codes)
        assert codes.get("limit-reached", 0) > 100 and sum(codes.values()) > 200, codes
        # erin, on the same uid, is not held back: her token is known to be good
        assert _cli(api, accounts, erin, "request", "list").returncode == 0
        res = _cli(api, accounts, erin, "request", "cancel", "0")  # a change: asked afresh
        assert res.returncode == EX_DATAERR and "no job" in res.stderr.lower(), res.stderr
        during = api.daemon.log_text()
        api.daemon.stop()
        after = api.daemon.log_text()
    finally:
        next(gen, None)
    refused = [line for line in during.splitlines() if "api refused" in line]
    assert len(refused) <= refusals.BURST, refused
    assert all(f"uid={accounts.alice.uid} pid=" in line for line in refused), refused
    (summary,) = [line for line in after.splitlines() if "refusals-summarised" in line]
    assert f"uid{accounts.alice.uid}" in summary and "limit-reached" in summary, summary
    assert sum(1 for line in after.splitlines() if "api refused" in line) == len(refused)


def test_a_revoked_token_is_refused_at_the_next_change(world: World, api: ApiDaemon) -> None:
    accounts = world.accounts
    model = world.hub.token_model("erin")
    token = model["token"]
    res = _cli(api, accounts, token, "whoami", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["hub_user"] == "erin", res.stderr
    world.hub.call("DELETE", f"/users/erin/tokens/{model['id']}")
    # a read may be answered from the cache (cache_seconds)...
    assert _cli(api, accounts, token, "request", "list").returncode == 0
    # ...a change asks the hub again: refused, and the refusal is remembered for reads too
    spec = api.write_spec(api.hello_spec())
    res = _cli(api, accounts, token, "request", "create", "revoked-env", "-f", str(spec))
    assert res.returncode == EX_NOPERM and "does not accept the API token" in res.stderr
    res = _cli(api, accounts, token, "request", "list")
    assert res.returncode == EX_NOPERM, res.stderr
    assert not (api.root / "revoked-env").exists()


def _owner(api: ApiDaemon, name: str) -> dict[str, Any]:
    env = json.loads((api.root / ".envctl" / "envs" / name / "env.json").read_text())
    return dict(env["owner"])


def test_a_renamed_and_recreated_hub_user(world: World, api: ApiDaemon) -> None:
    accounts, hub = world.accounts, world.hub
    gil = hub.token("gil")  # all of gil's permissions: the hub tells its creation time
    created = hub.call("GET", "/users/gil")["created"]
    spec = api.write_spec(api.hello_spec())
    res = _cli(api, accounts, gil, "request", "create", "gil-env", "-f", str(spec), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["state"] == "succeeded", res.stderr
    assert (_owner(api, "gil-env")["hub_user"], _owner(api, "gil-env")["hub_id"]) == \
        ("gil", created)
    # the hub renames gil, and gives the name to somebody new (in the same hub group)
    hub.call("PATCH", "/users/gil", {"name": "gil-old"})
    hub.call("POST", "/users/gil")
    hub.call("POST", "/groups/builders/users", {"users": ["gil"]})
    newcomer = hub.token("gil")
    res = _cli(api, accounts, newcomer, "env", "remove", "gil-env")
    assert res.returncode == EX_NOPERM, res.stderr
    assert "environment 'gil-env' belongs to hub user gil; only its owner or an envctl admin " \
        "may remove it" in res.stderr
    res = _cli(api, accounts, newcomer, "request", "create", "gil-env", "-f", str(spec),
               "--replace")
    assert res.returncode == EX_NOPERM and "may replace it" in res.stderr, res.stderr
    # the renamed owner (same token: it is the user's, whatever the name) still owns it; the
    # change asked the hub afresh, so the cache now knows the new name too
    res = _cli(api, accounts, gil, "env", "remove", "gil-env")
    assert res.returncode == 0, res.stderr
    res = _cli(api, accounts, gil, "whoami", "--json")
    assert json.loads(res.stdout)["hub_user"] == "gil-old"


def test_a_hub_user_without_a_group_is_told_their_name_and_the_keys(world: World,
                                                                    api: ApiDaemon) -> None:
    world.hub.call("POST", "/users/hal")
    res = _cli(api, world.accounts, world.hub.token("hal"), "request", "create", "hal-env",
               "-f", str(api.write_spec(api.hello_spec())))
    assert res.returncode == EX_NOPERM
    assert "hub user hal may not request environments on this daemon" in res.stderr
    assert "requests.allow_hub_groups" in res.stderr and "(none)" in res.stderr
    assert "jovyan" not in res.stderr and f"uid {world.accounts.alice.uid}" not in res.stderr


def test_what_needs_no_identity_answers_while_the_hub_is_down(world: World,
                                                              api: ApiDaemon) -> None:
    """Last: it shuts the door (the daemon's hub)."""
    accounts = world.accounts
    token = world.hub.token("erin")
    world.door.shut()
    for args in (("env", "list"), ("status",)):
        for sent in (token, None):
            res = _cli(api, accounts, sent, *args)
            assert res.returncode == 0, (args, res.stderr)
    res = _cli(api, accounts, token, "request", "list")
    assert res.returncode == EX_UNAVAILABLE and "cannot be reached" in res.stderr
