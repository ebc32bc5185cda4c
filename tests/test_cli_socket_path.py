"""A relative socket path is refused before anything is sent, and ``check`` without a working
directory still takes an absolute path.

Found by an attack: with the quick start's ``ENVCTL_SOCKET=var/run/envctld.sock``, ``envctl``
run in a directory others may write (/tmp, a shared root) talked to whoever had made
``var/run`` there — the owner of that directory, trusted as the daemon — and sent it the
caller's JupyterHub token.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tests.helpers import VENV_BIN

ENVCTL = str(VENV_BIN / "envctl")


def test_a_relative_socket_path_is_refused_and_nothing_is_sent(tmp_path: Path) -> None:
    (tmp_path / "var" / "run").mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "var/run/envctld.sock"))
    listener.listen(1)
    listener.settimeout(0.5)
    env = {**os.environ, "ENVCTL_SOCKET": "var/run/envctld.sock",
           "JUPYTERHUB_API_TOKEN": "secret-token-of-alice"}
    try:
        res = subprocess.run([ENVCTL, "whoami"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 64, res.stdout + res.stderr
        assert "the socket path var/run/envctld.sock is relative" in res.stderr
        assert f"{tmp_path}/var/run/envctld.sock" in res.stderr  # the absolute one to use
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            conn = None
        assert conn is None, "the CLI connected to a relative socket path"
    finally:
        listener.close()


def test_check_with_an_absolute_path_needs_no_working_directory(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    script = f"import os, subprocess, sys; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); " \
             f"sys.exit(subprocess.run([{ENVCTL!r}, 'check', '--group', 'root', " \
             f"{str(root)!r}]).returncode)"
    res = subprocess.run([str(VENV_BIN / "python"), "-c", script], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode in (0, 1), res.stdout + res.stderr  # judged, not an internal error
    assert "internal error" not in res.stderr and f"{root}:" in res.stdout
