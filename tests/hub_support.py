"""A real JupyterHub for the hub tests, and a counting door in front of its API.

A real ``jupyterhub`` (PyPI, with the PyPI ``configurable-http-proxy`` on PATH, so it starts a
real proxy) runs on loopback with the dummy authenticator and a service whose token may create,
rename and delete users, groups and tokens (carol is a hub admin by the hub's configuration).
:class:`HubDoor` is a plain HTTP forwarder the daemon is pointed at instead of the hub itself:
it counts the daemon's questions (per token hash) and can be shut, which to the daemon is a hub
that is down.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import VENV_BIN, wait_for

# Every test hub: loopback ports, the dummy authenticator, its database and cookie secret in
# the test's base directory (str.format fields; {{ }} is a brace).
HUB_BASE = """
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {public_port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.db_url = "sqlite:///{base}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{base}/jupyterhub_cookie_secret"
"""
HUB_CONFIG = HUB_BASE + """
c.Authenticator.admin_users = {{"carol"}}
c.JupyterHub.services = [{{"name": "envctl-tests", "api_token": "{service_token}"}}]
c.JupyterHub.load_roles = [{{
    "name": "envctl-tests",
    "scopes": ["admin:users", "admin:groups", "tokens"],
    "services": ["envctl-tests"],
}}]
"""


SERVER_SCOPES = ["users:activity!user", "access:servers!server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Hub:
    """A running JupyterHub (its own process group) and its proxy (the hub starts it in a
    session of its own and records its pid in ``jupyterhub-proxy.pid``)."""

    proc: subprocess.Popen[bytes]
    api_url: str
    service_token: str
    base: Path

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The hub's REST API with the service token."""
        req = urllib.request.Request(
            self.api_url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.service_token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def token(self, user: str, scopes: list[str] | None = None) -> str:
        """A new API token of ``user``, as the hub creates it (with all of the user's
        permissions, or only ``scopes``)."""
        return str(self.token_model(user, scopes)["token"])

    def token_model(self, user: str, scopes: list[str] | None = None) -> dict[str, Any]:
        """The hub's answer for a new token: ``token`` and its ``id`` (to revoke it)."""
        body: dict[str, Any] = {"note": "envctl tests"}
        if scopes is not None:
            body["scopes"] = scopes
        return dict(self.call("POST", f"/users/{user}/tokens", body))

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """Killed, the hub and its proxy: their clean shutdown (2 s) is not what any test is
        about; the proxy is found through the pid file the hub leaves behind."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        try:
            pid = int((self.base / "jupyterhub-proxy.pid").read_text())
            if b"configurable-http-proxy" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass  # no pid file or the proxy is gone


def start_hub(base: Path) -> Hub:
    ports = {"public_port": free_port(), "hub_port": free_port(),
             "proxy_api_port": free_port()}
    service_token = secrets.token_hex(24)
    return launch_hub(base, HUB_CONFIG.format(base=base, service_token=service_token, **ports),
                      ports["hub_port"], service_token)


def launch_hub(base: Path, config: str, hub_port: int, service_token: str) -> Hub:
    """JupyterHub on ``config`` (written as ``base/jupyterhub_config.py``), once its REST API
    answers; its own output goes to ``base/jupyterhub.log`` (shown if it dies starting)."""
    (base / "jupyterhub_config.py").write_text(config)
    log = base / "jupyterhub.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "jupyterhub"), "-f", str(base / "jupyterhub_config.py")],
            cwd=base, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(base), "LANG": "C.UTF-8"})
    hub = Hub(proc, f"http://127.0.0.1:{hub_port}/hub/api", service_token, base)
    try:
        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]  # the hub's own output
            try:
                hub.call("GET", "/")
            except OSError:
                return False
            return True
        wait_for(up, 90, what="JupyterHub answering")
    except BaseException:
        hub.stop()
        raise
    return hub


def ask_hub(hub: Hub, path: str, auth: str) -> tuple[int, bytes]:
    """The hub's answer (status, JSON body) to ``GET path`` with ``auth``: what a door in front
    of the hub's API passes back."""
    req = urllib.request.Request(hub.api_url.removesuffix("/hub/api") + path,
                                 headers={"Authorization": auth})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def answer(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    """Reply ``status`` with the JSON ``body`` from an ``http.server`` handler."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class HubDoor:
    """Forwards ``GET /hub/api/user`` to the hub and counts the calls (by token hash)."""

    def __init__(self, hub: Hub) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        door = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                auth = self.headers.get("Authorization", "")
                with door._lock:
                    door.calls[hashlib.sha256(auth.encode()).hexdigest()] += 1
                answer(self, *ask_hub(hub, self.path, auth))

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.api_url = f"http://127.0.0.1:{self._server.server_address[1]}/hub/api"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def shut(self) -> None:
        """The hub is down, as the daemon sees it: nothing listens at api_url any more."""
        self._server.shutdown()
        self._server.server_close()
