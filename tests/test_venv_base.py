"""A venv's base interpreter must be one every consumer of a shared root can run.

A venv runs its base interpreter for life (``pyvenv.cfg`` ``home``). On a root that other hosts
and user pods mount (NFS, EFS, FUSE), the daemon's own ``/usr/bin/python3`` is one they may not
have: loading a configuration that would build such venvs is refused, naming the key and the
way out. The network filesystem here is a real FUSE mount (bindfs), which the daemon treats as
remote like NFS; the same root reached without FUSE is local and keeps the old default.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from envctl_shared.config import parse, single_root
from envctl_shared.errors import EX_CONFIG, ConfigError

from tests.conftest import Accounts
from tests.helpers import VENV_BIN


@pytest.fixture
def network_root(scratch: Path) -> Iterator[tuple[Path, Path]]:
    """(backing directory, the same directory through a bindfs mount)."""
    backing, mnt = scratch / "backing", scratch / "mnt"
    backing.mkdir()
    mnt.mkdir()
    subprocess.run(["bindfs", str(backing), str(mnt)], check=True)
    try:
        yield backing, mnt
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], check=False)


def _raw(root: Path, accounts: Accounts, **requests: Any) -> dict[str, Any]:
    return {"roots": [{"path": str(root), "group": accounts.shared_group}],
            "requests": {"build_user": accounts.builder.name,
                         "allowed_backends": ["rattler", "venv"], **requests}}


@pytest.mark.fuse
def test_venv_python_outside_a_network_root_is_refused_at_load(
        network_root: tuple[Path, Path], accounts: Accounts, scratch: Path) -> None:
    backing, mnt = network_root
    with pytest.raises(ConfigError) as err:
        parse(_raw(mnt, accounts), source="envctld.yaml")  # the default /usr/bin/python3
    msg = err.value.message
    assert msg.startswith("envctld.yaml: requests.venv_python: /usr/bin/python3 is outside")
    assert "network filesystem" in msg and "envctl request create python" in msg
    # A Python env inside the root is what every consumer has.
    bindir = mnt / "python" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python3").write_text("")
    parse(_raw(mnt, accounts, venv_python=str(bindir / "python3")))
    # ... but not one that only looks inside: the interpreter's real path counts.
    os.symlink("/usr/bin/python3", bindir / "host-python")
    with pytest.raises(ConfigError, match="outside the requests root"):
        parse(_raw(mnt, accounts, venv_python=str(bindir / "host-python")))
    # No venv builds, or a local root: nothing to refuse.
    parse(_raw(mnt, accounts, allowed_backends=["rattler"]))
    single_root(mnt, accounts.shared_group)  # `envctl heal PATH --group G` builds nothing
    parse(_raw(backing, accounts))
    # The daemon's commands say so and exit 78 (configuration).
    cfg = scratch / "envctld.yaml"
    cfg.write_text(yaml.safe_dump(_raw(mnt, accounts)))
    res = subprocess.run([str(VENV_BIN / "envctl"), "check", "--config", str(cfg)], text=True,
                         capture_output=True, timeout=60)
    assert res.returncode == EX_CONFIG and "requests.venv_python" in res.stderr, res.stderr
