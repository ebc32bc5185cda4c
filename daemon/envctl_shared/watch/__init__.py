"""Noticing change: inotify keyed by directory identity (bound by our C engine) and a poller.

Nothing here decides what is correct or writes to a tree: events and poll passes only produce
root-relative *hints* on a coalescing :mod:`~envctl_shared.watch.queue`; the per-root
:mod:`~envctl_shared.watch.service` hands them to :class:`envctl_shared.heal.Healer`, which
re-resolves every path safely. Events can be lost (queue overflow, watch limits, network
filesystems), so every
loss ends in a reconcile pass: events are for speed, reconciles are the guarantee.
"""

from .inotify import max_user_watches
from .service import RootWatcher

__all__ = ["RootWatcher", "max_user_watches"]
