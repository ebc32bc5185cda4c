"""Who is on the other end of a Unix socket, as the kernel (not the peer) says.

Why: every authorisation decision rests on this, so it must come from credentials the client
cannot forge. ``SO_PEERCRED`` gives the uid, gid and pid captured at ``connect()``;
``SO_PEERGROUPS`` (Linux ≥ 4.13) gives the supplementary groups captured at the same moment.
Only when the kernel lacks ``SO_PEERGROUPS`` (ENOPROTOOPT) do we read ``/proc/<pid>/status``:
that is weaker — it is read later, so the process may have dropped groups or exited and its pid
been reused — and the result is used only if the uid there still matches the kernel's uid.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # not exported by Python 3.11
_UCRED = struct.Struct("iII")  # pid_t pid; uid_t uid; gid_t gid
_GID_SIZE = ctypes.sizeof(ctypes.c_uint32)  # gid_t is a 32-bit unsigned int on Linux
_MAX_GROUPS = 65536  # NGROUPS_MAX
_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32)]


@dataclass(frozen=True)
class PeerCred:
    """Kernel-reported identity of a connected peer."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups (may or may not include gid)
    groups_source: str  # "SO_PEERGROUPS" or "/proc" — recorded for the audit trail


def peer_cred(sock: socket.socket) -> PeerCred:
    """Identity of the peer of a connected AF_UNIX stream socket."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _UCRED.size))
    try:
        return PeerCred(pid, uid, gid, peer_groups(sock), "SO_PEERGROUPS")
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
    return PeerCred(pid, uid, gid, proc_groups(pid, uid), "/proc")


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """Supplementary groups via SO_PEERGROUPS.

    Through libc rather than ``socket.getsockopt``: Python caps that buffer at 1024 bytes
    (256 groups) while Linux allows 65536 groups. When the buffer is too small the kernel
    answers ERANGE and writes the size it needs, and we ask again with that size.
    """
    count = 64
    while True:
        buf = (ctypes.c_uint32 * count)()
        size = ctypes.c_uint32(ctypes.sizeof(buf))
        if _libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buf,
                            ctypes.byref(size)) == 0:
            return tuple(buf[:size.value // _GID_SIZE])
        err = ctypes.get_errno()
        if err != errno.ERANGE or count >= _MAX_GROUPS:
            raise OSError(err, os.strerror(err))
        count = min(_MAX_GROUPS, max(count * 2, size.value // _GID_SIZE))


def proc_groups(pid: int, uid: int) -> tuple[int, ...]:
    """Fallback for kernels without SO_PEERGROUPS: the ``Groups:`` line of /proc/<pid>/status.

    Returns no groups (the safe answer: group-based permission is simply not granted) when the
    process is gone or its real uid no longer matches the socket's — a sign of pid reuse.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
    except OSError:
        return ()
    if int(fields.get("Uid", "-1 ").split()[0]) != uid:
        return ()
    return tuple(int(g) for g in fields.get("Groups", "").split())
