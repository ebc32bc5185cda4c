"""Names of uids and gids for messages: the account's name, or the number itself.

Why one module: the daemon (auth, builds) and the CLI (doctor, init) all name users and groups
in what they say, and on NFS/EFS hosts an owner or group often has no entry in the local
database: every caller must fall back to the number the same way.
"""

from __future__ import annotations

import grp
import pwd


def user_name(uid: int) -> str:
    """Account name for a uid, or the number itself when the uid has no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """Group name for a gid, or the number itself when the gid has no group entry."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def person(record: object) -> str:
    """A requester or owner as records keep it (``{uid, name, hub_user, claimed_user}``), as
    people read it: ``hub user ann`` when the hub named them, else ``alice (uid 1001)``; an
    unverified claim is never shown as the person. ``unknown`` for anything else."""
    if not isinstance(record, dict):
        return "unknown"
    if record.get("hub_user"):
        return f"hub user {record['hub_user']}"
    uid = record.get("uid")
    name = record.get("name") or (user_name(uid) if isinstance(uid, int) else "unknown")
    return f"{name} (uid {uid})" if isinstance(uid, int) else str(name)
