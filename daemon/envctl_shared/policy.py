"""What "correct" means for one entry under a shared root.

Pure functions of an ``os.stat_result`` and a :class:`~envctl_shared.config.RootConfig`: no I/O, so
the healer, the checker and the daemon agree by construction, and the rules are testable on their
own. The rules (README, "Policy"):

- group = the root's group; the owner is never changed;
- directories: group rwx and SGID (so new entries inherit the group);
- regular files: group rw, group x exactly when user x;
- ``others``: keep as is, ``none`` (no access, 2770-style) or ``read`` (r and X, no w: 2775-style);
- setuid/setgid are never added to files; the sticky bit is left alone, except:
- the requests root's own directory also has the sticky bit (``RootConfig.holds_requests``):
  members still create their own entries, but cannot rename or delete the daemon's ``.envctl``
  and ``NAME`` links, or each other's entries (like /tmp);
- symlinks: only their own group (their mode means nothing on Linux);
- fifos, sockets, devices: never touched, only reported;
- regular files with setuid or setgid: never touched either, only reported. Widening one gives
  its owner's (or its group's) privileges to everyone it is widened to: a member's private
  ``4700`` copy of a shell would become ``4770``, a shell as that member for the whole group
  (and with ``others: read``, ``4755``: for everyone). A chgrp alone is no better: on a ``2750``
  file it would hand the root's group to whoever can run it. Conda and pip never make such files.
"""

from __future__ import annotations

import stat
from array import array
from dataclasses import dataclass
from enum import Enum
from functools import cache

from .config import RootConfig


class Kind(str, Enum):
    """What the policy does with an entry, by its file type."""

    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"
    SPECIAL = "special"  # fifo, socket, block or character device; a setuid/setgid file


_SETID = stat.S_ISUID | stat.S_ISGID


def kind_of(mode: int) -> Kind:
    """Classify an ``st_mode``."""
    if stat.S_ISDIR(mode):
        return Kind.DIR
    if stat.S_ISREG(mode):
        return Kind.SPECIAL if mode & _SETID else Kind.FILE
    if stat.S_ISLNK(mode):
        return Kind.SYMLINK
    return Kind.SPECIAL


@dataclass(frozen=True)
class Verdict:
    """The corrections an entry needs; both ``None`` means it is already correct."""

    kind: Kind
    gid: int | None = None  # the group to set, when different
    mode: int | None = None  # the permission bits (07777) to set, when different

    @property
    def ok(self) -> bool:
        """Nothing to change and nothing to report (special files are always reported)."""
        return self.gid is None and self.mode is None and self.kind is not Kind.SPECIAL

    def problems(self, st_gid: int, st_mode: int) -> list[str]:
        """Human-readable descriptions, e.g. ``group 1001, want 100``."""
        out = []
        if self.gid is not None:
            out.append(f"group {st_gid}, want {self.gid}")
        if self.mode is not None:
            out.append(f"mode {stat.S_IMODE(st_mode):04o}, want {self.mode:04o}")
        return out


_OTHER_BITS = stat.S_IRWXO


def wanted_mode(mode: int, kind: Kind, others: str) -> int:
    """The permission bits an entry of ``kind`` with bits ``mode`` should have."""
    perm = stat.S_IMODE(mode)
    if kind is Kind.DIR:
        perm |= stat.S_IRWXG | stat.S_ISGID
        user_x = True
    else:
        perm |= stat.S_IRGRP | stat.S_IWGRP
        user_x = bool(perm & stat.S_IXUSR)
        perm = perm | stat.S_IXGRP if user_x else perm & ~stat.S_IXGRP
    if others == "none":
        perm &= ~_OTHER_BITS
    elif others == "read":
        perm = (perm & ~_OTHER_BITS) | stat.S_IROTH | (stat.S_IXOTH if user_x else 0)
    return perm


def judge(st_mode: int, st_gid: int, root: RootConfig, is_root: bool = False) -> Verdict:
    """The verdict for an entry whose lstat/fstat gave ``st_mode`` and ``st_gid``; ``is_root``:
    the entry is the root directory itself."""
    kind = kind_of(st_mode)
    if kind is Kind.SPECIAL:
        return Verdict(kind)
    gid = None if st_gid == root.gid else root.gid
    if kind is Kind.SYMLINK:
        return Verdict(kind, gid=gid)
    want = wanted_mode(st_mode, kind, root.others)
    if is_root and kind is Kind.DIR and root.holds_requests:
        want |= stat.S_ISVTX
    return Verdict(kind, gid=gid, mode=None if want == stat.S_IMODE(st_mode) else want)


NEVER_FIXED = 0xFFFF  # mode_table value for entries the fast path hands back (specials)


@cache
def mode_table(others: str) -> bytes:
    """The wanted permission bits for every possible ``st_mode``, as 65536 native uint16.

    The healer's C fast path judges an entry as ``gid == root gid and table[st_mode] ==
    st_mode & 0o7777`` and fixes it to ``table[st_mode]``, so the rules stay here, in one place.
    Special files (setuid/setgid ones included) get ``NEVER_FIXED``: they are only reported.
    """
    table = array("H", [NEVER_FIXED]) * 65536
    for perm in range(0o10000):
        table[stat.S_IFDIR | perm] = wanted_mode(perm, Kind.DIR, others)
        if not perm & _SETID:
            table[stat.S_IFREG | perm] = wanted_mode(perm, Kind.FILE, others)
        table[stat.S_IFLNK | perm] = perm  # a symlink's mode means nothing: only its group
    return table.tobytes()
