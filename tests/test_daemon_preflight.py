"""A daemon that cannot start says every reason at once, before it has changed anything: no
root healed, no state dir made, no socket directory made."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import yaml

from tests.conftest import Accounts
from tests.daemon_support import Envctld


def test_every_start_problem_is_listed_before_anything_changes(scratch: Path,
                                                               accounts: Accounts) -> None:
    root = scratch / "envs"
    root.mkdir()
    private = root / "private.csv"  # a heal would make it group-readable
    private.write_text("x")
    os.chown(private, accounts.alice.uid, accounts.alice.gid)
    os.chmod(private, 0o600)
    state = scratch / "state"
    cfg = scratch / "envctld.yaml"
    cfg.write_text(yaml.safe_dump({
        "roots": [{"path": str(root), "group": accounts.shared_group},
                  {"path": str(scratch / "missing-root"), "group": accounts.shared_group}],
        "socket": {"path": str(scratch / "no" / "run" / "envctld.sock")},
        # requests on, as root, and no build account: the default does not exist
        "requests": {"root": str(root), "state_dir": str(state)},
        "logging": {"journal": "false"}}))
    daemon = Envctld(cfg, scratch)
    assert daemon.start_failing() == 78
    log = daemon.log_text()
    problems = re.findall(r"startup problem error=(.*?) hint=", log)
    assert len(problems) == 3, log
    assert "missing-root is not an existing directory" in problems[0]
    assert "socket directory" in problems[1] and "does not exist" in problems[1]
    assert "build_users is not set" in problems[2]
    assert "startup refused problems=3 changed=nothing" in log
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600  # not healed
    assert os.stat(root).st_gid != accounts.shared_gid  # not even the root itself
    assert not state.exists() and not (scratch / "no").exists()
