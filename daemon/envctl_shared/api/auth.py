"""Turn a kernel-verified peer into a Requester, and decide what it may do.

Why here and not in jobs: authorisation is about the socket's peer, and the only identity we trust
is the one the kernel reports (``peercred``). A client may *claim* to act for someone (on
JupyterHub every user is uid ``jovyan`` and sends ``JUPYTERHUB_USER``); the claim is recorded on
the job for the audit trail and never consulted here.

The rules (also in docs/protocol.md):

- admins: uid 0, the daemon's own uid, ``requests.admin_users``, members of
  ``requests.admin_groups``. Admins may do everything, including cancel anyone's job.
- requesters: ``requests.allow_users`` and members of ``requests.allow_groups`` (primary or
  supplementary group, as the kernel reported them at connect time). Requesters may create
  builds and see everyone's jobs and logs — they share the root, and seeing who is building what
  avoids duplicate builds.
- everyone else who can open the socket (its mode and group are the first gate): ping, version,
  whoami, daemon status, and their own jobs. Empty allow lists mean nobody but admins may create:
  a daemon never hands out builds until an admin says to whom.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from typing import Any

from ..config import RequestsConfig, resolve_group
from ..errors import NotAuthorised, ValidationError
from ..jobs.model import Job, Requester
from .peercred import PeerCred

log = logging.getLogger(__name__)

_ALLOW_HINT = ("ask an administrator to add you or one of your groups to requests.allow_users "
               "or requests.allow_groups in the daemon's configuration")


def username(uid: int) -> str:
    """Account name for a uid, or the number itself when the uid has no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _uids(names: tuple[str, ...], key: str) -> frozenset[int]:
    out = set()
    for name in names:
        try:
            out.add(int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid)
        except KeyError:
            log.warning("auth unknown_user=%s key=%s", name, key)
    return frozenset(out)


def _gids(names: tuple[str, ...], key: str) -> frozenset[int]:
    out = set()
    for name in names:
        try:
            out.add(resolve_group(name))
        except KeyError:
            log.warning("auth unknown_group=%s key=%s", name, key)
    return frozenset(out)


class Authoriser:
    """The allow/admin lists resolved to numeric ids once (per config load), then pure checks."""

    def __init__(self, cfg: RequestsConfig, daemon_uid: int | None = None) -> None:
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
        self.admin_uids = _uids(cfg.admin_users, "admin_users") | {0, self.daemon_uid}
        self.admin_gids = _gids(cfg.admin_groups, "admin_groups")
        self.allow_uids = _uids(cfg.allow_users, "allow_users")
        self.allow_gids = _gids(cfg.allow_groups, "allow_groups")

    def requester(self, cred: PeerCred, claimed_user: str | None = None) -> Requester:
        """The identity a request acts with: the kernel's, plus the client's unverified claim.

        The claim is free text from an untrusted peer that ends up in logs and the job store,
        so it is held to a short printable name (no newlines to forge log lines with)."""
        if claimed_user is not None and not _plain_name(claimed_user):
            raise ValidationError("claimed_user must be 1-128 printable characters without "
                                  "spaces", hint="JUPYTERHUB_USER should hold a user name")
        return Requester(uid=cred.uid, gid=cred.gid, groups=tuple(sorted(set(cred.groups))),
                         pid=cred.pid, username=username(cred.uid),
                         claimed_user=claimed_user or None, is_admin=self.is_admin(cred))

    def is_admin(self, cred: PeerCred) -> bool:
        """Admin by uid, or by primary or supplementary group (cheap: the server asks this
        for every connection it accepts, to keep the admins' share of connections)."""
        return cred.uid in self.admin_uids or \
            bool({cred.gid, *cred.groups} & self.admin_gids)

    def may_create(self, who: Requester) -> bool:
        return who.is_admin or who.uid in self.allow_uids or \
            bool({who.gid, *who.groups} & self.allow_gids)

    def require_create(self, who: Requester) -> None:
        if not self.may_create(who):
            raise NotAuthorised(f"user {who.username} (uid {who.uid}) may not request "
                                "environments from this daemon", hint=_ALLOW_HINT)

    def require_view(self, who: Requester, job: Job) -> None:
        """Own jobs are always visible; other people's to requesters and admins."""
        if job.requester_uid != who.uid and not self.may_create(who):
            raise NotAuthorised(f"job {job.id} belongs to {job.requester_name}; you may only "
                                "see your own jobs", hint=_ALLOW_HINT)

    def require_view_all(self, who: Requester) -> None:
        if not self.may_create(who):
            raise NotAuthorised("only requesters and admins may list everyone's jobs",
                                hint="drop --all to see your own jobs")

    def describe(self, who: Requester) -> dict[str, Any]:
        """What ``whoami`` returns: identity, claim, and the permissions that follow from it."""
        return {"uid": who.uid, "gid": who.gid, "groups": list(who.groups), "pid": who.pid,
                "username": who.username, "claimed_user": who.claimed_user,
                "is_admin": who.is_admin, "may_create": self.may_create(who),
                "group_names": [_group_name(g) for g in who.groups]}


def _plain_name(text: str) -> bool:
    """1-128 printable characters, no whitespace (so no newline, no Unicode line separator)."""
    return 0 < len(text) <= 128 and text.isprintable() and not any(c.isspace() for c in text)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
