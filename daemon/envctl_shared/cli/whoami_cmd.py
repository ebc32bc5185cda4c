"""``envctl whoami``: how the daemon sees you, and what that lets you do.

Why a command of its own: on JupyterHub the answer is not obvious — every user's server runs as
one uid, and the daemon tells hub users apart only by the hub's answer about the token the CLI
sends (``JUPYTERHUB_API_TOKEN``). When a request is refused, ``whoami`` shows whether the daemon
verified a hub user at all, which groups it counted, and what follows from them. Exit codes are
the protocol's: 0 answered, 69 daemon (or hub) unavailable, 77 token refused by the hub.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import EX_OK
from .output import emit_json, quote_name
from .status_cmd import add_socket_option, client_for


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("whoami", help="show how the daemon identifies you",
                              description="Ask the daemon who you are (uid, groups, verified "
                              "JupyterHub user) and what you may do.")
    add_socket_option(p)
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        me = client.call("whoami")
    if args.json:
        emit_json(me)
    else:
        print(render(me))
    return EX_OK


def render(me: dict[str, Any]) -> str:
    """Aligned ``key: value`` lines; names are quoted (they come from the hub and /etc)."""
    groups = ", ".join(quote_name(str(g)) for g in me.get("group_names") or []) or "-"
    if me.get("hub_verified"):
        hub = f"{quote_name(me['hub_user'])} (verified by JupyterHub)"
        hub_groups = ", ".join(quote_name(g) for g in me.get("hub_groups") or []) or "-"
    elif me.get("shared_uid"):
        hub = ("not verified: this uid is shared by hub users; send JUPYTERHUB_API_TOKEN "
               "(set in your JupyterHub server)")
        hub_groups = "-"
    else:
        hub = "- (your uid is not shared: the kernel's identity is yours)"
        hub_groups = "-"
    rows = [("user", f"{quote_name(str(me.get('username')))} (uid {me.get('uid')}, "
                     f"gid {me.get('gid')})"),
            ("groups", groups), ("hub user", hub), ("hub groups", hub_groups),
            ("admin", "yes" if me.get("is_admin") else "no"),
            ("may create", "yes" if me.get("may_create") else "no"),
            ("may see", "everyone's jobs" if me.get("may_view_all") else "your own jobs"),
            ("may cancel", str(me.get("may_cancel", "your own jobs")))]
    return "\n".join(f"{k + ':':<12}{v}" for k, v in rows)
