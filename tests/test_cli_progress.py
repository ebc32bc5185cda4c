"""``heal``/``check`` progress: a redrawn line on a terminal (a real pseudo-terminal), nothing
when stderr is not one or with ``--json``; the report on stdout is the same either way.

The slow tree is served by latencyfs (our FUSE latency filesystem) at 3 ms per metadata call,
which makes the walk concurrent (network/FUSE) and long enough to be seen mid-way: ~1.5 s for
the 906 entries on a quiet machine, some 6 redraws at the 0.25 s interval where 3 are asked.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import tempfile
import time
from pathlib import Path

from bench.latencyfs import latencyfs
from tests.helpers import VENV_BIN

ENVCTL = str(VENV_BIN / "envctl")
LINE = re.compile(rb"\r\x1b\[K[|/\\-] [^\r]*: ([\d,]+) entries \([\d,]+/s\), "
                  rb"([\d,]+) (wrong|fixed)")


def _under_pty(argv: list[str]) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pseudo-terminal; (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    stdout = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen(argv, stdout=stdout, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    term = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # drain as it goes: a full pty would block the writer
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            term += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    stdout.seek(0)
    out = stdout.read()
    stdout.close()
    return code, out, term


def _tree(backing: Path, dirs: int, files: int) -> None:
    for d in range(dirs):
        sub = backing / f"d{d:03}"
        sub.mkdir(mode=0o755)
        for f in range(files):
            (sub / f"f{f}").touch(mode=0o644)


def test_progress_on_a_terminal_only(scratch: Path) -> None:
    backing = scratch / "b"
    backing.mkdir()
    _tree(backing, 150, 5)
    os.chown(backing, 65534, 65534)  # not a protected owner: the root is judged like the rest
    with latencyfs(backing, scratch / "m", 3.0) as fs:
        argv = [ENVCTL, "check", "--group", "root", "-j", "2", str(fs.path)]
        code, out, term = _under_pty(argv)
        assert code == 1  # violations (0755 dirs in a group-root tree want 2775)
        draws = LINE.findall(term)
        assert len(draws) >= 3, term[:500]
        counts = [int(n.replace(b",", b"")) for n, _, _ in draws]
        assert counts == sorted(counts) and 0 < max(counts)
        assert any(0 < c < 906 for c in counts)  # seen mid-way, not only at the end
        assert term.endswith(b"\r\x1b[K")  # erased: the terminal is left clean
        assert b"\x1b" not in out and out.endswith(b" errors 0, " + out.rsplit(b", ", 1)[1])
        # the same report without a terminal: no progress anywhere
        res = subprocess.run(argv, capture_output=True, timeout=120)
        assert res.returncode == 1 and b"\x1b" not in res.stderr + res.stdout
        assert res.stderr == b""
        assert res.stdout.splitlines()[:-1] == out.splitlines()[:-1]
        # --json on a terminal: the document only
        code, out, term = _under_pty([*argv, "--json"])
        assert code == 1 and out.startswith(b"{") and term == b""
