"""Nobody but the daemon gets a request (or a JupyterHub token) sent to the socket path.

The attack: ``socket.path`` in a root-owned 1777 directory; mallory, not root, binds the name
first; alice's ``envctl request list`` (her ``JUPYTERHUB_API_TOKEN`` in the environment) used to
send ``{"op": "list", ..., "hub_token": ...}`` to mallory's listener and print its fake answer.
Now the client reads the listener's uid from the kernel before it sends a byte and talks only to
root or the owner of the socket's directory, and the daemon refuses to bind in a directory
others can write, sticky or not. Real users, real sockets, the real CLI and the real daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from envctl_shared.api.client import Client
from envctl_shared.errors import EX_IOERR, EX_NOPERM, UntrustedSocket

from tests.api_support import ENVCTL
from tests.conftest import Accounts, User
from tests.daemon_support import Envctld, write_config
from tests.helpers import as_user
from tests.watch_support import make_root

TOKEN = "hub-token-of-alice-0123456789"
# A listener posing as the daemon: connectable by all, says "ready" once it listens, takes one
# connection, answers a request line with a fake empty list, and finally prints (JSON) every
# byte it was sent.
IMPOSTOR = r"""
import json, os, socket, sys
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
srv.listen(1)
print("ready", flush=True)
srv.settimeout(60)
conn, _ = srv.accept()
conn.settimeout(10)
got = b""
while chunk := conn.recv(65536):
    got += chunk
    if got.endswith(b"\n"):
        conn.sendall(b'{"ok": true, "data": []}\n')
print(json.dumps(got.decode(errors="replace")), flush=True)
"""


@contextlib.contextmanager
def impostor(user: User, path: Path) -> Iterator[list[str]]:
    """``user`` listens on ``path`` for the body; the list then holds what it was sent."""
    proc = subprocess.Popen(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                             "--clear-groups", "/usr/bin/python3", "-c", IMPOSTOR, str(path)],
                            stdout=subprocess.PIPE, text=True)
    received: list[str] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield received
        out, _ = proc.communicate(timeout=30)
        received.append(json.loads(out))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _shared_dir(scratch: Path) -> Path:
    """A root-owned sticky world-writable directory, like /tmp."""
    shared = scratch / "run"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    return shared


def test_cli_sends_an_impostor_nothing(scratch: Path, accounts: Accounts) -> None:
    """The reproduction: alice's token and request never reach mallory's socket."""
    path = _shared_dir(scratch) / "envctld.sock"
    alice, mallory = accounts.alice, accounts.mallory
    env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8", "ENVCTL_SOCKET": str(path),
           "JUPYTERHUB_API_TOKEN": TOKEN,
           **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})}
    with impostor(mallory, path) as received:
        res = as_user(alice.uid, alice.gid, [ENVCTL, "request", "list"], check=False, env=env,
                      timeout=60, cwd="/")
    assert received == [""], received  # not a byte: no request, no token
    assert res.returncode == EX_NOPERM, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert (f"refusing to talk to {path}: it is served by uid {mallory.uid}, which is neither "
            f"root nor the owner of {path.parent} (uid 0)") in res.stderr
    assert "nothing was sent" in res.stderr and "Traceback" not in res.stderr


def test_the_directory_owner_may_serve_it(scratch: Path, accounts: Accounts) -> None:
    """A daemon that is not root serves from a directory it owns: trusted. The same user in a
    directory it does not own is not, whatever the client's own uid (root here)."""
    bob = accounts.bob
    own = scratch / "bob"
    own.mkdir(mode=0o755)
    os.chown(own, bob.uid, bob.gid)
    with impostor(bob, own / "d.sock") as received:
        with Client(own / "d.sock", timeout=10, hub_token=TOKEN) as client:
            assert client.call("list") == []
    assert TOKEN in received[0]  # it was talked to: it is the daemon here
    shared = _shared_dir(scratch)
    with impostor(bob, shared / "d.sock") as received:
        with pytest.raises(UntrustedSocket, match=f"served by uid {bob.uid}") as err:
            Client(shared / "d.sock", timeout=10, hub_token=TOKEN).call("list")
    assert received == [""]
    assert err.value.exit_code == EX_NOPERM and err.value.hint


def test_daemon_refuses_a_sticky_world_writable_socket_dir(scratch: Path,
                                                           accounts: Accounts) -> None:
    """The daemon's side: it will not start with its socket where others may bind first."""
    root = make_root(scratch, accounts)
    shared = _shared_dir(scratch)
    cfg = write_config(scratch, [(root, accounts.shared_group)],
                       extra={"socket": {"path": str(shared / "envctld.sock")}})
    daemon = Envctld(cfg, scratch)
    rc = daemon.start_failing()
    log = daemon.log_text()
    assert rc == EX_IOERR, log[-2000:]
    assert f"socket directory {shared} is writable by others (mode 1777" in log
    assert f"chmod go-w {shared}" in log
    assert not (shared / "envctld.sock").exists()
