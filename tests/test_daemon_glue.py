"""The daemon's glue without a service manager: sd_notify, socket activation, status().

sd_notify and LISTEN_FDS are exercised across a real exec (the only way LISTEN_PID can match),
with the built-in implementations when systemd-python is absent (the sidecar case).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path

import pytest
from envctl_shared.config import parse
from envctl_shared.daemon.service import Daemon

from tests.conftest import Accounts
from tests.helpers import VENV_BIN, as_user, find_violations
from tests.watch_support import make_root

PY = str(VENV_BIN / "python")

# The child either uses systemd-python (when installed) or, with it blocked, the built-in code.
BLOCK_SYSTEMD = "import sys; sys.modules['systemd'] = None; "
MODES = pytest.mark.parametrize("prelude", ["", BLOCK_SYSTEMD], ids=["default", "builtin"])


@MODES
def test_notify_reaches_an_abstract_socket(prelude: str) -> None:
    name = f"envctl-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(10)
        code = prelude + ("from envctl_shared.daemon.systemd import notify; "
                          "print(notify('READY=1\\nSTATUS=ok'))")
        out = subprocess.run([PY, "-c", code], env={**os.environ, "NOTIFY_SOCKET": "@" + name},
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == "True"
        assert s.recv(1024) == b"READY=1\nSTATUS=ok"
    out = subprocess.run([PY, "-c", code], env={k: v for k, v in os.environ.items()
                                                if k != "NOTIFY_SOCKET"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # no service manager: a no-op, not an error


def _activated(names: str, count: int, scratch: Path, prelude: str) -> dict[str, object]:
    """Run listen_socket() in a child that got ``count`` listening sockets at fds 3.."""
    socks = []
    for i in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(scratch / f"s{i}.sock"))
        s.listen()
        socks.append(s)
    redirs = " ".join(f"{3 + i}<&{s.fileno()}" for i, s in enumerate(socks))
    code = (prelude + "import json, os; from envctl_shared.daemon.systemd import listen_socket; "
            "s = listen_socket(); print(json.dumps({'name': s.getsockname(), "
            "'env': [k for k in os.environ if k.startswith('LISTEN_')], "
            "'fd3_open': os.path.exists('/proc/self/fd/3')}))")
    shell = (f'LISTEN_PID=$$ LISTEN_FDS={count} LISTEN_FDNAMES={names} exec {PY} -c "$0" '
             f"{redirs}")
    try:
        out = subprocess.run(["bash", "-c", shell, code], pass_fds=[s.fileno() for s in socks],
                             capture_output=True, text=True, check=True).stdout
    finally:
        for s in socks:
            s.close()
    return json.loads(out)


@MODES
def test_listen_socket_by_name_closes_the_others(scratch: Path, prelude: str) -> None:
    got = _activated("other:envctl-api", 2, scratch, prelude)
    assert got == {"name": str(scratch / "s1.sock"), "env": [], "fd3_open": False}


@MODES
def test_listen_socket_falls_back_to_the_first(scratch: Path, prelude: str) -> None:
    got = _activated("whatever", 1, scratch, prelude)
    assert got["name"] == str(scratch / "s0.sock")


def test_status_is_json_and_counts_what_was_healed(accounts: Accounts, scratch: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    root = make_root(scratch, accounts)
    a = accounts.alice
    # group and mode wrong: two writes for each of the four entries
    as_user(a.uid, a.gid, f"mkdir -p {root}/x/y && touch {root}/x/y/f {root}/x/g && "
            f"chgrp -R {a.gid} {root}/x")
    cfg = parse({"roots": [{"path": str(root), "group": accounts.shared_group}],
                 "requests": {"enabled": False}, "socket": {"path": str(scratch / "s.sock")}})
    d = Daemon(cfg)
    caplog.set_level(logging.INFO, logger="envctl_shared")
    d.start()
    try:
        assert not find_violations(root, accounts.shared_gid)
        st = json.loads(json.dumps(d.status().to_dict()))
        (r,) = st["roots"]
        assert r["mode"] == "inotify" and r["watches"] == 3 and r["full_passes"] == 1
        assert r["fixed"] == 4 and r["violations"] == 4 and r["errors"] == 0
        # the start's log lines count entries fixed as status does (not chgrp + chmod calls)
        said = [m for m in caplog.messages if m.startswith(("reconcile ", "watching "))]
        assert len(said) == 2 and all(" fixed=4 " in m for m in said), said
        assert st["ready"] and st["jobs"] is None
        as_user(a.uid, a.gid, f"touch {root}/x/new")
        assert d.wait_idle(10)
        # the event may still be on its way from the reader: wait for the audit, not a sleep
        from tests.helpers import wait_for
        wait_for(lambda: not find_violations(root, accounts.shared_gid), 10, 0.02, "healed")
        wait_for(lambda: d.status().roots[0].events >= 1, 10, 0.02, "event counted")
        # Our own chgrp/chmod come back as events and end as "echoes": one lstat, no write.
        wait_for(lambda: d.status().roots[0].echoes >= 1, 10, 0.02, "echo counted")
        # A worker counts a batch's fixes once it has made them all: the audit (and an echo of
        # the startup pass) can see the fix before the count has it.
        wait_for(lambda: d.status().roots[0].violations == 5, 10, 0.02, "5 violations counted")
        assert d.summary().startswith("roots=1 mode=inotify fixed=")
    finally:
        assert d.stop()


@pytest.mark.parametrize("others,warned", [("keep", True), ("read", False)])
def test_a_root_writable_by_everyone_is_said_at_start(accounts: Accounts, scratch: Path,
                                                      caplog: pytest.LogCaptureFixture,
                                                      others: str, warned: bool) -> None:
    """A root left 3777 (anyone on the host adds entries) starts, and is kept so under
    ``others: keep`` — said once, as a WARNING with the two ways out; ``others: read`` heals
    the write bit away, and there is nothing to say."""
    root = make_root(scratch, accounts)
    os.chmod(root, 0o3777)
    cfg = parse({"roots": [{"path": str(root), "group": accounts.shared_group,
                            "others": others}],
                 "requests": {"enabled": False}, "socket": {"path": str(scratch / "s.sock")}})
    d = Daemon(cfg)
    caplog.set_level(logging.INFO, logger="envctl_shared")
    d.start()
    try:
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if warned:
            assert os.stat(root).st_mode & 0o7777 == 0o3777
            assert said == [f"root-writable-by-everyone root={root} mode=3777 others=keep "
                            f"hint='chmod o-w {root}', or roots[].others: read"], said
        else:
            assert os.stat(root).st_mode & 0o7777 == 0o3775 and said == [], said
    finally:
        assert d.stop()
