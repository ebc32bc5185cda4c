"""Out of inotify watches, then the admin raises the limit: the root is back to real time.

The daemon's WARNING says "raise fs.inotify.max_user_watches"; doing so must be enough. The
limit is lowered for real (machine-wide, restored in a ``finally``), the daemon falls back to
polling, the limit is raised back, and then a write in a directory that had no watch is healed
in real time, far sooner than the (long) poll interval could.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.daemon_support import write_config
from tests.helpers import as_user, find_violations, wait_for
from tests.watch_support import REALTIME, daemon_status, make_root, out_of_watches

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture
DIRS = 400


@pytest.mark.serial  # a machine-wide sysctl
def test_raising_the_watch_limit_brings_inotify_back(accounts: Accounts, scratch: Path,
                                                     envctld) -> None:
    root = make_root(scratch, accounts)
    # poll_interval 60 s: only inotify can heal within REALTIME once it is back
    cfg = write_config(scratch, [(root, accounts.shared_group)],
                       watch={"mode": "inotify", "poll_interval": 60})
    d = envctld(cfg)
    a = accounts.alice
    with out_of_watches(d.log_text, root, accounts, DIRS):
        assert daemon_status(scratch / "envctld.sock")["roots"][0]["mode"] == "poll"
    # the limit is back up (restored): within a tick of the maintenance thread, inotify again
    wait_for(lambda: "inotify restored" in d.log_text(), 10, 0.05, "inotify restored")
    status = daemon_status(scratch / "envctld.sock")["roots"][0]
    assert status["mode"] == "inotify" and status["watches"] >= DIRS + 2, status
    wait_for(lambda: not find_violations(root, accounts.shared_gid), 15, 0.1, "reconciled")
    t0 = time.monotonic()
    as_user(a.uid, a.gid, f"echo > {root}/many/d{DIRS - 1}/late")
    wait_for(lambda: not find_violations(root, accounts.shared_gid), REALTIME, 0.02,
             "a write in a formerly unwatched directory healed in real time")
    assert time.monotonic() - t0 < REALTIME
    assert d.log_text().count("inotify watch limit reached") == 1
    assert d.alive
    d.stop()
