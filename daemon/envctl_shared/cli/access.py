"""Whether the calling user can work in a shared root, and what to do when they cannot.

Why its own module: "Permission denied" on a shared root almost always has one of three causes,
and each has a different fix — the user is not in the root's group (an admin adds them), they
were added after their session started (log in again; on JupyterHub, restart the server: a
process's groups are fixed when it starts), or an entry's mode keeps group members out (the
daemon heals it). ``heal``/``check`` hints and ``envctl doctor`` tell them apart the same way.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path
from typing import NamedTuple

from ..accounts import group_name, user_name
from .output import quote_name


class GroupAccess(NamedTuple):
    """The calling user and one group: member on paper (passwd/group database), and in fact
    (this process's credentials)."""

    gid: int
    group: str
    user: str
    in_database: bool
    in_session: bool



def group_access(gid: int) -> GroupAccess:
    """Membership of ``gid`` for the effective user: the database (primary group or listed in
    /etc/group, NSS included) and this session's groups."""
    uid = os.geteuid()
    user = user_name(uid)
    try:
        primary = pwd.getpwuid(uid).pw_gid
    except KeyError:
        primary = os.getegid()
    try:
        listed = user in grp.getgrgid(gid).gr_mem
    except KeyError:
        listed = False
    in_session = gid == os.getegid() or gid in os.getgroups()
    return GroupAccess(gid, group_name(gid), user, primary == gid or listed, in_session)


def membership_fix(acc: GroupAccess) -> str | None:
    """What to do when the user lacks the group in this session; None when they have it."""
    if acc.in_session:
        return None
    if acc.in_database:
        return (f"you were added to group {acc.group} after this session started: log in "
                "again (on JupyterHub: restart your server from the hub's control panel)")
    return (f"you ({acc.user}) are not in group {acc.group}: ask an administrator to add you "
            f"('usermod -aG {acc.group} {acc.user}'), then log in again")


def permission_hint(gid: int | None) -> str:
    """The hint for EACCES under a root whose group is ``gid``: the membership fix when that is
    the cause, else the entry's own mode (which the daemon heals)."""
    if os.geteuid() == 0:
        return "even root was refused: a root-squashing NFS/EFS export? run it on the server"
    if gid is not None:
        fix = membership_fix(group_access(gid))
        if fix:
            return fix
        return (f"you are in group {group_name(gid)}, but an entry's mode keeps the group out:"
                " the daemon heals it within seconds if it runs ('envctl status'); else an "
                "administrator runs 'envctl heal' as root")
    return "check the owner, group and mode on the way there ('namei -l PATH')"


def missing_hint(path: Path) -> str:
    """A missing path is a typo or an unmounted share: name the deepest part that exists."""
    parent = path.parent
    while not os.path.isdir(parent):
        parent = parent.parent
    return (f"check the spelling ({quote_name(str(parent))} exists); a network share "
            f"(EFS/NFS) may not be mounted: 'findmnt -T {quote_name(str(path.parent))}'")
