"""Mount the team's slowfs (a FUSE passthrough adding latency per metadata call) for a while.

The tool lives in ``../shared/tools/slowfs.py`` beside the checkout; it models EFS/NFS round
trips so that walks can be measured (and tested) at network-filesystem latency on a laptop.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

SLOWFS = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "slowfs.py"


@contextlib.contextmanager
def slowfs(backing: Path, mountpoint: Path, latency_ms: float) -> Iterator[Path]:
    """Mount ``backing`` at ``mountpoint`` with ``latency_ms`` per call; always unmounted."""
    if not SLOWFS.is_file():
        raise FileNotFoundError(f"slowfs not found at {SLOWFS}")
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(SLOWFS), str(backing), str(mountpoint),
                             str(latency_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"slowfs did not mount: {err.strip()}")
            time.sleep(0.05)
        yield mountpoint
    finally:
        subprocess.run(["fusermount", "-u", str(mountpoint)], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
