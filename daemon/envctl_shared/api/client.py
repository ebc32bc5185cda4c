"""The client side of the protocol, for the CLI and for anything else that scripts the daemon.

Why its own module: the CLI must talk *only* the protocol (it may run in a user pod with no
daemon code paths in use), and the ways a connection can fail must stay different messages —
nobody listening (DaemonUnavailable), the kernel refusing us the socket file
(SocketPermissionDenied), someone other than the daemon listening (UntrustedSocket), and the
daemon refusing the request (whatever error it sent, e.g. NotAuthorised). Error envelopes are
rebuilt into the same EnvctlError class the daemon raised, so the user sees the daemon's words
and the CLI exits with the matching code.

Why the client checks who listens before it sends a byte: a request carries the caller's
JupyterHub token, and whoever can bind the socket path first (a world-writable directory, a
wrong ``--socket``) would receive it and could answer anything. The kernel's ``SO_PEERCRED`` on
our end names the uid that listens; only root or the owner of the socket's directory (the
daemon's user owns ``/run/envctl``) may be the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..accounts import group_name
from ..config import DEFAULT_SOCKET, SOCKET_ENV
from ..errors import (
    DaemonUnavailable,
    EnvctlError,
    ProtocolError,
    SocketPermissionDenied,
    UntrustedSocket,
    UsageError,
)
from . import protocol
from .peercred import peer_cred

MAX_REPLY_BYTES = 64 * 1024 * 1024  # a reply is trusted, but a runaway one must not eat memory
HUB_TOKEN_ENV = "JUPYTERHUB_API_TOKEN"  # set by JupyterHub in every user's server


def _cwd_exists() -> bool:
    try:
        os.getcwd()
    except OSError:
        return False
    return True


def socket_path(explicit: str | None = None) -> Path:
    """``--socket``, else ``$ENVCTL_SOCKET``, else the default ``/run/envctl/envctld.sock``."""
    return Path(explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


class Client:
    """One connection to the daemon; several requests may be sent on it in turn."""

    def __init__(self, path: str | Path | None = None, timeout: float | None = 30.0,
                 hub_token: str | None = None) -> None:
        """``hub_token`` defaults to ``$JUPYTERHUB_API_TOKEN``: inside a hub user's server, it
        is what proves to the daemon which hub user is asking (the uid cannot)."""
        self.path = Path(path) if path else socket_path()
        if not self.path.is_absolute():
            # found anew in whatever directory the CLI runs in: in /tmp or a shared root,
            # whoever made var/run there would be its "daemon" (and get the hub token)
            raise UsageError(f"the socket path {self.path} is relative: it would be looked up "
                             "in the current directory, where others may listen",
                             hint=f"give it as an absolute path, e.g. {Path.cwd() / self.path}"
                             if _cwd_exists() else "give it as an absolute path")
        self.timeout = timeout
        self.hub_token = hub_token or os.environ.get(HUB_TOKEN_ENV) or None
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._interrupted = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect; a full listen backlog (EAGAIN: the daemon is busy accepting) is waited
        out until the timeout, like a blocking connect would."""
        deadline = time.monotonic() + (self.timeout if self.timeout is not None else 3600.0)
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
                break
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EAGAIN or time.monotonic() + delay > deadline:
                    raise _connect_error(self.path, exc) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            _check_server(sock, self.path)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._file = sock.makefile("rb")
        if self._interrupted:  # interrupt() came while connecting
            self.interrupt()

    def interrupt(self) -> None:
        """From another thread: whoever waits on this connection for the daemon wakes and sees
        it lost (``close`` would not wake a blocked read), and so does any later wait."""
        self._interrupted = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._file = None

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its ``data``; an error reply is raised as EnvctlError."""
        self._send(op, args)
        msg = self._receive()
        if "event" in msg or msg.get("end"):
            raise ProtocolError(f"{op}: unexpected stream message from the daemon")
        return msg.get("data")

    def stream(self, op: str, **args: Any) -> Iterator[dict[str, Any]]:
        """Send a streaming request; yield each ``{"event", "data"}`` and finally the ``end``
        message (``{"end": true, "data": ...}``). A daemon that replies once (e.g. because
        the stream had nothing to follow) yields that reply as the end."""
        self._send(op, args)
        while True:
            msg = self._receive()
            if "event" in msg:
                yield msg
                continue
            yield {"end": True, "data": msg.get("data")}
            return

    def _send(self, op: str, args: dict[str, Any]) -> None:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(protocol.encode(protocol.request(op, args, self.hub_token)))
        except OSError as exc:
            # The daemon may have refused the request mid-send (too large): its reply explains.
            self._receive()
            raise DaemonUnavailable(f"lost the connection to the daemon at {self.path}: "
                                    f"{exc.strerror or exc}") from None

    def _receive(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_REPLY_BYTES)
        except TimeoutError:
            raise DaemonUnavailable(f"the daemon at {self.path} did not answer within "
                                    f"{self.timeout:g}s", hint="check 'systemctl status envctld' "
                                    "or the daemon's log") from None
        except OSError as exc:
            raise DaemonUnavailable(f"lost the connection to the daemon at {self.path}: "
                                    f"{exc.strerror or exc}") from None
        if not line:
            raise DaemonUnavailable(f"the daemon at {self.path} closed the connection",
                                    hint="it may be restarting; retry in a moment")
        try:
            msg = json.loads(line)
        except ValueError:
            raise ProtocolError("the daemon sent a reply that is not JSON",
                                hint="client and daemon versions may differ") from None
        if not isinstance(msg, dict) or "ok" not in msg:
            raise ProtocolError("the daemon sent a reply without an ok field")
        if not msg["ok"]:
            raise EnvctlError.from_dict(dict(msg.get("error") or {}))
        return msg


def _check_server(sock: socket.socket, path: Path) -> None:
    """Refuse a server that is neither root nor the owner of the socket's directory.

    The uid is the kernel's, captured when the server called ``listen()`` (under socket
    activation that is systemd, root). The directory is looked up after the connect: whoever
    owns the directory the path leads to decides what is bound in it, so its owner (or root) is
    who may serve it; a directory that cannot be looked up leaves only root trusted."""
    uid = peer_cred(sock).uid
    try:
        owner: int | None = os.stat(path.parent).st_uid
    except OSError:
        owner = None
    if uid in (0, owner):
        return
    raise UntrustedSocket(
        f"refusing to talk to {path}: it is served by uid {uid}, which is neither root nor "
        f"the owner of {path.parent} (uid {owner if owner is not None else 'unknown'})",
        hint="someone other than the envctl daemon may be listening there; nothing was sent "
        "(no request, no JupyterHub token). Check --socket / ENVCTL_SOCKET and tell an "
        "administrator")


def _socket_denied_hint(path: Path) -> str:
    """Who the socket lets in, named: its group (``socket.group``), or a directory on the way."""
    try:
        st = os.stat(path)
    except OSError:
        return f"a directory on the way keeps you out: 'namei -l {path}'"
    group, mode = group_name(st.st_gid), st.st_mode & 0o777
    if mode & 0o060 != 0o060:  # no group is let in: joining one would not help
        return (f"the socket (group {group}, mode {mode:04o}) lets in its owner alone: ask an "
                "administrator to set socket.mode to 0660 and socket.group to a group you are "
                "in, in the daemon's configuration")
    return (f"the socket (group {group}, mode {mode:04o}) lets in its owner and "
            f"group {group}: ask an administrator to add you to {group}, or to set socket.group "
            "in the daemon's configuration to a group you are in; then log in again")


def _connect_error(path: Path, exc: OSError) -> EnvctlError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SocketPermissionDenied(f"permission denied on the daemon socket {path}",
                                      hint=_socket_denied_hint(path))
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
        return DaemonUnavailable(
            f"the envctl daemon is not running (no one is listening on {path})",
            hint="start it ('systemctl start envctld'), or point --socket / ENVCTL_SOCKET at "
            "the right socket")
    if exc.errno == errno.EAGAIN:
        return DaemonUnavailable(f"the daemon at {path} is not accepting connections fast "
                                 "enough (listen queue full)", hint="retry in a moment")
    return DaemonUnavailable(f"cannot connect to the daemon at {path}: {exc.strerror or exc}",
                             hint="point --socket / ENVCTL_SOCKET at the daemon's socket")
