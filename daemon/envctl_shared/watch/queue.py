"""A coalescing work queue of root-relative paths, between event readers and heal workers.

Why coalesce: a burst (``cp -r``, ``tar x``, conda linking) produces several events per entry,
and our own chgrp/chmod produce more. Each path is queued at most once until a worker takes it;
a path queued as ``subtree`` (a new or moved-in directory, or the whole root after an overflow)
absorbs later requests for itself and for anything below it that are still waiting, because the
subtree pass will see them anyway. Readers never block: ``put`` only touches a dict.

Entries are handed out in batches of siblings: taking one entry takes every waiting entry of
the same directory with it, so a worker resolves that directory once for all of them (a burst
writes many files per directory; resolving each path from the root costs ~4x the heal itself).

Two lanes: creations and moves (``urgent``) go before attribute changes. Most IN_ATTRIB events
of a burst are the echoes of our own fixes, which find nothing to do; in one lane they would
queue ahead of entries still broken and delay the end of the burst by seconds. A real chmod by
a user waits only until the new entries are done, and a path waiting in the later lane moves to
the first when an urgent event names it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple


class Item(NamedTuple):
    """A subtree to reconcile (``names`` empty), or entries ``names`` of directory ``rel``.

    An entry batch with no names is the root directory itself (an event on the root)."""

    rel: str
    subtree: bool
    names: tuple[str, ...] = ()


def _split(rel: str) -> tuple[str, str]:
    parent, _, name = rel.rpartition("/")
    return parent, name


class WorkQueue:
    """FIFO of distinct paths; ``subtree`` wins over ``entry`` for the same or a deeper path."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, bool] = OrderedDict()  # rel -> subtree?
        self._later: OrderedDict[str, None] = OrderedDict()  # entries from attribute events
        self._siblings: dict[str, set[str]] = {}  # parent -> names waiting as entries (any lane)
        self._subtrees: set[str] = set()  # rels waiting as subtree items
        self._cond = threading.Condition()
        self._busy = 0
        self._closed = False

    def put(self, rel: str, subtree: bool = False, urgent: bool = True) -> bool:
        """Queue ``rel``; False when it was already covered by a waiting item.

        ``urgent`` False (an attribute change) queues an entry in the later lane."""
        with self._cond:
            if self._closed:
                return False
            if rel in self._later:
                if not (urgent or subtree):
                    return False
                del self._later[rel]  # promoted: re-queued below in the first lane
                self._unlink(rel)
            if rel in self._items:
                if subtree and not self._items[rel]:
                    self._items[rel] = True
                    self._subtrees.add(rel)
                    self._unlink(rel)
                    return True
                return False
            if self._covered(rel):
                return False
            if urgent or subtree or not rel:
                self._items[rel] = subtree
                if subtree:
                    self._subtrees.add(rel)
            else:
                self._later[rel] = None
            if not subtree and rel:
                parent, name = _split(rel)
                self._siblings.setdefault(parent, set()).add(name)
            self._cond.notify()
            return True

    def _unlink(self, rel: str) -> None:
        parent, name = _split(rel)
        names = self._siblings.get(parent)
        if names is not None:
            names.discard(name)
            if not names:
                del self._siblings[parent]

    def _covered(self, rel: str) -> bool:
        """A waiting subtree item on an ancestor (or the root "") already includes ``rel``.

        Few subtrees wait at a time, and paths can be thousands of components deep (a chain
        deeper than PATH_MAX): then each waiting subtree is compared, rather than every
        ancestor sliced out of ``rel``."""
        subtrees = self._subtrees
        if not subtrees:
            return False
        if "" in subtrees:
            return True
        if len(subtrees) < rel.count("/"):
            return any(rel.startswith(s) and rel[len(s):len(s) + 1] == "/" for s in subtrees)
        while "/" in rel:
            rel = rel.rsplit("/", 1)[0]
            if self._items.get(rel) is True:
                return True
        return False

    def get(self, timeout: float) -> Item | None:
        """The oldest waiting item (with its waiting siblings), or None after ``timeout`` (so
        workers wake to show liveness)."""
        with self._cond:
            if not self._items and not self._later and not self._closed:
                self._cond.wait(timeout)
            if self._items:
                rel, subtree = self._items.popitem(last=False)
                if subtree:
                    self._subtrees.discard(rel)
            elif self._later:
                rel, subtree = self._later.popitem(last=False)[0], False
            else:
                return None
            self._busy += 1
            if subtree or not rel:
                return Item(rel, subtree)
            parent, _ = _split(rel)
            names = self._siblings.pop(parent)
            for name in names:  # siblings from both lanes: one resolve serves them all
                key = f"{parent}/{name}" if parent else name
                self._items.pop(key, None)
                self._later.pop(key, None)
            return Item(parent, False, tuple(sorted(names)))

    def done(self) -> None:
        """A worker finished the item it got (for :meth:`wait_idle`)."""
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is waiting or being worked on; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._items and not self._later and not self._busy, timeout)

    def close(self) -> None:
        """Wake every waiting worker; later ``put`` calls are ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._items) + len(self._later) + self._busy
