"""Adversarial trees shared by the healer tests (local disk and latencyfs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .conftest import Accounts
from .helpers import as_user


def build_tree(scratch: Path, acc: Accounts, hardlink: bool = True) -> tuple[Path, Path]:
    """An env-like tree by alice (umask 077) plus outside targets the tree points at."""
    root = scratch / "root"
    outside = scratch / "outside"
    root.mkdir()
    outside.mkdir()
    os.chown(root, acc.alice.uid, acc.alice.gid)
    os.chmod(root, 0o700)
    os.chown(outside, acc.alice.uid, acc.alice.gid)
    script = f"""
        mkdir -p env/lib/python3.11/site-packages/pkg env/bin env/share/excluded/deep cache
        echo data > env/lib/python3.11/site-packages/pkg/__init__.py
        printf '#!/bin/sh\\n' > env/bin/tool && chmod 700 env/bin/tool
        echo x > env/share/excluded/deep/file
        echo secret > {outside}/alice-private && chmod 600 {outside}/alice-private
        mkdir {outside}/alice-dir && echo y > {outside}/alice-dir/inner
        ln -s {outside}/alice-private env/link-to-file
        ln -s {outside}/alice-dir env/link-to-dir
        ln -s /etc env/link-to-etc
        mkfifo env/fifo
        mkdir env/locked && echo z > env/locked/inside && chmod 000 env/locked
    """
    as_user(acc.alice.uid, acc.alice.gid, f"cd {root} && {script}")
    if hardlink:
        os.link("/etc/passwd", root / "env" / "hardlink-to-passwd")  # root-owned, same fs
    return root, outside


_CHAIN = """
import os, sys
top, levels, name, side, sibling, shared, wrong_from, gid = sys.argv[1:]
levels, shared, wrong_from, gid = int(levels), int(shared), int(wrong_from), int(gid)
cur = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
for i in range(levels):
    right = i < wrong_from
    os.mkdir(name, dir_fd=cur)
    nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
    os.fchown(nxt, -1, shared if right else gid)
    if right:
        os.fchmod(nxt, 0o2770)
    if sibling:  # an empty directory beside the next level, named per level (listing orders vary)
        os.mkdir(f"{sibling}{i}", dir_fd=nxt)
    if side:
        f = os.open(side, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o666, dir_fd=nxt)
        os.fchown(f, -1, shared if right else gid)
        if right:
            os.fchmod(f, 0o660)
        os.close(f)
    os.close(cur)
    cur = nxt
"""


def make_chain(top: Path, levels: int, uid: int, gid: int, *, name: str = "d",
               side: str = "", sibling: str = "", shared_gid: int = -1,
               wrong_from: int = 0) -> None:
    """A chain of ``levels`` directories ``name`` below ``top``, made by uid/gid with umask
    077 the way an attacker would (mkdir + chdir, fd-relative: far deeper than PATH_MAX), each
    level holding a file ``side`` and an empty directory ``sibling<level>`` if given (a comb:
    a depth-first walk leaves work queued at every level). Levels before ``wrong_from`` are made
    compliant (group ``shared_gid``, 2770/660: the user must be in it); the rest are left broken, in
    the
    user's own group."""
    os.chown(top, uid, gid)
    as_user(uid, gid, ["/usr/bin/python3", "-c", _CHAIN, str(top), str(levels), name, side,
                       sibling, str(shared_gid), str(wrong_from), str(gid)],
            init_groups=wrong_from > 0)


_UNHEAL = """
import os, sys
top, levels, name, side, wrong_from, gid = sys.argv[1:]
levels, wrong_from, gid = int(levels), int(wrong_from), int(gid)
cur = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
for i in range(levels):
    nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
    os.close(cur)
    cur = nxt
    if i >= wrong_from:
        os.fchown(cur, -1, gid)
        os.fchmod(cur, 0o2700)  # what mkdir with umask 077 below a setgid parent made
        if side:
            f = os.open(side, os.O_WRONLY | os.O_NOFOLLOW, dir_fd=cur)
            os.fchown(f, -1, gid)
            os.fchmod(f, 0o600)
            os.close(f)
"""


def unheal_chain(top: Path, levels: int, uid: int, gid: int, *, name: str = "d",
                 side: str = "", wrong_from: int) -> None:
    """Break again, as their owner, the levels from ``wrong_from`` down of a chain that
    :func:`make_chain` made with ``shared_gid`` and ``wrong_from`` and a heal fixed: each
    back in the user's own group with the modes umask 077 gave (a few seconds cheaper than
    making a deep chain again)."""
    as_user(uid, gid, ["/usr/bin/python3", "-c", _UNHEAL, str(top), str(levels), name, side,
                       str(wrong_from), str(gid)])


def remove_tree(path: Path) -> None:
    """Remove a tree of any depth: GNU ``rm`` walks it fd-relative (``shutil.rmtree``
    recurses once per level and builds full paths, which a 20,000-level chain defeats)."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)
