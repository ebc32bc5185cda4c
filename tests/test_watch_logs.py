"""The daemon's log lines cannot be forged by a file name.

Names in the tree are users' choice; the daemon logs the entries it fixes (at DEBUG) as
key=value lines that tools parse line by line. A newline in a name must not start a line of its
own, which would read as anything its author liked ("ERROR ... root failed").
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Accounts
from tests.daemon_support import write_config
from tests.helpers import wait_for
from tests.watch_support import alice_sh, make_root, settled

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture

FORGED = "2026-01-01T00:00:00Z ERROR envctl.watch root failed reason=forged"


def test_a_newline_in_a_name_does_not_forge_a_log_line(accounts: Accounts, scratch: Path,
                                                       envctld) -> None:
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]), args=("--debug",))
    alice_sh(accounts, root, f"echo > \"$(printf 'x\\n{FORGED}')\"")
    settled(root, accounts, "the file with a newline in its name healed")
    wait_for(lambda: "fixed root=" in d.log_text(), 5, 0.02, "the fix logged")
    log = d.log_text()
    assert "path=x\\n2026-01-01T00:00:00Z ERROR envctl.watch root failed" in log, log[-2000:]
    assert not any(line.startswith(FORGED) for line in log.splitlines())
    d.stop()
