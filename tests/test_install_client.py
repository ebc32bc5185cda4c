"""A client installed where there is no compiler (a user pod): it installs, and it works.

The healer's C extension is optional at build time (setup.py). A fresh venv gets the package
from a copy of this checkout by pip, with the compiler unreachable (``CC`` pointing nowhere, as
in a slim image without gcc). Before, pip failed outright (the extension was always built), and
with no extension every command died with ImportError. Now the commands that only talk to the
daemon run against a real daemon, and ``check`` says in one line (plus a hint) what it needs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.daemon_support import Envctld, write_config
from tests.watch_support import make_root

pytest_plugins = ("tests.fixtures_daemon",)
REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "README.md", "daemon")


@pytest.fixture(scope="module")
def client_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bin/`` of a venv with the package installed by pip without a working compiler."""
    work = tmp_path_factory.mktemp("client")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(work / "venv")], check=True)
    env = {k: v for k, v in os.environ.items() if k != "ENVCTL_REQUIRE_EXTENSION"}
    r = subprocess.run([str(work / "venv/bin/pip"), "install", "-q",
                        "--disable-pip-version-check", str(src)],
                       env=env | {"CC": "/nonexistent/cc"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    site = next((work / "venv/lib").glob("python3*/site-packages"))
    assert not list((site / "envctl_shared/heal").glob("_fastfs*.so"))  # really without it
    return work / "venv/bin"


def _envctl(client_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(client_bin / "envctl"), *args], capture_output=True, text=True,
                          timeout=60)


def test_daemon_commands_work_without_the_extension(client_bin: Path, accounts: Accounts,
                                                    scratch: Path,
                                                    envctld: Callable[..., Envctld]) -> None:
    sock = scratch / "envctld.sock"
    down = _envctl(client_bin, "status", "--socket", str(sock))
    assert down.returncode == 69, down.stderr
    assert down.stderr.startswith("envctl: error: the envctl daemon is not running")
    assert "Error" not in down.stderr and "Traceback" not in down.stderr

    root = make_root(scratch, accounts)
    os.chmod(root, 0o2775)  # the build user (not in the group) must be able to enter it
    cfg = write_config(scratch, [(root, accounts.shared_group)],
                       extra={"requests": {"enabled": True, "state_dir": str(scratch / "state"),
                                           "backend": "venv", "allowed_backends": ["venv"],
                                           "build_user": accounts.builder.name}})
    envctld(cfg)  # the daemon runs from the full dev install; the client is the bare one
    up = _envctl(client_bin, "status", "--json", "--socket", str(sock))
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["requests_enabled"] is True
    listed = _envctl(client_bin, "request", "list", "--json", "--socket", str(sock))
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), (list, dict))


def test_check_says_in_one_line_what_it_needs(client_bin: Path, scratch: Path) -> None:
    r = _envctl(client_bin, "check", "--group", "root", str(scratch))
    assert r.returncode == 69  # EX_UNAVAILABLE: a part of the install is missing
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and r.stdout == "", r.stderr
    assert lines[0].startswith("envctl: error: the healer's C extension")
    assert lines[1].startswith("  hint: reinstall with gcc")
