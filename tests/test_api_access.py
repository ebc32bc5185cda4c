"""Every op's declared access (``protocol.OPS``) is what a real daemon enforces.

Why one test over the whole table: the access of each op is data (``protocol.Access``), checked
in one place (``auth.Authoriser.check``); what can still go wrong is a handler that forgets to
hand its target to the check, or a level that means something else than the docs say. So for
every op — with the arguments that escalate it — three callers who can all open the socket ask
the real daemon, each as a real process of its own uid: an unprivileged user (not in any allow
list), a requester who is not the owner of the targets (bob), and an admin (root). The targets
(a finished job and an environment) belong to alice. An op is *allowed* when the answer is
anything but ``not-authorised`` (a conflict or not-found after the check is fine: the check
passed); the expectation is derived from the op's declared access alone.

A new op fails :func:`test_every_op_is_covered` until its arguments are listed in ``ARGS``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from envctl_shared.api.protocol import OPS, Access

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts, User

ENV = "acc-env"
# Arguments each op is called with ("JOB" is replaced by alice's job id); a second entry per op
# where an argument escalates its access.
ARGS: dict[str, list[dict[str, Any]]] = {
    "ping": [{}], "version": [{}], "whoami": [{}], "status": [{}],
    "create": [{"name": "acc-new", "spec": "SPEC"},
               {"name": ENV, "spec": "SPEC", "replace": True}],
    "get": [{"id": "JOB"}], "list": [{}, {"all": True}], "logs": [{"id": "JOB"}],
    "cancel": [{"id": "JOB"}], "kernels-sync": [{}],
    "env-list": [{}], "env-show": [{"name": ENV}], "env-export": [{"name": ENV}],
    "env-diff": [{"name": ENV}], "env-describe": [{"name": ENV, "description": "shared"}],
    "env-verify": [{"name": ENV}], "env-rollback": [{"name": ENV}],
    "env-remove": [{"name": ENV}], "env-add": [{"name": ENV, "packages": ["hello"]}],
    "env-update": [{"name": ENV}], "env-gc": [{"dry_run": True}],
}
# Allowed for (unprivileged, requester who is not the owner, admin).
EXPECTED = {
    Access.ANYONE: (True, True, True), Access.SELF: (True, True, True),
    Access.VERIFIED: (True, True, True), Access.JOB_READER: (False, True, True),
    Access.REQUESTER: (False, True, True), Access.JOB_OWNER: (False, False, True),
    Access.ENV_OWNER: (False, False, True), Access.ADMIN: (False, False, True),
}
CALLER = """
import json, socket, sys
out = []
for req in json.load(sys.stdin):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sys.argv[1])
        s.sendall(json.dumps(req).encode() + b"\\n")
        reply = json.loads(s.makefile().readline())
    out.append(None if reply["ok"] else reply["error"]["code"])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)


def _calls(api: ApiDaemon, user: User | None, requests: list[dict[str, Any]]) -> list[str | None]:
    """Each request on a connection of its own, as ``user`` (None: root); the error codes."""
    argv = ["/usr/bin/python3", "-c", CALLER, str(api.sock)]
    if user is not None:
        argv = [*api.cli_argv(user)[:-1], *argv]  # setpriv ... env -i ... (envctl dropped)
    out = subprocess.run(argv, input=json.dumps(requests), text=True, capture_output=True,
                         check=True, timeout=120).stdout
    return list(json.loads(out))


def test_every_op_is_covered() -> None:
    assert sorted(ARGS) == sorted(OPS)


def test_each_declared_access_is_enforced(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.hello_spec()
    res = api.cli(accounts.alice, "request", "create", ENV, "-f",
                  str(api.write_spec(spec)), "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["state"] == "succeeded", job
    cases = []
    for name, variants in ARGS.items():
        op = OPS[name]
        for args in variants:
            args = {k: job["id"] if v == "JOB" else spec if v == "SPEC" else v
                    for k, v in args.items()}
            cases.append((name, args, EXPECTED[op.access_for(args)[0]]))
    requests = [{"v": 1, "op": name, "args": args} for name, args, _ in cases]
    # the unprivileged and the requester first: the admin's calls change things
    got = list(zip(_calls(api, accounts.mallory, requests), _calls(api, accounts.bob, requests),
                   _calls(api, None, requests), strict=True))
    wrong = []
    for (name, args, expected), codes in zip(cases, got, strict=True):
        allowed = tuple(code != "not-authorised" for code in codes)
        if allowed != expected:
            wrong.append(f"{name} {sorted(args)}: allowed {allowed} (codes {codes}), "
                         f"declared {OPS[name].access_for(args)[0].value} → {expected}")
    assert not wrong, "\n".join(wrong)
