"""What "correct" means for one entry under a shared root: the one place the rules live.

A root's rules are compiled once into a :class:`Rules` (gid, the mode tables, protected owners,
members, the root's own rule, the excluded trees), and the C engine (``heal/_fastfs.c``, through
``heal.fsops.Engine``) executes them for every entry — the walks, the poller's stamp check and
the walker's slow path alike ask the same C ``classify``, so no order of the owner rules (another
mount, special, compliant, protected, foreign) is written anywhere else. No I/O here: the rules
are testable on their own. The rules (README, "Policy"):

- group = the root's group; the owner is never changed;
- directories: group rwx and SGID (so new entries inherit the group);
- regular files: group rw, group x exactly when user x;
- ``others``: keep as is, ``none`` (no access, 2770-style) or ``read`` (r and X, no w: 2775-style);
- setuid/setgid are never added to files; the sticky bit is left alone, except:
- the requests root's own directory also has the sticky bit (``RootConfig.holds_requests``):
  members still create their own entries, but cannot rename or delete the daemon's ``.envctl``
  and ``NAME`` links, or each other's entries (like /tmp);
- symlinks: only their own group (their mode means nothing on Linux);
- another mount below the root: neither changed nor entered;
- entries of ``protected_owners`` are never changed (the root itself excepted: the admin named
  it); with ``owners: members``, entries of owners who are not members are never changed either
  (a member could move a non-member's tree into the root and share it with the group);
- the excluded patterns — the requests root's ``.envctl`` (``config.DAEMON_AREA``, the daemon's
  managed tree) among them — are neither changed nor entered;
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
from enum import Enum
from functools import cache
from typing import NamedTuple

from .config import Others, RootConfig


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


class Verdict(NamedTuple):
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


NEVER_FIXED = 0xFFFF  # mode_table value for entries the fast path hands back (specials)


@cache
def mode_table(others: str, sticky_dirs: bool = False) -> bytes:
    """The wanted permission bits for every possible ``st_mode``, as 65536 native uint16.

    The C engine judges an entry as ``gid == root gid and table[st_mode] == st_mode & 0o7777``
    and fixes it to ``table[st_mode]``, so the rules stay here, in one place. Special files
    (setuid/setgid ones included) get ``NEVER_FIXED``: they are only reported. ``sticky_dirs``:
    directories also want the sticky bit (the requests root's own rule).
    """
    table = array("H", [NEVER_FIXED]) * 65536
    sticky = stat.S_ISVTX if sticky_dirs else 0
    for perm in range(0o10000):
        table[stat.S_IFDIR | perm] = wanted_mode(perm, Kind.DIR, others) | sticky
        if not perm & _SETID:
            table[stat.S_IFREG | perm] = wanted_mode(perm, Kind.FILE, others)
        table[stat.S_IFLNK | perm] = perm  # a symlink's mode means nothing: only its group
    return table.tobytes()


class Rules(NamedTuple):
    """One root's rules, compiled once (:meth:`of`) and executed by the C engine.

    ``table``/``root_table``: the wanted bits of an entry and of the root directory itself
    (computed once per ``others`` and sticky rule: ``mode_table`` is cached);
    ``members``: None (any owner), else the only owners whose entries may be changed, sorted;
    ``exclude``: patterns (root-relative) neither changed nor entered, the daemon's managed tree
    (``.envctl`` of the requests root) included.
    """

    gid: int
    others: Others = "keep"
    protected: tuple[int, ...] = (0,)
    members: tuple[int, ...] | None = None
    sticky_root: bool = False
    exclude: tuple[str, ...] = ()

    @property
    def table(self) -> bytes:
        return mode_table(self.others, False)

    @property
    def root_table(self) -> bytes:
        return mode_table(self.others, self.sticky_root)

    @classmethod
    def of(cls, root: RootConfig) -> Rules:
        """The rules of ``root``: the requests root's directory is sticky (members create
        their own entries but cannot rename the daemon's ``.envctl`` and ``NAME`` links away,
        nor each other's entries: like /tmp)."""
        members = None if root.member_uids is None else tuple(sorted(root.member_uids))
        return cls(gid=root.gid, others=root.others, protected=root.protected_owners,
                   members=members, sticky_root=root.holds_requests, exclude=root.exclude)

    def verdict(self, st_mode: int, st_gid: int, is_root: bool = False) -> Verdict:
        """What an entry with ``st_mode`` and ``st_gid`` needs, by the tables (for reporting:
        whether it may be changed — mount, owners — is the engine's ``classify``)."""
        kind = kind_of(st_mode)
        if kind is Kind.SPECIAL:
            return Verdict(kind)
        gid = None if st_gid == self.gid else self.gid
        if kind is Kind.SYMLINK:
            return Verdict(kind, gid=gid)
        want = memoryview(self.root_table if is_root else self.table).cast("H")[st_mode]
        return Verdict(kind, gid=gid, mode=None if want == stat.S_IMODE(st_mode) else want)
