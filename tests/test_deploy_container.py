"""The container image's process model, run for real: tini as PID 1 of a PID namespace.

Why: there is no container engine on this machine kind, but the part of the image that can go
wrong at run time is not the layers, it is PID 1. The kernel gives PID 1 no default signal
actions and makes it the parent of every orphan. So the Containerfile's ENTRYPOINT + CMD are run
here as PID 1 of a fresh PID namespace (``unshare --pid --fork --mount-proc``), with the image's
paths mapped to this checkout's venv: SIGTERM from "the runtime" must stop the daemon cleanly,
and an orphaned grandchild (what a double-forking build script leaves) must not stay a zombie.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import Accounts
from tests.helpers import REPO, VENV_BIN, wait_for

CONTAINERFILE = REPO / "Containerfile"
IMAGE_BIN = "/opt/envctl/bin"


def instruction(name: str) -> list[str]:
    """The exec-form (JSON) argument list of the last ``NAME [...]`` line of the Containerfile."""
    found = re.findall(rf"^{name} (\[.*\])$", CONTAINERFILE.read_text(), re.M)
    assert found, f"no exec-form {name} in the Containerfile"
    return list(json.loads(found[-1]))


def test_containerfile_shape() -> None:
    text = CONTAINERFILE.read_text()
    final_stage = text.split("\nFROM ")[-1]
    assert final_stage.startswith("debian:12"), "same Debian python3 as the systemd install"
    assert re.search(r"install -y[^\n]*\\\n[^\n]*\btini\b", final_stage), "tini in the image"
    assert "python3-venv" in final_stage, "the venv backend needs it at run time"
    entry = instruction("ENTRYPOINT")
    assert entry[:2] == ["/usr/bin/tini", "--"], "tini must be PID 1"
    assert "-g" not in entry, "SIGTERM goes to the daemon only; it cancels builds itself"
    assert entry[2] == f"{IMAGE_BIN}/envctld"
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var"} <= ignored


@dataclass(frozen=True)
class Pid1:
    unshare: subprocess.Popen[bytes]  # outside the namespace; exits with PID 1's status
    init: int  # host pid of PID 1 (tini)
    log: Path  # PID 1's stdout/stderr (the daemon's key=value log)


def _pids_under(ppid: int) -> list[tuple[int, str]]:
    """(pid, state) of the direct children of ``ppid``, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            out.append((int(stat.parent.name), fields[0]))
    return out


def _comm(pid: int) -> str:
    """The process's command name ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.fixture
def pid1(scratch: Path, accounts: Accounts) -> Iterator[Pid1]:
    """ENTRYPOINT + CMD as PID 1 of a new PID namespace, killed with its namespace at the end."""
    root = scratch / "envs"
    root.mkdir()
    config = scratch / "envctld.yaml"
    config.write_text(yaml.safe_dump({
        "roots": [{"path": str(root), "group": accounts.shared_group}],
        "socket": {"path": str(scratch / "envctld.sock")},
        "requests": {"enabled": True, "backend": "venv", "allowed_backends": ["venv"],
                     "build_user": accounts.builder.name, "state_dir": str(scratch / "state")},
        "logging": {"journal": "false"}}))
    argv = [a.replace(IMAGE_BIN, str(VENV_BIN)) for a in
            instruction("ENTRYPOINT") + instruction("CMD")]
    argv[argv.index("--config") + 1] = str(config)
    log = (scratch / "pid1.log").open("wb")
    # --kill-child: should unshare itself be killed, the namespace's init dies with it.
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                             *argv], stdout=log, stderr=subprocess.STDOUT)
    init = 0
    try:
        wait_for(lambda: bool(_pids_under(proc.pid)), timeout=10, what="PID 1")
        init = _pids_under(proc.pid)[0][0]
        wait_for(lambda: subprocess.run([str(VENV_BIN / "envctl"), "status", "--socket",
                                         str(scratch / "envctld.sock")],
                                        capture_output=True).returncode == 0,
                 timeout=30, what="the daemon answering under tini")
        yield Pid1(proc, init, scratch / "pid1.log")
    finally:
        if proc.poll() is None:
            # SIGKILL to a PID namespace's init kills every process in the namespace.
            if init:
                os.kill(init, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(timeout=10)
        log.close()


def test_pid1_is_tini_and_reaps_orphans(pid1: Pid1) -> None:
    assert Path(f"/proc/{pid1.init}/comm").read_text().strip() == "tini"
    # A double fork inside the namespace: the grandchild is re-parented to PID 1, then dies.
    # It lives until we kill it: seen as PID 1's child only once it has exec'd sleep, it must
    # not have exited (and been reaped) before we look — a fixed lifetime raced the look.
    subprocess.run(["nsenter", "-t", str(pid1.init), "-p", "-m", "sh", "-c",
                    "(sleep 300 &); exit 0"], check=True, timeout=10)

    def orphans() -> list[int]:
        return [pid for pid, _ in _pids_under(pid1.init) if _comm(pid) == "sleep"]
    wait_for(lambda: bool(orphans()), timeout=10, what="the orphan re-parented to PID 1")
    (orphan,) = orphans()
    os.kill(orphan, signal.SIGKILL)
    wait_for(lambda: orphan not in [pid for pid, _ in _pids_under(pid1.init)], timeout=10,
             what="PID 1 reaping the orphan (a zombie stays listed until reaped)")


def test_sigterm_to_pid1_stops_the_daemon_cleanly(pid1: Pid1) -> None:
    daemon = [pid for pid, _ in _pids_under(pid1.init)]
    assert daemon, "envctld is not PID 1's child"
    t0 = time.monotonic()
    os.kill(pid1.init, signal.SIGTERM)  # what the container runtime sends
    assert pid1.unshare.wait(timeout=30) == 0, pid1.log.read_text()
    assert time.monotonic() - t0 < 15
    assert "stopped drained=True" in pid1.log.read_text()  # its own shutdown, not a kill
    assert not any(Path(f"/proc/{pid}").exists() for pid in [pid1.init, *daemon])
