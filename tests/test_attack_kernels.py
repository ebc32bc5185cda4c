"""``kernels sync`` against what any member can put in the root: hand-made envs whose names
Jupyter cannot hold, and many of them. Real root, real kernels.dir, no env run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from envctl_shared.config import parse
from envctl_shared.jobs import kernels


def _hand_made(root: Path, name: str) -> None:
    site = root / name / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (site / "ipykernel_launcher.py").write_text("")


def test_a_name_too_long_for_a_kernelspec_is_skipped_not_fatal(
        scratch: Path, accounts: Any) -> None:
    """An env name of 125 capitals escapes to a 257-byte kernelspec name: its mkdir failed
    (ENAMETOOLONG) and took the whole admin's sync down with it, every time, so one member's
    directory kept every other env out of the launcher."""
    root = scratch / "root"
    root.mkdir()
    os.chown(root, 0, accounts.shared_gid)
    os.chmod(root, 0o3775)
    kdir = scratch / "kernels"
    cfg = parse({"roots": [{"path": str(root), "group": accounts.shared_group}],
                 "requests": {"state_dir": str(scratch / "state"),
                              "build_user": accounts.builder.name},
                 "kernels": {"dir": str(kdir)}})
    long = "A" * 125
    for name in (long, "ordinary"):
        _hand_made(root, name)
    done = kernels.sync(cfg, set())
    assert done.written == ("envctl-ordinary",) and long in done.skipped
    assert sorted(os.listdir(kdir)) == ["envctl-ordinary"]
    assert kernels.publish(cfg, long, True).startswith("no kernelspec")
