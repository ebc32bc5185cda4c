"""``envctl init ROOT --group G``: the set-up steps of the guide, done once and done right.

Why a command: the guide's set-up is six steps (mkdir, chgrp, ``chmod 2775``, the build
account, a daemon configuration, ``conda config --append envs_dirs``) and each has a way to go
subtly wrong — a root without SGID, the same envs_dir listed twice, a root created on the local
disk because the share was not mounted, a configuration whose daemon (root) has no account to
build as. ``init`` does every step, says what it did (``created``, ``changed``,
``unchanged``) and is idempotent: a second run changes nothing. ``--dry-run`` prints the same
steps as ``would ...`` and touches nothing. It never creates a missing parent unless asked
(``--parents``): a missing ``/efs/shared`` usually means EFS is not mounted.

Nothing half-done: every step is first run as a dry run, and each checks what the kernel would
refuse it part-way — giving the root to a group the user is not in, changing a root someone else
owns, creating a file or directory where the user may not write — so a refusal (exit 77, with
the fix) comes before anything changed, and ``--dry-run`` predicts it. Only then are the steps
done. (Run as a user, not root, init is refused most often for exactly these reasons.)
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as cfgmod
from ..accounts import group_name, user_name
from ..errors import EX_OK, ConfigError, FilesystemError, PermissionDenied, UsageError
from .access import group_access, membership_fix, missing_hint
from .output import emit_json, quote_name

# --mode: (others, bits). The root is also sticky (the daemon builds requested envs in it, and
# policy.judge wants its directory sticky): members create their own entries but cannot rename
# or delete the daemon's .envctl and NAME links, or each other's entries.
MODES = {"2770": ("none", 0o3770), "2775": ("read", 0o3775)}

# Capabilities (bits of CapEff) that let a process change a file it does not own / give it to a
# group it is not in: root has them, a container's root may lack them, a user may hold them.
CAP_CHOWN = 1 << 0
CAP_FOWNER = 1 << 3
# The account builds run as (systemd/envctl.sysusers.conf makes the same one at install).
DEFAULT_BUILD_USER = "envctl-build"


def default_kernels_dir(root: Path) -> Path:
    """The one default kernels dir: beside the conda directory that holds ROOT
    (``/efs/shared/.conda/envs`` → ``/efs/shared/share/jupyter/kernels``), outside every root,
    found by Jupyter through ``JUPYTER_PATH`` = its parent."""
    return Path(os.path.normpath(root.parent.parent / "share" / "jupyter" / "kernels"))


@dataclass
class Step:
    """One thing init does: what, and whether it was done (or would be), or already so."""

    what: str
    outcome: str  # created | changed | unchanged | would create | would change | printed

    def to_dict(self) -> dict[str, str]:
        return {"what": self.what, "outcome": self.outcome}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("init", help="set up a shared root (admins): group, SGID, conda, daemon",
                       description="Create ROOT with group G, mode 2775 (or 2770), SGID and "
                       "the sticky bit (members cannot rename or delete entries they do not "
                       "own, such as the daemon's .envctl); "
                       "as root, create the build account (--build-user, default "
                       f"{DEFAULT_BUILD_USER}) unless it exists; "
                       "write (--write-config FILE) or print a daemon configuration for it; add "
                       "it to envs_dirs in the system .condarc (--user: ~/.condarc) unless "
                       "listed; create the kernels directory. Idempotent: a second run changes "
                       "nothing. --dry-run prints every step and changes nothing.")
    p.add_argument("root", metavar="ROOT", help="the shared root, e.g. /efs/shared/.conda/envs")
    p.add_argument("--group", "-g", required=True, metavar="G",
                   help="the group that shares it (name or gid)")
    p.add_argument("--mode", choices=sorted(MODES), default="2775",
                   help="2775: others may read and use envs (default); 2770: group only")
    p.add_argument("--user", action="store_true",
                   help="add the root to ~/.condarc instead of the system /etc/conda/.condarc")
    p.add_argument("--condarc", metavar="FILE",
                   help="add the root to this .condarc instead (e.g. $CONDA_ROOT/.condarc)")
    p.add_argument("--kernels-dir", metavar="DIR",
                   help="the shared Jupyter kernels directory (default: "
                   "ROOT/../../share/jupyter/kernels, as JUPYTER_PATH=ROOT/../../share/jupyter)")
    p.add_argument("--build-user", metavar="NAME", default=DEFAULT_BUILD_USER,
                   help="as root: the unprivileged account the daemon builds as, created when "
                   f"missing (default {DEFAULT_BUILD_USER}); a daemon run as a user builds as "
                   "that user")
    p.add_argument("--write-config", metavar="FILE",
                   help="write the daemon configuration to FILE (if absent) instead of printing "
                   "it")
    p.add_argument("--parents", action="store_true",
                   help="also create missing parent directories (mode 0755)")
    p.add_argument("--dry-run", "-n", action="store_true", help="print the steps, change nothing")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class Plan:
    """What init was asked to do, from the command line."""

    root: Path
    gid: int
    bits: int
    parents: bool
    config: Path | None  # --write-config
    text: str  # the daemon configuration
    condarc: Path
    kernels: Path
    build_user: str | None  # root: the build account (made when missing); else None

    def steps(self, dry: bool) -> list[Step]:
        """Every step in order; each raises (before changing anything) what it cannot do."""
        out = [make_root(self.root, self.gid, self.bits, self.parents, dry)]
        if self.build_user is not None:
            out.append(make_build_user(self.build_user, dry))
        if self.config is not None:
            out.append(write_config(self.config, self.text, dry))
        out.append(add_to_condarc(self.condarc, self.root, dry))
        out.append(make_kernels_dir(self.kernels, dry))
        return out


def run(args: argparse.Namespace) -> int:
    from .. import condarc  # here: YAML is not loaded for other commands

    root = Path(os.path.abspath(args.root))
    others, bits = MODES[args.mode]
    kernels = (Path(os.path.normpath(args.kernels_dir)) if args.kernels_dir else
               default_kernels_dir(root))
    builder = args.build_user if os.geteuid() == 0 else None
    plan = Plan(root=root, gid=_gid(args.group), bits=bits, parents=args.parents,
                config=Path(args.write_config) if args.write_config else None,
                text=daemon_config(root, args.group, others, kernels, builder),
                condarc=(Path(args.condarc) if args.condarc else
                         Path(os.path.expanduser("~/.condarc")) if args.user else
                         condarc.SYSTEM_CONDARC),
                kernels=kernels, build_user=builder)
    dry = bool(args.dry_run)
    steps = plan.steps(dry=True)  # all checks, no change: a refusal leaves nothing half-done
    if not dry:
        try:
            steps = plan.steps(dry=False)
        except OSError as exc:  # what no check could foresee (a race, a full disk, NFS)
            cls = PermissionDenied if isinstance(exc, PermissionError) else FilesystemError
            where = f"{quote_name(str(exc.filename))}: " if exc.filename else ""
            raise cls(f"{where}{exc.strerror}",
                      hint="the steps before this one were done; fix this and run init again "
                      "(it only does what is left)") from None
    if args.json:
        emit_json({"dry_run": dry, "changed": any(s.outcome != "unchanged" for s in steps),
                   "steps": [s.to_dict() for s in steps],
                   "config": None if args.write_config else plan.text})
        return EX_OK
    for s in steps:
        print(f"{s.outcome:<12} {quote_name(s.what)}")
    if not args.write_config:
        print("\n# daemon configuration (save as /etc/envctl/envctld.yaml, or pass "
              "--write-config FILE):")
        sys.stdout.write(plan.text)
    elif not dry:  # what an admin does next, with what was just set up
        shown = quote_name(os.path.abspath(args.write_config))
        print(f"\nnext: start the daemon with it ('envctld --config {shown}'; as a service: "
              f"docs/systemd.md); give users' servers JUPYTER_PATH="
              f"{quote_name(str(kernels.parent))} for the kernels; then run 'envctl doctor' as "
              f"a member of {quote_name(args.group)}")
    return EX_OK


def _gid(group: str) -> int:
    """The gid of a name or number, as the daemon's configuration reads it (a bare gid is one;
    -1 and numbers that would wrap are not)."""
    try:
        return cfgmod.resolve_group(group)
    except KeyError as exc:
        hint = ("name a group ('getent group') or a gid" if group.lstrip("-").isdigit() else
                f"create it first ('groupadd {group}'), or name an existing one "
                "('getent group')")
        raise UsageError(str(exc.args[0]), hint=hint) from None


def _capable(cap: int) -> bool:
    """Whether this process holds capability ``cap`` (root in a container may not)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return (int(line.split()[1], 16) & cap) == cap
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _denied(message: str, hint: str) -> PermissionDenied:
    if os.geteuid() == 0:
        hint = ("even root was refused: a read-only or root-squashing NFS/EFS mount? run init "
                "where root may write (on the server)")
    return PermissionDenied(message, hint=hint)


_AS_ROOT = "or run init as root ('sudo envctl init ...')"


def _check_can_create(path: Path, hint: str) -> None:
    """Refuse now what creating ``path`` (and missing parents) would be refused later: the
    nearest directory on the way that exists must be one this user may write in."""
    base = path.parent
    while not os.path.lexists(base):
        base = base.parent
    if not os.path.isdir(base):
        raise FilesystemError(f"cannot create {quote_name(str(path))}: "
                              f"{quote_name(str(base))} is not a directory", hint=hint)
    if not os.access(base, os.W_OK | os.X_OK, effective_ids=True):
        verb = "replace" if os.path.lexists(path) else "create"  # a .condarc: by a rename
        raise _denied(f"cannot {verb} {quote_name(str(path))}: you "
                      f"({user_name(os.geteuid())}) may not write in {quote_name(str(base))}",
                      hint)


def _check_can_chgrp(root: Path, gid: int) -> None:
    """chgrp to a group needs membership in it (in this session) or CAP_CHOWN."""
    if _capable(CAP_CHOWN):
        return
    acc = group_access(gid)
    fix = membership_fix(acc)
    if fix is not None:
        raise _denied(f"you ({acc.user}) cannot give {quote_name(str(root))} to group "
                      f"{acc.group}: only its members and root can", f"{fix}; {_AS_ROOT}")


_WOULD = {"created": "would create", "changed": "would change"}


def _outcome(changed: bool, dry: bool, verb: str) -> str:
    """``verb`` (created/changed) when done, ``would ...`` in a dry run, else unchanged."""
    if not changed:
        return "unchanged"
    return _WOULD[verb] if dry else verb


def make_root(root: Path, gid: int, bits: int, parents: bool, dry: bool) -> Step:
    """The root: created, or its group and mode set; a symlink or a file there is refused."""
    what = f"{root} (group {group_name(gid)}, mode {bits:04o})"
    if not os.path.isdir(root.parent):
        if not parents:
            raise FilesystemError(f"{quote_name(str(root.parent))} does not exist",
                                  hint=missing_hint(root) + "; or pass --parents to create it")
        if not dry:  # the dry run checked below that they can be created
            os.makedirs(root.parent, 0o755, exist_ok=True)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        _check_can_create(root, f"name a ROOT in a directory you may write, {_AS_ROOT}")
        _check_can_chgrp(root, gid)
        if not dry:
            os.mkdir(root, 0o700)  # no window in which it is open with the wrong group
            try:
                os.chown(root, -1, gid)
                os.chmod(root, bits)
            except OSError:
                os.rmdir(root)  # not left private and half set up
                raise
        return Step(what, _outcome(True, dry, "created"))
    if not stat.S_ISDIR(st.st_mode):
        raise FilesystemError(f"{quote_name(str(root))} exists and is not a directory",
                              hint="move it away, or name another root")
    regroup = st.st_gid != gid
    remode = stat.S_IMODE(st.st_mode) != bits
    if (regroup or remode) and st.st_uid != os.geteuid() and not _capable(
            (CAP_CHOWN if regroup else 0) | (CAP_FOWNER if remode else 0)):
        raise _denied(f"{quote_name(str(root))} belongs to {user_name(st.st_uid)}: only its "
                      "owner or root can change its group and mode",
                      f"ask {user_name(st.st_uid)}, {_AS_ROOT}")
    if regroup:
        _check_can_chgrp(root, gid)
    if not dry:
        if regroup:
            os.chown(root, -1, gid)
        if remode:
            os.chmod(root, bits)
    return Step(what, _outcome(regroup or remode, dry, "changed"))


def add_to_condarc(target: Path, root: Path, dry: bool) -> Step:
    """``root`` appended to ``envs_dirs`` in ``target`` unless listed: a file that cannot be
    read or parsed, or replaced (through a temporary file beside it), is refused first."""
    from .. import condarc, safeyaml

    try:
        changed = condarc.add_envs_dir(target, root, dry_run=True)
    except PermissionError:
        raise _denied(f"cannot read {quote_name(str(target))}: permission denied",
                      f"name a .condarc you may read and write (--condarc FILE), {_AS_ROOT}"
                      ) from None
    except OSError as exc:
        raise FilesystemError(f"cannot read {quote_name(str(target))}: {exc.strerror}",
                              hint="name another .condarc (--condarc FILE)") from None
    except (safeyaml.YAMLError, ValueError) as exc:
        raise FilesystemError(f"{quote_name(str(target))} is not a valid .condarc: "
                              f"{getattr(exc, 'problem', None) or exc}",
                              hint="fix it (conda cannot read it either), or name another "
                              "(--condarc FILE)") from None
    if not changed:
        return Step(f"envs_dirs in {target}: lists {root}", "unchanged")
    _check_can_create(target, (
        "as a user, pass --user (your ~/.condarc) or --condarc FILE; the system file needs "
        "root" if target == condarc.SYSTEM_CONDARC else f"name a .condarc you may write, "
        f"{_AS_ROOT}"))
    if dry:
        return Step(f"envs_dirs in {target}: append {root}", "would change")
    condarc.add_envs_dir(target, root)
    return Step(f"envs_dirs in {target}: appended {root}", "changed")


def make_build_user(name: str, dry: bool) -> Step:
    """The account a root daemon builds as: a system account of its own group, no home, no
    shell (as ``systemd/envctl.sysusers.conf`` makes it). Without one every build is refused
    and the daemon does not start."""
    what = f"build account {name}"
    try:
        pwd.getpwnam(name)
        return Step(what, "unchanged")
    except KeyError:
        pass
    useradd = shutil.which("useradd", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if useradd is None:
        raise FilesystemError(f"cannot create the build account {name}: no useradd here",
                              hint="create it yourself, or pass --build-user with an "
                              "existing unprivileged account")
    if not dry:
        try:
            import grp

            grp.getgrnam(name)
            group = ["--gid", name]
        except KeyError:
            group = ["--user-group"]
        res = subprocess.run([useradd, "--system", "--no-create-home", "--shell",
                              "/usr/sbin/nologin", "--comment", "envctl environment builds",
                              *group, name], capture_output=True, text=True)
        if res.returncode != 0:
            raise FilesystemError(f"useradd {name}: {res.stderr.strip() or res.returncode}",
                                  hint="create the account yourself, or pass --build-user")
    return Step(what, _outcome(True, dry, "created"))


def make_kernels_dir(path: Path, dry: bool) -> Step:
    what = f"kernels directory {path}"
    if os.path.isdir(path):
        return Step(what, "unchanged")
    if os.path.lexists(path):
        raise FilesystemError(f"{quote_name(str(path))} exists and is not a directory",
                              hint="move it away, or pass --kernels-dir DIR")
    _check_can_create(path, "pass --kernels-dir DIR, a directory you may create (Jupyter "
                      f"finds it through JUPYTER_PATH=its parent), {_AS_ROOT}")
    if not dry:
        os.makedirs(path, 0o755, exist_ok=True)
        os.chmod(path, 0o755)
    return Step(what, _outcome(True, dry, "created"))


def daemon_config(root: Path, group: str, others: str, kernels: Path,
                  build_user: str | None) -> str:
    """A minimal daemon configuration for this root, checked by the daemon's own loader (an
    unknown group or key would be caught here, not at the daemon's start). ``build_user``
    (root's init) is made by a step when missing, so it is checked once it exists."""
    import yaml

    requests: dict[str, Any] = {"root": str(root), "allow_groups": [group]}
    if build_user is not None:
        requests["build_user"] = build_user
    data = {"roots": [{"path": str(root), "group": group, "others": others}],
            "socket": {"group": group}, "requests": requests,
            "kernels": {"dir": str(kernels)}}
    builds = ("" if build_user is not None else
              " A daemon run as root also needs requests.build_user (an unprivileged account).")
    text = ("# envctld configuration written by 'envctl init'; every key and its default:\n"
            f"# config/envctld.yaml.{builds}\n"
            + yaml.safe_dump(data, default_flow_style=False, sort_keys=False))
    check = yaml.safe_load(text)
    if build_user is not None:
        try:
            pwd.getpwnam(build_user)
        except KeyError:
            del check["requests"]["build_user"]  # not made yet (a dry run, or the step ahead)
    try:
        cfgmod.parse(check, source="<envctl init>")
    except ConfigError as err:
        raise ConfigError(err.message, hint="fix the option it names") from None
    return text


def write_config(path: Path, text: str, dry: bool) -> Step:
    """Written when absent; an existing file is never overwritten (it may carry an admin's
    settings): unchanged when it is the same, else an error that says what to do."""
    what = f"daemon configuration {path}"
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _check_can_create(path, f"name a FILE in a directory you may write (or leave out "
                          f"--write-config: the configuration is printed), {_AS_ROOT}")
        if not dry:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
        return Step(what, _outcome(True, dry, "created"))
    if old == text:
        return Step(what, "unchanged")
    raise FilesystemError(f"{quote_name(str(path))} exists with other settings: left as it is",
                          hint="merge the root into it by hand (run without --write-config to "
                          "print the configuration), or name another file")
