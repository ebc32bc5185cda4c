"""``envctl request create -f FILE`` reads a bounded amount of FILE (or of stdin).

Found by attacking the CLI: ``-f /dev/zero`` read the whole "file" before any size check, until
the process died with "internal error: MemoryError" (on a shared login node, after taking the
memory others needed). The CLI cannot know the daemon's ``max_spec_bytes``, so it stops at a
fixed 1 MiB (sixteen times the daemon's default) and says the file is too large. Run under a
1 GiB address-space limit: the old code fails fast instead of swapping the machine.
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path
from typing import IO

import pytest

from tests.helpers import VENV_BIN

ENVCTL = str(VENV_BIN / "envctl")
LIMIT = 1 << 20  # request_cmd.MAX_SPEC_FILE, restated: the tests pin the documented value


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def create(scratch: Path, spec: str, stdin: IO[bytes] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """``envctl request create`` against a socket no daemon listens on: a spec that was read
    ends in 69 (daemon unavailable), one that was refused while reading in 65."""
    return subprocess.run([ENVCTL, "request", "create", "demo", "-f", spec, "--socket",
                           str(scratch / "no-daemon.sock")], stdin=stdin, capture_output=True,
                          text=True, timeout=60, preexec_fn=_limit_memory)


def _too_large(res: subprocess.CompletedProcess[str], shown: str) -> None:
    assert res.returncode == 65, res.stderr
    assert res.stderr.startswith(f"envctl: error: {shown} is too large for an environment "
                                 "file (more than 1 MiB)"), res.stderr
    assert "internal error" not in res.stderr


def test_dev_zero_as_file_and_as_stdin(scratch: Path) -> None:
    _too_large(create(scratch, "/dev/zero"), "/dev/zero")
    with open("/dev/zero", "rb") as zero:
        _too_large(create(scratch, "-", stdin=zero), "standard input")


@pytest.mark.parametrize("size,code", [(LIMIT, 69), (LIMIT + 1, 65)])
def test_the_cap_is_exact(scratch: Path, size: int, code: int) -> None:
    """1 MiB is read and sent (the daemon would judge it against its own limit); one byte
    more is refused before any of it is sent — from a file and from a pipe alike."""
    spec = scratch / "env.yml"
    spec.write_bytes(b"#" * (size - 1) + b"\n")
    assert create(scratch, str(spec)).returncode == code
    with open(spec, "rb") as fh:
        res = create(scratch, "-", stdin=fh)
    assert res.returncode == code, res.stderr
