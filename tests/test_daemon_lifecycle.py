"""envctld as a process: readiness, reloads, shutdown under load, restart after kill -9.

All through the real signals and the real sd_notify protocol a service manager would use.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

from tests.conftest import Accounts
from tests.daemon_support import ENVCTLD, write_config
from tests.helpers import as_user, find_violations, wait_for
from tests.watch_support import make_root, make_source, scaled

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture


def test_ready_only_after_startup_reconcile_and_restart_after_kill9(
        accounts: Accounts, scratch: Path, envctld) -> None:
    root = make_root(scratch, accounts)
    a = accounts.alice
    as_user(a.uid, a.gid, f"mkdir -p {root}/before/x && echo > {root}/before/x/f")
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    d = envctld(cfg)
    ready = d.wait_message(lambda m: "READY=1" in m, 0, "READY=1")  # a STATUS= may follow it
    assert "READY=1" in ready and "STATUS=roots=1 mode=inotify" in ready
    # READY=1 means the startup reconcile is done: no waiting here.
    assert not find_violations(root, accounts.shared_gid)
    d.kill9()
    src = make_source(scratch, scaled(50), 8)
    as_user(a.uid, a.gid, ["cp", "-r", str(src), str(root / "while-down")])
    as_user(a.uid, a.gid, f"chmod -R g-w {root}/before")
    assert find_violations(root, accounts.shared_gid)
    d.restart()
    assert not find_violations(root, accounts.shared_gid), "startup reconcile missed entries"
    d.stop()
    assert any("STOPPING=1" in m for m in d.messages)


def test_sigterm_during_burst_exits_zero(accounts: Accounts, scratch: Path, envctld) -> None:
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]))
    src = make_source(scratch, scaled(40), 5)
    stop_file = scratch / "stop-writing"
    a = accounts.alice
    # Copies until told to stop (at most 50): the daemon is mid-burst whenever SIGTERM lands.
    writer = subprocess.Popen(["setpriv", f"--reuid={a.uid}", f"--regid={a.gid}",
                               "--clear-groups", "sh", "-c",
                               (f"umask 077; i=0; while [ ! -e {stop_file} ] && [ $i -lt 50 ]; "
                                f"do cp -r {src} {root}/c$i; i=$((i+1)); done")])
    try:
        wait_for(lambda: (root / "c1").exists(), 20, 0.01, "writer under way")
        assert writer.poll() is None
        d.stop(timeout=30)  # asserts exit code 0
        assert "stopped drained=" in d.log_text()
    finally:
        stop_file.touch()
        writer.wait(60)


def test_sighup_changed_config_adds_root_and_applies_policy(accounts: Accounts, scratch: Path,
                                                             envctld) -> None:
    root1 = make_root(scratch, accounts, "r1")
    root2 = make_root(scratch, accounts, "r2")
    a = accounts.alice
    cfg = write_config(scratch, [(root1, accounts.shared_group)], others="none")
    d = envctld(cfg)
    as_user(a.uid, a.gid, f"mkdir {root1}/d && echo > {root1}/d/f && "
                          f"mkdir {root2}/pre && echo > {root2}/pre/f")
    wait_for(lambda: not find_violations(root1, accounts.shared_gid), 10, 0.05, "r1 healed")
    assert find_violations(root2, accounts.shared_gid)  # not watched yet
    assert stat.S_IMODE(os.stat(root1 / "d").st_mode) & 0o007 == 0
    write_config(scratch, [(root1, accounts.shared_group), (root2, accounts.shared_group)],
                 others="read")
    ready = d.reload()
    assert "roots=2" in ready
    # The reload's reconcile ran before READY=1: the new root and the new policy are applied.
    assert not find_violations(root2, accounts.shared_gid)
    assert stat.S_IMODE(os.stat(root1 / "d").st_mode) & 0o007 == 0o005
    assert stat.S_IMODE(os.stat(root1 / "d" / "f").st_mode) & 0o007 == 0o004
    as_user(a.uid, a.gid, f"mkdir {root2}/later && echo > {root2}/later/f")
    wait_for(lambda: not find_violations(root2, accounts.shared_gid), 10, 0.05,
             "new root watched after reload")
    # Dropping a root stops healing it.
    write_config(scratch, [(root2, accounts.shared_group)], others="read")
    assert "roots=1" in d.reload()
    as_user(a.uid, a.gid, f"echo > {root1}/orphan")
    time.sleep(1.0)
    assert find_violations(root1, accounts.shared_gid) == [str(root1 / "orphan")]
    d.stop()


def test_sighup_with_broken_config_keeps_the_old_one(accounts: Accounts, scratch: Path,
                                                     envctld) -> None:
    root = make_root(scratch, accounts)
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    d = envctld(cfg)
    good = cfg.read_text()
    for broken in ("roots: [\n", "roots: [{path: /nonexistent/x, group: root}]\n",
                   good + "typo_key: 1\n"):
        cfg.write_text(broken)
        d.reload()
        assert d.alive
    assert d.log_text().count("reload rejected") == 3
    a = accounts.alice
    as_user(a.uid, a.gid, f"mkdir {root}/still && echo > {root}/still/f")
    wait_for(lambda: not find_violations(root, accounts.shared_gid), 10, 0.05,
             "old config still healing")
    d.stop()


def test_invalid_config_at_start_exits_with_config_code(scratch: Path) -> None:
    cfg = scratch / "bad.yaml"
    cfg.write_text("roots: []\n")
    r = subprocess.run([ENVCTLD, "--config", str(cfg)], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 78 and "roots" in r.stderr
    # a wrong command line is a usage error, as for envctl (was argparse's 2)
    for argv in ([], ["--config", str(cfg), "--bogus"]):
        r = subprocess.run([ENVCTLD, *argv], capture_output=True, text=True, timeout=30)
        assert r.returncode == 64 and r.stderr.startswith("usage: envctld"), r.stderr


def test_watchdog_pings_stop_when_a_worker_wedges(accounts: Accounts, scratch: Path,
                                                  envctld) -> None:
    root = make_root(scratch, accounts)
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    d = envctld(cfg, env={"WATCHDOG_USEC": "1000000", "ENVCTL_TEST_WEDGE_AFTER": "3"})
    d.wait_message(lambda m: m == "WATCHDOG=1", 5, "a first watchdog ping")
    # Before the wedge: pings, never a withheld one (idle workers are not "stuck").
    time.sleep(2.5)
    assert "withholding" not in d.log_text()
    wait_for(lambda: "withholding watchdog ping" in d.log_text(), 15, 0.1, "pings withheld")
    n = len(d.messages)
    time.sleep(1.5)
    assert "WATCHDOG=1" not in d.messages[n:]
    d.kill9()  # a wedged worker cannot drain: this is what systemd's watchdog would do


def test_healthy_daemon_keeps_pinging(accounts: Accounts, scratch: Path, envctld) -> None:
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]),
                env={"WATCHDOG_USEC": "600000"})
    time.sleep(2.5)
    pings = sum(1 for m in d.messages if m == "WATCHDOG=1")
    assert pings >= 5  # every WatchdogSec/2
    d.stop()
