"""``envctl web``: the pages and the HTTP API, as a JupyterHub service (see docs/web.md).

Why a command of the CLI: the hub starts services by a command line, and ``envctl`` is already
on the path of every machine that talks to the daemon. Its dependencies (tornado, jupyterhub's
service auth) are the ``[web]`` extra, imported only when this command runs.
"""

from __future__ import annotations

import argparse
import logging

from ..api.client import socket_path
from ..errors import EX_OK, UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "web", help="serve the web pages and HTTP API (a JupyterHub service)",
        description="Serve envctl's pages and HTTP API under the service prefix the hub gives "
        "(JUPYTERHUB_SERVICE_PREFIX), signing users in with the hub's OAuth and forwarding "
        "each user's hub token to the daemon. Run it unprivileged, as a uid listed in the "
        "daemon's jupyterhub.shared_uids. See docs/web.md.")
    p.add_argument("--ip", default=None,
                   help="address to listen on (default: the host of JUPYTERHUB_SERVICE_URL)")
    p.add_argument("--port", type=_port, default=None,
                   help="port to listen on (default: the port of JUPYTERHUB_SERVICE_URL)")
    p.add_argument("--local", action="store_true",
                   help="dev-only: no hub; serve on 127.0.0.1 as yourself (your uid, like your "
                   "CLI), to whoever has the secret URL it prints")
    p.set_defaults(func=run)


def _port(text: str) -> int:
    """A TCP port (an int beyond 65535 was taken, and served on that number modulo 65536)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return int(text)


def run(args: argparse.Namespace) -> int:
    try:
        from ..web import server
    except ImportError as exc:
        raise UsageError(f"envctl web needs the web extra ({exc.name} is not installed)",
                         hint="pip install 'envctl-shared[web]'") from None
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not args.debug:
        logging.getLogger("tornado.access").setLevel(logging.WARNING)
    server.serve(socket_path(args.socket), args.ip, args.port, local=args.local)
    return EX_OK
