"""``envctl status`` against a real daemon: heal-only daemons answer it, and a wedge shows.

These are the probes of a Kubernetes deployment (deploy/kubernetes): readiness and liveness
run ``envctl status``, so its exit code must tell "up", "not there" and "wedged" apart.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from envctl_shared.status import DaemonStatus, InotifyBudget, RootStatus

from tests.conftest import Accounts
from tests.daemon_support import Envctld, write_config
from tests.helpers import VENV_BIN, wait_for
from tests.watch_support import make_root

pytest_plugins = ("tests.fixtures_daemon",)
ENVCTL = str(VENV_BIN / "envctl")


def _status(sock: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ENVCTL, "status", "--socket", str(sock), *extra],
                          capture_output=True, text=True, timeout=30)


def test_heal_only_daemon_answers_status(accounts: Accounts, scratch: Path,
                                         envctld: Callable[..., Envctld]) -> None:
    root = make_root(scratch, accounts)
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    envctld(cfg)
    sock = scratch / "envctld.sock"
    r = _status(sock, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["requests_enabled"] is False and data["ready"] is True
    assert data["progress_age_s"] < 5
    r = subprocess.run([ENVCTL, "request", "list", "--socket", str(sock)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 69 and "requests are disabled" in r.stderr


def test_reload_switches_requests_on(accounts: Accounts, scratch: Path,
                                     envctld: Callable[..., Envctld]) -> None:
    root = make_root(scratch, accounts)
    os.chmod(root, 0o2775)  # the build user (not in the group) must enter it to build
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    d = envctld(cfg)
    write_config(scratch, [(root, accounts.shared_group)],
                 extra={"requests": {"enabled": True, "state_dir": str(scratch / "state"),
                                     "backend": "venv", "allowed_backends": ["venv"],
                                     "build_user": accounts.builder.name}})
    d.reload()
    sock = scratch / "envctld.sock"
    r = subprocess.run([ENVCTL, "request", "list", "--json", "--socket", str(sock)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    data = json.loads(_status(sock, "--json").stdout)
    assert data["requests_enabled"] is True
    # the wire shape is the typed status's, key for key, at the top, per root and nested
    assert set(data) == {f.name for f in fields(DaemonStatus)}
    assert set(data["roots"][0]) == {f.name for f in fields(RootStatus)}
    assert set(data["inotify"]) == {f.name for f in fields(InotifyBudget)}
    assert data["containment"] in ("cgroup", "sweep") and data["max_builds"] == 1
    assert DaemonStatus.from_dict(data).to_dict() == data
    # ... and what people read is built from it
    text = _status(sock).stdout
    assert text.startswith(f"envctld {data['version']} (pid {data['pid']}), ready, up "), text
    assert f"{root}  " in text and "jobs: " in text


def test_wedged_worker_fails_the_liveness_probe(accounts: Accounts, scratch: Path,
                                                envctld: Callable[..., Envctld]) -> None:
    root = make_root(scratch, accounts)
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    envctld(cfg, env={"ENVCTL_TEST_WEDGE_AFTER": "0.5"})
    sock = scratch / "envctld.sock"
    assert _status(sock, "--stale", "30").returncode == 0
    wait_for(lambda: _status(sock, "--stale", "3").returncode == 75, timeout=20,
             what="the wedge to show in envctl status")
    assert "wedged" in _status(sock, "--stale", "3").stderr
