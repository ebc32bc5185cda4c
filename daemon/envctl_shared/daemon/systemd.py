"""The daemon's side of systemd: sd_notify, socket activation, the watchdog interval.

Why a built-in fallback for each: the same daemon runs as a sidecar container without
libsystemd (and without systemd-python). When ``systemd.daemon`` is importable it is used; when
it is not, the protocols are small enough to speak directly: sd_notify is one datagram to
``$NOTIFY_SOCKET`` (a path, or an abstract name written ``@name``), socket activation is fds from
3 upward described by ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``. Nothing here knows what
the daemon does; ``service`` decides what to say and when.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

log = logging.getLogger(__name__)

try:  # optional: systemd-python
    from systemd import daemon as _sd_daemon  # type: ignore[attr-defined]  # repo has systemd/
except ImportError:  # pragma: no cover - depends on the host
    _sd_daemon = None

SD_LISTEN_FDS_START = 3
API_SOCKET_NAME = "envctl-api"


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1\\nSTATUS=...``) to the service manager; False if none."""
    if _sd_daemon is not None:
        try:
            return bool(_sd_daemon.notify(state))
        except OSError as exc:  # e.g. out of fds: the caller's loop must not die of it
            log.debug("sd_notify failed error=%s", exc)
            return False
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.debug("sd_notify failed socket=%s error=%s", addr, exc)
        return False
    return True


def _listen_fds() -> list[tuple[int, str]]:
    """(fd, name) pairs passed to this process by socket activation, in order.

    The LISTEN_* variables are removed from ``os.environ`` either way (libsystemd's unsetenv
    does not update Python's copy): builds we spawn must not think they were activated.
    """
    try:
        if _sd_daemon is not None and hasattr(_sd_daemon, "listen_fds_with_names"):
            pairs = _sd_daemon.listen_fds_with_names(unset_environment=True)
            return sorted((fd, name or "") for fd, name in pairs.items())
        try:
            pid = int(os.environ.get("LISTEN_PID", ""))
            count = int(os.environ.get("LISTEN_FDS", ""))
        except ValueError:
            return []
        if pid != os.getpid() or count <= 0:
            return []
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
        return [(fd, names[i] if i < len(names) else "") for i, fd in enumerate(fds)]
    finally:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)


def listen_socket(name: str = API_SOCKET_NAME) -> socket.socket | None:
    """The activated socket called ``name`` (else the first one passed), or None."""
    fds = _listen_fds()
    if not fds:
        return None
    chosen = next((fd for fd, n in fds if n == name), fds[0][0])
    for fd, _ in fds:
        if fd != chosen:
            os.close(fd)  # not ours to use; do not leak it into builds
        else:
            os.set_inheritable(fd, False)
    log.info("socket activation fd=%d name=%s", chosen,
             next((n for fd, n in fds if fd == chosen), ""))
    return socket.socket(fileno=chosen)


def watchdog_interval() -> float | None:
    """``WatchdogSec=`` in seconds when systemd expects pings from this process, else None."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to journald (``JOURNAL_STREAM`` is its dev:ino)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def journal_handler() -> Any | None:
    """systemd-python's JournalHandler, or None when the module is not installed."""
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER="envctld")
