"""``envctl status``: is the daemon up, what is it watching, what has it fixed, what is queued.

Why exit codes matter here: this command is the readiness/liveness probe of a Kubernetes or
systemd deployment. 0 = the daemon answered; 69 (EX_UNAVAILABLE) = nobody is listening (or the
daemon hung up); 77 (EX_NOPERM) = the socket's permissions keep us out; 75 (EX_TEMPFAIL) = the
daemon answered but says it is not ready yet (``ready: false``, e.g. its first scan is running)
or shows no progress for ``--stale`` seconds (a wedged worker: the liveness probe's signal).
This module also owns the socket option and the client factory that ``request_cmd`` shares,
because both command groups reach the daemon the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from ..config import DEFAULT_SOCKET, SOCKET_ENV
from ..errors import EX_OK, EX_TEMPFAIL
from ..status import DaemonStatus, RootStatus
from .output import emit_json, quote_name, table
from .parsing import timeout_seconds

if TYPE_CHECKING:
    from ..api.client import Client


def add_socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH",
                        help=f"daemon socket (default: ${SOCKET_ENV} or {DEFAULT_SOCKET})")


def client_for(args: argparse.Namespace, timeout: float | None = 30.0) -> Client:
    """A client on ``--socket`` / ``$ENVCTL_SOCKET`` / the default path (imported here: the
    socket client is not loaded for ``heal``/``check``, which must start fast)."""
    from ..api.client import Client

    return Client(args.socket, timeout=timeout)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "status", help="show the daemon's status (exit 0 = up and ready)",
        description="Ask the daemon for its status: roots and watch modes, healer counters, "
        "job counts. Exit 0 when it answers and is ready, 75 when it is not ready yet, 69 when "
        "no daemon is listening, 77 when the socket's permissions keep you out.")
    add_socket_option(p)
    p.add_argument("--json", action="store_true", help="print the daemon's status as JSON")
    p.add_argument("--timeout", type=timeout_seconds, default=10.0, metavar="SECONDS",
                   help="give up waiting for an answer after this long (default 10)")
    p.add_argument("--stale", type=float, default=300.0, metavar="SECONDS",
                   help="exit 75 when the daemon has shown no progress for this long "
                   "(a wedged worker; default 300)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with client_for(args, timeout=args.timeout) as client:
        data = client.call("status")
    st = DaemonStatus.from_dict(data)
    if args.json:
        emit_json(data)
    else:
        print(render(st))
    if st.ready is False:
        return EX_TEMPFAIL
    age = st.progress_age_s
    if isinstance(age, (int, float)) and age > args.stale:
        print(f"envctl: daemon shows no progress for {age:.0f}s (limit {args.stale:.0f}s): "
              "wedged", file=sys.stderr)
        return EX_TEMPFAIL
    return EX_OK


def render(st: DaemonStatus) -> str:
    """People's view: a header line, one row per root, the job counts. A key a daemon of
    another version did not send shows as ``-`` (``from_dict`` made it None)."""
    ready = {True: "ready", False: "NOT READY", None: "up"}[st.ready]
    head = (f"envctld {st.version or '?'} (pid {st.pid or '?'}), {ready}, "
            f"up {_duration(float(st.uptime_s or 0))}")
    lines = [head]
    if st.roots:
        rows = [[_cell(v) for v in (r.path, r.mode, r.scanned, r.violations, r.fixed, r.errors,
                                    r.events, r.overflows, r.rebuilds, r.watch_errors)]
                for r in st.roots]
        lines += ["", table(rows, ["ROOT", "WATCH", "SCANNED", "VIOLATIONS", "FIXED", "ERRORS",
                                   "EVENTS", "OVERFLOWS", "REBUILDS", "WATCH-ERRORS"])]
        pollers = [line for r in st.roots if (line := _poller_line(r))]
        if pollers:
            lines += ["", *pollers]
    budget = st.inotify
    if budget is not None and budget.needed:
        limit = budget.max_user_watches
        lines += ["", f"inotify watches: {budget.needed:,} needed, "
                      f"fs.inotify.max_user_watches "
                      f"{f'{limit:,}' if isinstance(limit, int) else 'unknown'}"]
    if st.failure:  # printable only: it may quote a name from the tree
        lines += ["", "FAILED: " + "".join(c if c.isprintable() else
                                           c.encode("unicode_escape").decode("ascii")
                                           for c in str(st.failure))]
    area = st.area
    if isinstance(area, dict):  # the requests root's .envctl: every request is refused
        lines += ["", f"NOT READY: {quote_name(str(area.get('path')))} "
                      f"{quote_name(str(area.get('problem')))}",
                  f"fix: {quote_name(str(area.get('fix')))}"]
    if isinstance(st.jobs, dict):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(st.jobs.items())) or "none"
        lines += ["", f"jobs: {counts}"]
    elif st.requests_enabled is False:
        lines += ["", "jobs: requests disabled"]
    for key, what in (("tampered", "TAMPERED"), ("failed_verify", "FAILED VERIFY")):
        for item in (st.integrity or {}).get(key) or []:
            name = quote_name(str(item.get("name")))
            lines.append(f"{what}: {name} {item.get('version')}"
                         + (f": {item['what']}" if item.get("what") else "")
                         + f" (envctl env verify {name} --version {item.get('version')})")
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _poller_line(root: RootStatus) -> str | None:
    """Who polls this root for every daemon sharing it, and since when (the election)."""
    p = root.poller
    if not isinstance(p, dict):
        return None
    path = quote_name(str(root.path or "?"))
    role = p.get("role")
    if role == "standalone":
        return f"poller {path}: this daemon, alone ({quote_name(str(p.get('error') or ''))})"
    leader = p.get("leader") if isinstance(p.get("leader"), dict) else None
    who = "nobody known"
    if leader:
        since = leader.get("since")
        when = (time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(since))
                if isinstance(since, (int, float)) else "?")
        who = f"{quote_name(str(leader.get('host')))} (pid {leader.get('pid')}) since {when}"
        if leader.get("held") is False:
            who += ", its lock released: takeover pending"
    mine = {"leader": "this daemon polls", "follower": "this daemon stands by",
            "unreachable": "this daemon cannot reach the lock: not polling "
                           f"({quote_name(str(p.get('error') or ''))})"}.get(str(role), str(role))
    return f"poller {path}: {who}; {mine} (host {quote_name(str(p.get('host')))})"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))
