"""Turn a kernel-verified peer into a Requester, and decide what it may do.

Why here and not in jobs: authorisation is about the socket's peer, and the identities we trust
are the one the kernel reports (``peercred``) and, for peers on ``jupyterhub.shared_uids`` (where
one uid is every hub user), the hub user the hub itself names as the owner of the token the
client sent (``hub``). A client may *claim* to act for someone (``JUPYTERHUB_USER``); the claim
is recorded on the job for the audit trail and never consulted here.

The rules (also in docs/protocol.md):

- admins: uid 0, the daemon's own uid, ``requests.admin_users``, members of
  ``requests.admin_groups``; hub admins and members of ``requests.admin_hub_groups`` (verified
  hub users). Admins may do everything, including cancel or replace anyone's.
- requesters: ``requests.allow_users``, members of ``requests.allow_groups`` (primary or
  supplementary group, as the kernel reported them at connect time) and verified hub users in
  ``requests.allow_hub_groups``. Requesters may create builds and see everyone's jobs and logs —
  they share the root, and seeing who is building what avoids duplicate builds.
- owners: a job, and the environment it built, belong to its requester — the same uid and, on a
  shared uid, the same verified hub user. Cancel and replace are for the owner or admins.
- everyone else who can open the socket (its mode and group are the first gate): ping, version,
  whoami, daemon status, and their own jobs. Empty allow lists mean nobody but admins may create:
  a daemon never hands out builds until an admin says to whom.
"""

from __future__ import annotations

import logging
import os
import pwd
from typing import Any

from ..accounts import group_name, user_name
from ..config import JupyterHubConfig, RequestsConfig, resolve_group
from ..errors import NotAuthorised, ValidationError
from ..jobs import envs
from ..jobs.model import Job, Requester
from .hub import HubUser
from .peercred import PeerCred

log = logging.getLogger(__name__)

_ALLOW_HINT = ("ask an administrator to add you or one of your groups to requests.allow_users "
               "or requests.allow_groups in the daemon's configuration")



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

    def __init__(self, cfg: RequestsConfig, hub: JupyterHubConfig | None = None,
                 daemon_uid: int | None = None) -> None:
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
        self.admin_uids = _uids(cfg.admin_users, "admin_users") | {0, self.daemon_uid}
        self.admin_gids = _gids(cfg.admin_groups, "admin_groups")
        self.allow_uids = _uids(cfg.allow_users, "allow_users")
        self.allow_gids = _gids(cfg.allow_groups, "allow_groups")
        self.allow_hub_groups = frozenset(cfg.allow_hub_groups)
        self.admin_hub_groups = frozenset(cfg.admin_hub_groups)
        self.shared_uids = frozenset(hub.shared_uids if hub is not None else ())

    def requester(self, cred: PeerCred, claimed_user: str | None = None,
                  hub_user: HubUser | None = None) -> Requester:
        """The identity a request acts with: the kernel's, the hub user the hub verified (or
        None), plus the client's unverified claim.

        The claim is free text from an untrusted peer that ends up in logs and the job store,
        so it is held to a short printable name (no newlines to forge log lines with)."""
        if claimed_user is not None and not _plain_name(claimed_user):
            raise ValidationError("claimed_user must be 1-128 printable characters without "
                                  "spaces", hint="JUPYTERHUB_USER should hold a user name")
        hub_admin = hub_user is not None and \
            (hub_user.admin or bool(self.admin_hub_groups.intersection(hub_user.groups)))
        return Requester(uid=cred.uid, gid=cred.gid, groups=tuple(sorted(set(cred.groups))),
                         pid=cred.pid, username=user_name(cred.uid),
                         claimed_user=claimed_user or None,
                         is_admin=self.is_admin(cred) or hub_admin,
                         hub_user=None if hub_user is None else hub_user.name,
                         hub_groups=() if hub_user is None else hub_user.groups)

    def is_admin(self, cred: PeerCred) -> bool:
        """Admin by uid, or by primary or supplementary group (cheap: the server asks this
        for every connection it accepts, to keep the admins' share of connections)."""
        return cred.uid in self.admin_uids or \
            bool({cred.gid, *cred.groups} & self.admin_gids)

    def unverified(self, who: Requester) -> bool:
        """A peer on a shared uid that has not proved which hub user it is: it may do nothing
        beyond ping, version, status and whoami (the handlers refuse it earlier)."""
        return who.uid in self.shared_uids and who.hub_user is None

    def may_create(self, who: Requester) -> bool:
        if self.unverified(who):
            return False
        return who.is_admin or who.uid in self.allow_uids or \
            bool({who.gid, *who.groups} & self.allow_gids) or \
            bool(self.allow_hub_groups.intersection(who.hub_groups))

    def require_create(self, who: Requester) -> None:
        if not self.may_create(who):
            raise NotAuthorised(f"user {who.username} (uid {who.uid}) may not request "
                                "environments from this daemon", hint=_ALLOW_HINT)

    def require_view(self, who: Requester, job: Job) -> None:
        """Own jobs are always visible; other people's to requesters and admins."""
        if not who.owns(job) and not self.may_create(who):
            raise NotAuthorised(f"job {job.id} belongs to {job.owner}; you may only "
                                "see your own jobs", hint=_ALLOW_HINT)

    def require_env_owner(self, who: Requester, owner: dict[str, Any] | None,
                          what: str) -> None:
        """Replace (and whatever else changes an existing environment) is for its owner — the
        requester of its first version, as the daemon recorded it (``jobs.envs``) — or admins;
        an environment envctl did not build is for admins."""
        if who.is_admin or envs.owned_by(owner, who.uid, who.hub_user):
            return
        raise NotAuthorised(f"{what} belongs to {envs.owner_name(owner)}; only its owner or an "
                            "admin may replace it", hint="pick another name, or ask its owner "
                            "or an envctl admin")

    def require_view_all(self, who: Requester) -> None:
        if not self.may_create(who):
            raise NotAuthorised("only requesters and admins may list everyone's jobs",
                                hint="drop --all to see your own jobs")

    def describe(self, who: Requester) -> dict[str, Any]:
        """What ``whoami`` returns: identity, claim, and the permissions that follow from it.
        ``hub_verified`` is true only when the hub named the user (never from a claim)."""
        shared = who.uid in self.shared_uids
        return {"uid": who.uid, "gid": who.gid, "groups": list(who.groups), "pid": who.pid,
                "username": who.username, "claimed_user": who.claimed_user,
                "group_names": [group_name(g) for g in who.groups],
                "shared_uid": shared, "hub_user": who.hub_user,
                "hub_verified": who.hub_user is not None, "hub_groups": list(who.hub_groups),
                "is_admin": who.is_admin and not self.unverified(who),
                "may_create": self.may_create(who),
                "may_view_all": self.may_create(who),
                "may_cancel": "any job" if who.is_admin and not self.unverified(who) else
                              "nothing" if self.unverified(who) else "your own jobs"}


def _plain_name(text: str) -> bool:
    """1-128 printable characters, no whitespace (so no newline, no Unicode line separator)."""
    return 0 < len(text) <= 128 and text.isprintable() and not any(c.isspace() for c in text)


