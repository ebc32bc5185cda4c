"""watchdog's inotify observer, adapted to tell us what it normally keeps to itself.

Why an adapter and not a plain ``Observer().schedule(handler)``: watchdog 7.1 (see
``../shared/notes/field-facts.md``) logs an inotify queue overflow but never tells the handler,
swallows ENOSPC when a subdirectory watch cannot be added (``max_user_watches``), builds its mask
from the event filter with a bug (Attrib classes alone yield nothing), and floods stderr with
``RuntimeWarning: Callback ... already exists`` during bursts. Each of those would make the
daemon silently miss entries, so this module:

- builds the inotify mask itself: IN_CREATE, IN_MOVED_TO, IN_ATTRIB (and IN_DELETE_SELF, which
  watchdog always adds). Not IN_OPEN/IN_CLOSE_NOWRITE/IN_MODIFY/IN_CLOSE_WRITE: writing data
  never changes an inode's group or mode, and those events are the bulk of a burst (and of
  overflows). Not IN_MOVED_FROM either: watchdog parks it in a queue that delays every later
  event by 0.5 s and scans linearly; without it, a move inside the root arrives as a moved-in
  directory, which is exactly what we want to reconcile;
- subclasses watchdog's watch group so that an overflow (after watchdog has rebuilt its
  watches) and a failed watch (ENOSPC) call our hooks;
- silences that RuntimeWarning and watchdog's own overflow warning (we log our own, once).

The handler does no I/O: it turns each event into a root-relative path on the work queue.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    FileAttribEvent,
    FileCreatedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants, InotifyFD

from .queue import WorkQueue

log = logging.getLogger("envctl.watch")

warnings.filterwarnings("ignore", message=r"Callback with id .* already exists",
                        category=RuntimeWarning)
warnings.filterwarnings("ignore", message=r"Callback with id .* does not exist",
                        category=RuntimeWarning)
# Our own WARNING line (with the root) replaces watchdog's per-overflow one.
logging.getLogger("watchdog").setLevel(logging.ERROR)
# Stopping an emitter races with its last read; watchdog logs that benign race as an ERROR.
logging.getLogger("watchdog.observers.inotify").addFilter(
    lambda record: "called when the thread is inactive" not in record.getMessage())

MASK = (InotifyConstants.IN_CREATE | InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_ATTRIB
        | InotifyConstants.IN_DELETE_SELF)
# Without IN_MOVED_FROM watchdog never pairs moves: a moved-in entry (from outside the root or
# from elsewhere in it) arrives as created, plus synthetic creates for a directory's contents.
EVENT_FILTER: list[type[FileSystemEvent]] = [
    DirCreatedEvent, FileCreatedEvent, DirAttribEvent, FileAttribEvent,
]


class Hooks(Protocol):
    """What the watcher wants to hear about, called from watchdog's reader thread."""

    def on_overflow(self) -> None: ...

    def on_watch_failed(self, path: str, err: int) -> None: ...


class _WatchGroup(InotifyWatchGroup):
    """watchdog's recursive watch bookkeeping, reporting overflows and failed watches."""

    hooks: Hooks | None = None

    def on_queue_overflow(self) -> None:
        super().on_queue_overflow()  # watchdog re-adds its watches first...
        if self.hooks is not None:
            self.hooks.on_overflow()  # ...so the reconcile we ask for runs after that

    def _add_callback(self, path: bytes) -> None:
        try:
            wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and self.hooks is not None:
                self.hooks.on_watch_failed(os.fsdecode(path), exc.errno)
            if path == self.path:
                raise
            return  # vanished or unreadable since it was listed: nothing to watch
        self._active_callbacks_by_path[path] = wd
        self._active_callbacks_by_watch[wd] = path


class _Emitter(InotifyEmitter):
    """An inotify emitter with our mask and our watch group."""

    def __init__(self, event_queue: EventQueue, watch: ObservedWatch, *, hooks: Hooks,
                 **kwargs: Any) -> None:
        super().__init__(event_queue, watch, **kwargs)
        self._hooks = hooks

    def get_event_mask_from_filter(self) -> Any:
        return MASK

    def on_thread_start(self) -> None:
        group = _WatchGroup.__new__(_WatchGroup)
        group.hooks = self._hooks  # set before __init__, which adds the watches
        group.__init__(self._inotify_fd, os.fsencode(self.watch.path),  # type: ignore[misc]
                       is_recursive=True, event_mask=self.get_event_mask_from_filter(),
                       follow_symlink=False)
        self._inotify = group


class _Handler(FileSystemEventHandler):
    """Turns events into queue items; never touches the filesystem."""

    def __init__(self, root: Path, queue: WorkQueue, count: Callable[[], None]) -> None:
        self._prefix = str(root) + "/"
        self._root = str(root)
        self._queue = queue
        self._count = count

    def _rel(self, path: str | bytes) -> str | None:
        p = os.fsdecode(path)
        if p == self._root:
            return ""
        return p[len(self._prefix):] if p.startswith(self._prefix) else None

    def dispatch(self, event: FileSystemEvent) -> None:
        self._count()
        rel = self._rel(event.src_path)
        if rel is not None:  # a created/moved-in directory is a subtree; anything else an entry
            self._queue.put(rel, isinstance(event, DirCreatedEvent))


class InotifyWatch:
    """One recursive inotify watch on one root, with its own inotify instance.

    Its own instance (not watchdog's shared one) so that an overflow is attributed to the root
    it happened on and a removed root releases its watches.
    """

    def __init__(self, root: Path, queue: WorkQueue, hooks: Hooks,
                 count: Callable[[], None]) -> None:
        self._fd = InotifyFD()
        self._fd.start()
        self._observer = BaseObserver(_Emitter, timeout=1.0, inotify_fd=self._fd, hooks=hooks)
        self._observer.schedule(_Handler(root, queue, count), str(root), recursive=True,
                                event_filter=EVENT_FILTER)

    def start(self) -> None:
        """Add the watches (blocking until every directory present now is watched)."""
        try:
            self._observer.start()
        except BaseException:
            self._fd.stop()
            raise

    def stop(self) -> None:
        """Remove every watch and stop the threads."""
        self._observer.stop()
        self._observer.join()
        self._fd.stop()
        self._fd.join()

    def watch_count(self) -> int:
        """Watches in this inotify instance (from /proc, so it is the kernel's count)."""
        fd = self._fd._inotify_fd
        try:
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as fh:
                return sum(1 for line in fh if line.startswith("inotify wd:"))
        except OSError:
            return -1
