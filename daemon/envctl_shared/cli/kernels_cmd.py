"""``envctl kernels sync``: rebuild the shared kernelspecs (one per env with ipykernel).

Why a command: builds keep ``kernels.dir`` current on their own, but envs made by hand, envs
removed by hand, or a kernels directory that was lost need one pass over the whole root. The
daemon does it, admins only, from what each env has on disk (its record, its site directories):
no env's code runs, and one time limit bounds the pass (``jobs.kernels``).
"""

from __future__ import annotations

import argparse

from ..errors import EX_OK
from .output import emit_json, quote_name
from .status_cmd import add_socket_option, client_for


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("kernels", help="Jupyter kernelspecs of the shared envs",
                              description="The daemon writes a Jupyter kernelspec for every "
                              "environment that has ipykernel into kernels.dir.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True
    s = sub.add_parser("sync", help="rewrite every kernelspec from the envs in the root "
                       "(admins)",
                       description="Rewrite the kernelspec of every environment in the root "
                       "that has ipykernel (hand-made ones too), and remove those of "
                       "environments that have none or are gone (admins): for envs made or "
                       "removed by hand, or a kernels.dir that was lost.")
    add_socket_option(s)
    s.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    s.set_defaults(func=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    # The daemon's own time limit (kernels.SYNC_LIMIT) ends a sync: wait for it.
    with client_for(args, timeout=None) as client:
        done = client.call("kernels-sync")
    if args.json:
        emit_json(done)
        return EX_OK
    for key in ("written", "removed", "skipped"):
        names = ", ".join(quote_name(n) for n in done[key]) or "-"
        print(f"{key + ':':<9}{names}")
    return EX_OK
