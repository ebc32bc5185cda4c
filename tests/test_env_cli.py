"""``envctl env ...`` and ``request create --test`` end to end: a real daemon, real builds, the CLI
run as real other users (alice the owner, bob another requester, mallory outside the allowed
group, root an admin), and the records in the root read the way any user can read them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from envctl_shared.errors import EX_FAILURE, EX_NOPERM, EX_TEMPFAIL

from tests.api_support import VENV_SPEC, ApiDaemon, start_api_daemon
from tests.conftest import Accounts, User
from tests.helpers import as_user, wait_for

EX_DATAERR, EX_PROTOCOL = 65, 76


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts, gc_grace=1, keep_versions=1)


def _spec(api: ApiDaemon, version: str) -> str:
    return str(api.write_spec(f"channels: [{api.channel.as_uri()}]\n"
                              f"dependencies:\n  - app={version}\n"))


def _json(res: subprocess.CompletedProcess[str]) -> Any:
    assert res.returncode == 0, (res.stdout, res.stderr)
    return json.loads(res.stdout)


def test_update_with_tests_then_list_show_export(api: ApiDaemon, accounts: Accounts) -> None:
    a = accounts
    res = api.cli(a.alice, "request", "create", "appenv", "-f", _spec(api, "1.0"))
    assert res.returncode == 0, res.stderr
    # a failing test: not promoted, its output in the followed log, exit 1
    res = api.cli(a.alice, "request", "create", "appenv", "-f", _spec(api, "2.0"), "--replace",
                  "--test", "app", "--test", "echo probing; app | grep -q 3.0")
    assert res.returncode == EX_FAILURE, res.stderr
    assert "app 2.0 in" in res.stdout and "probing\n" in res.stdout
    assert "test 2 ('echo probing; app | grep -q 3.0') failed with status 1" in res.stderr
    assert os.readlink(api.root / "appenv") == ".envctl/envs/appenv/v1"
    # a multi-line test whose second line looks like a package of env show's
    forged = "true <<'X'\n    app 9.9 0  (conda)\nX"
    res = api.cli(a.alice, "request", "create", "appenv", "-f", _spec(api, "2.0"), "--replace",
                  "--test", "app | grep -q 2.0", "--test", forged)
    assert res.returncode == 0, res.stderr
    assert os.readlink(api.root / "appenv") == ".envctl/envs/appenv/v2"
    # everyone who can connect lists and shows (mallory is not even a requester)
    listed = {e["name"]: e for e in _json(api.cli(a.mallory, "env", "list", "--json"))}
    env = listed["appenv"]
    assert (env["status"], env["current"], env["backend"]) == ("ready", "v2", "rattler")
    assert env["owner"]["uid"] == a.alice.uid and env["owner"]["name"] == a.alice.name
    assert env["requester"]["name"] == a.alice.name and env["size_bytes"] > 0
    res = api.cli(a.mallory, "env", "list")
    assert res.returncode == 0 and "appenv" in res.stdout and "ready" in res.stdout
    shown = _json(api.cli(a.bob, "env", "show", "appenv", "--json"))
    assert [(v["version"], v["state"], v["current"]) for v in shown["versions"]] == \
        [("v1", "ready", False), ("v2", "ready", True)]
    assert shown["versions"][1]["tests"] == ["app | grep -q 2.0", forged]
    assert [(p["name"], p["version"]) for p in shown["versions"][0]["packages"]] == \
        [("app", "1.0")]
    assert "app=1.0" in shown["versions"][0]["spec"]
    res = api.cli(a.bob, "env", "show", "appenv")
    assert "* v2" in res.stdout and "app 1.0 0  (conda)" in res.stdout
    assert "app 9.9" not in "".join(line for line in res.stdout.splitlines(keepends=True)
                                    if not line.startswith("    tested:")), res.stdout
    # the records are the daemon's and world-readable, in the root, for every host
    record = as_user(a.bob.uid, a.bob.gid,
                     ["cat", str(api.root / ".envctl/envs/appenv/v1.json")]).stdout
    assert json.loads(record)["state"] == "ready"
    assert os.stat(api.root / ".envctl/envs/appenv/env.json").st_uid == 0
    # export v1; bob builds it back as his own env
    text = api.cli(a.bob, "env", "export", "appenv", "--version", "v1").stdout
    assert "- app ==1.0 0" in text
    res = api.cli(a.bob, "request", "create", "bobcopy", "-f", str(api.write_spec(text)))
    assert res.returncode == 0, res.stderr
    assert (api.root / "bobcopy/share/app/VERSION").read_text() == "1.0\n"


def test_who_may_roll_back_remove_and_collect(api: ApiDaemon, accounts: Accounts) -> None:
    a = accounts
    for version in ("1.0", "2.0"):
        res = api.cli(a.alice, "request", "create", "owned", "-f", _spec(api, version),
                      "--replace")
        assert res.returncode == 0, res.stderr
    stable = api.root / "owned"
    for user in (a.bob, a.mallory):  # another requester; someone who may not request at all
        res = api.cli(user, "env", "rollback", "owned")
        assert res.returncode == EX_NOPERM, res.stderr
        res = api.cli(user, "env", "remove", "owned")
        assert res.returncode == EX_NOPERM, res.stderr
    res = api.cli(a.bob, "request", "create", "owned", "-f", _spec(api, "1.0"), "--replace")
    assert res.returncode == EX_NOPERM and "belongs to" in res.stderr
    t0 = time.monotonic()
    out = _json(api.cli(a.alice, "env", "rollback", "owned", "--json"))
    assert time.monotonic() - t0 < 5  # a CLI round trip; the switch itself is one rename
    assert out == {"name": "owned", "current": "v1", "previous": "v2"}
    assert (stable / "share/app/VERSION").read_text() == "1.0\n"
    res = api.cli(a.alice, "env", "rollback", "owned", "--to", "v7")
    assert res.returncode == EX_DATAERR and "no built version v7" in res.stderr
    # GC is for admins. Current v1 and the newest version (keep_versions 1) are kept
    assert api.cli(a.alice, "env", "gc").returncode == EX_NOPERM
    assert api.cli(a.alice, "env", "gc", "--dry-run").returncode == EX_NOPERM
    time.sleep(1.1)
    gc = _json(api.cli(_root(), "env", "gc", "--json"))
    assert not [r for r in gc["removed"] if r["name"] == "owned"], gc
    # rolled forward to v2, v1 is neither: it goes once its grace (1 s) is over
    assert _json(api.cli(a.alice, "env", "rollback", "owned", "--to", "v2", "--json"))[
        "current"] == "v2"
    time.sleep(1.1)
    gc = _json(api.cli(_root(), "env", "gc", "--json"))
    assert {"name": "owned", "version": "v1"} in gc["removed"]
    assert not (api.root / ".envctl/envs/owned/v1").exists()
    res = api.cli(a.alice, "env", "rollback", "owned", "--to", "v2")  # the current one
    assert res.returncode == 0 and res.stdout == "owned: already at v2\n", res.stdout
    # remove: one unlink, by the owner
    res = api.cli(a.alice, "env", "remove", "owned")
    assert res.returncode == 0 and "its versions go at the next GC" in res.stdout
    assert not os.path.lexists(stable)
    listed = {e["name"]: e for e in _json(api.cli(a.bob, "env", "list", "--json"))}
    assert listed["owned"]["status"] == "removed"
    # the name is free again: a new first version, a new owner
    res = api.cli(a.bob, "request", "create", "owned", "-f", _spec(api, "2.0"))
    assert res.returncode == 0, res.stderr
    assert os.readlink(stable) == ".envctl/envs/owned/v3"  # numbers never go back
    env = {e["name"]: e for e in _json(api.cli(a.bob, "env", "list", "--json"))}["owned"]
    assert env["owner"]["uid"] == a.bob.uid


def test_hand_made_and_planted_records_are_not_trusted(api: ApiDaemon,
                                                       accounts: Accounts) -> None:
    a = accounts
    hand = api.root / "byhand"
    hand.mkdir()
    (hand / "mine").write_text("x")
    listed = {e["name"]: e for e in _json(api.cli(a.alice, "env", "list", "--json"))}
    assert listed["byhand"]["status"] == "unmanaged"
    res = api.cli(_root(), "request", "create", "byhand", "-f", _spec(api, "1.0"), "--replace")
    assert res.returncode == EX_TEMPFAIL and "never replaces or moves it" in res.stderr
    assert sorted(os.listdir(hand)) == ["mine"]
    # an owner record the daemon did not write (another owner) is ignored: admins only
    res = api.cli(a.alice, "request", "create", "planted", "-f", _spec(api, "1.0"))
    assert res.returncode == 0, res.stderr
    env_json = api.root / ".envctl/envs/planted/env.json"
    doc = json.loads(env_json.read_text())
    doc["owner"] = {**doc["owner"], "uid": a.bob.uid, "name": a.bob.name}
    env_json.write_text(json.dumps(doc))
    os.chown(env_json, a.bob.uid, -1)
    res = api.cli(a.bob, "env", "rollback", "planted")
    assert res.returncode == EX_NOPERM and "nobody" in res.stderr, res.stderr
    listed = {e["name"]: e for e in _json(api.cli(a.bob, "env", "list", "--json"))}
    assert listed["planted"]["owner"] is None
    wait_for(lambda: "envs record-refused name=env.json" in api.daemon.log_text(), 5,
             what="the refusal logged")


def test_a_malformed_name_or_id_is_the_users_typo(api: ApiDaemon, accounts: Accounts) -> None:
    """``envctl env show ../x`` was the daemon's protocol error (exit 76, "the CLI and the
    daemon may be of different versions"): what the user typed is checked by the client,
    against the op's own argument rule, before anything is sent."""
    for argv, arg in ((["env", "show", "../x"], "name"), (["env", "rollback", "a b"], "name"),
                      (["env", "export", "x/y"], "name"), (["request", "status", "../.."], "id"),
                      (["env", "rollback", "x", "--to", "../v1"], "to")):
        res = api.cli(accounts.alice, *argv)
        assert res.returncode == EX_DATAERR, res.stderr
        assert f"argument {arg!r} must be" in res.stderr and "versions" not in res.stderr


def test_protocol_checks_new_arguments(api: ApiDaemon) -> None:
    def ask(msg: dict[str, object]) -> Any:
        return json.loads(api.raw((json.dumps(msg) + "\n").encode(), lines=1))

    err = ask({"v": 1, "op": "env-show", "args": {"name": "../etc"}})["error"]
    assert err["code"] == "protocol-error" and "'name'" in err["message"]
    err = ask({"v": 1, "op": "create", "args": {"name": "x", "spec": "dependencies: [app]",
                                                "tests": [1]}})["error"]
    assert err["code"] == "protocol-error" and "list of strings" in err["message"]
    err = ask({"v": 1, "op": "create", "args": {"name": "x", "spec": "dependencies: [app]",
                                                "tests": ["true"] * 17}})["error"]
    assert err["code"] == "invalid-request" and "17 test commands" in err["message"]
    err = ask({"v": 1, "op": "env-rollback", "args": {"name": "nosuch"}})["error"]
    assert err["code"] == "not-found"


def _root() -> User:
    """The CLI as root (an admin), through the same helper as the users."""
    return User("root", 0, 0)


def test_envctld_killed_mid_update_keeps_serving_and_cleans_up(api: ApiDaemon,
                                                               accounts: Accounts) -> None:
    """The real daemon, SIGKILLed while a venv replace of a rattler-built env is in its first
    step (the test's python wrapper sleeps for prefixes naming "slow"): the stable path keeps
    serving v1 while no daemon runs; the restarted daemon kills the build, removes v2 and
    marks the job interrupted. Last in this module: it restarts the module's daemon."""
    a = accounts
    res = api.cli(a.alice, "request", "create", "slowk9", "-f", _spec(api, "1.0"))
    assert res.returncode == 0, res.stderr
    res = api.cli(a.alice, "request", "create", "slowk9", "-f", str(api.write_spec(VENV_SPEC)),
                  "--backend", "venv", "--replace", "--no-wait")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    versions = api.root / ".envctl/envs/slowk9"
    wait_for(lambda: api.job(job_id)["phase"] == "creating" and (versions / "v2").is_dir(),
             60, what="v2 being built")
    api.daemon.kill9()
    stable = api.root / "slowk9"
    assert os.readlink(stable) == ".envctl/envs/slowk9/v1"
    assert as_user(a.bob.uid, a.bob.gid, ["cat", str(stable / "share/app/VERSION")]).stdout \
        == "1.0\n"
    api.daemon.restart()
    job = api.job(job_id)
    assert job["state"] == "interrupted", job
    assert sorted(os.listdir(versions)) == ["env.json", "v1", "v1.json", "v1.use"]
    log = api.cli(a.alice, "request", "logs", job_id).stdout
    assert "removed the unfinished version v2 of 'slowk9'" in log
    assert (stable / "share/app/VERSION").read_text() == "1.0\n"

