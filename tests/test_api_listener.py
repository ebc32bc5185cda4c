"""Socket creation safety and kernel identity, on real sockets and real other users.

The listener must refuse to bind where others could swap the socket, remove only a provably
stale socket, never steal a live one, and never expose the socket before its mode and group are
set. ``peercred`` must report what the kernel holds for the connecting process — including
supplementary groups — and its /proc fallback must agree with SO_PEERGROUPS.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from envctl_shared.api.client import Client
from envctl_shared.api.listener import bind_unix, parent_problem
from envctl_shared.api.peercred import peer_cred, proc_groups
from envctl_shared.api.server import Server
from envctl_shared.config import SocketConfig, parse
from envctl_shared.errors import ConfigError, Conflict, DaemonUnavailable, FilesystemError
from envctl_shared.status import DaemonStatus

from tests.conftest import Accounts


def _cfg(path: Path, mode: int = 0o660, group: str | None = None) -> SocketConfig:
    return SocketConfig(path=path, mode=mode, group=group)


def test_binds_with_mode_and_group(scratch: Path, accounts: Accounts) -> None:
    path = scratch / "d.sock"
    sock = bind_unix(_cfg(path, 0o660, accounts.shared_group))
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == accounts.shared_gid
    finally:
        sock.close()


def test_stale_socket_is_replaced_live_one_refused(scratch: Path) -> None:
    path = scratch / "d.sock"
    first = bind_unix(_cfg(path))
    with pytest.raises(Conflict, match="already listening"):
        bind_unix(_cfg(path))
    first.close()  # the file stays behind: a crashed daemon's stale socket
    assert path.exists()
    second = bind_unix(_cfg(path))
    with Client(path, timeout=2) as client:
        client.connect()  # the new one really listens there
    second.close()


def test_a_missing_socket_directory_is_made_as_runtime_directory_would(scratch: Path) -> None:
    """/run/envctl outside systemd: made, the daemon's, 0755 (whatever the umask); one level
    only: a missing grandparent is a typo, refused before anything is made."""
    path = scratch / "run" / "d.sock"
    assert parent_problem(path) is None
    old = os.umask(0o077)
    try:
        sock = bind_unix(_cfg(path))
    finally:
        os.umask(old)
    sock.close()
    st = os.stat(path.parent)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o755)
    deep = scratch / "missing" / "deeper" / "d.sock"
    problem = parent_problem(deep)
    assert problem is not None and "does not exist, nor does" in problem.message
    with pytest.raises(FilesystemError, match="cannot create socket directory"):
        bind_unix(_cfg(deep))
    assert not (scratch / "missing").exists()


def test_refuses_unsafe_places(scratch: Path, accounts: Accounts) -> None:
    shared = scratch / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(FilesystemError, match="writable by others"):
        bind_unix(_cfg(shared / "d.sock"))
    os.chmod(shared, 0o1777)  # sticky, like /tmp: others could still bind the name first
    with pytest.raises(FilesystemError, match="writable by others"):
        bind_unix(_cfg(shared / "d.sock"))
    theirs = scratch / "theirs"
    theirs.mkdir()
    os.chown(theirs, accounts.mallory.uid, accounts.mallory.gid)
    with pytest.raises(FilesystemError, match="owned by uid"):
        bind_unix(_cfg(theirs / "d.sock"))
    link = scratch / "link"
    link.symlink_to(scratch)
    with pytest.raises(FilesystemError, match="not a directory"):
        bind_unix(_cfg(link / "d.sock"))
    plain = scratch / "plain"
    plain.write_text("")
    with pytest.raises(FilesystemError, match="not a socket"):
        bind_unix(_cfg(plain))
    assert plain.read_text() == ""  # never removed


def test_client_says_daemon_not_running(scratch: Path) -> None:
    with pytest.raises(DaemonUnavailable, match="not running"):
        Client(scratch / "nothing.sock").call("ping")
    listener = bind_unix(_cfg(scratch / "d.sock"))
    listener.close()  # the file is there, nobody listens: ECONNREFUSED
    with pytest.raises(DaemonUnavailable, match="not running"):
        Client(scratch / "d.sock").call("ping")


def test_peer_credentials_are_the_kernels(scratch: Path, accounts: Accounts) -> None:
    path = scratch / "d.sock"
    listener = bind_unix(_cfg(path, 0o666))
    listener.settimeout(30)
    alice = accounts.alice
    code = ("import socket,sys,time;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
            "s.recv(1)")
    proc = subprocess.Popen(["setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}",
                             "--init-groups", "/usr/bin/python3", "-c", code, str(path)])
    try:
        conn, _ = listener.accept()
        with conn:
            cred = peer_cred(conn)
            assert (cred.uid, cred.gid) == (alice.uid, alice.gid)
            assert cred.groups_source == "SO_PEERGROUPS"
            assert accounts.shared_gid in cred.groups
            # The fallback reads the same truth from /proc, and refuses a uid mismatch.
            assert set(proc_groups(cred.pid, alice.uid)) == set(cred.groups)
            assert proc_groups(cred.pid, accounts.bob.uid) == ()
            conn.sendall(b"x")
    finally:
        proc.wait(10)
        listener.close()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{proc.pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc_groups(proc.pid, alice.uid) == ()  # gone: no groups, never a guess


def test_inherited_socket_is_never_unlinked(scratch: Path) -> None:
    """systemd owns a socket it passes us (it may re-pass it to the next daemon): stop() must
    leave the file; and a daemon with requests disabled says so instead of failing oddly."""
    path = scratch / "inherited.sock"
    inherited = bind_unix(_cfg(path, 0o666))
    cfg = parse({"roots": [{"path": str(scratch), "group": "root"}],
                 "socket": {"path": str(scratch / "unused.sock")}})
    status = DaemonStatus.from_dict({"ready": True, "requests_enabled": False})
    server = Server(cfg, None, lambda: status)
    server.start(inherited)
    try:
        with Client(path, timeout=5) as client:
            assert client.call("status")["requests_enabled"] is False
            with pytest.raises(DaemonUnavailable, match="requests are disabled"):
                client.call("list")
    finally:
        server.stop()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert not (scratch / "unused.sock").exists()


def test_many_supplementary_groups_are_all_read(scratch: Path, accounts: Accounts) -> None:
    """More groups than the first SO_PEERGROUPS buffer holds (64): the ERANGE retry path."""
    path = scratch / "d.sock"
    listener = bind_unix(_cfg(path, 0o666))
    listener.settimeout(30)
    gids = list(range(50_000, 50_300))
    code = "import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);s.recv(1)"
    proc = subprocess.Popen(["setpriv", f"--reuid={accounts.bob.uid}",
                             f"--regid={accounts.bob.gid}",
                             f"--groups={','.join(map(str, gids))}", "/usr/bin/python3", "-c",
                             code, str(path)])
    try:
        conn, _ = listener.accept()
        with conn:
            assert sorted(peer_cred(conn).groups) == gids
            conn.sendall(b"x")
    finally:
        proc.wait(10)
        listener.close()


def test_connection_limits_are_checked_at_load(scratch: Path) -> None:
    """The admins' share must leave room for everyone else; the defaults are documented."""
    def sock(**keys: object) -> SocketConfig:
        return parse({"roots": [{"path": str(scratch), "group": "root"}],
                      "socket": {"path": str(scratch / "d.sock"), **keys}}).socket

    cfg = sock()
    assert (cfg.max_connections, cfg.max_connections_per_uid, cfg.admin_connections) == \
        (256, 64, 16)
    assert sock(max_connections=8, admin_connections=0).admin_connections == 0
    with pytest.raises(ConfigError, match="admin_connections: must be less than "
                                          "max_connections"):
        sock(max_connections=8)
    with pytest.raises(ConfigError, match="max_connections_per_uid: must be greater than zero"):
        sock(max_connections_per_uid=0)
