"""Create the daemon's listening Unix socket safely, or refuse with a reason.

Why so careful: the daemon runs privileged and the socket usually lives in a directory it does
not fully control. A missing socket directory is made as systemd's ``RuntimeDirectory=`` would
(the daemon's, 0755; its own parent must exist), so a configuration works outside systemd too.
The checks: the parent directory exists, is a real directory (not a symlink),
is owned by root or by us, and is writable by nobody else — sticky or not: the sticky bit of a
``/tmp``-style directory stops others from removing our entry, not from binding the name first
(before the daemon starts, or while it restarts) and posing as the daemon to every client, who
would send it requests and JupyterHub tokens (the client refuses such a server too: see
``client``). An existing path is removed only when it is a socket, owned by us (or root when we
are root), and nothing answers on it (a stale socket left by a crash); a live one means another
daemon is running, and we refuse rather than steal it. The socket is bound under a 0177 umask so
it is never reachable before ``chgrp`` + ``chmod`` have applied the configured ``socket.group``
and ``socket.mode``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from pathlib import Path

from ..config import SocketConfig, resolve_group
from ..errors import Conflict, FilesystemError

log = logging.getLogger(__name__)
SOCKET_DIR_MODE = 0o755  # systemd's RuntimeDirectoryMode= default, as envctld.service sets it


def bind_unix(cfg: SocketConfig, backlog: int = 128) -> socket.socket:
    """A listening socket at ``cfg.path`` with ``cfg.mode`` and ``cfg.group`` applied; its
    directory is created first when missing, as systemd's ``RuntimeDirectory=`` would."""
    path = cfg.path
    _make_parent(path.parent)
    _check_parent(path.parent)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if cfg.group is not None:
            os.chown(path, -1, resolve_group(cfg.group), follow_symlinks=False)
        os.chmod(path, cfg.mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise FilesystemError(f"cannot create socket {path}: {exc.strerror}",
                              hint="check socket.path and socket.group in the config") from None
    log.info("api listening socket=%s mode=%04o group=%s", path, cfg.mode, cfg.group or "-")
    return sock


def parent_problem(path: Path) -> FilesystemError | None:
    """What keeps the daemon from listening at ``path``, asked before it changes anything:
    a socket directory that is missing where it cannot be made (its own parent missing), or
    that exists and is not the daemon's alone."""
    parent = path.parent
    if not os.path.lexists(parent):
        if os.path.isdir(parent.parent):
            return None  # made at bind time (_make_parent)
        return FilesystemError(f"socket directory {parent} does not exist, nor does "
                               f"{parent.parent}", hint="change socket.path, or create "
                               f"{parent.parent}")
    try:
        _check_parent(parent)
    except FilesystemError as exc:
        return exc
    return None


def _make_parent(parent: Path) -> None:
    """The socket directory as ``RuntimeDirectory=envctl`` makes it: the daemon's, 0755. One
    level only (a missing grandparent is a typo, not ours to invent); a directory someone else
    made first is judged by ``_check_parent`` as any other."""
    try:
        os.mkdir(parent, SOCKET_DIR_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise FilesystemError(f"cannot create socket directory {parent}: {exc.strerror}",
                              hint="create it (systemd: RuntimeDirectory=envctl) or change "
                              "socket.path") from None
    os.chmod(parent, SOCKET_DIR_MODE)  # whatever the umask took
    log.info("api created socket_dir=%s mode=%04o", parent, SOCKET_DIR_MODE)


def _check_parent(parent: Path) -> None:
    try:
        st = os.lstat(parent)
    except FileNotFoundError:
        raise FilesystemError(f"socket directory {parent} does not exist",
                              hint="create it (systemd: RuntimeDirectory=envctl) or change "
                              "socket.path") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FilesystemError(f"socket directory {parent} is not a directory (or is a symlink)")
    if st.st_uid not in (0, os.geteuid()):
        raise FilesystemError(f"socket directory {parent} is owned by uid {st.st_uid}",
                              hint="use a directory owned by root or by the daemon's user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FilesystemError(f"socket directory {parent} is writable by others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}; sticky or not, another "
                              "user could bind the socket name first and pose as the daemon)",
                              hint=f"'chmod go-w {parent}', or set socket.path in a directory "
                              "only the daemon's user can write, e.g. /run/envctl (mode 0755)")


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FilesystemError(f"{path} exists and is not a socket",
                              hint="remove it or change socket.path")
    if st.st_uid != os.geteuid():
        raise FilesystemError(f"{path} is a socket owned by uid {st.st_uid}, not by the daemon",
                              hint="remove it if no other service uses it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise FilesystemError(f"cannot probe existing socket {path}: {exc.strerror}") from None
        log.info("api removing_stale_socket=%s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise Conflict(f"another daemon is already listening on {path}",
                   hint="stop it first, or give this daemon another socket.path")
