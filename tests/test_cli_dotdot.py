"""``envctl check``/``heal`` and ``..`` after a symlink: refused, never normalised as text.

``a/lnk/..`` is, to the kernel, the parent of ``lnk``'s target; text normalisation made it
``a``, so the tree walked was not the tree named and the symlink check never saw ``lnk``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import VENV_BIN

ENVCTL = str(VENV_BIN / "envctl")


def _check(cwd: Path, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ENVCTL, "check", "--group", "root", path], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_dotdot_after_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a" / "real").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "lnk").symlink_to(tmp_path / "elsewhere" / "deep")
    res = _check(tmp_path, "a/lnk/..")
    assert res.returncode == 74, res.stdout + res.stderr
    assert f"'..' after the symlink {tmp_path}/a/lnk" in res.stderr
    assert f"name the real directory: {tmp_path}/elsewhere" in res.stderr
    assert res.stdout == ""  # nothing walked
    # '..' through real directories, and from a working directory, are what they say
    res = _check(tmp_path, "a/real/..")
    assert f"{tmp_path}/a: " in res.stdout and res.returncode == 1, res.stdout + res.stderr
    res = _check(tmp_path / "a" / "real", "..")
    assert f"{tmp_path}/a: " in res.stdout and res.returncode == 1, res.stdout + res.stderr
