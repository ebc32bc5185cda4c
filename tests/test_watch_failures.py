"""A watch that fails is never a silent blind spot: logged, counted, rebuilt — or the daemon exits.

The failure is real, not simulated: the running daemon's open-file limit is lowered from outside
(``prlimit``), so the inotify reader's next open of a new directory fails with ``EMFILE``, as on
a host out of descriptors. The old watch ignored exactly such errors (and died on others) while
``envctl status`` kept saying ``errors: 0``. Now the exception is logged with its traceback,
counted (``watch_errors``), and the watch is rebuilt with a reconcile, after which new entries
are healed in real time again; when it cannot be rebuilt, the daemon says why and exits 70
(EX_SOFTWARE) for systemd (``Restart=on-failure``) or Kubernetes to restart it.
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

from tests.conftest import Accounts
from tests.daemon_support import write_config
from tests.helpers import VENV_BIN, wait_for
from tests.watch_support import (
    SETTLE,
    alice_sh,
    daemon_status,
    make_root,
    new_entries_healed,
    settled,
)

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture

EX_SOFTWARE = 70


def _starve_fds(pid: int) -> tuple[int, int]:
    """Lower ``pid``'s soft RLIMIT_NOFILE to 3 (its fds stay open, any new one fails with
    EMFILE); returns the old limits to restore."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, old[1]))
    return old


def test_watch_failure_is_logged_counted_and_rebuilt(accounts: Accounts, scratch: Path,
                                                     envctld) -> None:
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]))
    sock = scratch / "envctld.sock"
    assert daemon_status(sock)["roots"][0]["watch_errors"] == 0
    assert d.proc is not None
    old = _starve_fds(d.proc.pid)
    try:
        alice_sh(accounts, root, "mkdir -p x/sub")  # the reader must open x to watch it
        wait_for(lambda: "inotify watch failed" in d.log_text(), SETTLE, 0.05,
                 "the reader's failure logged")
    finally:
        resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, old)
    wait_for(lambda: daemon_status(sock)["roots"][0]["rebuilds"] >= 1, SETTLE, 0.05,
             "the watch rebuilt")
    log = d.log_text()
    assert "Traceback" in log and "Too many open files" in log and "action=rebuild" in log
    st = daemon_status(sock)
    r = st["roots"][0]
    assert (st["ready"], st["failure"], r["mode"]) == (True, None, "inotify"), st
    assert r["watch_errors"] >= 1, r
    settled(root, accounts, "x healed by the reconcile after the rebuild")
    new_entries_healed(root, accounts, ["x", "x/sub"])  # real time again
    d.stop()


def test_watch_that_cannot_be_rebuilt_makes_the_daemon_exit(accounts: Accounts, scratch: Path,
                                                            envctld) -> None:
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]))
    assert d.proc is not None
    _starve_fds(d.proc.pid)  # for good: every rebuild attempt fails too
    alice_sh(accounts, root, "mkdir x")
    rc = d.proc.wait(SETTLE + 10)
    assert rc == EX_SOFTWARE, d.log_text()[-3000:]
    log = d.log_text()
    assert "inotify rebuild failed" in log and "root failed" in log, log[-3000:]
    assert "failed error=root " in log and "action=exit" in log
    # (Out of fds, it cannot even tell systemd: the exit code is what the restart needs.)


def test_root_renamed_away_fails_the_daemon_visibly(accounts: Accounts, scratch: Path,
                                                    envctld) -> None:
    """The root itself renamed under a running daemon: nothing can be watched at its path. The
    watch keeps trying (status says so, with the errors counted), then the daemon reports not
    ready, tells systemd why, and exits 70."""
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]))
    sock = scratch / "envctld.sock"
    root.rename(scratch / "root-away")
    try:
        wait_for(lambda: daemon_status(sock)["roots"][0]["watch_errors"] >= 1, SETTLE, 0.05,
                 "the failed rebuilds counted")
        r = daemon_status(sock)["roots"][0]
        assert r["mode"] == "rebuilding" and r["rebuilds"] == 0, r
        human = subprocess.run([str(VENV_BIN / "envctl"), "status", "--socket", str(sock)],
                               capture_output=True, text=True, timeout=30).stdout
        head, row = human.splitlines()[2:4]  # after the daemon's line and a blank one
        assert head.split()[-2:] == ["REBUILDS", "WATCH-ERRORS"], human
        assert row.split()[1] == "rebuilding" and int(row.split()[-1]) >= 1, human
        assert d.proc is not None
        assert d.proc.wait(SETTLE) == EX_SOFTWARE, d.log_text()[-3000:]
    finally:
        (scratch / "root-away").rename(root)
    assert "inotify watch ended" in d.log_text() and "reason=root" in d.log_text()
    d.wait_message(lambda m: m.startswith(f"STATUS=failed: root {root}: inotify watch cannot "
                                          "be rebuilt") and "STOPPING=1" in m, 5,
                   "STATUS=failed with STOPPING=1")
