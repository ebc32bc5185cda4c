"""A real request-serving ``envctld`` for the API and CLI tests, and clients as real other users.

Why module-scoped: starting a daemon (watch + reconcile + job store + socket) costs about a
second, and the API tests only need one with requests enabled; tests keep to their own env
names. Builds are real and offline: a local conda channel built by ``jobs_support`` (rattler
backend) and a hand-made wheelhouse (venv backend). ``venv_python`` points at a tiny wrapper that
sleeps when the prefix's name contains ``slow`` — a deterministic build that stays in its first
phase long enough to cancel it or to follow it and hang up.

Clients run as the test accounts through ``setpriv``; ``groups=True`` gives them their
/etc/group supplementary groups (``--init-groups``) so the daemon sees them via SO_PEERGROUPS,
``groups=False`` runs them with none.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from envctl_shared.api.client import Client

from tests.conftest import Accounts, User
from tests.daemon_support import Envctld
from tests.helpers import VENV_BIN
from tests.jobs_support import build_channel, hello_packages, write_wheel

ENVCTL = str(VENV_BIN / "envctl")
# The CLI runs the code the tests import (a checkout other than the installed one included).
_PYTHONPATH = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
SLOW_PYTHON = """#!/bin/sh
# envctl test wrapper: a venv build whose prefix mentions "slow" stays in its first phase; one
# whose prefix mentions "envdump" prints the whole environment the build sees into its log.
case "$*" in *slow*) sleep 120 ;; esac
case "$*" in *envdump*) echo "BUILD ENVIRONMENT:"; env ;; esac
exec /usr/bin/python3 "$@"
"""
HELLO_SPEC = "channels: [{channel}]\ndependencies:\n  - hello\n"
VENV_SPEC = "dependencies:\n  - pip:\n    - greetlib\n"


@dataclass
class ApiDaemon:
    """A started daemon plus everything a test needs to talk to it."""

    daemon: Envctld
    base: Path
    root: Path
    sock: Path
    channel: Path
    config: Path

    def job(self, job_id: str) -> Any:
        """The job object the daemon replies to ``get`` (asked as root, over the socket)."""
        with Client(self.sock) as client:
            return client.call("get", id=job_id)

    def hello_spec(self) -> str:
        return HELLO_SPEC.format(channel=self.channel.as_uri())

    def write_spec(self, text: str, name: str = "environment.yml") -> Path:
        """A spec file every test user can read."""
        path = Path(tempfile.mkdtemp(dir=self.base)) / name
        os.chmod(path.parent, 0o755)
        path.write_text(text)
        os.chmod(path, 0o644)
        return path

    def cli(self, user: User, *args: str, groups: bool = True, env: dict[str, str] | None = None,
            timeout: float = 180, check: bool = False) -> subprocess.CompletedProcess[str]:
        """``envctl ARGS`` as ``user``, with a clean environment and ENVCTL_SOCKET set."""
        return subprocess.run(self.cli_argv(user, *args, groups=groups, env=env), text=True,
                              capture_output=True, timeout=timeout, check=check, cwd="/")

    def cli_argv(self, user: User, *args: str, groups: bool = True,
                 env: dict[str, str] | None = None) -> list[str]:
        environ = {"PATH": "/usr/bin:/bin", "ENVCTL_SOCKET": str(self.sock), "HOME": "/",
                   "LANG": "C.UTF-8", **_PYTHONPATH, **(env or {})}
        return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                "--init-groups" if groups else "--clear-groups", "env", "-i",
                *(f"{k}={v}" for k, v in environ.items()), ENVCTL, *args]

    def raw(self, data: bytes, timeout: float = 10.0, lines: int | None = None) -> bytes:
        """Send raw bytes (as root) and return what the daemon answers until it closes, goes
        quiet for ``timeout``, or has sent ``lines`` lines."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.sock))
            try:
                s.sendall(data)
            except BrokenPipeError:
                pass  # the daemon hung up early (busy, too large): read what it said
            s.settimeout(timeout)
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
                    if lines is not None and out.count(b"\n") >= lines:
                        break
            except (TimeoutError, ConnectionResetError):
                pass
            return out


def api_config(base: Path, accounts: Accounts, sock: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None, **requests: Any) -> Path:
    """The daemon config: one root (the shared group), a world-connectable socket (so users
    outside the group reach the daemon and meet *its* authorisation), requests for the group;
    ``extra`` adds or replaces top-level sections (``jupyterhub``, ``kernels``, ``logging``)."""
    root = base / "envs"
    root.mkdir(mode=0o2775, exist_ok=True)
    os.chown(root, 0, accounts.shared_gid)
    os.chmod(root, 0o2775)
    run = base / "run"
    run.mkdir(mode=0o755, exist_ok=True)
    wheelhouse = base / "wheelhouse"
    write_wheel(wheelhouse, "greetlib")
    channel = base / "channel"
    if not (channel / "noarch").exists():
        build_channel(channel, hello_packages())
    slow = base / "slowpython"
    slow.write_text(SLOW_PYTHON)
    os.chmod(slow, 0o755)
    data: dict[str, Any] = {
        "roots": [{"path": str(root), "group": accounts.shared_group}],
        "watch": {"poll_interval": 1, "status_interval": 60},
        "socket": {"path": str(run / "envctld.sock"), "mode": "0666",
                   "group": accounts.shared_group, "read_timeout": 2, **(sock or {})},
        "requests": {
            "root": str(root), "state_dir": str(base / "state"), "backend": "rattler",
            "allowed_backends": ["rattler", "venv"], "build_user": accounts.builder.name,
            "max_concurrent": 4, "timeout": 120, "allow_groups": [accounts.shared_group],
            "channels": [channel.as_uri()], "default_channels": [channel.as_uri()],
            "venv_python": str(slow),
            "pip_args": ["--no-index", "--find-links", str(wheelhouse)],
            "max_request_bytes": 65536, **requests,
        },
        "logging": {"level": "INFO"},
        **(extra or {}),
    }
    path = base / "envctld.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def new_base() -> Path:
    """A fresh directory under /tmp/envctl-tests that every test user can traverse (the build
    user runs inside it); the caller removes it."""
    tests_base = Path("/tmp/envctl-tests")
    tests_base.mkdir(mode=0o755, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=tests_base))
    os.chmod(base, 0o755)
    return base


def start_api_daemon(accounts: Accounts, sock: dict[str, Any] | None = None,
                     extra: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                     **requests: Any) -> Iterator[ApiDaemon]:
    """Generator for a module fixture: start, yield, always clean up (process and files).
    ``env``: variables added to the daemon's own environment."""
    base = new_base()
    daemon: Envctld | None = None
    try:
        config = api_config(base, accounts, sock, extra, **requests)
        daemon = Envctld(config, base, env=env).start()
        cfg = yaml.safe_load(config.read_text())
        yield ApiDaemon(daemon, base, Path(cfg["requests"]["root"]),
                        Path(cfg["socket"]["path"]), base / "channel", config)
        daemon.stop()
    finally:
        if daemon is not None:
            daemon.cleanup()
        shutil.rmtree(base, ignore_errors=True)
