"""``envctl init ROOT --group G``: the set-up steps of the guide, done once and done right.

Why a command: the guide's set-up is five steps (mkdir, chgrp, ``chmod 2775``, a daemon
configuration, ``conda config --append envs_dirs``) and each has a way to go subtly wrong — a
root without SGID, the same envs_dir listed twice, a root created on the local disk because the
share was not mounted. ``init`` does every step, says what it did (``created``, ``changed``,
``unchanged``) and is idempotent: a second run changes nothing. ``--dry-run`` prints the same
steps as ``would ...`` and touches nothing. It never creates a missing parent unless asked
(``--parents``): a missing ``/efs/shared`` usually means EFS is not mounted.
"""

from __future__ import annotations

import argparse
import grp
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as cfgmod
from ..errors import EX_OK, ConfigError, FilesystemError, UsageError
from .access import missing_hint
from .output import emit_json, quote_name

# --mode: (others, bits). The root is also sticky (the daemon builds requested envs in it, and
# policy.judge wants its directory sticky): members create their own entries but cannot rename
# or delete the daemon's .envctl and NAME links, or each other's entries.
MODES = {"2770": ("none", 0o3770), "2775": ("read", 0o3775)}


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
    p.add_argument("--write-config", metavar="FILE",
                   help="write the daemon configuration to FILE (if absent) instead of printing "
                   "it")
    p.add_argument("--parents", action="store_true",
                   help="also create missing parent directories (mode 0755)")
    p.add_argument("--dry-run", "-n", action="store_true", help="print the steps, change nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import condarc  # here: YAML is not loaded for other commands

    root = Path(os.path.abspath(args.root))
    others, bits = MODES[args.mode]
    gid = _gid(args.group)
    kernels = Path(os.path.normpath(args.kernels_dir or root.parent.parent / "share" /
                                    "jupyter" / "kernels"))
    steps: list[Step] = []
    dry = bool(args.dry_run)
    steps.append(make_root(root, gid, bits, args.parents, dry))
    text = daemon_config(root, args.group, others, kernels)
    if args.write_config:
        steps.append(write_config(Path(args.write_config), text, dry))
    target = (Path(args.condarc) if args.condarc else
              Path(os.path.expanduser("~/.condarc")) if args.user else condarc.SYSTEM_CONDARC)
    changed = condarc.add_envs_dir(target, root, dry_run=dry)
    steps.append(Step(f"envs_dirs in {target} lists {root}",
                      _outcome(changed, dry, "changed")))
    steps.append(make_dir(kernels, 0o755, dry, "kernels directory"))
    if args.json:
        emit_json({"dry_run": dry, "changed": any(s.outcome != "unchanged" for s in steps),
                   "steps": [s.to_dict() for s in steps],
                   "config": None if args.write_config else text})
        return EX_OK
    for s in steps:
        print(f"{s.outcome:<12} {quote_name(s.what)}")
    if not args.write_config:
        print("\n# daemon configuration (save as /etc/envctl/envctld.yaml, or pass "
              "--write-config FILE):")
        sys.stdout.write(text)
    return EX_OK


def _gid(group: str) -> int:
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"no group {group!r}",
                         hint="create it first ('groupadd " + group + "'), or name an "
                         "existing one ('getent group')") from None


_WOULD = {"created": "would create", "changed": "would change"}


def _outcome(changed: bool, dry: bool, verb: str) -> str:
    """``verb`` (created/changed) when done, ``would ...`` in a dry run, else unchanged."""
    if not changed:
        return "unchanged"
    return _WOULD[verb] if dry else verb


def make_root(root: Path, gid: int, bits: int, parents: bool, dry: bool) -> Step:
    """The root: created, or its group and mode set; a symlink or a file there is refused."""
    what = f"{root} (group {grp.getgrgid(gid).gr_name}, mode {bits:04o})"
    if not os.path.isdir(root.parent):
        if not parents:
            raise FilesystemError(f"{quote_name(str(root.parent))} does not exist",
                                  hint=missing_hint(root) + "; or pass --parents to create it")
        if not dry:
            os.makedirs(root.parent, 0o755, exist_ok=True)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        if not dry:
            os.mkdir(root, 0o700)  # no window in which it is open with the wrong group
            os.chown(root, -1, gid)
            os.chmod(root, bits)
        return Step(what, _outcome(True, dry, "created"))
    if not stat.S_ISDIR(st.st_mode):
        raise FilesystemError(f"{quote_name(str(root))} exists and is not a directory",
                              hint="move it away, or name another root")
    changed = st.st_gid != gid or stat.S_IMODE(st.st_mode) != bits
    if changed and not dry:
        os.chown(root, -1, gid)
        os.chmod(root, bits)
    return Step(what, _outcome(changed, dry, "changed"))


def make_dir(path: Path, mode: int, dry: bool, label: str) -> Step:
    if os.path.isdir(path):
        return Step(f"{label} {path}", "unchanged")
    if not dry:
        os.makedirs(path, mode, exist_ok=True)
        os.chmod(path, mode)
    return Step(f"{label} {path}", _outcome(True, dry, "created"))


def daemon_config(root: Path, group: str, others: str, kernels: Path) -> str:
    """A minimal daemon configuration for this root, checked by the daemon's own loader (an
    unknown group or key would be caught here, not at the daemon's start)."""
    import yaml

    data = {"roots": [{"path": str(root), "group": group, "others": others}],
            "socket": {"group": group},
            "requests": {"root": str(root), "allow_groups": [group]},
            "kernels": {"dir": str(kernels)}}
    text = ("# envctld configuration written by 'envctl init'; every key and its default:\n"
            "# config/envctld.yaml. Builds also need requests.build_user (an unprivileged "
            "account).\n" + yaml.safe_dump(data, default_flow_style=False, sort_keys=False))
    try:
        cfgmod.parse(yaml.safe_load(text), source="<envctl init>")
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
