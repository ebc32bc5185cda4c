"""Adversarial trees shared by the healer tests (local disk and slowfs)."""

from __future__ import annotations

import os
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
    script = """
        mkdir -p env/lib/python3.11/site-packages/pkg env/bin env/share/excluded/deep cache
        echo data > env/lib/python3.11/site-packages/pkg/__init__.py
        printf '#!/bin/sh\\n' > env/bin/tool && chmod 700 env/bin/tool
        echo x > env/share/excluded/deep/file
        echo secret > {out}/alice-private && chmod 600 {out}/alice-private
        mkdir {out}/alice-dir && echo y > {out}/alice-dir/inner
        ln -s {out}/alice-private env/link-to-file
        ln -s {out}/alice-dir env/link-to-dir
        ln -s /etc env/link-to-etc
        mkfifo env/fifo
        mkdir env/locked && echo z > env/locked/inside && chmod 000 env/locked
    """.format(out=outside)
    as_user(acc.alice.uid, acc.alice.gid, f"cd {root} && {script}")
    if hardlink:
        os.link("/etc/passwd", root / "env" / "hardlink-to-passwd")  # root-owned, same fs
    return root, outside
