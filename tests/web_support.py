"""A real JupyterHub running ``envctl web`` as its service, a real daemon, and a real browser.

The hub (PyPI ``jupyterhub`` with the PyPI ``configurable-http-proxy``) runs on loopback with
the dummy authenticator and a fixed password; it starts ``envctl web`` itself (a ``command``
service) as ``nobody`` (not a test account: the service lives as long as the module, and no
process of the test accounts may outlive a test) — the uid every hub user's request reaches
the daemon with, listed in this daemon's ``jupyterhub.shared_uids``. Hub users
``alice`` and ``bob`` are both in the hub group ``builders`` (``requests.allow_hub_groups``);
nothing but the hub tells them apart.

The browser is Debian's headless Chromium driven by selenium through ``chromium-driver``, with
a fresh profile per user.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.api_support import ApiDaemon
from tests.conftest import Accounts
from tests.helpers import REPO, VENV_BIN
from tests.hub_support import HUB_BASE, Hub, launch_hub

PASSWORD = "envctl-web-tests"
SERVICE = "envctl"
HUB_CONFIG = HUB_BASE + """
c.DummyAuthenticator.password = "{password}"
c.Authenticator.allowed_users = {{"alice", "bob"}}
c.JupyterHub.services = [
    {{"name": "{service}", "url": "http://127.0.0.1:{web_port}", "command": {command},
      "user": "{web_user}", "cwd": "/", "oauth_no_confirm": True,
      "oauth_client_allowed_scopes": ["read:users!user"],
      "environment": {environment}}},
    {{"name": "envctl-tests", "api_token": "{service_token}"}},
]
c.JupyterHub.load_roles = [
    {{"name": "envctl-tests", "scopes": ["admin:users", "admin:groups", "tokens"],
      "services": ["envctl-tests"]}},
    {{"name": "user", "scopes": ["self", "access:services!service={service}"]}},
]
"""


@dataclass
class WebWorld:
    hub: Hub
    api: ApiDaemon
    public: str  # the hub's public URL (the proxy)
    accounts: Accounts

    @property
    def service(self) -> str:
        return f"{self.public}/services/{SERVICE}/"

    def http(self, method: str, path: str, token: str | None = None,
             body: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """The service's HTTP API through the proxy: (status, JSON body)."""
        req = urllib.request.Request(
            self.service + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={**({"Authorization": f"token {token}"} if token else {}),
                     "Accept": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode("utf-8", "replace")

    def web_log(self) -> str:
        return (self.hub.base / "jupyterhub.log").read_text(errors="replace")


def start_web_hub(base: Path, api: ApiDaemon, web_user: str, ports: dict[str, int]) -> Hub:
    service_token = secrets.token_hex(24)
    command = [str(VENV_BIN / "envctl"), "--socket", str(api.sock), "web"]
    environment = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "PYTHONPATH": str(REPO / "daemon"),
                   "HOME": "/", "LANG": "C.UTF-8"}
    return launch_hub(base, HUB_CONFIG.format(
        base=base, service_token=service_token, password=PASSWORD, service=SERVICE,
        command=repr(command), environment=repr(environment), web_user=web_user, **ports),
        ports["hub_port"], service_token)


def stop_hub(hub: Hub) -> None:
    """SIGTERM first: the hub stops the services it started; then whatever is left is killed."""
    hub.proc.terminate()
    try:
        hub.proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    hub.stop()


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1280,900")
