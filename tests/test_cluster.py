"""Several hosts, one shared root: one poller between them, every daemon healing its own host.

Three simulated hosts: three real ``envctld`` processes, each in a UTS namespace of its own (its
own host name), each on its own latencyfs mount of one backing directory (separate FUSE
servers: what one host writes through its mount, the others' kernels never report, exactly as
NFS clients), each with its own socket. latencyfs passes record locks through to the backing
file, so the mounts share the election lock as NFS clients share it through the server; its
counters give the metadata operations each host sends to the "server".
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from envctl_shared.daemon.leader import PollerLease

from bench.latencyfs import Counters, LatencyFs, latencyfs
from tests.conftest import Accounts
from tests.daemon_support import write_config
from tests.helpers import VENV_BIN, as_user, find_violations, wait_for
from tests.watch_support import daemon_status, make_root, make_source

pytest_plugins = ("tests.fixtures_daemon", "tests.fixtures_jobs")  # envctld, jobs_env
pytestmark = [pytest.mark.fuse, pytest.mark.slow]

POLL = 1.0  # poll_interval of every daemon: takeover must come within 2 x this
# For waits whose length proves nothing (the next poll pass; a heal whose author the fix
# counters name): a loaded machine stretches every pass, and only a hang should fail them.
PATIENCE = 30.0
PASSES = 5  # poll passes per window of metadata traffic compared
HOSTS = ("hostA", "hostB", "hostC")


def _poller(sock: Path) -> dict[str, Any]:
    root = daemon_status(sock)["roots"][0]
    return {"role": root["poller"]["role"], "leader": root["poller"]["leader"],
            "polls": root["poll_passes"], "fixed": root["fixed"], "mode": root["mode"]}


def _traffic(mounts: list[LatencyFs], leader: Path) -> tuple[list[Counters], float]:
    """What each mount served to its daemon while the leader (on socket ``leader``) ran
    exactly ``PASSES`` poll passes and nothing else happened, and how long that took: a window
    of whole passes, so that two windows compare as they are (per pass, not per second: on a
    busy machine a pass takes longer, not more calls)."""
    def passes() -> int:
        return int(daemon_status(leader)["roots"][0]["poll_passes"])

    n = passes()
    wait_for(lambda: passes() > n, PATIENCE, 0.01, "a poll pass ended")
    before, start, n = [m.counters() for m in mounts], time.monotonic(), passes()
    wait_for(lambda: passes() >= n + PASSES, PATIENCE, 0.01, f"{PASSES} poll passes")
    took = time.monotonic() - start
    return [m.counters().since(b) for m, b in zip(mounts, before)], took


def _healed(backing: Path, accounts: Accounts, timeout: float, what: str) -> float:
    return wait_for(lambda: not find_violations(backing, accounts.shared_gid), timeout, 0.02,
                    what)


def test_three_hosts_one_poller(accounts: Accounts, scratch: Path, envctld) -> None:
    a = accounts.alice
    backing = make_root(scratch, accounts, "backing")
    src = make_source(scratch, 60, 5)
    as_user(a.uid, a.gid, ["cp", "-r", str(src), str(backing / "tree")])  # broken: umask 077
    with contextlib.ExitStack() as stack:
        # No kernel cache: with libfuse's 1 s, the same as the poll interval, whether a pass
        # found its attributes cached hung on timing, and a window counted 13% fewer calls.
        mounts = [stack.enter_context(latencyfs(backing, scratch / f"m-{h}", 0.0,
                                                cache_timeout=0))
                  for h in HOSTS]
        socks, daemons = [], []
        for host, mnt in zip(HOSTS, mounts):
            conf = scratch / f"conf-{host}"
            conf.mkdir()
            cfg = write_config(conf, [(mnt.path, accounts.shared_group)],
                               watch={"mode": "auto", "poll_interval": POLL,
                                      "full_scan_interval": 3600})
            socks.append(conf / "envctld.sock")
            daemons.append((host, cfg))

        # One host alone: it leads, polls, and sets the baseline of metadata traffic.
        first = envctld(daemons[0][1], host="hostA")
        _healed(backing, accounts, 15, "the startup reconcile healed the copied tree")
        assert _poller(socks[0])["role"] == "leader"
        wait_for(lambda: _poller(socks[0])["polls"] >= 2, PATIENCE, 0.1, "hostA polls")
        traffic, _took = _traffic(mounts, socks[0])
        alone = sum(c.total for c in traffic)

        # Three hosts: still one poller, and about the same traffic on the shared filesystem.
        others = [envctld(cfg, host=host) for host, cfg in daemons[1:]]
        time.sleep(POLL)  # their start-up passes are over; measure the steady state
        together, took = _traffic(mounts, socks[0])
        states = [_poller(s) for s in socks]
        assert [s["role"] for s in states] == ["leader", "follower", "follower"], states
        assert all(s["leader"]["host"] == "hostA" for s in states), states
        since = states[0]["leader"]["since"]
        assert time.time() - 60 < since < time.time() and states[2]["leader"]["since"] == since
        assert states[0]["mode"] == "inotify+poll" and states[1]["mode"] == "inotify+standby"
        assert states[1]["polls"] == 0 and states[2]["polls"] == 0
        total = sum(c.total for c in together)
        print(f"metadata ops per {PASSES} poll passes: one daemon {alone}, three daemons {total} "
              f"({total / alone:.3f}x); per host in {took:.1f}s "
              f"{[(c.total, c.ops.get('lock', 0)) for c in together]} (total, lock)")
        assert total <= 1.25 * alone
        for follower in together[1:]:  # a standby host sends its lock attempts, nothing else
            assert follower.total - follower.ops["lock"] <= 2, follower.ops
        human = _status_text(socks[2])
        assert "poller " in human and "hostA (pid " in human and "stands by" in human, human

        # A write through host B's mount: B's inotify heals it at once (within a second on a
        # busy machine; tens of ms on a quiet one). The leader is stopped meanwhile (holding
        # its lock: B stays a follower), so that no poll can heal it first: B's count of
        # fixes says that B healed it. (Timed from the leader's last pass, a poll_interval
        # away, a slow write or heal lost that race on a loaded machine.)
        fixed_b = _poller(socks[1])["fixed"]
        assert first.proc is not None
        first.proc.send_signal(signal.SIGSTOP)
        try:
            as_user(a.uid, a.gid,
                    f"mkdir {mounts[1].path}/viaB && echo > {mounts[1].path}/viaB/f")
            took = _healed(backing, accounts, 1.0, "a write through hostB's mount, healed by B")
        finally:
            first.proc.send_signal(signal.SIGCONT)
        # (the fix counters: a heal is counted once its batch or pass is over, the audit may
        # see it healed before that)
        wait_for(lambda: _poller(socks[1])["fixed"] >= fixed_b + 2, PATIENCE, 0.02,
                 "B's fixes counted")
        print(f"write through hostB healed by hostB in {took:.3f}s")

        # A write by a host without a daemon (straight into the backing directory): the
        # leader's poll heals it; no follower ever sees it.
        fixed = [_poller(s)["fixed"] for s in socks]
        as_user(a.uid, a.gid, f"mkdir {backing}/direct && echo > {backing}/direct/f")
        took = _healed(backing, accounts, PATIENCE, "a write without a daemon, healed by a poll")
        wait_for(lambda: _poller(socks[0])["fixed"] >= fixed[0] + 2, PATIENCE, 0.02,
                 "the poll's fixes counted (at the end of its pass)")
        after = [_poller(s)["fixed"] for s in socks]
        assert after[1:] == fixed[1:], (fixed, after)
        print(f"write into the backing dir healed by hostA's poll in {took:.3f}s")

        # The leader dies without a word: another host leads (and starts its pass) within
        # 2 x poll_interval; the pass itself may take long on a loaded machine.
        first.kill9()
        killed = time.monotonic()
        new = wait_for(lambda: any(_poller(s)["role"] == "leader" for s in socks[1:]),
                       2 * POLL, 0.05, "a follower took over the polling")
        wait_for(lambda: any(_poller(s)["polls"] > 0 for s in socks[1:]), PATIENCE, 0.05,
                 "the new leader's first pass")
        states = [_poller(s) for s in socks[1:]]
        assert sorted(s["role"] for s in states) == ["follower", "leader"], states
        leader = states[0]["leader"]["host"]
        assert leader in ("hostB", "hostC") and states[1]["leader"]["host"] == leader
        print(f"takeover by {leader} {time.monotonic() - killed:.2f}s after kill -9 "
              f"(leading after {new:.2f}s; bound {2 * POLL:.0f}s)")
        as_user(a.uid, a.gid, f"mkdir {backing}/after && echo > {backing}/after/f")
        _healed(backing, accounts, PATIENCE, "a write without a daemon, healed by the new leader")
        for d in others:
            d.stop()


def _status_text(sock: Path) -> str:
    r = subprocess.run([str(VENV_BIN / "envctl"), "status", "--socket", str(sock)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_leader_that_loses_its_filesystem_stops_polling(accounts: Accounts,
                                                          scratch: Path) -> None:
    """Two daemons' elections on two mounts; the leader's filesystem goes away (its FUSE
    server dies: every call now fails with ENOTCONN, as a hung-up NFS mount fails). Its next
    attempt says it may not poll, and the other side, whose lock attempt now succeeds (the
    dead client's lock went with it), takes over."""
    backing = make_root(scratch, accounts, "backing")
    with latencyfs(backing, scratch / "ma", 0.0) as ma, \
            latencyfs(backing, scratch / "mb", 0.0) as mb:
        first, second = PollerLease(ma.path), PollerLease(mb.path)
        try:
            assert first.may_poll() and first.role == "leader"
            assert not second.may_poll() and second.role == "follower"
            assert second.status()["leader"]["held"] is True
            assert first.may_poll()  # asserted again: still the leader
            ma.crash()  # the filesystem is gone, not the daemon
            assert not first.may_poll() and first.role == "unreachable", first.status()
            assert second.may_poll() and second.role == "leader"
            assert not first.may_poll()
        finally:
            first.close()
            second.close()


def test_a_local_root_holds_no_election(accounts: Accounts, scratch: Path, envctld) -> None:
    """On a local disk every writer is on this host: a lone daemon there behaves as before
    elections existed (it polls nothing, creates nothing in the root)."""
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]))
    status = daemon_status(scratch / "envctld.sock")["roots"][0]
    assert status["poller"] is None and status["mode"] == "inotify"
    assert not (root / ".envctl").exists()
    d.stop()


def test_jobs_of_every_host_seen_from_any_host(accounts: Accounts, scratch: Path, envctld,
                                               jobs_env) -> None:
    """A job started on host A is listed with its state by host C (its record in the root),
    its status and its log too (published in the root); once A's daemon is gone, C marks its
    jobs instead of losing them."""
    backing = jobs_env.root
    with contextlib.ExitStack() as stack:
        socks = {}
        for host in ("hostA", "hostC"):
            mnt = stack.enter_context(latencyfs(backing, scratch / f"m-{host}", 0.0))
            conf = scratch / f"conf-{host}"
            conf.mkdir()
            raw = jobs_env.raw(state_dir=str(scratch / f"state-{host}"),
                               allowed_backends=["rattler"])
            raw["roots"][0]["path"] = str(mnt.path)
            raw["socket"] = {"path": str(conf / "envctld.sock")}
            raw["watch"] = {"poll_interval": 1}
            (conf / "envctld.yaml").write_text(yaml.safe_dump(raw))
            socks[host] = conf / "envctld.sock"
            daemons = envctld(conf / "envctld.yaml", host=host)
            if host == "hostA":
                first = daemons
        spec = scratch / "hello.yml"
        spec.write_text(f"channels: [{jobs_env.channel}]\ndependencies: [hello]\n")
        create = subprocess.Popen([str(VENV_BIN / "envctl"), "request", "create", "greeter",
                                   "-f", str(spec), "--test", "sleep 3",
                                   "--socket", str(socks["hostA"])],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            def seen_on_c(state: str) -> dict[str, Any] | None:
                jobs = _cli_json(socks["hostC"], "request", "list", "--all", "--finished")
                hits = [j for j in jobs if j["name"] == "greeter" and j["state"] == state]
                return hits[0] if hits else None

            wait_for(lambda: seen_on_c("running") is not None, 60, 0.2,
                     "hostA's running job listed by hostC")
            job = seen_on_c("running")
            assert job and job["host"] == "hostA" and job["host_alive"] is True
        finally:
            out, _ = create.communicate(timeout=120)
        assert create.returncode == 0, out
        done = _cli_json(socks["hostC"], "request", "status", job["id"])
        assert (done["state"], done["host"]) == ("succeeded", "hostA"), done
        logs = subprocess.run([str(VENV_BIN / "envctl"), "request", "logs", job["id"],
                               "--socket", str(socks["hostC"])], capture_output=True, text=True)
        assert logs.returncode == 0 and "building 'greeter'" in logs.stdout, logs.stderr
        human = _cli_table(socks["hostC"])
        assert human[0][-1] == "HOST" and [job["id"], "hostA"] in ([r[0], r[-1]] for r in human)
        first.kill9()
        gone = _cli_json(socks["hostC"], "request", "status", job["id"])
        assert (gone["state"], gone["host_alive"]) == ("succeeded", False), gone
        assert [job["id"], "hostA (gone)"] in ([r[0], " ".join(r[-2:])]
                                              for r in _cli_table(socks["hostC"]))


def _cli_table(sock: Path) -> list[list[str]]:
    """``request list --all --finished`` as a person sees it: the rows, split on blanks."""
    r = subprocess.run([str(VENV_BIN / "envctl"), "request", "list", "--all", "--finished",
                        "--socket", str(sock)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split() for line in r.stdout.splitlines() if line.strip()]


def _cli_json(sock: Path, *args: str) -> Any:
    r = subprocess.run([str(VENV_BIN / "envctl"), *args, "--json", "--socket", str(sock)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
