"""Turn a kernel-verified peer into a Requester, and decide what it may do: one check for all.

Why here and not in jobs: authorisation is about the socket's peer, and the identities we trust
are the one the kernel reports (``peercred``) and, for peers on ``jupyterhub.shared_uids`` (where
one uid is every hub user), the hub user the hub itself names as the owner of the token the
client sent (``hub``). A client may *claim* to act for someone (``JUPYTERHUB_USER``); the claim
is recorded on the job for the audit trail and never consulted here.

Who may call which op is data: each op of ``protocol.OPS`` declares its :class:`Access`, and
:meth:`Authoriser.check` is the only place that reads it. The dispatcher checks before the
handler runs; where the decision needs a target (a job, the owner of an environment), the
handler calls the same check with it — for environments under the name's lock, where the
owner cannot change meanwhile (``jobs.env_service``). The people:

- admins: uid 0, the daemon's own uid, ``requests.admin_users``, members of
  ``requests.admin_groups``; hub admins and members of ``requests.admin_hub_groups`` (verified
  hub users). Admins may do everything.
- requesters: ``requests.allow_users``, members of ``requests.allow_groups`` (primary or
  supplementary group, as the kernel reported them at connect time) and verified hub users in
  ``requests.allow_hub_groups``. Requesters may create builds and see everyone's jobs and logs —
  they share the root, and seeing who is building what avoids duplicate builds.
- owners: a job, and the environment it built, belong to its requester (``Requester.matches``:
  the same uid and, on a shared uid, the same verified hub user, told by its hub_id when
  recorded).
- a peer on a shared uid without a verified hub user: only what needs no identity.
Empty allow lists mean nobody but admins may create: a daemon never hands out builds until an
admin says to whom.
"""

from __future__ import annotations

import logging
import os
import pwd
from typing import Any, NamedTuple

from ..accounts import group_name, user_name
from ..config import JupyterHubConfig, RequestsConfig, resolve_group
from ..errors import NotAuthorised, ValidationError
from ..jobs import envs
from ..jobs.model import Job, Requester
from .hub import TOKEN_HINT, HubUser
from .peercred import PeerCred
from .protocol import Access, Op

log = logging.getLogger(__name__)

class EnvTarget(NamedTuple):
    """An existing environment as the access check sees it: its owner as ``env.json`` records
    it (None: envctl did not build it, so admins only)."""

    name: str
    owner: dict[str, Any] | None


# A target of the check not known yet: the dispatcher checks what it can before the handler
# runs; the handler checks again with the job or the environment's owner.
PENDING: Any = object()


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
                         hub_groups=() if hub_user is None else hub_user.groups,
                         hub_id=None if hub_user is None else hub_user.hub_id)

    def is_admin(self, cred: PeerCred) -> bool:
        """Admin by uid, or by primary or supplementary group (cheap: the server asks this
        for every connection it accepts, to keep the admins' share of connections)."""
        return cred.uid in self.admin_uids or \
            bool({cred.gid, *cred.groups} & self.admin_gids)

    def unverified(self, who: Requester) -> bool:
        """A peer on a shared uid that has not proved which hub user it is: it may do nothing
        that needs an identity."""
        return who.uid in self.shared_uids and who.hub_user is None

    def may_create(self, who: Requester) -> bool:
        """A requester (or admin): may build, and see everyone's jobs."""
        if self.unverified(who):
            return False
        return who.is_admin or who.uid in self.allow_uids or \
            bool({who.gid, *who.groups} & self.allow_gids) or \
            bool(self.allow_hub_groups.intersection(who.hub_groups))

    def check(self, op: Op, who: Requester, target: Any = PENDING,
              args: dict[str, Any] | None = None) -> None:
        """NotAuthorised unless ``who`` may call ``op`` with ``args`` on ``target``: a Job for
        job access, an :class:`EnvTarget` for env access (a name that exists); PENDING: what
        can be decided without it."""
        access, action = op.access_for(args or {})
        if not access.needs_token:
            return
        if self.unverified(who):
            raise NotAuthorised(f"uid {who.uid} is shared by the users of JupyterHub "
                                "(jupyterhub.shared_uids): a request from it must carry the "
                                "hub API token that says which hub user you are",
                                hint=TOKEN_HINT)
        if access is Access.ADMIN:
            if not who.is_admin:
                raise NotAuthorised(f"only envctl admins may {action}",
                                    hint=op.hint or "ask an envctl admin")
            return
        if access in (Access.REQUESTER, Access.ENV_OWNER) and not self.may_create(who):
            what = action if access is Access.REQUESTER else "request or change environments"
            raise NotAuthorised(f"{who.subject} may not {what} on this daemon: only "
                                "requesters and admins may", hint=self._allow_hint(who))
        if target is PENDING or who.is_admin or access.target is None:
            return
        if isinstance(target, Job):
            if who.owns(target) or (access is Access.JOB_READER and self.may_create(who)):
                return
            raise NotAuthorised(f"job {target.id} belongs to {target.owner}; only its owner"
                                f"{', requesters' if access is Access.JOB_READER else ''} or "
                                f"an envctl admin may {action}", hint=op.hint)
        env: EnvTarget = target
        if env.owner is not None and envs.owned_by(env.owner, who):
            if who.hub_user is not None and not env.owner.get("hub_id"):
                log.info("auth owner-by-name op=%s name=%s hub_user=%s uid=%d (its record has "
                         "no hub_id)", op.name, env.name, who.hub_user, who.uid)
            return
        raise NotAuthorised(f"environment {env.name!r} belongs to "
                            f"{envs.owner_name(env.owner)}; only its owner or an envctl admin "
                            f"may {action}", hint=op.hint)

    def _allow_hint(self, who: Requester) -> str:
        """Which keys would make ``who`` a requester: a hub user's hub groups, else the
        Unix user's name and groups."""
        if who.hub_user is not None:
            groups = ", ".join(who.hub_groups) or "none"
            return (f"an administrator adds one of your JupyterHub groups ({groups}) to "
                    "requests.allow_hub_groups in the daemon's configuration (or to "
                    "requests.admin_hub_groups)")
        return (f"an administrator adds {who.username} to requests.allow_users, or one of "
                "your groups to requests.allow_groups, in the daemon's configuration")

    def describe(self, who: Requester) -> dict[str, Any]:
        """What ``whoami`` returns: identity, claim, and the permissions that follow from it.
        ``hub_verified`` is true only when the hub named the user (never from a claim)."""
        shared = who.uid in self.shared_uids
        return {"uid": who.uid, "gid": who.gid, "groups": list(who.groups), "pid": who.pid,
                "username": who.username, "claimed_user": who.claimed_user,
                "group_names": [group_name(g) for g in who.groups],
                "shared_uid": shared, "hub_user": who.hub_user, "hub_id": who.hub_id,
                "hub_verified": who.hub_user is not None, "hub_groups": list(who.hub_groups),
                "is_admin": who.is_admin and not self.unverified(who),
                "may_create": self.may_create(who),
                "may_view_all": self.may_create(who),
                "may_cancel": "any job" if who.is_admin and not self.unverified(who) else
                              "nothing" if self.unverified(who) else "your own jobs"}


def _plain_name(text: str) -> bool:
    """1-128 printable characters, no whitespace (so no newline, no Unicode line separator)."""
    return 0 < len(text) <= 128 and text.isprintable() and not any(c.isspace() for c in text)


