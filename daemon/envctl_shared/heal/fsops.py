"""The C engine's typed face: a root's compiled rules (:class:`Engine`) and fd primitives.

Python's ``os`` module cannot chown or chmod the inode behind an ``O_PATH`` fd, nor read a
mount id, and its per-call overhead dominates a walk whose syscalls take a microsecond. The
C extension :mod:`envctl_shared.heal._fastfs` executes a root's :class:`~envctl_shared.policy.Rules`
— its walks, scans, the poller's stamp check and the slow path's single-entry judgement all
go through its one ``classify``, and every walk is its one walk (``tree_walk`` in C) in one
of three visit modes: heal/check (:meth:`Engine.walk`), the poller's stamp check
(:meth:`Engine.check_stamps`) and the watcher's directory listing (:func:`list_dirs`); it
also holds the fd primitives (``stat``, ``open_dir``), and the watcher's inotify calls and
the reduction of its read batches (:func:`read_events`): per event, Python cost more than
the kernel. This module is its typed face, so the walker and the watcher never touch C types.
"""

# No ``from __future__ import annotations`` here: a NamedTuple compiles each string annotation
# at import, and every CLI command imports this module (start-up: see cli/main.py).

import importlib
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

from ..errors import ExtensionMissing
from ..policy import Rules


class _Extension:
    """The C extension, imported on first use, not when this module is.

    Why: the extension is optional at install time (a client pod has no compiler), and every
    CLI command imports the healer's modules while building its parser. Commands that only talk
    to the daemon never touch it; ``heal``/``check`` without it get one line and a hint.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            module: ModuleType = importlib.import_module(f"{__package__}._fastfs")
        except ImportError as exc:
            raise ExtensionMissing(
                "the healer's C extension (envctl_shared.heal._fastfs) is not built in this "
                "install", hint="reinstall with gcc and the Python headers present "
                "(Debian: apt-get install gcc python3-dev); 'envctl request' and 'envctl "
                "status' work without it") from exc
        globals()["_fastfs"] = module  # later calls go straight to the module
        return getattr(module, name)


_fastfs: Any = _Extension()

O_PATH: int = getattr(os, "O_PATH", 0o10000000)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# A directory used only as the base of *at() calls: on NFS/FUSE an O_PATH open is one LOOKUP,
# without the OPENDIR/RELEASEDIR round trips of a readable one.
PATH_DIR_FLAGS = PATH_FLAGS | os.O_DIRECTORY


class Stat(NamedTuple):
    """What the healer needs of a ``statx``; field names follow ``os.stat_result``."""

    st_mode: int
    st_uid: int
    st_gid: int
    st_ino: int
    st_dev: int
    st_mtime_ns: int
    st_ctime_ns: int
    mnt_id: int  # -1: the kernel did not say


def stat_at(dirfd: int, name: str = "") -> Stat:
    """``statx`` of ``name`` in ``dirfd`` ("" = the fd itself), never following a symlink.

    Cached attributes are accepted (``AT_STATX_DONT_SYNC``): on NFS/FUSE a lookup has just
    refreshed them, and a second GETATTR round trip would double the cost of every entry.
    """
    return Stat(*_fastfs.stat(dirfd, name))


Ident = tuple[int, int, int]  # (st_ino, st_dev, mnt_id): which directory, on which mount


def ident(st: Stat) -> Ident:
    return (st.st_ino, st.st_dev, st.mnt_id)


def reopen(how: Callable[[], int], want: Ident) -> int:
    """An fd from ``how`` (an open through a child's ``..``, or by the kernel from the root)
    when it is the directory ``want`` names, else -1 (closed): the proof every walk that
    closes a level and comes back to it asks of the re-opened fd in Python — the heal pass's
    fd table and the jobs layer's walk (C's ``tree_walk`` proves its own the same way). A
    directory moved meanwhile is never walked on in its new place."""
    try:
        fd = how()
    except OSError:
        return -1
    try:
        if ident(stat_at(fd)) == want:
            return fd
    except OSError:
        pass
    os.close(fd)
    return -1


class MountRef(NamedTuple):
    """The root's mount, what "on the same mount" compares to: its mount id (-1: the kernel
    gives none) and, only then, its device."""

    dev: int
    mnt: int

    @classmethod
    def of(cls, st: Stat) -> "MountRef":
        return cls(st.st_dev, st.mnt_id)


class Listed(NamedTuple):
    """What a :func:`list_dirs` walk did."""

    entered: list[tuple[Any, bool]]  # (token, had no entry at all) right below the start
    visited: int  # directories handed to ``visit``
    reopened: int  # levels reopened on the way back up (through a child's "..", proven)


def window() -> int:
    """Directory levels whose fds the C walk keeps open (deeper ones are reopened)."""
    return int(_fastfs.WINDOW)


def list_dirs(dirfd: int, token: Any, names: Sequence[str] | None, root: MountRef,
              visit: Callable[[Any, str, int, int, int], Any]) -> Listed:
    """The watcher's walk (the C walk's list mode): every directory below ``dirfd`` (only its
    entries ``names`` when given) that is on the root's mount, depth first.

    Each is opened ``O_RDONLY|O_DIRECTORY|O_NOFOLLOW`` relative to its parent's fd (a symlink
    or a file swapped in is skipped, as is what vanished) and handed to ``visit(parent_token,
    name, fd, st_dev, st_ino)`` — ``token`` is the start's — which returns the directory's token
    or None to not enter it; ``fd`` is valid during the call only (a watch is added through
    ``/proc/self/fd/N``). No path string is resolved, so any depth works; at most
    :func:`window` levels keep an fd, the others are reopened through a child's ``..`` and
    proven to be the same directory, and a level moved mid-walk is abandoned (its events
    place it). Holds the GIL: ``visit`` runs on the caller's thread. Raises what ``visit``
    raises, and OSError for an entry that cannot be opened or listed for another reason."""
    return Listed(*_fastfs.list_dirs(dirfd, token, None if names is None else tuple(names),
                                     root.dev, root.mnt, visit))


class Events(NamedTuple):
    """One read batch of inotify events, as :func:`read_events` reduced it."""

    counted: int  # events of known watches
    overflow: bool  # the kernel's queue overflowed (the rest is empty)
    ordered: list[tuple[int, int, int, str | None]]  # (wd, mask, cookie, name): in order
    entries: list[tuple[int, set[str], set[str]]]  # (wd, urgent names, later names)


def inotify_init() -> int:
    """A new inotify instance, non-blocking and close-on-exec; raises OSError."""
    fd: int = _fastfs.inotify_init()
    return fd


def add_watch(ifd: int, fd: int, mask: int) -> int:
    """The watch descriptor of the directory open on ``fd`` in the inotify instance ``ifd``
    (through ``/proc/self/fd/N``: no path resolved; the kernel's existing one for an inode
    already watched); raises OSError (``ENOSPC``: out of ``max_user_watches``)."""
    wd: int = _fastfs.add_watch(ifd, fd, mask)
    return wd


def rm_watch(ifd: int, wd: int) -> None:
    """Remove a watch (an error, as when the kernel already did, is ignored)."""
    _fastfs.rm_watch(ifd, wd)


def read_events(data: bytes, wds: dict[int, Any], root_wd: int) -> Events:
    """The watcher's batch of events (``struct inotify_event`` records) reduced in one C call:
    events of watch descriptors not in ``wds`` (and of one after its ``IN_IGNORED``) dropped;
    the events that change the watcher's table (a directory created, moved in or away, a
    watch's own ``IN_IGNORED``/``IN_MOVE_SELF``/..., ``root_wd``'s own ``IN_ATTRIB``) kept in
    order; every other named event only names an entry to heal, and those are grouped by
    watch, each name once, in two sets: created or moved in (``urgent``), attributes changed
    only (``later``). A file moved away is dropped."""
    return Events(*_fastfs.events(data, wds, root_wd))


# Entries handed back by the C loop name their directory by a node index (see ``WalkResult``;
# always 0 in a scan) and carry their own name.
def open_dir(dirfd: int, rel: str) -> int:
    """An ``O_PATH`` fd on the directory at the clean relative path ``rel`` below ``dirfd``,
    resolved by the kernel in one call (``openat2``): never through a symlink (ELOOP), never
    across a mount (EXDEV), never outside ``dirfd``; ``rel`` may be longer than PATH_MAX.

    Why not one ``openat`` per component from Python: an event path thousands of levels deep
    cost milliseconds per resolve that way, and the daemon resolves one per event batch."""
    return _fastfs.open_dir(dirfd, rel)


Attention = list[tuple[int, str, int, int, int, int]]  # (node, name, errno, mode, uid, gid)
Fixed = list[tuple[int, str, int, int, int, int]]  # (node, name, old mode, old gid, set_gid,
#                                                     set_mode): fixed, or with fix off, wrong
Skipped = list[tuple[int, str, str, int, int, int]]  # (node, name, reason, mode, uid, gid)
Tallied = list[tuple[int, int, int, int, int]]  # (S_IFMT type, entries as in Fixed, groups
#                                                  set, modes set, entries changed)
Nodes = list[tuple[int, str]]  # (parent index or -1, name): the directories a walk entered


class ScanResult(NamedTuple):
    """One batch of a directory's entries, inspected (and with ``fix``, healed) in C."""

    scanned: int  # non-directories judged (compliant, fixed, wrong or skipped)
    subdirs: list[str]  # directories, not inspected: the walk visits them through their own fd
    attention: Attention  # changed under us (errno 0: re-judge), failed, vanished (ENOENT)
    fixed: Fixed
    skipped: Skipped  # reason: protected, special, mount, foreign
    tallied: Tallied  # with tally: the entries fixed, counted instead of listed in ``fixed``


class WalkResult(NamedTuple):
    """A whole subtree inspected (and with ``fix``, healed) in C."""

    scanned: int  # entries judged, directories included
    dirs: int  # subdirectories judged
    nodes: Nodes  # index 0: the directory walked; empty when nothing was handed back
    attention: Attention
    fixed: Fixed
    skipped: Skipped
    tallied: Tallied


class Judged(NamedTuple):
    """One entry judged (and with ``fix``, healed) by the engine from its fd's own statx."""

    outcome: str  # compliant, fixed, would-fix, or a skip reason: protected, special, mount,
    #               foreign
    mode: int  # as judged
    uid: int
    gid: int
    set_gid: bool  # the group was changed
    set_mode: int  # the permission bits set, or -1


class Stamp(NamedTuple):
    """What the poller's last listing saw of one directory: the C stamp check reads it by
    position (a tuple), so this is its whole interface."""

    ino: int
    mtime: int  # ns
    ctime: int  # ns
    subdirs: tuple[str, ...]

    @classmethod
    def of(cls, st: Stat, subdirs: tuple[str, ...]) -> "Stamp":
        return cls(st.st_ino, st.st_mtime_ns, st.st_ctime_ns, subdirs)

    def same(self, st: Stat) -> bool:
        return (self.ino, self.mtime, self.ctime) == (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


class Engine:
    """A root's :class:`~envctl_shared.policy.Rules`, compiled once for C, and every visit the C
    engine makes by them. ``root`` is the root's mount (see :class:`MountRef`)."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self._compiled: Any = None

    @property
    def _c(self) -> Any:
        """The C rules, compiled on first use (a CLI without the extension builds a Healer to
        show a plan, and says what is missing only when a walk starts)."""
        if self._compiled is None:
            r = self.rules
            self._compiled = _fastfs.Rules(r.gid, r.table, r.root_table, r.protected, r.members)
        return self._compiled

    def judge(self, fd: int, root: MountRef, *, fix: bool, is_root: bool = False) -> Judged:
        """The slow path's one entry: the inode behind ``fd`` judged by its own ``statx`` and
        with ``fix`` healed right after, in one C call without the GIL (a chmod computed in
        Python from an earlier stat could land after a writer's own chmod and undo it).
        ``is_root``: ``fd`` is the root directory itself (its own rule; owners not asked)."""
        return Judged(*_fastfs.judge(fd, self._c, fix, root.dev, root.mnt, is_root))

    def scan(self, dirfd: int, names: Sequence[str] | None, root: MountRef, *, fix: bool,
             tally: bool = False, lanes: int = 1, dirs: bool = False) -> ScanResult:
        """Inspect ``names`` in ``dirfd`` (None: list it) with the GIL released.

        Wrong entries are fixed in C through a proven ``O_PATH`` fd (or with ``fix`` off, listed
        in ``fixed`` unchanged); special files, protected or foreign owners and other mounts
        come back in ``skipped``; an entry swapped or re-owned mid-fix in ``attention`` with
        errno 0, for the walker's slow path. With ``tally``, entries fixed are only counted
        (``tallied``): a heal nobody reads entry by entry builds no tuple per entry. ``names``
        are shared among up to ``lanes`` C threads, each inspecting its share (on NFS/FUSE each
        lookup is a round trip: lanes keep that many in flight per caller). With ``dirs``, a
        directory among ``names`` is judged and healed like any other entry (the entry itself,
        not what is below it) instead of coming back in ``subdirs``.
        """
        return ScanResult(*_fastfs.scan(dirfd, names, self._c, fix, root.dev, root.mnt, tally,
                                        lanes, dirs))

    def walk(self, dirfd: int, root: MountRef, *, fix: bool, tally: bool = False) -> WalkResult:
        """``scan`` the whole subtree below ``dirfd`` in one call, with the GIL released.

        Iterative, with a bounded number of open fds at any depth: levels beyond a window are
        reopened on the way back up through their child's ``..``, proven to be the same
        directory (inode, device, mount). Each subdirectory is opened ``O_NOFOLLOW|O_DIRECTORY``,
        judged, healed through its own fd and entered — protected and (with ``fix`` off) wrong
        ones too, since what lies below them may need healing; one on another mount is skipped
        and not entered. ``attention`` holds what changed under the walk (a directory swapped
        for a symlink, a level moved away mid-walk), for the walker to revisit by path. Raises
        OSError when ``dirfd`` itself cannot be listed.
        """
        return WalkResult(*_fastfs.walk(dirfd, self._c, fix, root.dev, root.mnt, tally))

    def check_stamps(self, root_fd: int, stamps: dict[int, Stamp],
                     root: MountRef) -> tuple[int, list[str]]:
        """The poller's incremental pass on a local disk, in one C call: every directory known
        to ``stamps`` (inode number -> :class:`Stamp`) is opened ``O_PATH|O_NOFOLLOW`` relative
        to its parent, ``statx``-ed and looked up by its inode number (keys of bounded size,
        whatever the depth). Returns how many were checked and the paths that are unknown,
        changed, not compliant or on another mount (not entered). Holds the GIL throughout:
        it reads the dict.
        """
        return _fastfs.check_stamps(root_fd, stamps, self._c, root.dev, root.mnt)
class NodePaths:
    """Paths of a walk's entries, from its node table, relative to the directory walked.

    Built only when asked (a finding someone listens to, a race to revisit): the walk itself
    holds no per-entry path, whose total size grows with depth x entries. Entries are asked
    for in walk order, so the path of the last directory asked is kept with the offsets where
    each of its ancestors' paths end: the next entry's directory shares a prefix with it, and
    each path costs its own length, not its depth times a Python step.
    """

    def __init__(self, nodes: Nodes) -> None:
        self._nodes = nodes
        self._chain: list[int] = []  # nodes from below the top down to the last one asked
        self._ends: list[int] = []  # where each one's path ends in self._path
        self._at: dict[int, int] = {}  # node -> its index in self._chain
        self._path = ""

    def __call__(self, node: int, name: str) -> str:
        base = self._dir(node)
        return f"{base}/{name}" if base else name

    def _dir(self, node: int) -> str:
        new: list[int] = []
        while node > 0 and node not in self._at:
            new.append(node)
            node = self._nodes[node][0]
        keep = self._at[node] + 1 if node > 0 else 0
        for gone in self._chain[keep:]:
            del self._at[gone]
        del self._chain[keep:], self._ends[keep:]
        if not new:
            return self._path[:self._ends[-1]] if keep else ""
        names = [self._nodes[n][1] for n in reversed(new)]
        end = self._ends[-1] if keep else -1
        for n, part in zip(reversed(new), names):
            end += len(part) + 1
            self._at[n] = len(self._chain)
            self._chain.append(n)
            self._ends.append(end)
        self._path = "/".join([self._path[:self._ends[keep - 1]], *names] if keep else names)
        return self._path
