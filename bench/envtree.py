"""Env-shaped trees for benchmarks: the shape of a real Python install, with empty files.

A template is made once (as root, the source's modes, empty files, its symlinks) from a real
installation; a "broken" copy is what another user leaves behind with ``cp -r`` under umask 077;
a "compliant" copy is a broken copy healed once. Sizes are reached by repeating the source
under numbered top-level directories, so the directory/file ratio stays the real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# A full CPython install with site-packages (~60k entries: 51k files, 8.7k dirs) when present;
# otherwise this interpreter's standard library.
DEFAULT_SOURCES = [Path("/root/.pyenv/versions/3.11.7"), Path(sys.base_prefix) / "lib"]


def source_tree() -> Path:
    for src in DEFAULT_SOURCES:
        if src.is_dir():
            return src
    raise SystemExit("no source tree to copy the shape of")


def make_template(dest: Path, entries: int, source: Path | None = None) -> int:
    """Replicate ``source``'s shape under ``dest`` until at least ``entries`` entries exist."""
    src = source or source_tree()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    count, copy = 0, 0
    while count < entries:
        top = dest / f"part{copy}"
        count += _replicate(src, top, entries - count)
        copy += 1
    return count


def _replicate(src: Path, dst: Path, budget: int) -> int:
    made = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        target = dst / rel
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, os.stat(dirpath).st_mode & 0o7777)
        made += 1
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            s = os.path.join(dirpath, name)
            t = target / name
            if os.path.islink(s):
                os.symlink(os.readlink(s), t)
            else:
                t.touch()
                os.chmod(t, os.lstat(s).st_mode & 0o7777)
            made += 1
            if made >= budget:
                return made
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return made


def copy_as(uid: int, gid: int, template: Path, dest: Path, umask: int = 0o077) -> None:
    """``cp -r`` the template as another user with ``umask``: the broken tree users leave."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.chown(dest.parent, uid, gid)  # the writer's own area, as a home or scratch dir would be
    subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "sh", "-c",
                    f'umask {umask:03o}; exec cp -r "$0" "$1"', str(template), str(dest)],
                   check=True)


def count_entries(path: Path) -> int:
    """Entries under and including ``path``, counted by find (symlinks not followed)."""
    return subprocess.run(["find", str(path)], check=True, capture_output=True).stdout.count(b"\n")
