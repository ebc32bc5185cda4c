"""watchdog's inotify machinery, adapted to tell us what it normally keeps to itself.

We keep watchdog's inotify instance (reader thread, watch descriptors) and its recursive watch
group (a new or moved-in directory is watched, with every subdirectory, before its event goes
further). Why not a plain ``Observer().schedule(handler)``: watchdog 7.1 (see
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
- takes each event's path straight from that group to our work queue, on the reader thread.
  watchdog would build event objects, emit synthetic "created" events for everything already
  in a new directory (our subtree reconcile covers those), and pass each through an emitter and
  an observer thread: measured on a 60k-entry burst, skipping that halves the time from the
  writer's end to a compliant tree. The observer remains only to run the emitter's lifecycle;
- silences that RuntimeWarning and watchdog's own overflow warning (we log our own, once).

The sink does no I/O: it turns each path into a root-relative queue item.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from watchdog.events import FileSystemEventHandler
from watchdog.observers.api import BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import (InotifyConstants, InotifyEvent, InotifyFD,
                                          inotify_add_watch)

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
class Hooks(Protocol):
    """What the watcher wants to hear about, called from watchdog's reader thread."""

    def on_overflow(self) -> None: ...

    def on_watch_failed(self, path: str, err: int) -> None: ...


class _WatchGroup(InotifyWatchGroup):
    """watchdog's recursive watch bookkeeping, reporting overflows and failed watches."""

    hooks: Hooks | None = None
    sink: Callable[[bytes, bool, bool], None] | None = None

    def on_event(self, event: InotifyEvent) -> None:
        """watchdog's watch bookkeeping (a new or moved-in directory is watched, recursively,
        before anything else), then the path goes straight to our queue from this reader
        thread: no event objects, no emitter and observer hops (each a thread switch under
        the GIL) for the tens of thousands of events of a burst."""
        with self._lock:
            if not self.is_active:
                return
            path = self._build_event_source_path(event)
            if path is None:
                return
            new_dir = event.is_directory and (event.is_create or event.is_moved_to)
            if new_dir and self.is_recursive:
                self._add_all_callbacks(path)
        if self.sink is not None:
            urgent = event.is_create or event.is_moved_to
            if urgent or event.is_attrib:
                self.sink(path, new_dir, urgent)

    def _add_all_callbacks(self, path: bytes) -> None:
        """Watch directory ``path`` and every directory below it that is not watched yet.

        watchdog's version re-walks (``os.walk`` plus an ``lstat`` per directory) the whole
        subtree of every new directory, on the reader thread. In a ``cp -r`` burst a
        directory is usually watched already by its parent's walk when its own IN_CREATE
        arrives, and that walk listed it right after its watch was added: whatever appeared
        in it later has events of its own. So a directory already watched as this inode ends
        the walk there; a new inode at a known path (deleted and re-created, or moved in) is
        walked. After an overflow watchdog removes every watch first, so its rebuild still
        walks everything.
        """
        if not self._watch(path):
            return
        stack = [path]
        while stack:
            top = stack.pop()
            try:
                with os.scandir(top) as it:
                    subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue  # vanished or unreadable: nothing below it to watch
            stack.extend(p for p in subdirs if self._watch(p))

    def _watch(self, path: bytes) -> bool:
        """Add the watch; True when ``path`` was not already watched as this very inode.

        The kernel returns the existing watch descriptor for an inode already watched; that
        case ends here, without watchdog's bookkeeping (which formats a warning for it)."""
        known = self._active_callbacks_by_path.get(path)
        if known is not None and inotify_add_watch(self._inotify_fd._inotify_fd, path,
                                                   self.event_mask) == known:
            return False
        self._add_callback(path)
        now = self._active_callbacks_by_path.get(path)
        return now is not None and now != known

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
                 sink: Callable[[bytes, bool, bool], None], **kwargs: Any) -> None:
        super().__init__(event_queue, watch, **kwargs)
        self._hooks = hooks
        self._sink = sink

    def get_event_mask_from_filter(self) -> Any:
        return MASK

    def on_thread_start(self) -> None:
        group = _WatchGroup.__new__(_WatchGroup)
        group.hooks = self._hooks  # set before __init__, which adds the watches
        group.sink = self._sink
        group.__init__(self._inotify_fd, os.fsencode(self.watch.path),  # type: ignore[misc]
                       is_recursive=True, event_mask=self.get_event_mask_from_filter(),
                       follow_symlink=False)
        self._inotify = group


class _Sink:
    """Turns event paths into queue items; never touches the filesystem."""

    def __init__(self, root: Path, queue: WorkQueue, count: Callable[[], None]) -> None:
        self._root = os.fsencode(root)
        self._prefix = self._root + b"/"
        self._queue = queue
        self._count = count

    def __call__(self, path: bytes, new_dir: bool, urgent: bool) -> None:
        """``urgent``: created or moved in (an attribute change otherwise)."""
        self._count()
        if path == self._root:
            self._queue.put("")
        elif path.startswith(self._prefix):  # a new directory is a subtree, the rest entries
            self._queue.put(os.fsdecode(path[len(self._prefix):]), new_dir, urgent)


class InotifyWatch:
    """One recursive inotify watch on one root, with its own inotify instance.

    Its own instance (not watchdog's shared one) so that an overflow is attributed to the root
    it happened on and a removed root releases its watches.
    """

    def __init__(self, root: Path, queue: WorkQueue, hooks: Hooks,
                 count: Callable[[], None]) -> None:
        self._fd = InotifyFD()
        self._fd.start()
        self._observer = BaseObserver(_Emitter, timeout=1.0, inotify_fd=self._fd, hooks=hooks,
                                      sink=_Sink(root, queue, count))
        # The observer only runs the emitter's lifecycle (which builds our watch group): events
        # reach the queue from the group itself, so its handler is watchdog's no-op base class.
        self._observer.schedule(FileSystemEventHandler(), str(root), recursive=True)

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
