"""``envctl doctor [NAME]``: the troubleshooting list of the users' guide, run for you.

Why: "Permission denied" on a shared root has a handful of usual causes — not in the root's
group, in it but not in this session, a umask that strips group write with no daemon to heal it,
a root without SGID, a share that is not mounted, a daemon that is down or wedged, a
``.condarc`` that conda never reads — and each has a different fix. One check is about the
machine, not the user: a kernel that lets anyone hard-link others' files (``fs.protected_hardlinks
= 0``) lets a member share another user's private file through a root. ``doctor`` checks every one
as the user who runs it (no root needed), prints one line per check (✓, or ✗ and the fix), and
exits 0 when all is well, 1 when something is not. With NAME it also checks one environment: its
tree, who built it and when, whether its python runs (as the user; run as root, not at all:
an env's interpreter and its ``.pth`` files are its members' code, never run as root), why a
``pip install`` into it says "Permission denied" (a version envctl built is read-only by design)
and what to run instead, whether its kernel is registered.

Roots come from the daemon (``status``), or from ``--config FILE`` / ``--root PATH`` when none
answers (or to check a root the daemon does not watch). Nothing here changes anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config as cfgmod
from ..accounts import group_name, person
from ..errors import EX_FAILURE, EX_OK, DaemonUnavailable, EnvctlError
from ..fsinfo import mount_of
from ..status import DaemonStatus
from .access import group_access, membership_fix, missing_hint
from .output import emit_json, hint_of, local_time, quote_name
from .parsing import timeout_seconds

if TYPE_CHECKING:
    from ..condarc import EnvsDirs

PROBLEMS_SHOWN = 5  # violations listed for an env (the count says how many in all)
PYTHON_TIMEOUT = 60.0  # a first import on a cold network filesystem can take a while


@dataclass
class Check:
    """One line of the report: what was checked, what was found, and the fix when it failed."""

    check: str
    ok: bool
    summary: str
    fix: str | None = None
    subject: str | None = None  # the root or env it is about

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "summary": self.summary, "fix": self.fix,
                "subject": self.subject}


@dataclass
class RootInfo:
    """A root to check: its path, and its group when a configuration says what it must be."""

    path: Path
    gid: int | None = None


@dataclass
class Context:
    """What the checks learn along the way and share: the daemon's answer, the roots."""

    daemon: DaemonStatus | None = None
    roots: list[RootInfo] = field(default_factory=list)
    requests_root: Path | None = None
    kernels_dir: Path | None = None
    checks: list[Check] = field(default_factory=list)

    def add(self, *args: Any, **kw: Any) -> Check:
        c = Check(*args, **kw)
        self.checks.append(c)
        return c


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check that shared environments work for you",
                       description="Check, as you, everything that makes shared environments "
                       "work: each root exists and is mounted, you are in its group (in this "
                       "session too), your umask, the root's group/mode/SGID, the daemon is up "
                       "and not stale, conda's envs_dirs lists the root, your JupyterHub "
                       "identity, the kernel's hardlink protection. With NAME: that "
                       "environment's tree, builder, python and kernel. One line per check; "
                       "exit 0 all good, 1 problems found.")
    p.add_argument("name", nargs="?", metavar="NAME", help="also check this environment")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", "-c", metavar="FILE",
                     help="take roots from FILE (the daemon's configuration)")
    src.add_argument("--root", metavar="PATH", action="append",
                     help="check this root (repeatable; default: the daemon's roots)")
    p.add_argument("--stale", type=float, default=300.0, metavar="SECONDS",
                   help="call the daemon stale after this long without progress (default 300)")
    p.add_argument("--timeout", type=timeout_seconds, default=10.0, metavar="SECONDS",
                   help="how long to wait for the daemon's answer (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ctx = Context()
    conf = cfgmod.load(args.config) if args.config else None
    socket = args.socket or (str(conf.socket.path) if conf is not None else None)
    if conf is not None:
        ctx.roots = [RootInfo(r.path, r.gid) for r in conf.roots]
        ctx.requests_root = conf.requests_root.path
        ctx.kernels_dir = conf.kernels.dir
    elif args.root:
        ctx.roots = [RootInfo(Path(os.path.abspath(p))) for p in args.root]
    check_daemon(ctx, socket, args.timeout, args.stale)
    if not ctx.roots and ctx.daemon is not None:
        ctx.roots = [RootInfo(Path(r.path)) for r in ctx.daemon.roots or [] if r.path]
    if not ctx.roots:
        ctx.add("roots", False, "no root to check: the daemon did not say, and none was given",
                "name one: 'envctl doctor --root /efs/shared/.conda/envs', or --config FILE")
    from ..condarc import envs_dirs  # here: YAML is not loaded for other commands

    umask = current_umask()
    envs = envs_dirs()
    for root in ctx.roots:
        check_root(ctx, root, umask, envs)
    check_hardlinks(ctx)
    check_condarc_files(ctx, envs)
    if ctx.daemon is not None:
        check_hub(ctx, socket, args.timeout)
        check_limits(ctx)
    if args.name:
        check_env(ctx, args.name, socket, args.timeout)
    code = EX_OK if all(c.ok for c in ctx.checks) else EX_FAILURE
    if args.json:
        emit_json({"ok": code == EX_OK, "exit_code": code,
                   "checks": [c.to_dict() for c in ctx.checks]})
    else:
        print_report(ctx.checks)
    return code


def print_report(checks: list[Check]) -> None:
    """One line per check; the fix indented below a failed one. ✓/✗ where the terminal's
    encoding has them (a C locale gets OK/!!)."""
    enc = sys.stdout.encoding or "ascii"
    try:
        "✓✗".encode(enc)
        good, bad = "✓", "✗"
    except (UnicodeEncodeError, LookupError):
        good, bad = "OK", "!!"
    for c in checks:
        print(f"{good if c.ok else bad} {c.check}: {c.summary}")
        if not c.ok and c.fix:
            print(f"    fix: {c.fix}")


# -- the daemon -------------------------------------------------------------------------------

def _client(socket: str | None, timeout: float) -> Any:
    from ..api.client import Client  # not loaded unless the daemon is asked

    return Client(socket, timeout=timeout)


def check_daemon(ctx: Context, socket: str | None, timeout: float, stale: float) -> None:
    """Reachable, ready, making progress; the heal lag is what a user waits for."""
    try:
        with _client(socket, timeout) as client:
            data = client.call("status")
    except EnvctlError as err:  # refused by the socket's mode, it may be healing all the same
        ctx.add("daemon", False, err.message, hint_of(err) + (
            "; until it runs nothing heals what you write (files may lack group access)"
            if isinstance(err, DaemonUnavailable) else ""))
        return
    st = ctx.daemon = DaemonStatus.from_dict(data)
    head = f"envctld {st.version or '?'} (pid {st.pid or '?'})"
    if st.failure:
        ctx.add("daemon", False, f"{head} reports a failure: {quote_name(str(st.failure))}",
                "an administrator reads its log ('journalctl -u envctld') and restarts it")
        return
    if st.ready is False:
        ctx.add("daemon", False, f"{head} is up but not ready (its first scan is running)",
                "wait a minute and run doctor again ('envctl status' shows progress)")
        return
    age = st.progress_age_s
    if isinstance(age, (int, float)) and age > stale:
        ctx.add("daemon", False, f"{head} shows no progress for {age:.0f}s: wedged",
                "an administrator restarts it ('systemctl restart envctld')")
        return
    queue = sum(r.queue or 0 for r in st.roots or [])
    lag = f"heal queue {queue}" + (f", last progress {age:.1f}s ago"
                                   if isinstance(age, (int, float)) else "")
    ctx.add("daemon", True, f"{head} is up and ready; {lag}")


def check_limits(ctx: Context) -> None:
    """One line: the daemon's per-build limits, and whether its cgroup controllers enforce
    them (a missing one: builds run without that limit). Only when it builds envs."""
    limits = ctx.daemon.limits if ctx.daemon is not None else None
    if not isinstance(limits, dict):
        return
    missing = [str(c) for c in limits.get("missing") or []]
    shown = ", ".join(f"{k} {_size(limits.get(k))}" for k in ("memory", "disk")) + \
        f", tasks {limits.get('tasks')}, cpu weight {limits.get('cpu_weight')}"
    if not missing:
        ctx.add("build limits", True, f"{shown}; enforced by the cgroup controllers "
                f"{', '.join(str(c) for c in limits.get('controllers') or [])}")
        return
    ctx.add("build limits", False, f"{shown}; NOT enforced: the daemon has no cgroup "
            f"controller {', '.join(missing)} (builds run without "
            f"{'that limit' if len(missing) == 1 else 'those limits'})",
            "an administrator delegates them to envctld: Delegate=yes in its unit on a host "
            "with cgroup v2 (or the v1 hierarchies writable by root); see the daemon's log "
            "line jobs-containment for why")


def _size(value: object) -> str:
    return cfgmod.format_size(value) if isinstance(value, int) else "?"


def check_hub(ctx: Context, socket: str | None, timeout: float) -> None:
    """On a JupyterHub the daemon must know which hub user you are (only when that applies:
    a token in the environment, or a uid the daemon says is shared)."""
    from ..api.client import HUB_TOKEN_ENV

    try:
        with _client(socket, timeout) as client:
            me = client.call("whoami")
    except EnvctlError as err:
        if os.environ.get(HUB_TOKEN_ENV):
            ctx.add("hub identity", False, err.message, hint_of(err))
        return
    if me.get("hub_verified"):
        ctx.add("hub identity", True, f"hub user {quote_name(str(me.get('hub_user')))} "
                "(verified by JupyterHub)")
    elif me.get("shared_uid"):
        ctx.add("hub identity", False, f"uid {me.get('uid')} is shared by the hub's users and "
                "the daemon could not tell which one you are",
                "run envctl in a terminal of your JupyterHub server (it carries "
                f"{HUB_TOKEN_ENV}); if it does, restart the server from the hub's control panel")


# -- a root -----------------------------------------------------------------------------------

def current_umask() -> int:
    """This process's umask (inherited from the shell that ran us), read without changing it."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_root(ctx: Context, root: RootInfo, umask: int, envs: EnvsDirs) -> None:
    shown = quote_name(str(root.path))
    try:
        st = os.stat(root.path)
    except FileNotFoundError:
        ctx.add("root", False, f"{shown} does not exist", missing_hint(root.path), str(root.path))
        return
    except PermissionError:
        gid = root.gid if root.gid is not None else _parent_gid(root.path)
        fix = (membership_fix(group_access(gid)) if gid is not None else None)
        ctx.add("root", False, f"{shown} cannot be reached: permission denied",
                fix or "check the directories on the way: 'namei -l " + shown + "'",
                str(root.path))
        return
    if not stat.S_ISDIR(st.st_mode):
        ctx.add("root", False, f"{shown} is not a directory",
                "name the root directory of the shared environments", str(root.path))
        return
    mnt = mount_of(root.path)
    where = "network or FUSE: the daemon polls it" if mnt.remote else "local disk"
    ctx.add("root", True, f"{shown} exists, on {mnt.fstype} mounted at "
            f"{quote_name(mnt.mount_point)} ({where})", subject=str(root.path))
    gid = root.gid if root.gid is not None else st.st_gid
    acc = group_access(gid)
    as_root = os.geteuid() == 0
    fix = None if as_root else membership_fix(acc)
    if as_root:  # the kernel lets root in whatever its groups (unless squashed)
        summary = (f"you are root: group {acc.group}'s permissions do not limit you"
                   + (" (unless the export squashes root: run doctor as a member to see what "
                      "members see)" if mnt.remote else ""))
    elif fix is None:
        summary = f"you ({acc.user}) are in group {acc.group}, and this session has it"
    else:
        summary = f"{shown} belongs to group {acc.group}, which this session lacks"
    ctx.add("group", fix is None, summary, fix, str(root.path))
    check_umask(ctx, root, umask)
    check_mode(ctx, root, st, gid)
    check_envs_dirs(ctx, root, envs, acc.group)


def _parent_gid(path: Path) -> int | None:
    try:
        return os.stat(path.parent).st_gid
    except OSError:
        return None


def _watched(ctx: Context, root: Path) -> bool:
    """Whether the daemon answered and watches ``root`` (so it heals what users write)."""
    if ctx.daemon is None:
        return False
    return any(r.path == str(root) for r in ctx.daemon.roots or [])


def _group_bits(mask: int) -> str:
    """The group permissions set in ``mask``, as ``rwx`` letters."""
    return "".join(c for bit, c in ((0o040, "r"), (0o020, "w"), (0o010, "x")) if mask & bit)


def check_umask(ctx: Context, root: RootInfo, umask: int) -> None:
    """What the umask means here: group access to what you create, or the daemon's healing."""
    shown = f"umask {umask:04o}"
    lost = _group_bits(umask)
    if not lost:
        ctx.add("umask", True, f"{shown}: what you create is usable by your group",
                subject=str(root.path))
    elif os.geteuid() == 0:  # protected_owners: [0] by default
        ctx.add("umask", True, f"{shown} removes group {lost} from what you create, and no "
                "daemon heals root's files (roots[].protected_owners): create what members "
                "change as a member, or with 'umask 002'", subject=str(root.path))
    elif _watched(ctx, root.path):
        ctx.add("umask", True, f"{shown} removes group {lost} from what you create; the daemon "
                "heals it within seconds", subject=str(root.path))
    else:
        ctx.add("umask", False, f"{shown} removes group {lost} from what you create, and no "
                "daemon heals this root", "run 'umask 002' (and add it to ~/.bashrc), or ask "
                "an administrator to run envctld on this root", str(root.path))


def check_mode(ctx: Context, root: RootInfo, st: os.stat_result, gid: int) -> None:
    """The root itself: its group, group rwx, SGID (so new entries inherit the group), and not
    writable by everyone (then anyone on the host, not just the group, adds entries to it)."""
    shown = quote_name(str(root.path))
    mode = stat.S_IMODE(st.st_mode)
    wrong = []
    if st.st_gid != gid:
        wrong.append(f"group {group_name(st.st_gid)}, want {group_name(gid)}")
    if mode & 0o070 != 0o070:
        wrong.append(f"group lacks {_group_bits(~mode)}")
    if not mode & stat.S_ISGID:
        wrong.append("no SGID: new entries will not inherit the group")
    if mode & stat.S_IWOTH:
        wrong.append("writable by everyone: any user of the host can add entries, not just "
                     "the group")
    desc = f"group {group_name(st.st_gid)}, mode {mode:04o}"
    if not wrong:
        ctx.add("root mode", True, f"{shown}: {desc}", subject=str(root.path))
        return
    want = 0o2000 | (mode & 0o1705) | 0o070  # the sticky bit kept, o+w taken
    ctx.add("root mode", False, f"{shown}: {desc}: " + "; ".join(wrong),
            f"an administrator runs 'chgrp {group_name(gid)} {shown} && chmod {want:04o} "
            f"{shown}' (or 'envctl init'); a running daemon heals group and SGID at its next "
            "pass" + ("; it leaves others' write bit as it is under roots[].others: keep"
                      if mode & stat.S_IWOTH else ""), str(root.path))


PROTECTED_HARDLINKS = Path("/proc/sys/fs/protected_hardlinks")


def check_hardlinks(ctx: Context) -> None:
    """The kernel's fs.protected_hardlinks: at 0 anyone may hard-link any file they can reach,
    even one they may not read, so a group member can link another user's private file into a
    root, where the healer (judging the inode, not how it got there) makes it group-readable
    and -writable. Not shown where /proc/sys cannot be read (some containers): nothing can be
    said there."""
    try:
        value = PROTECTED_HARDLINKS.read_text(encoding="ascii").strip()
    except OSError:
        return
    if value != "0":
        ctx.add("hardlinks", True, f"fs.protected_hardlinks = {value}: users can hard-link only "
                "files they own or may read and write")
        return
    ctx.add("hardlinks", False, "fs.protected_hardlinks = 0: a member of a root's group can "
            "hard-link another user's private file into the root, and the healer would share "
            "it with the group", "an administrator runs 'sysctl fs.protected_hardlinks=1' and "
            "keeps it in /etc/sysctl.d/ (most distributions set it by default)")


def check_envs_dirs(ctx: Context, root: RootInfo, envs: EnvsDirs, group: str) -> None:
    """conda lists a root's envs only when envs_dirs names it; only the root where envs are
    built matters when a configuration says which. ``group``: the root's, for the fix."""
    if ctx.requests_root is not None and root.path != ctx.requests_root:
        return
    shown = quote_name(str(root.path))
    source = envs.source_of(root.path)
    if source is not None:
        ctx.add("envs_dirs", True, f"conda lists environments from {shown} (from "
                f"{quote_name(source)})", subject=str(root.path))
    else:
        ctx.add("envs_dirs", False, f"conda's envs_dirs does not list {shown}: 'conda env list'"
                " will not show its environments",
                f"run 'conda config --append envs_dirs {shown}' (or an administrator runs "
                f"'envctl init {shown} --group {group}' for everyone)", str(root.path))


def check_condarc_files(ctx: Context, envs: EnvsDirs) -> None:
    for path, reason in envs.broken:
        ctx.add("condarc", False, f"conda cannot read {quote_name(path)}: {reason}",
                "fix or remove that file (conda fails on it too)", path)


# -- one environment --------------------------------------------------------------------------

def check_env(ctx: Context, name: str, socket: str | None, timeout: float) -> None:
    """The env as the daemon recorded it (status, builder, last build, kernel), then its tree,
    audited as you, its python, run as you (never as root), whether it is a read-only version,
    and its kernel (ipykernel found from its files: none of its code runs for that)."""
    info: dict[str, Any] | None = None
    if ctx.daemon is not None:
        try:
            with _client(socket, timeout) as client:
                info = client.call("env-show", name=name)
        except EnvctlError as err:
            ctx.add("env", False, err.message, hint_of(err), name)
            return
        status = info.get("status")
        built = (f"version {info.get('current')} built by "
                 f"{quote_name(person(info.get('requester')))} on "
                 f"{local_time(info.get('built_at'))}"
                 f", owner {quote_name(person(info.get('owner')))}")
        ctx.add("env", status == "ready", f"{name}: {status}; {built}",
                None if status == "ready" else "see 'envctl env show " + name + "'", name)
    prefix = Path(info["prefix"]) if info and info.get("prefix") else _find_prefix(ctx, name)
    if prefix is None or not os.path.isdir(prefix):
        ctx.add("env tree", False, f"no environment {name!r} in "
                + ", ".join(quote_name(str(r.path)) for r in ctx.roots),
                "list them: 'envctl env list' or 'conda env list'", name)
        return
    from ..jobs.kernels import launcher_in

    check_env_tree(ctx, name, prefix)
    check_python(ctx, name, prefix)
    real = Path(os.path.realpath(prefix))
    check_frozen(ctx, name, real)
    check_kernel(ctx, name, info, launcher_in(None, str(real)))


def _find_prefix(ctx: Context, name: str) -> Path | None:
    roots = [ctx.requests_root] if ctx.requests_root else [r.path for r in ctx.roots]
    return next((r / name for r in roots if os.path.isdir(r / name)), None)


def check_env_tree(ctx: Context, name: str, prefix: Path) -> None:
    """The env's real tree (the stable path is a symlink to its current version), audited with
    its root's policy; the first few violations shown."""
    from ..errors import ExtensionMissing
    from ..heal import Finding, Healer

    real = Path(os.path.realpath(prefix))
    root = next((r for r in ctx.roots if real == r.path or r.path in real.parents), None)
    if root is None:
        ctx.add("env tree", False, f"{quote_name(str(real))} is outside every root",
                "envs live under a shared root; rebuild it there", name)
        return
    gid = root.gid if root.gid is not None else os.stat(root.path).st_gid
    policy = cfgmod.single_root(root.path, str(gid)).roots[0]
    found: list[Finding] = []
    healer = Healer(policy, dry_run=True, on_finding=found.append)
    try:
        stats = healer.run(str(real.relative_to(root.path)))
    except ExtensionMissing as err:
        ctx.add("env tree", False, err.message, hint_of(err), name)
        return
    except OSError as exc:
        ctx.add("env tree", False, f"{quote_name(str(real))}: {exc.strerror}",
                membership_fix(group_access(gid)) or "check 'namei -l PATH'", name)
        return
    bad = [f for f in found if f.action in ("would-fix", "error")]
    if not bad:
        ctx.add("env tree", True, f"{quote_name(str(real))}: {stats.scanned} entries, all "
                "shared correctly", subject=name)
        return
    shown = "; ".join(f"{quote_name(f.path)}: " + ("; ".join(f.problems) or str(f.reason))
                      for f in bad[:PROBLEMS_SHOWN])
    more = f" (and {len(bad) - PROBLEMS_SHOWN} more)" if len(bad) > PROBLEMS_SHOWN else ""
    ctx.add("env tree", False, f"{len(bad)} of {stats.scanned} entries are wrong: {shown}{more}",
            "the daemon heals them if it runs; else an administrator runs 'envctl heal "
            f"{quote_name(str(prefix))} --config /etc/envctl/envctld.yaml'", name)


# Only the version is asked: isolated (no PYTHON* variables, no user site) and without ``site``,
# so none of the env's ``.pth`` files or packages run.
_VERSION = "import sys; print(sys.version.split()[0])"


def check_python(ctx: Context, name: str, prefix: Path) -> None:
    """Whether the env's python starts, as you: ``-I -S``, a timeout. Run as root, doctor does
    not run it at all: an env's interpreter is its members' code, and running it as another
    account (``nobody``) would not contain it either — a process that starts its own session
    outlives doctor's kill, as an account other services share."""
    python = prefix / "bin" / "python"
    if not os.path.lexists(python):
        ctx.add("python", True, f"{name} has no bin/python (not a Python environment)",
                subject=name)
        return
    if os.geteuid() == 0:
        ctx.add("python", True, "not run: doctor runs as root, and root never runs an env's "
                "code (run 'envctl doctor' as a member of the root's group to try it)",
                subject=name)
        return
    try:
        proc = subprocess.Popen([str(python), "-I", "-S", "-c", _VERSION], cwd="/",
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    except OSError as exc:
        ctx.add("python", False, f"{quote_name(str(python))} does not run: {exc.strerror}",
                "check the env's tree above; rebuild it with 'envctl request create --replace'",
                name)
        return
    try:
        out, err = proc.communicate(timeout=PYTHON_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        ctx.add("python", False, f"{quote_name(str(python))} did not answer within "
                f"{PYTHON_TIMEOUT:g}s", "check the env's tree above and its filesystem", name)
        return
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        ctx.add("python", False, f"{quote_name(str(python))} exits {proc.returncode}: "
                f"{quote_name(last)}", "check the env's tree above; rebuild it with "
                "'envctl request create --replace'", name)
        return
    ctx.add("python", True, f"python {(out.split() or ['?'])[0]} runs", subject=name)


def check_frozen(ctx: Context, name: str, real: Path) -> None:
    """A version envctl built is read-only by design: a ``pip install`` or ``conda install``
    into it says "Permission denied". Say so, with the two ways to get more packages."""
    area = real.parent.parent
    if area.name != "envs" or area.parent.name != ".envctl":
        return
    try:
        frozen = not os.stat(real).st_mode & 0o222
    except OSError:
        return
    state = "read-only by design" if frozen else "the daemon's (it becomes read-only)"
    ctx.add("installing", True, f"{name} is version {real.name}, {state}: 'pip install' or "
            "'conda install' into it fails with Permission denied; for more packages, "
            f"'envctl env add {name} PKG...' builds a new version (its owner and admins), "
            f"'envctl env layer {name}' makes your own layer on top where pip install works",
            subject=name)


def jupyter_kernel_dirs() -> list[Path]:
    """Where Jupyter looks for kernelspecs for this user (``jupyter --paths``, data part)."""
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    paths += [os.path.join(data, "jupyter"), "/usr/local/share/jupyter", "/usr/share/jupyter"]
    return [Path(p) / "kernels" for p in paths]


def check_kernel(ctx: Context, name: str, info: dict[str, Any] | None, has_kernel: bool) -> None:
    """An env with ipykernel should be a kernel in the launcher: registered by the daemon in
    kernels.dir, and found by Jupyter through JUPYTER_PATH."""
    from ..jobs.kernels import kernel_name

    kname = kernel_name(name)
    if kname is None:
        ctx.add("kernel", True, f"{name!r} cannot be a kernel name: no kernel expected",
                subject=name)
        return
    dirs = jupyter_kernel_dirs() + ([ctx.kernels_dir] if ctx.kernels_dir else [])
    # os.path.isfile, as Jupyter looks: a directory this user cannot enter has no kernel
    found = next((d / kname for d in dirs if os.path.isfile(d / kname / "kernel.json")), None)
    if found is not None:
        ctx.add("kernel", True, f"kernel {kname} registered in {quote_name(str(found.parent))}",
                subject=name)
    elif info is not None and info.get("kernel"):
        ctx.add("kernel", False, f"the daemon registered kernel {kname}, but Jupyter does not "
                "look where it is", "set JUPYTER_PATH to the parent of the daemon's kernels.dir"
                " in your server's environment (z2jh: singleuser.extraEnv)", name)
    elif has_kernel:
        ctx.add("kernel", False, f"{name} has ipykernel but no kernel {kname} is registered",
                "an administrator runs 'envctl kernels sync' (and sets kernels.dir)", name)
    else:
        ctx.add("kernel", True, f"{name} has no ipykernel: no kernel expected", subject=name)
