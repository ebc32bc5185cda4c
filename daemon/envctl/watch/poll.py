"""The poller: finds what changed under a root without inotify, at a fraction of a full walk.

Why not watchdog's PollingObserver: it keeps a full stat per entry (~800 B each) and follows
symlinks. Here the state is one small record per *directory* (inode, mtime, ctime, names of its
subdirectories), and a pass stats only directories: creating, removing or renaming an entry
changes its parent directory's mtime, and a chmod/chgrp of a directory changes its own ctime, so
only directories whose stamp moved are listed again, and only the entries of those listings
that the policy rejects are queued. Subdirectories new since the last pass are queued as
subtrees. What a pass cannot see — a chmod of a *file* by another NFS client, which touches
only that file's ctime — is caught by the periodic full reconcile (``full_scan_interval``).

Safety: directories are opened with ``O_NOFOLLOW|O_DIRECTORY`` relative to their parent's fd and
entries are stat'ed with ``follow_symlinks=False``; nothing on another device is descended into.
The poller never writes: it only queues hints for the healer.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from ..config import RootConfig
from ..heal.fsops import DIR_FLAGS
from ..heal.walker import compile_excludes
from ..policy import judge
from .queue import WorkQueue


class _Dir:
    """What the last pass saw of one directory."""

    __slots__ = ("ctime", "ino", "mtime", "subdirs")

    def __init__(self, st: os.stat_result, subdirs: tuple[str, ...]) -> None:
        self.ino = st.st_ino
        self.mtime = st.st_mtime_ns
        self.ctime = st.st_ctime_ns
        self.subdirs = subdirs

    def same(self, st: os.stat_result) -> bool:
        return (self.ino, self.mtime, self.ctime) == (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class PollStats:
    """One pass: directories stat'ed, directories re-listed, items queued, seconds."""

    dirs: int = 0
    listed: int = 0
    queued: int = 0
    duration: float = 0.0


@dataclass
class _Visit:
    parent_fd: int  # -1: the root itself
    name: str
    rel: str
    record_only: bool  # a new subtree already queued whole: just remember its directories


@dataclass
class _Close:
    fd: int


class Poller:
    """Keeps the directory table of one root and runs cheap change-detection passes."""

    def __init__(self, root: RootConfig, queue: WorkQueue) -> None:
        self.root = root
        self.queue = queue
        self.excluded = compile_excludes(root.exclude)
        self._dirs: dict[str, _Dir] = {}
        self._dev = -1

    @property
    def directories(self) -> int:
        return len(self._dirs)

    def run(self) -> PollStats:
        """One pass. The first one only records the tree (the caller reconciles it whole)."""
        start = time.monotonic()
        stats = PollStats()
        record_only = not self._dirs
        self._dev = os.lstat(self.root.path).st_dev
        stack: list[_Visit | _Close] = [_Visit(-1, str(self.root.path), "", record_only)]
        try:
            while stack:
                item = stack.pop()
                if isinstance(item, _Close):
                    os.close(item.fd)
                else:
                    self._visit(item, stack, stats)
        finally:
            for item in stack:
                if isinstance(item, _Close):
                    os.close(item.fd)
        stats.duration = time.monotonic() - start
        return stats

    def _visit(self, v: _Visit, stack: list[_Visit | _Close], stats: PollStats) -> None:
        dir_fd = None if v.parent_fd < 0 else v.parent_fd
        try:
            st = os.stat(v.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            self._forget(v.rel)
            return
        known = self._dirs.get(v.rel)
        if not stat.S_ISDIR(st.st_mode) or st.st_dev != self._dev:
            self._forget(v.rel)
            if v.rel and not v.record_only:  # replaced by a file or a mount: judge it as entry
                stats.queued += self.queue.put(v.rel)
            return
        stats.dirs += 1
        changed = known is None or not known.same(st)
        if not changed and not known.subdirs:  # type: ignore[union-attr]
            return
        try:
            fd = os.open(v.name, DIR_FLAGS, dir_fd=dir_fd)
        except OSError:
            self._forget(v.rel)  # vanished or swapped for a symlink since the stat
            return
        stack.append(_Close(fd))
        if changed:
            stats.listed += 1
            if not v.record_only and not judge(st.st_mode, st.st_gid, self.root).ok:
                stats.queued += self.queue.put(v.rel)
            subdirs = self._list(fd, v, known, stats)
            for gone in set(known.subdirs if known else ()) - set(subdirs):
                self._forget(_join(v.rel, gone))
            self._dirs[v.rel] = _Dir(os.fstat(fd), subdirs)
        else:
            subdirs = known.subdirs  # type: ignore[union-attr]
        old = set(known.subdirs) if known is not None else set()
        for name in subdirs:
            new = name not in old and not v.record_only
            stack.append(_Visit(fd, name, _join(v.rel, name), v.record_only or new))

    def _list(self, fd: int, v: _Visit, known: _Dir | None, stats: PollStats) -> tuple[str, ...]:
        """Names of subdirectories; queues entries the policy rejects and new subtrees."""
        subdirs = []
        old = set(known.subdirs) if known is not None else set()
        with os.scandir(fd) as it:
            for entry in it:
                rel = _join(v.rel, entry.name)
                if self.excluded(rel):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(entry.name)
                    if entry.name not in old and not v.record_only:
                        stats.queued += self.queue.put(rel, subtree=True)
                elif not v.record_only and not judge(st.st_mode, st.st_gid, self.root).ok:
                    stats.queued += self.queue.put(rel)
        return tuple(subdirs)

    def _forget(self, rel: str) -> None:
        """Drop a directory and everything recorded below it."""
        stack = [rel]
        while stack:
            top = stack.pop()
            gone = self._dirs.pop(top, None)
            if gone is not None:
                stack.extend(_join(top, name) for name in gone.subdirs)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name
