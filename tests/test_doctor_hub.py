"""``envctl doctor`` on a JupyterHub: the hub identity check both ways against a real hub
(tests.test_hub_identity's): a server's token the hub verifies, and one it does not accept.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.test_hub_identity import SERVER_SCOPES, Hub, start_hub


@pytest.fixture(scope="module")
def hub_api(accounts: Accounts) -> Iterator[tuple[Hub, ApiDaemon]]:
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="envctl-doctor-hub-"))
    hub = start_hub(base)
    try:
        hub.call("POST", "/users", {"usernames": ["erin"]})
        extra = {"jupyterhub": {"api_url": hub.api_url, "shared_uids": [accounts.alice.uid],
                                "timeout": 2, "cache_seconds": 60}}
        for api in start_api_daemon(accounts, extra=extra):
            yield hub, api
    finally:
        hub.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _hub_check(api: ApiDaemon, accounts: Accounts, token: str | None) -> dict[str, Any]:
    env = {"JUPYTERHUB_API_TOKEN": token} if token else {}
    res = api.cli(accounts.alice, "doctor", "--json", env=env)
    checks = {c["check"]: c for c in json.loads(res.stdout)["checks"]}
    return dict(checks["hub identity"])


def test_hub_identity_verified_and_refused(hub_api: tuple[Hub, ApiDaemon],
                                           accounts: Accounts) -> None:
    hub, api = hub_api
    check = _hub_check(api, accounts, hub.token("erin", SERVER_SCOPES))
    assert check["ok"] and check["summary"] == "hub user erin (verified by JupyterHub)"
    check = _hub_check(api, accounts, "0" * 32)  # a token the hub never issued
    assert not check["ok"] and "does not accept the API token" in check["summary"]
    assert check["fix"]
    check = _hub_check(api, accounts, None)  # outside a server: no token at all
    assert not check["ok"] and "JUPYTERHUB_API_TOKEN" in check["fix"]
