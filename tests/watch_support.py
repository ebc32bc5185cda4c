"""Trees and writers for the watcher/daemon tests: a root another user writes into, sources.

The root belongs to alice (the writer) with the shared group, mode 2770: writers run through
``as_user`` with no supplementary groups and umask 077, so everything they create is wrong for
the policy until the daemon heals it (group, g+rw, SGID), and only an independent ``find``
audit decides that it has.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.conftest import Accounts

SCALE = float(os.environ.get("ENVCTL_SOAK_SCALE", "1"))


def make_root(base: Path, acc: Accounts, name: str = "root") -> Path:
    """A root owned by alice:shared, 2770, ready for alice to write into."""
    root = base / name
    root.mkdir()
    os.chown(root, acc.alice.uid, acc.shared_gid)
    os.chmod(root, 0o2770)
    return root


def make_source(base: Path, dirs: int, files_per_dir: int, name: str = "src") -> Path:
    """A world-readable tree (nested two levels, files with and without x, symlinks)."""
    src = base / name
    for d in range(dirs):
        sub = src / f"pkg{d // 20}" / f"mod{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(files_per_dir):
            p = sub / f"f{f}.py"
            p.write_text("x")
            if f % 7 == 0:
                p.chmod(0o755)
        (sub / "link").symlink_to("f0.py")
    for dirpath, dirnames, filenames in os.walk(src):
        os.chmod(dirpath, 0o755)
    return src


def alice_tmp(base: Path, acc: Accounts, name: str = "alice-tmp") -> Path:
    """A directory outside the root where alice may prepare trees to move in."""
    d = base / name
    d.mkdir()
    os.chown(d, acc.alice.uid, acc.alice.gid)
    return d


def scaled(n: int) -> int:
    return max(1, int(n * SCALE))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
