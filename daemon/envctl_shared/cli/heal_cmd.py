"""``envctl heal`` and ``envctl check``: the healer from the command line, no daemon needed.

``check`` is what an admin runs from cron or CI: it only reads, lists every violation and exits
1 when there is one. ``heal`` fixes and reports counts (each entry fixed with ``-v``/``--json``;
errors always). Both take the policy from a config file
(each PATH must lie inside a configured root; no PATH means every root) or from ``--group``
(each PATH is then a root of its own).

Exit codes: 0 clean (check) / everything fixed (heal); 1 violations found (check, or
``heal --dry-run``); 74 the pass is incomplete: some entries could not be inspected or fixed,
or lie on another mount inside the tree (never entered, so never audited: a check must not
call such a tree clean), or PATH itself vanished or was replaced before it was audited. The
summary line names each count. No component of a PATH may be a symlink (below the configured
root with ``--config``; anywhere with ``--group``, where PATH is the root): whoever owns the link
would choose which directory root's permissions land on. Names in human output are escaped
(``output.quote_name``): a name cannot forge a line; ``--json`` carries them exactly.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from .. import config as cfgmod
from ..errors import EX_FAILURE, EX_IOERR, EX_OK, FilesystemError, UsageError
from ..fsinfo import first_symlink, walk_concurrency
from ..heal import Finding, Healer, HealStats
from .access import missing_hint, permission_hint
from .output import emit_json, quote_name
from .progress import Progress


class Target(NamedTuple):
    """One pass to run: a root's policy and the root-relative path to walk."""

    root: cfgmod.RootConfig
    rel: str

    @property
    def path(self) -> Path:
        return self.root.path / self.rel if self.rel else self.root.path


def add_parser(sub: Any) -> None:
    for name, helptext in (("heal", "fix group and permissions under PATHs"),
                           ("check", "list entries that break the policy (exit 1 if any)")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("paths", nargs="*", metavar="PATH",
                       help="trees to walk (default with --config: every configured root)")
        src = p.add_mutually_exclusive_group()
        src.add_argument("--config", "-c", metavar="FILE", help="take roots and policy from FILE")
        src.add_argument("--group", "-g", metavar="GROUP",
                         help="treat each PATH as a root owned by GROUP (name or gid)")
        p.add_argument("--others", choices=("keep", "none", "read"), default="keep",
                       help="with --group: what others may do (default: keep)")
        p.add_argument("--concurrency", "-j", type=int, metavar="N",
                       help="walk threads on NFS/EFS/FUSE (default 16), each with two "
                       "lookups in flight; walks on local disks are always serial (threads "
                       "only slow them down)")
        p.add_argument("--json", action="store_true", help="print one JSON document")
        p.add_argument("--verbose", "-v", action="store_true",
                       help="also list each entry fixed, and skipped ones (protected, special, "
                       "mounts)")
        if name == "heal":
            p.add_argument("--dry-run", "-n", action="store_true",
                           help="report what would change, change nothing")
        p.set_defaults(func=run, dry_run=name == "check", mode=name)


def targets(args: argparse.Namespace) -> list[Target]:
    """Resolve PATH arguments into (root policy, relative path) pairs, validating each."""
    example = f"e.g. 'envctl {args.mode} --group users /efs/shared/.conda/envs'"
    if args.group is None and args.config is None:
        raise UsageError("say which policy to apply: --config FILE or --group GROUP",
                         hint=example)
    if args.group is not None:
        if not args.paths:
            raise UsageError("--group needs at least one PATH", hint=example)
        try:
            cfgmod.resolve_group(args.group)
        except KeyError as exc:
            raise UsageError(f"--group: {exc.args[0]}",
                             hint="name a group of this host ('getent group' lists them) or a "
                             "numeric gid") from None
        out = []
        for p in args.paths:
            _must_be_dir(p)
            out.append(Target(cfgmod.single_root(p, args.group, args.others).roots[0], ""))
        return out
    conf = cfgmod.load(args.config)
    if not args.paths:
        for configured in conf.roots:
            if not os.path.lexists(configured.path):
                raise FilesystemError(f"{quote_name(str(configured.path))}: no such directory "
                                      f"(a root of {quote_name(conf.source)})",
                                      hint=missing_hint(configured.path))
        return [Target(root, "") for root in conf.roots]
    out = []
    for p in args.paths:
        path = _absolute(p)
        root = conf.root_for(path)
        if root is None:
            raise UsageError(f"{quote_name(p)} is not inside any root of {conf.source}",
                             hint="roots: " + ", ".join(str(r.path) for r in conf.roots))
        if not os.path.lexists(path):
            raise FilesystemError(f"{quote_name(p)}: no such file or directory",
                                  hint=missing_hint(path))
        _refuse_symlinks(p, path, root.path)
        out.append(Target(root, "" if path == root.path else str(path.relative_to(root.path))))
    return out


def _must_be_dir(p: str) -> None:
    """A root must be a real directory, reached through no symlink; say which of the usual
    mistakes it is."""
    path = _absolute(p)
    if not os.path.lexists(p):
        raise FilesystemError(f"{quote_name(p)}: no such directory", hint=missing_hint(path))
    _refuse_symlinks(p, path, Path("/"))
    if not os.path.isdir(p):
        raise FilesystemError(f"{quote_name(p)} is not a directory",
                              hint="name the root directory of the shared environments")


def _absolute(p: str) -> Path:
    """``p`` as an absolute path without ``.``/``..``, refused when a ``..`` follows a symlink.

    Why: ``lnk/..`` is, to the kernel, the parent of ``lnk``'s *target*, while text
    normalisation (``abspath``) makes it ``lnk``'s own directory: the tree named and the tree
    walked would differ, and the symlink check after normalisation would never see ``lnk``.
    (The working directory itself is already physical: the kernel resolved it.)"""
    if not os.path.isabs(p):
        try:
            p_abs = os.path.join(os.getcwd(), p)
        except FileNotFoundError:
            raise FilesystemError(f"{quote_name(p)}: the current directory was removed",
                                  hint="cd somewhere that exists, or give an absolute "
                                       "path") from None
    else:
        p_abs = p
    kept: list[str] = []
    for part in p_abs.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            here = "/" + "/".join(kept)
            if kept and os.path.islink(here):
                raise FilesystemError(f"{quote_name(p)}: '..' after the symlink "
                                      f"{quote_name(here)}", hint="name the real directory: "
                                      f"{quote_name(os.path.realpath(p))}")
            kept = kept[:-1]
        else:
            kept.append(part)
    return Path("/" + "/".join(kept))


def _refuse_symlinks(p: str, path: Path, base: Path) -> None:
    """Refuse ``path`` when a component below ``base`` is a symlink: healing through it would
    change whatever its owner points it at (another user's private directory), as root."""
    link = first_symlink(path, base)
    if link is None:
        return
    what = f"{quote_name(p)} is a symlink" if link == path else \
        f"{quote_name(p)}: {quote_name(str(link))} is a symlink"
    raise FilesystemError(what, hint=f"name the real directory: "
                          f"{quote_name(os.path.realpath(path))} (check who owns the link: "
                          "envctl never heals through one)")


# The daemon's own area in a root (``jobs.layout.AREA``: locks, versions being built). Parts of
# it are private to the daemon; a user's check must not call its tree incomplete for them.
DAEMON_AREA = ".envctl"


def in_daemon_area(rel: str) -> bool:
    return rel == DAEMON_AREA or rel.startswith(DAEMON_AREA + "/")


class _Reporter:
    """Prints findings as they come (text mode) or keeps them for the JSON document."""

    def __init__(self, target: Target, as_json: bool, verbose: bool) -> None:
        self.progress: Progress | None = None  # erased before a line is printed
        self.target = target
        self.as_json = as_json
        self.verbose = verbose
        self.findings: list[dict[str, Any]] = []
        self.daemons = 0  # entries of the daemon's area this user may not read
        self.denied = 0  # other entries that refused us (EACCES): worth a hint

    def __call__(self, f: Finding) -> None:
        if f.action == "error" and os.geteuid() != 0 and in_daemon_area(f.path):
            self.daemons += 1
            f = Finding(f.path, f.kind, "skipped", (), "daemon")
        elif f.action == "error" and f.reason == os.strerror(errno.EACCES):
            self.denied += 1
        if self.as_json:
            self.findings.append({**f.to_dict(), "path": self._abs(f.path)})
            return
        if f.action == "skipped" and not self.verbose:
            return
        if self.progress is not None:
            self.progress.clear()
        what = "; ".join(f.problems)
        detail = {"fixed": f"fixed: {what}", "would-fix": what,
                  "skipped": f"skipped ({f.reason}){': ' + what if what else ''}",
                  "error": f"error: {f.reason}"}[f.action]
        print(f"{quote_name(self._abs(f.path))}: {detail}", flush=False)

    def _abs(self, rel: str) -> str:
        """String concatenation, not pathlib: a path thousands of levels deep costs its length,
        not a Python object per component."""
        root = str(self.target.root.path)
        return f"{root.rstrip('/')}/{rel}" if rel else root


def not_audited(s: HealStats) -> bool:
    """PATH itself vanished, or was replaced (by a symlink...) once the walk reached it."""
    return s.scanned == 0 and s.skipped["vanished"] > 0


def _summary(mode: str, t: Target, s: HealStats) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(s.skipped.items())) or "none"
    path = quote_name(str(t.path))
    head = (f"{path}: scanned {s.scanned}, {s.violations} wrong" if mode == "check"
            else f"{path}: scanned {s.scanned}, fixed {s.entries_fixed}"
            f" (group {s.fixed['group']}, mode {s.fixed['mode']})")
    line = f"{head}, skipped: {skipped}, errors {s.errors}, {s.duration:.2f}s"
    if s.skipped["mount"]:
        line += (f"; INCOMPLETE: {s.skipped['mount']} entries on another mount not "
                 f"{'audited' if mode == 'check' else 'healed'} (-v lists them)")
    if not_audited(s):
        line += "; INCOMPLETE: the path vanished or was replaced before it was reached"
    return line


def exit_code(s: HealStats, dry_run: bool, incomplete: bool = False) -> int:
    """74 when the pass did not cover the tree (errors, entries on another mount, a PATH not
    reached: ``incomplete``), else 1 when a check (dry run) found violations, else 0."""
    if incomplete or s.errors or s.skipped["mount"]:
        return EX_IOERR
    return EX_FAILURE if dry_run and s.violations else EX_OK


def run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and not 1 <= args.concurrency <= 256:
        raise UsageError("--concurrency must be between 1 and 256",
                         hint="leave it out for the default (16 on network filesystems)")
    dry = bool(args.dry_run)
    results = []
    total = HealStats()
    incomplete = False
    for t in targets(args):
        reporter = _Reporter(t, args.json, args.verbose)
        conc = walk_concurrency(t.root.path, args.concurrency)
        healer = Healer(t.root, dry_run=dry, concurrency=conc, on_finding=reporter,
                        report_fixes=args.json or args.verbose)
        progress = Progress(str(t.path), healer.progress, dry,
                            enabled=not args.json and sys.stderr.isatty())
        reporter.progress = progress
        start = time.monotonic()
        try:
            with progress:
                stats = healer.run(t.rel)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise FilesystemError(f"{quote_name(str(t.path))}: {exc.strerror}",
                                  hint="it vanished or was replaced while starting: retry"
                                  ) from None
        except PermissionError as exc:
            raise FilesystemError(f"{quote_name(str(t.path))}: {exc.strerror}",
                                  hint=permission_hint(t.root.gid)) from None
        stats.duration = time.monotonic() - start
        stats.errors -= reporter.daemons
        if reporter.daemons:
            stats.skipped["daemon"] += reporter.daemons
        total.merge(stats)
        incomplete = incomplete or not_audited(stats)
        if args.json:
            results.append({"root": str(t.root.path), "path": str(t.path), "group": t.root.gid,
                            "stats": stats.to_dict(), "findings": reporter.findings})
        else:
            sys.stdout.flush()
            print(_summary("check" if dry else "heal", t, stats))
            if reporter.denied:
                print(f"  hint: {permission_hint(t.root.gid)}", file=sys.stderr)
    code = exit_code(total, dry, incomplete)
    if args.json:
        emit_json({"mode": args.mode, "dry_run": dry, "ok": code == EX_OK,
                   "exit_code": code, "totals": total.to_dict(), "paths": results})
    return code
