"""``envctl env ...``: the environments in the shared root, their versions, and the way back.

Why through the daemon: the versions and their records live in the root (readable by everyone),
but the daemon is the one that checks they are its own before trusting them, and the one that
may switch, remove and collect; the CLI only talks the protocol and formats the answer
(``--json`` prints the daemon's data as it is). ``env add``/``env update`` are builds, followed
as ``request create`` follows one; ``env layer`` is the exception, made by the user alone
(``layer_cmd``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import EX_FAILURE, EX_OK, UsageError
from . import layer_cmd
from .output import emit_json, local_time, quote_name, table
from .request_cmd import queue
from .status_cmd import add_socket_option, client_for

_NAME_HELP = "the environment's name (<root>/NAME)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("env", help="list, inspect, export, change, roll back and remove "
                              "shared environments, or layer your own over one",
                              description="Environments in the request root: each build is a "
                              "version; NAME points to the current one.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True

    ls = sub.add_parser("list", help="every environment in the root (hand-made ones too)",
                        description="Every environment in the request root, hand-made ones "
                        "too (listed unmanaged): status, current version, backend, owner, when "
                        "it was built, size, kernel, description.")
    ls.set_defaults(func=run_list)
    show = sub.add_parser("show", help="an environment's versions, specs and packages",
                          description="An environment's versions (* the current one): who "
                          "built each, when and why, what changed from the one before, the "
                          "tests it passed, its digest and last verify.")
    show.add_argument("name", help=_NAME_HELP)
    show.set_defaults(func=run_show)
    exp = sub.add_parser("export", help="an environment.yml with exact pins (request create "
                         "-f accepts it back)",
                         description="Print an environment.yml with the exact packages of a "
                         "version, for version control: 'envctl request create NAME -f FILE "
                         "--replace' builds it again.")
    exp.add_argument("name", help=_NAME_HELP)
    exp.add_argument("--version", metavar="V", help="a version (default: the current one)")
    exp.set_defaults(func=run_export)
    ver = sub.add_parser("verify", help="recompute a version's digest and list every "
                         "difference from what was frozen (exit 1 on any)",
                         description="Recompute a version's digest (paths, types, modes, "
                         "owners, sizes, content, link targets) and list every difference from "
                         "what was frozen; the result is recorded ('env show', 'env list', "
                         "'status'). Exit 0 as built, 1 on any difference.")
    ver.add_argument("name", help=_NAME_HELP)
    ver.add_argument("--version", metavar="V", help="a version (default: the current one)")
    ver.set_defaults(func=run_verify)
    rb = sub.add_parser("rollback", help="make an earlier version current again (atomic)",
                        description="Make an earlier version current again in one atomic "
                        "rename: the one before the current one, or --to V (any version still "
                        "built, a newer one too). The owner, admins; exit 77 for others.")
    rb.add_argument("name", help=_NAME_HELP)
    rb.add_argument("--to", metavar="V", help="the version (default: the one before)")
    rb.set_defaults(func=run_rollback)
    rm = sub.add_parser("remove", help="remove the name at once; versions go at the next GC",
                        description="Remove NAME from the root at once (the owner, admins; "
                        "exit 77 for others): <root>/NAME disappears, and its versions are "
                        "deleted by the GC after requests.gc_grace, so what runs in them "
                        "keeps running until then.")
    rm.add_argument("name", help=_NAME_HELP)
    rm.set_defaults(func=run_remove)
    gc = sub.add_parser("gc", help="remove old versions now (admins)",
                        description="Remove now what the daemon's GC removes every "
                        "requests.gc_interval seconds: versions that are not current, not among "
                        "the requests.keep_versions newest and not current for "
                        "requests.gc_grace, and what failed builds left (admins).")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    gc.set_defaults(func=run_gc)
    diff = sub.add_parser("diff", help="what changed between two versions (packages added, "
                          "removed, up- or downgraded; who, when, why)",
                          description="Compare the packages (conda and pip) of two versions: "
                          "with no version, the current one against the one before it; with "
                          "one, that version against the one before it; with two, V1 to V2.")
    diff.add_argument("name", help=_NAME_HELP)
    diff.add_argument("versions", nargs="*", metavar="V", help="V1 V2, or V, or none")
    diff.set_defaults(func=run_diff)
    desc = sub.add_parser("describe", help="set what an environment is for (the owner, "
                          "admins)", description="Set the description shown in 'env list', "
                          "'env show' and the kernel's name: one paragraph, at most 500 "
                          "characters; '' clears it.")
    desc.add_argument("name", help=_NAME_HELP)
    desc.add_argument("description", metavar="TEXT", help="the description ('' clears it)")
    desc.set_defaults(func=run_describe)
    for parser in (ls, show, exp, ver, rb, rm, gc, diff, desc):
        parser.add_argument("--json", action="store_true", help="print the answer as JSON")
        add_socket_option(parser)
    _add_change_parsers(sub)
    layer_cmd.add_parser(sub)


def _add_change_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``env add`` and ``env update``: a new version of a shared env (its owner, admins)."""
    add = sub.add_parser("add", help="a new version with more packages (the owner, admins)",
                         description="Build a new version from the current version's spec "
                         "plus the packages named (a package already listed is replaced by the "
                         "new entry of its name), test it and make it current; follows the "
                         "build like 'request create'. Others: 'envctl env layer NAME'.")
    add.add_argument("name", help=_NAME_HELP)
    add.add_argument("packages", nargs="*", metavar="PKG", help="conda match specs to add")
    add.add_argument("--pip", nargs="+", action="extend", default=[], metavar="PKG",
                     help="pip requirements to add to the spec's pip: list")
    add.set_defaults(func=run_add)
    upd = sub.add_parser("update", help="a new version of the same spec, solved again for "
                         "newer packages (the owner, admins)",
                         description="Build a new version from the current version's spec as "
                         "it is (a new solve takes newer packages where the spec allows), test "
                         "it and make it current; follows the build like 'request create'.")
    upd.add_argument("name", help=_NAME_HELP)
    upd.set_defaults(func=run_update)
    for parser in (add, upd):
        parser.add_argument("--test", action="append", default=[], metavar="CMD", dest="tests",
                            help="a shell command the new version must pass, after the current "
                                 "version's own tests (repeatable)")
        parser.add_argument("--no-wait", action="store_true",
                            help="print the job id and return")
        parser.add_argument("--json", action="store_true", help="print the job as JSON")
        add_socket_option(parser)


def _call(args: argparse.Namespace, op: str, **kw: Any) -> Any:
    with client_for(args) as client:
        return client.call(op, **kw)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return "-"


def _who(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "-"
    if rec.get("hub_user"):
        return f"{rec['hub_user']} (hub)"
    claim = rec.get("claimed_user")
    return str(rec.get("name")) + (f" (claims {claim})" if claim else "")


def run_list(args: argparse.Namespace) -> int:
    envs = _call(args, "env-list")
    if args.json:
        emit_json(envs)
        return EX_OK
    if not envs:
        print("no environments")
        return EX_OK
    rows = [[quote_name(e["name"]), e["status"] + (" (updating)" if e.get("updating") else "")
             + (f" (verify failed: {', '.join(e['failed_verify'])})"
                if e.get("failed_verify") else "") + (" (FAILED)" if e.get("failure") else ""),
             e.get("current") or "-", e.get("backend") or "-", _who(e.get("owner")),
             local_time(e.get("built_at")), _size(e.get("size_bytes")), e.get("kernel") or "-",
             _short(e.get("description"))]
            for e in envs]
    print(table(rows, ["NAME", "STATUS", "CURRENT", "BACKEND", "OWNER", "BUILT", "SIZE",
                       "KERNEL", "DESCRIPTION"]))
    for e in envs:
        if e.get("failure"):
            print(f"{quote_name(e['name'])}: {quote_name(e['failure'])}")
    return EX_OK


def _short(text: str | None, width: int = 40) -> str:
    """A description in a table cell: one line, cut with an ellipsis."""
    if not text:
        return "-"
    text = quote_name(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def run_show(args: argparse.Namespace) -> int:
    env = _call(args, "env-show", name=args.name)
    if args.json:
        emit_json(env)
        return EX_OK
    print(f"{quote_name(env['name'])}: {env['status']}, current {env.get('current') or '-'}, "
          f"owner {_who(env.get('owner'))}, path {quote_name(env['prefix'])}")
    if env.get("description"):
        print(f"  {quote_name(env['description'])}")
    if env.get("failure"):
        print(f"  FAILED: {quote_name(env['failure'])}")
    for v in env.get("versions") or []:
        mark = "*" if v.get("current") else " "
        built = local_time(v.get("built_at"))
        print(f"\n{mark} {v['version']}  {v.get('state')}  built {built} by "
              f"{_who(v.get('requester'))}  job {v.get('job') or '-'}  "
              f"{_size(v.get('size_bytes'))}"
              + (f"  (not current since {local_time(v['retired_at'])})"
                 if v.get("retired_at") and not v.get("current") else ""))
        print(f"    {_verified(v)}")
        if v.get("why"):
            print(f"    why: {quote_name(v['why'])}")
        changes = v.get("changes")
        if changes and changes.get("from"):
            lines = _change_lines(changes)
            print(f"    changes from {changes['from']}:" + ("" if lines else " none"))
            for line in lines:
                print(f"      {line}")
        for test in v.get("tests") or []:  # a requester's text: one line each, escaped
            print(f"    tested: {quote_name(test)}")
        for key, value in (v.get("variables") or {}).items():
            print(f"    variable: {key}={value}")
        for pkg in v.get("packages") or []:
            build = f" {pkg['build']}" if pkg.get("build") else ""
            print(f"    {pkg['name']} {pkg['version']}{build}  ({pkg['manager']})")
    return EX_OK


def _verified(v: dict[str, Any]) -> str:
    """One line on a version's integrity: its digest and its last verify."""
    if not v.get("digest"):
        return "not frozen yet (built before versions were frozen)"
    result = v.get("verify") or {}
    last = (f"last verified {local_time(v['verified_at'])}: "
            + ("passed" if result.get("ok") else f"FAILED, {result.get('count')} difference(s)")
            if v.get("verified_at") else "never verified")
    return f"frozen {local_time(v.get('frozen_at'))}, {v['digest'][:19]}…, {last}"


def _change_lines(diff: dict[str, Any]) -> list[str]:
    """A package diff (``env-diff``, a version's ``changes``) one package a line."""
    lines = [f"added    {p['name']} {p['version']} ({p['source']})" for p in diff["added"]]
    lines += [f"removed  {p['name']} {p['version']} ({p['source']})" for p in diff["removed"]]
    lines += [f"{ {'up': 'up', 'down': 'down'}.get(c['direction'], 'changed'):<8} {c['name']} "
              f"{c['from']} -> {c['to']} ({c['source']})" for c in diff["changed"]]
    return lines


def run_diff(args: argparse.Namespace) -> int:
    if len(args.versions) > 2:
        raise UsageError("give at most two versions: envctl env diff NAME [V1 V2]",
                         hint="versions are listed by: envctl env show NAME")
    old, new = (args.versions if len(args.versions) == 2 else
                [None, *args.versions] if args.versions else [None, None])
    out = _call(args, "env-diff", name=args.name, to=new, **{"from": old})
    if args.json:
        emit_json(out)
        return EX_OK
    by = _who(out.get("by"))
    print(f"{quote_name(out['name'])}: {out.get('from') or '(nothing)'} -> {out['to']}, built "
          f"{local_time(out.get('at'))} by {by}"
          + (f", why: {quote_name(out['why'])}" if out.get("why") else ""))
    lines = _change_lines(out)
    for line in lines:
        print(f"  {line}")
    if not lines:
        print("  no package changed")
    return EX_OK


def run_describe(args: argparse.Namespace) -> int:
    out = _call(args, "env-describe", name=args.name, description=args.description)
    if args.json:
        emit_json(out)
    else:
        print(f"{out['name']}: " + (f"described as {quote_name(out['description'])}"
                                   if out.get("description") else "description cleared"))
    return EX_OK


def run_verify(args: argparse.Namespace) -> int:
    out = _call(args, "env-verify", name=args.name, version=args.version)
    if args.json:
        emit_json(out)
    else:
        for diff in out["differences"]:
            print(f"{quote_name(diff['path'])}: {diff['what']} ({diff['detail']})")
        more = out["count"] - len(out["differences"])
        print(f"{out['name']} {out['version']}: "
              + ("verified, no difference" if out["ok"] else
                 f"{out['count']} difference(s)" + (f" ({more} not listed)" if more else ""))
              + f" ({out['digest']})")
    return EX_OK if out["ok"] else EX_FAILURE


def run_export(args: argparse.Namespace) -> int:
    out = _call(args, "env-export", name=args.name, version=args.version)
    if args.json:
        emit_json(out)
    else:
        sys.stdout.write(out["text"])
    return EX_OK


def run_rollback(args: argparse.Namespace) -> int:
    out = _call(args, "env-rollback", name=args.name, to=args.to)
    if args.json:
        emit_json(out)
    else:
        was = out.get("previous")
        print(f"{out['name']}: already at {out['current']}" if was == out["current"] else
              f"{out['name']}: now {out['current']} (was {was or '-'})")
    return EX_OK


def run_remove(args: argparse.Namespace) -> int:
    out = _call(args, "env-remove", name=args.name)
    if args.json:
        emit_json(out)
    else:
        print(f"{out['name']} removed (was {out['removed']}); its versions go at the next GC")
    return EX_OK


def run_gc(args: argparse.Namespace) -> int:
    out = _call(args, "env-gc", dry_run=args.dry_run)
    if args.json:
        emit_json(out)
        return EX_OK
    verb = "would remove" if out["dry_run"] else "removed"
    for item in out["removed"]:
        print(f"{verb} {item['name']} {item['version']}")
    print(f"{verb} {len(out['removed'])} version(s)" + (
        f"; skipped (being built): {', '.join(out['skipped'])}" if out["skipped"] else ""))
    for item in out.get("failed") or []:  # the others were collected all the same
        print(f"FAILED {quote_name(item['name'])}: {quote_name(item['error'])}")
    return EX_FAILURE if out.get("failed") else EX_OK


def run_add(args: argparse.Namespace) -> int:
    if not args.packages and not args.pip:
        raise UsageError("name at least one package (PKG or --pip PKG)",
                         hint=f"to solve the same spec again: envctl env update {args.name}")
    return queue(args, "env-add", {"name": args.name, "packages": args.packages or None,
                                   "pip": args.pip or None, "tests": args.tests or None})


def run_update(args: argparse.Namespace) -> int:
    return queue(args, "env-update", {"name": args.name, "tests": args.tests or None})
