"""Race-free metadata primitives on file descriptors, for a privileged process in a user tree.

Why these exist: Python's ``os`` module offers no way to chown the inode behind an ``O_PATH`` fd
(``fchown`` on it fails with EBADF, and ``os.chown("", dir_fd=...)`` lacks ``AT_EMPTY_PATH``),
nor to read a file's mount id (``statx`` is not wrapped in 3.11). Both are needed to change an
entry only through an fd proven to be the inode that was inspected, and to refuse bind mounts
that sit on the same device as the root. Everything else in the healer is plain ``os``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

O_PATH: int = getattr(os, "O_PATH", 0o10000000)
AT_EMPTY_PATH = 0x1000
AT_STATX_DONT_SYNC = 0x4000  # a cached mount id is fine; no round trip on NFS
STATX_MNT_ID = 0x1000
_STATX_SIZE = 256
_STATX_MNT_ID_OFFSET = 144

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                       ctypes.c_void_p]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_KEEP_IDS = 0xFFFFFFFF  # (uid_t)-1: leave the owner as it is


def chgrp_fd(fd: int, gid: int) -> None:
    """Set the group of the inode ``fd`` refers to (a symlink stays the link, never its target)."""
    if _fchownat(fd, b"", _KEEP_IDS, gid, AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def chmod_fd(fd: int, mode: int, is_dir_fd: bool) -> None:
    """Set permission bits on the inode behind ``fd``.

    A real directory fd takes ``fchmod``; an ``O_PATH`` fd goes through ``/proc/self/fd``, which
    resolves to that very inode (for a symlink's O_PATH fd the kernel refuses with EOPNOTSUPP
    instead of following it, and we never ask it to).
    """
    if is_dir_fd:
        os.fchmod(fd, mode)
    else:
        os.chmod(f"/proc/self/fd/{fd}", mode)


class _StatxHead(ctypes.Structure):
    """The leading fields of ``struct statx`` we read; the buffer itself is 256 bytes."""

    _fields_ = [("mask", ctypes.c_uint32), ("pad", ctypes.c_byte * (_STATX_MNT_ID_OFFSET - 4)),
                ("mnt_id", ctypes.c_uint64), ("rest", ctypes.c_byte * (_STATX_SIZE - 152))]


_buffers = threading.local()


def mount_id(fd: int) -> int | None:
    """The mount id of the file behind ``fd``, or None when the kernel cannot tell us.

    Called once per directory on every walk, so each thread reuses one statx buffer.
    """
    if _statx is None:
        return None
    buf = getattr(_buffers, "statx", None)
    if buf is None:
        buf = _buffers.statx = _StatxHead()
    if _statx(fd, b"", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_MNT_ID, ctypes.byref(buf)):
        return None
    return int(buf.mnt_id) if buf.mask & STATX_MNT_ID else None
