"""Real-time change notification for one root: inotify, keyed by directory identity.

What must be right here is *where an event belongs*. inotify reports an event as (watch
descriptor, name); the watch descriptor names a directory inode, which keeps it whatever the
directory is renamed to. So the table here maps each watch descriptor to a node holding that
directory's identity (``st_dev``, ``st_ino``) and its place: a parent node and a name. A rename
updates one node (paired ``IN_MOVED_FROM``/``IN_MOVED_TO`` by cookie), and every path below it
follows without being rewritten. The queue holds nodes and names, not path strings (see
:mod:`~envctl_shared.watch.queue`): a path is built from the nodes only when a worker takes an
item, and the healer re-resolves it from the root fd anyway.

Two clocks meet in that table. Events are history, read in batches (everything queued is
drained first; what comes in while a batch is handled is read ahead into the next one, so the
kernel's bounded queue does not overflow behind a long batch); walks, which add watches, see
the disk *now*, newer than every event of the batch being handled. A walk places what it
finds where it is, but never takes a name from a node that history still has there (an
``IN_MOVED_FROM`` still to come must find it); a rename event moves its node and takes the
name. A directory renamed inside the root has its subtree
re-walked where it is and queued for a subtree reconcile; one renamed away with no
``IN_MOVED_TO`` in the root loses its watches (no event from outside may be taken for one
inside), unless a walk of the same batch found it in the root, which is newer news; a directory
that cannot be found where the table says (renamed again since) is left to the pending events
that will place it. Anything that leaves the table unable to follow (an overflow, a rename that
would make a cycle in it) or any exception on the reader thread ends this watch, and
:class:`~envctl_shared.watch.service.RootWatcher` rebuilds it from scratch and reconciles the
root (``Hooks.on_end``): the reader never dies silently, and never runs on a table it cannot
trust. (Tested with random renames in, out and across the root, read live and read late.)

Walks (the initial one, new and moved-in directories, rebuilds) are the C engine's one walk in
its list mode (:func:`~envctl_shared.heal.fsops.list_dirs`): each directory is opened
``O_NOFOLLOW`` relative to its parent's fd, on the root's mount only (the engine's one
same-mount test), and handed here with its identity; its watch is added through
``/proc/self/fd/N`` of that fd. No path string is ever resolved, so a symlink swapped in
cannot redirect a watch outside the root, and directories deeper than ``PATH_MAX`` are watched
like any other; the walk is iterative and keeps a bounded number of fds open whatever the
depth (levels past its window are reopened through ``..``, checked against their identity).
What stays here is the table: which node a directory is, whether it is entered (see
:meth:`_visit`).

Why not watchdog (see docs/field-facts.md, "watchdog", and ``bench/watchdog_fit.py``): its
7.1.1 observer, used through its public API, passes our rename, move-in and overflow stories
but adds watches by path string, so nothing deeper than ``PATH_MAX`` is watched, and its
bookkeeping is keyed by path where ours is keyed by directory identity. Its public API has no
bare kernel binding (``watchdog.observers.inotify_c`` is an internal module), so the three calls
are bound by the C engine (``fsops.inotify_init``, ``add_watch``, ``rm_watch``: a watch added
once per directory walked cost ~7 µs more through ctypes), and the kernel ABI's constants are
here (``<sys/inotify.h>``, stable since Linux 2.6.13). Its polling observer
does not fit either (see :mod:`~envctl_shared.watch.poll`).

The mask: IN_CREATE, IN_MOVED_TO, IN_MOVED_FROM (to pair renames), IN_ATTRIB, IN_MOVE_SELF and
IN_DELETE_SELF (the root itself). Not IN_OPEN/IN_CLOSE_*/IN_MODIFY: writing data never changes
an inode's group or mode, and those events are the bulk of a burst (and of overflows).

Everything runs on one reader thread; the queue it feeds does no I/O.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..heal.fsops import (
    DIR_FLAGS,
    PATH_DIR_FLAGS,
    MountRef,
    add_watch,
    inotify_init,
    list_dirs,
    read_events,
    rm_watch,
    stat_at,
)
from ..heal.walker import compile_excludes, excludes_below
from .queue import WorkQueue, path_of


class IN:
    """The inotify constants of ``<sys/inotify.h>`` this module uses (kernel ABI)."""

    IN_ATTRIB = 0x00000004
    IN_MOVED_FROM = 0x00000040
    IN_MOVED_TO = 0x00000080
    IN_CREATE = 0x00000100
    IN_DELETE_SELF = 0x00000400
    IN_MOVE_SELF = 0x00000800
    IN_UNMOUNT = 0x00002000
    IN_Q_OVERFLOW = 0x00004000
    IN_IGNORED = 0x00008000
    IN_ONLYDIR = 0x01000000
    IN_ISDIR = 0x40000000


MASK = (IN.IN_CREATE | IN.IN_MOVED_TO | IN.IN_MOVED_FROM | IN.IN_ATTRIB | IN.IN_MOVE_SELF
        | IN.IN_DELETE_SELF | IN.IN_ONLYDIR)
_ROOT_GONE = IN.IN_MOVE_SELF | IN.IN_DELETE_SELF | IN.IN_UNMOUNT | IN.IN_IGNORED
_VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # gone, or replaced by a non-directory
READ_SIZE = 64 * 1024
MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"
DRAIN_MAX = 8 * 1024 * 1024  # a full default queue (16,384 events) is ~0.5-4 MB
# Woken while a burst goes on (a batch was read less than REST ago), the reader waits this long
# before draining, so that a batch holds what came in that time: a Python step per batch, not
# per event. The kernel's queue (16,384 events by default) takes a burst of ~150k events/s for
# ~100 ms. Woken at rest, it reads at once: a lone change is not delayed by GATHER.
GATHER = 0.005
REST = 0.02
READ_AHEAD_EVERY = 32  # directory events handled, or walked, between reads ahead
TICK = 1.0  # the reader wakes at least this often: its heartbeat, and idle fds released
CACHE_SIZE = 64  # fds of recently used directories (the parent of the next new directory)

Ident = tuple[int, int]  # (st_dev, st_ino)


class Hooks(Protocol):
    """What the owner of a watch hears, called from its reader thread."""

    def on_watch_failed(self, rel: str, err: int) -> None:
        """A watch could not be added (``ENOSPC``: out of ``max_user_watches``)."""

    def on_end(self, reason: str, exc: BaseException | None) -> None:
        """The watch stopped by itself and must be rebuilt: ``reason`` is ``overflow``,
        ``error`` (``exc`` is the exception), ``resync`` or ``root``."""


class _Resync(Exception):
    """The table cannot follow what happened (a rename that would make a cycle in it)."""


class _Node:
    """One watched directory: identity (its watch descriptor and inode, which no rename
    changes) and current place (parent node and name, which a rename updates)."""

    __slots__ = ("wd", "ident", "parent", "name", "children", "strays", "cookie", "seen")

    def __init__(self, wd: int, ident: Ident, parent: _Node | None, name: str) -> None:
        self.wd = wd
        self.ident = ident
        self.parent = parent
        self.name = name
        self.children: dict[str, _Node] = {}  # subdirectory name -> node holding the name
        # Placed here without holding their name (see _place), still below this directory.
        self.strays: set[_Node] | None = None
        self.cookie = 0  # the IN_MOVED_FROM cookie while its rename is unresolved
        self.seen = -1  # the batch during which a walk last found it on the disk

    def below(self) -> list[_Node]:
        """The nodes placed directly below this one."""
        return [*self.children.values(), *(self.strays or ())]

    def unlink(self, child: _Node) -> None:
        if self.children.get(child.name) is child:
            del self.children[child.name]
        elif self.strays:
            self.strays.discard(child)

    def link(self, child: _Node, hold: bool) -> None:
        """``child`` is placed here; ``hold``: it takes its name (whoever held it strays)."""
        if hold or self.children.get(child.name, child) is child:
            held = self.children.get(child.name)
            if held is not None and held is not child:
                self._stray(held)
            self.children[child.name] = child
            if self.strays:
                self.strays.discard(child)
        else:
            self._stray(child)

    def _stray(self, node: _Node) -> None:
        if self.strays is None:
            self.strays = set()
        self.strays.add(node)


class _Visit:
    """A directory of a walk, as the C walk hands it back to :meth:`InotifyWatch._visit`: its
    node; ``force``: list even what is already watched in place below it (a renamed subtree:
    what was created in it while it could not be found); ``evict``: its entries found take
    their names (an arrival event's, see :meth:`InotifyWatch._place`); ``known``: the last
    entry visited in it was already watched in place; ``keep``: the fds of the directories
    found in it go to the fd cache (an arrival's: what a writer creates next is in there)."""

    __slots__ = ("node", "force", "evict", "known", "keep")

    def __init__(self, node: _Node, force: bool, evict: bool = False, keep: bool = False) -> None:
        self.node = node
        self.force = force
        self.evict = evict
        self.known = False
        self.keep = keep


def max_user_watches() -> int | None:
    """The kernel's per-user watch limit now (every process of the daemon's uid shares it);
    None where it cannot be read."""
    try:
        with open(MAX_USER_WATCHES) as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


class InotifyWatch:
    """Every directory of one root watched, its events turned into queue items.

    Its own inotify instance (not one shared between roots), so that an overflow or a failure
    is attributed to the root it happened on, and a removed root releases its watches.
    """

    def __init__(self, root: Path, queue: WorkQueue, hooks: Hooks, count: Callable[[int], None],
                 progress: Callable[[], None] | None = None,
                 exclude: tuple[str, ...] = ()) -> None:
        """``count`` is called with the number of events of each batch; ``progress`` for
        every directory a walk visits (a liveness signal during long walks). Directories
        ``exclude`` matches (the root's patterns) get no watch: the healer never enters them
        either."""
        self._root_path = root
        self._exclude = exclude
        self._excluded = compile_excludes(exclude)
        self._queue = queue
        self._hooks = hooks
        self._count = count
        self._progress = progress
        self._ifd = -1
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._nodes: dict[int, _Node] = {}
        self._root: _Node | None = None
        self._mount = MountRef(-1, -1)  # the root's, once opened
        self._moving: dict[int, _Node] = {}  # cookie -> node renamed, destination not seen yet
        self._cache: OrderedDict[_Node, int] = OrderedDict()  # node -> fd (LRU)
        self._limited = False  # ENOSPC seen: adding more watches is pointless
        self._batch = 0  # drained batches of events so far
        self._read_at = float("-inf")  # when the last batch was drained (monotonic)
        self._ahead: list[bytes] = []  # events read while a batch was handled: the next one
        self._ahead_size = 0
        self._visits = 0  # directories walked so far (see _read_ahead)
        self.beat = time.monotonic()  # last sign of life of the reader (or of a walk)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Watch every directory present now (returns once they are), then read events."""
        try:
            self._ifd = inotify_init()
            self._wake_r, self._wake_w = os.pipe()
            self._watch_root()
        except BaseException:
            self._close()
            raise
        self._thread = threading.Thread(target=self._run, name="envctl-inotify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading and remove every watch (closing the instance removes them)."""
        self._stopping = True
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        self._close()

    def _close(self) -> None:
        self._clear_cache()
        for fd in (self._ifd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._ifd = self._wake_r = self._wake_w = -1

    def watch_count(self) -> int:
        """Watches in this inotify instance: the size of the table, which follows the kernel's
        (a watch enters it when added, leaves it on its IN_IGNORED or when we remove it), so a
        status read costs the same at 160k watches as at 1k — re-reading
        /proc/self/fdinfo cost 0.38 s at 160k. -1 once stopped."""
        return len(self._nodes) if self._ifd >= 0 else -1

    # -- the reader thread ----------------------------------------------------------------

    def _run(self) -> None:
        """Read until stopped; whatever ends it otherwise is reported, exceptions included."""
        reason, failure = "stopped", None
        try:
            reason = self._read_loop()
        except _Resync:
            reason = "resync"
        except BaseException as exc:  # reported with its traceback by the owner, never lost
            reason, failure = "error", exc
        finally:
            self._clear_cache()
        if not self._stopping:
            self._hooks.on_end(reason, failure)

    def _read_loop(self) -> str:
        poller = select.poll()
        poller.register(self._ifd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            self.beat = time.monotonic()
            if not self._ahead:
                ready = poller.poll(TICK * 1000)
                if self._stopping:
                    return "stopped"
                if not ready:
                    self._clear_cache()  # idle: hold no directory open
                    continue
                if time.monotonic() - self._read_at < REST:
                    time.sleep(GATHER)
            elif self._stopping:
                return "stopped"
            data = self._drain()
            self._read_at = time.monotonic()
            if not data:
                continue
            self._batch += 1
            reason = self._dispatch(data)
            if reason is not None:
                return reason

    def _drain(self) -> bytes:
        """Every event read ahead or queued now (up to DRAIN_MAX bytes), in one batch: whatever
        a walk then finds on the disk is newer than all of them (see :meth:`_place`)."""
        self._read_ahead()
        data = b"".join(self._ahead)
        self._ahead.clear()
        self._ahead_size = 0
        return data

    def _read_ahead(self) -> None:
        """Move what the kernel queued into the next batch (up to DRAIN_MAX bytes).

        Called while a batch is handled too: the kernel's queue is bounded (16,384 events by
        default), and a batch that walks many new directories takes long enough, with the heal
        workers sharing the interpreter, for a burst to overflow it. Read ahead, events wait
        here, in order, exactly as they would have waited there: they are the next batch, and
        the walks of this one are newer than them only as they would have been anyway."""
        while self._ahead_size < DRAIN_MAX:
            try:
                chunk = os.read(self._ifd, READ_SIZE)
            except BlockingIOError:
                return
            self._ahead.append(chunk)
            self._ahead_size += len(chunk)

    def _dispatch(self, data: bytes) -> str | None:
        """Handle one batch's events; a reason when the watch must end.

        C reduces the batch first (:func:`~envctl_shared.heal.fsops.read_events`): the events
        that change the table (directories placed, watches gone) are handled here in order;
        then every other entry named, once per batch and lane, is queued with its siblings.
        A file's later events in the same batch (its creation, the writer's chmod, the echo
        of our own fix) queue nothing more than its first did: a heal that starts after the
        batch was read sees every change the batch reports. Entries are queued after the
        table is updated: those of a directory whose watch went in this batch (deleted, or
        moved out of the root) are not queued at all."""
        nodes = self._nodes
        assert self._root is not None
        counted, overflow, ordered, entries = read_events(data, nodes, self._root.wd)
        if overflow:
            return "overflow"
        self._count(counted)
        for i, (wd, mask, cookie, name) in enumerate(ordered):
            if i % READ_AHEAD_EVERY == READ_AHEAD_EVERY - 1:
                self._read_ahead()
            node = nodes.get(wd)
            if node is None:
                continue  # a watch removed since (moved out earlier in this batch)
            if name is not None:
                self._on_dir(node, name, mask, cookie)
            elif node is self._root:
                if mask & _ROOT_GONE:
                    return "root"
                if mask & IN.IN_ATTRIB:
                    self._queue.put(node)  # the root directory itself
            elif mask & IN.IN_IGNORED:
                self._forget(node)
            elif mask & IN.IN_MOVE_SELF and node.cookie:
                if node.seen == self._batch:  # a walk found it since, in the root: it stays
                    self._moving.pop(node.cookie, None)
                    node.cookie = 0
                else:
                    self._moved_out(node)
        for wd, urgent, later in entries:
            node = nodes.get(wd)
            if node is not None:
                self._queue.put_names(node, urgent, True)
                self._queue.put_names(node, later, False)
        return None

    def _on_dir(self, parent: _Node, name: str, mask: int, cookie: int) -> None:
        """Directory ``name`` of the watched directory ``parent`` created, moved in or away."""
        if mask & IN.IN_MOVED_FROM:
            child = parent.children.get(name)
            if child is not None:  # where it lands decides: here, or out of the root
                self._moving.pop(child.cookie, None)
                child.cookie = cookie
                self._moving[cookie] = child
            return
        moved = self._moving.pop(cookie, None) if mask & IN.IN_MOVED_TO else None
        self._arrived(parent, name, moved)

    def _arrived(self, parent: _Node, name: str, moved: _Node | None) -> None:
        """A directory created or moved in: watch it (and everything below it not watched in
        place yet), then queue its subtree, which is reconciled after those watches exist."""
        force = moved is not None
        if moved is not None:  # renamed inside the root: it is here now, with its subtree
            moved.cookie = 0
            self._place(moved, parent, name, evict=True)
        pfd = self._fd_of(parent)
        subtree = True  # also when not found (gone, or renamed again: pending events place it)
        if pfd >= 0:
            # A renamed node holds its name from its event on; what is found there now is
            # only seen. A created (or moved-in) directory is the name's new holder.
            top = _Visit(parent, force, evict=moved is None, keep=True)
            pfd = os.dup(pfd)  # the cache's may close while the walk uses it (see _forget)
            try:
                entered = self._walk(pfd, top, [name])
            finally:
                os.close(pfd)
            if entered:
                # Empty when listed after its watch existed: whatever appears in it has events
                # of its own, only the directory itself is to heal (a chain built one level
                # at a time is then not walked again from each level).
                subtree = force or not entered[0][1]
            elif top.known:
                return  # watched in place by an earlier walk, whose queued subtree covers it
        self._queue.put(parent, name, subtree)

    def _moved_out(self, node: _Node) -> None:
        """Renamed and no IN_MOVED_TO in this root named it: it left the root. Its watches go
        (no event from outside may be taken for one inside), with everything below it."""
        self._moving.pop(node.cookie, None)
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.below())
            rm_watch(self._ifd, n.wd)
            self._forget(n)

    def _forget(self, node: _Node) -> None:
        """The watch is gone (IN_IGNORED: deleted, or removed by us)."""
        if self._nodes.get(node.wd) is node:
            del self._nodes[node.wd]
        if node.parent is not None:
            node.parent.unlink(node)
        if node.cookie:
            self._moving.pop(node.cookie, None)
        fd = self._cache.pop(node, None)
        if fd is not None:
            os.close(fd)

    # -- the table --------------------------------------------------------------------------

    def _place(self, node: _Node, parent: _Node, name: str, evict: bool) -> None:
        """Record that ``node`` is ``name`` in ``parent``.

        ``evict``: history says so (a rename or arrival event), and the name is its own from
        that point on. Otherwise a walk saw it there on the disk, ahead of the events still to
        be handled: it is placed there (its events are attributed there) but takes no name from
        another node, whose pending IN_MOVED_FROM must still find it; its own arrival event, if
        one is pending, gives it the name when its turn comes. A node placed without its name
        is a stray of its parent: still below it, dropped with it."""
        if node.parent is not parent or node.name != name:
            up: _Node | None = parent
            while up is not None:
                if up is node:
                    raise _Resync
                up = up.parent
            if node.parent is not None:
                node.parent.unlink(node)
            node.parent, node.name = parent, name
            self._queue.moved()
        parent.link(node, evict)

    # -- directory fds --------------------------------------------------------------------

    def _fd_of(self, node: _Node) -> int:
        """An fd of ``node``'s directory (owned by the cache), or -1 when it is not where the
        table says: renamed or deleted since, and the events saying so are still to come.

        From the nearest cached ancestor (or the root), each component is opened no-follow and
        must be the inode the table knows: a path that now leads elsewhere is never taken."""
        fd = self._cache.get(node)
        if fd is not None:
            self._cache.move_to_end(node)
            return fd
        chain: list[_Node] = []
        up: _Node | None = node
        while up is not None and up not in self._cache:
            chain.append(up)
            up = up.parent
        if up is None:  # nothing cached: start again from the root's path
            base = chain.pop()
            fd = self._open_checked(os.fspath(self._root_path), None, base, DIR_FLAGS)
            if fd < 0:
                return -1
            self._keep(base, fd)
        else:
            fd = self._cache[up]
        for n in reversed(chain):
            fd = self._open_checked(n.name, fd, n, PATH_DIR_FLAGS)
            if fd < 0:
                return -1
            self._keep(n, fd)
        return fd

    def _open_checked(self, name: str, dirfd: int | None, node: _Node, flags: int) -> int:
        """Open ``name`` in ``dirfd``; -1 unless it is ``node``'s inode."""
        try:
            fd = os.open(name, flags, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno in _VANISHED:
                return -1
            raise
        try:
            st = stat_at(fd)
        except BaseException:
            os.close(fd)
            raise
        if (st.st_dev, st.st_ino) != node.ident:
            os.close(fd)
            return -1
        return fd

    def _keep(self, node: _Node, fd: int) -> None:
        """Hand ``fd`` to the cache (which closes what it evicts)."""
        old = self._cache.pop(node, None)
        if old is not None and old != fd:
            os.close(old)
        self._cache[node] = fd
        if len(self._cache) > CACHE_SIZE:
            os.close(self._cache.popitem(last=False)[1])

    def _clear_cache(self) -> None:
        while self._cache:
            os.close(self._cache.popitem()[1])

    # -- walks: adding watches ------------------------------------------------------------

    def _watch_root(self) -> None:
        """Watch the root and every directory below it (the first walk of this instance)."""
        fd = os.open(self._root_path, DIR_FLAGS)
        try:
            st = stat_at(fd)
            self._mount = MountRef.of(st)
            wd = self._add_watch(fd)
            if wd < 0:
                raise OSError(errno.ENOSPC, "inotify watch limit reached")
            root = self._root = _Node(wd, (st.st_dev, st.st_ino), None, "")
            self._nodes[wd] = root
            self._walk(fd, _Visit(root, True), None)
        except BaseException:
            os.close(fd)
            raise
        self._keep(root, fd)

    def _add_watch(self, fd: int) -> int:
        """The watch descriptor of the directory behind ``fd`` (the kernel returns the existing
        one for an inode already watched); -1 when out of watches."""
        try:
            return add_watch(self._ifd, fd, MASK)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        self._limited = True
        return -1

    def _walk(self, fd: int, top: _Visit, names: list[str] | None) -> list[tuple[_Visit, bool]]:
        """Watch every directory below ``top`` (already watched; its fd ``fd``; only its entries
        ``names`` when given) not watched in place yet, by the C walk's list mode, which hands
        each one to :meth:`_visit`. Returns the directories entered right below ``top``, each
        with whether it had no entry at all when listed (after its watch was added)."""
        return list_dirs(fd, top, names, self._mount, self._visit).entered

    def _visit(self, parent: _Visit, name: str, fd: int, dev: int, ino: int) -> _Visit | None:
        """Directory ``name`` of ``parent`` found by a walk (``fd``: open on it for this call):
        watch it and place its node where it is now. Returns what to enter, or None: excluded,
        out of watches, or already watched in place (unless ``force``: its subtree covers it)."""
        self.beat = time.monotonic()
        if self._progress is not None:
            self._progress()
        self._visits += 1
        if self._visits % READ_AHEAD_EVERY == 0:  # a long walk (a big tree moved in)
            self._read_ahead()
        up = parent.node
        if self._limited or (excludes_below(self._exclude, up.parent is None)
                             and self._excluded(path_of(up, name))):
            return None
        wd = self._add_watch(fd)
        if wd < 0:
            self._hooks.on_watch_failed(path_of(up, name), errno.ENOSPC)
            return None
        ident = (dev, ino)
        node = self._nodes.get(wd)
        if node is not None and node.ident != ident:  # a watch descriptor reused
            self._forget(node)
            node = None
        known = (node is not None and node.parent is up and node.name == name
                 and up.children.get(name) is node)
        force = parent.force
        if node is None:
            node = self._nodes[wd] = _Node(wd, ident, up, name)
            self._place(node, up, name, parent.evict)
        elif not known:  # found elsewhere than the table said: the disk is newer
            self._place(node, up, name, parent.evict)
            force = True
        node.seen = self._batch
        if node.cookie:  # seen after its IN_MOVED_FROM was handled: it is in the root
            self._moving.pop(node.cookie, None)
            node.cookie = 0
        parent.known = known
        if parent.keep:
            self._keep(node, os.dup(fd))
        return None if known and not force else _Visit(node, force)
