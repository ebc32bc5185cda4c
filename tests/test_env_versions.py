"""Updating an environment while people use it, with real builds (rattler from the local channel,
venv from the hand-made wheelhouse) and real other users:

- a poller (bob, every 20 ms, its own process) reads ``<root>/NAME/...`` during the whole update
  and sees the old version, then the new one — never an error, never an empty read;
- a process started in the old version (cwd there, paths resolved at start) reads its files
  after the switch; the prefix baked into the new version's files is the new version's;
- a failing ``--test`` does not promote (the log has the command's output), a passing one does,
  run inside the new version as the build user with the env activated;
- ``kill -9`` of the daemon mid-update leaves the current version serving, and the restarted
  daemon removes the half-built version;
- rollback and remove are one rename / one unlink; GC keeps the current version, the newest
  ``keep_versions`` and anything retired less than ``gc_grace`` ago; a hand-made env is listed
  ``unmanaged`` and never touched.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from envctl_shared.config import parse
from envctl_shared.errors import Conflict, NotAuthorised, NotFound
from envctl_shared.jobs import JobManager, Requester, State

from tests.helpers import live_processes, wait_for
from tests.jobs_support import JobsEnv, daemon_argv, full_log, wait_done, write_wheel

pytest_plugins = ("tests.fixtures_jobs",)  # the jobs fixtures
Factory = Callable[..., JobManager]

APP = "dependencies:\n  - app={v}\n"
DEMO = "dependencies:\n  - python\n  - pip:\n    - envctl_demo=={v}\n"

# Reads one file every 20 ms until the stop file appears; prints each distinct run as it
# begins, then the number of reads.
POLLER = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
last, n = None, 0
while not os.path.exists(stop):
    try:
        with open(path) as f:
            got = f.read().strip() or "<empty>"
    except OSError as exc:
        got = f"<{exc.strerror}>"
    n += 1
    if got != last:
        print(got, flush=True)
        last = got
    time.sleep(0.02)
print(n)
"""


class Poller:
    """``POLLER`` as another user (bob), in its own process; its output goes to a file the
    test opened, so the test can wait on what it has seen so far."""

    def __init__(self, env: JobsEnv, path: Path, scratch: Path) -> None:
        self.stop = scratch / "stop-poller"
        self.out = scratch / "poller.out"
        bob = env.accounts.bob
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(
                ["setpriv", f"--reuid={bob.uid}", f"--regid={bob.gid}", "--init-groups",
                 sys.executable, "-c", POLLER, str(path), str(self.stop)], stdout=out, text=True)
        self.wait_seen(None)  # a first read done: what follows happens while it reads

    def wait_seen(self, run: str | None, timeout: float = 30) -> None:
        """Until the poller has read ``run`` (None: anything)."""
        wait_for(lambda: bool(lines := self.out.read_text().splitlines()) and
                 (run is None or run in lines), timeout, what=f"the poller reading {run!r}")

    def finish(self) -> tuple[int, list[str]]:
        self.stop.touch()
        self.proc.wait(timeout=30)
        lines = self.out.read_text().splitlines()
        return int(lines[-1]), lines[:-1]


def _build(mgr: JobManager, env: JobsEnv, name: str, spec: str, backend: str = "rattler",
           **kw: object) -> str:
    job = wait_done(mgr, mgr.submit(env.requester(), name, spec, backend=backend,
                                    **kw).id, 240)  # type: ignore[arg-type]
    assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
    return job.id


@pytest.mark.parametrize("backend", ["rattler", "venv"])
def test_update_without_a_gap_and_old_process_keeps_its_version(
        jobs_env: JobsEnv, manager_factory: Factory, scratch: Path, backend: str) -> None:
    mgr = manager_factory()
    name = f"live-{backend}"
    stable = jobs_env.root / name
    if backend == "rattler":
        spec, rel = APP, "share/app/VERSION"
    else:
        write_wheel(jobs_env.wheelhouse, "envctl_demo", "2.0", "GREETING = '2.0'\n")
        spec, rel = DEMO, ""
    _build(mgr, jobs_env, name, spec.format(v="1.0"), backend)
    old = stable.resolve()
    assert old == jobs_env.root / ".envctl" / "envs" / name / "v1"
    if backend == "venv":
        rel = os.path.relpath(glob.glob(f"{old}/lib/python3*/site-packages/envctl_demo.py")[0],
                              old)
        first = (old / rel).read_text().strip()
    else:
        first = "1.0"
    # bound to the old version at start: cwd there, its baked prefix read after the switch
    switched = scratch / "switched"
    survivor = subprocess.Popen(
        ["setpriv", f"--reuid={jobs_env.accounts.alice.uid}",
         f"--regid={jobs_env.accounts.alice.gid}", "--init-groups", "sh", "-c",
         f'while [ ! -e {switched} ]; do sleep 0.05; done; '
         f'cat {rel}; ls bin >/dev/null && echo "bin ok"'], cwd=old,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    poller = Poller(jobs_env, stable / rel, scratch)
    try:
        job = _build(mgr, jobs_env, name, spec.format(v="2.0"), backend, replace=True)
        new = stable.resolve()
        second = (new / rel).read_text().strip()
        poller.wait_seen(second)
    finally:
        switched.touch()
        samples, runs = poller.finish()
    assert new == old.parent / "v2" and second != first
    assert runs == [first, second], runs  # never missing, never empty, never back
    assert samples > 10
    out, _ = survivor.communicate(timeout=30)
    assert out == f"{first}\nbin ok\n", out  # read after the switch
    assert (old / rel).read_text().strip() == first  # the old version stays until GC
    if backend == "rattler":  # has_prefix: each version's files name that version's prefix
        assert (new / "share/app/prefix.txt").read_text() == f"{new}\n"
        assert (old / "share/app/prefix.txt").read_text() == f"{old}\n"
        ran = subprocess.run([str(stable / "bin" / "app")], capture_output=True, text=True)
        assert ran.stdout == f"app 2.0 in {new}\n"
    assert f"{stable} now points to v2" in full_log(mgr, job)
    if backend == "venv":  # the inventory and the export of a venv: pip's own records
        pkgs = {p["name"]: p for p in mgr.environments.show(name)["versions"][1]["packages"]}
        assert pkgs["envctl_demo"] == {"manager": "pip", "name": "envctl_demo",
                                       "version": "2.0"}
        text = mgr.environments.export(name)["text"]
        assert "- envctl_demo==2.0" in text and "- pip==" not in text  # the venv brings pip


def test_tests_gate_the_promotion(jobs_env: JobsEnv, manager_factory: Factory) -> None:
    mgr = manager_factory()
    _build(mgr, jobs_env, "gated", APP.format(v="1.0"))
    stable = jobs_env.root / "gated"
    versions = stable.resolve().parent
    bad = mgr.submit(jobs_env.requester(), "gated", APP.format(v="2.0"), replace=True,
                     tests=["echo checking the version; app | grep -q 3.0"])
    done = wait_done(mgr, bad.id)
    log = full_log(mgr, bad.id)
    assert done.state is State.FAILED, log
    assert "test 1 ('echo checking the version; app | grep -q 3.0') failed with status 1" \
        in (done.exit_detail or "")
    assert "checking the version\n" in log  # the command's own output
    assert os.readlink(stable) == ".envctl/envs/gated/v1"  # not promoted
    assert sorted(os.listdir(versions)) == ["env.json", "v1", "v1.json", "v1.use"]  # v2 removed
    # the test runs inside the new version, activated, as the build user
    probe = ('test "$CONDA_PREFIX" = "$(dirname "$(dirname "$(command -v app)")")" && '
             'case "$CONDA_PREFIX" in */v2) ;; *) exit 9 ;; esac && '
             'test "$(id -u)" = ' + str(jobs_env.accounts.builder.uid) + ' && app')
    # the tests run against the frozen version (read-only, and below a read-only mount):
    # what users get, nothing left to write into
    litter = '! mkdir "$CONDA_PREFIX/cache"'  # a test cannot change the version it tests
    good = wait_done(mgr, mgr.submit(jobs_env.requester(), "gated", APP.format(v="2.0"),
                                     replace=True, tests=["true", probe, litter]).id)
    log = full_log(mgr, good.id)
    assert good.state is State.SUCCEEDED, log
    assert f"app 2.0 in {versions / 'v2'}\n" in log and "3 test command(s) passed" in log
    assert os.readlink(stable) == ".envctl/envs/gated/v2"
    assert json.loads((versions / "v2.json").read_text())["tests"] == ["true", probe, litter]
    assert not (versions / "v2" / "cache").exists()
    assert os.stat(versions / "v2").st_uid == 0  # frozen: the daemon's


def test_kill9_mid_update_keeps_current_and_restart_cleans(jobs_env: JobsEnv, scratch: Path,
                                                          manager_factory: Factory) -> None:
    """The daemon (a JobManager in its own process) is SIGKILLed while v2 of a venv is being
    built: v1 keeps serving throughout (a poller watches), and the restarted daemon removes
    the half-built v2 and says so."""
    first = manager_factory()
    _build(first, jobs_env, "k9env", DEMO.format(v="1.0"), "venv")
    first.stop()
    stable = jobs_env.root / "k9env"
    versions = stable.resolve().parent
    rel = os.path.relpath(glob.glob(f"{versions}/v1/lib/python3*/site-packages/"
                                    "envctl_demo.py")[0], versions / "v1")
    poller = Poller(jobs_env, stable / rel, scratch)
    cfg = jobs_env.raw()
    daemon = subprocess.Popen(daemon_argv(cfg, jobs_env.requester(), [
        ["k9env", DEMO.format(v="1.0"), "venv"]], replace=True), stdout=subprocess.PIPE,
        text=True)
    try:
        assert daemon.stdout is not None
        job_id = daemon.stdout.readline().strip()
        wait_for(lambda: (versions / "v2" / "bin").exists(), 60, what="v2 half-built")
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    assert os.readlink(stable) == ".envctl/envs/k9env/v1"
    assert json.loads((versions / "v2.json").read_text())["state"] == "building"
    mgr = JobManager(parse(cfg))
    mgr.start()
    try:
        samples, runs = poller.finish()
        assert runs == ["GREETING = 'hello from a wheel'"] and samples > 10, runs
        job = mgr.get(job_id)
        assert job.state is State.INTERRUPTED
        assert "removed the unfinished version v2 of 'k9env'" in full_log(mgr, job_id)
        assert sorted(os.listdir(versions)) == ["env.json", "v1", "v1.json", "v1.use"]
        assert os.readlink(stable) == ".envctl/envs/k9env/v1"
    finally:
        mgr.stop()
        wait_for(lambda: not live_processes({jobs_env.accounts.builder.uid},
                                            home_under=jobs_env.state_dir), 10,
                 what="no build left")


def _age(jobs_env: JobsEnv, name: str, seconds: float) -> None:
    """Make every retirement of ``name`` ``seconds`` older, as the passing of time would (the
    record stays the daemon's: written by root, 0644, replaced atomically). Why not sleep: a
    grace short enough to sleep through is shorter than a build on a loaded machine."""
    path = jobs_env.root / ".envctl" / "envs" / name / "env.json"
    env = json.loads(path.read_text())
    env["retired"] = {v: t - seconds for v, t in env["retired"].items()}
    tmp = path.with_name(".env.json.test")
    tmp.write_text(json.dumps(env))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _rollback(mgr: JobManager, jobs_env: JobsEnv, who: Requester, name: str,
              to: str | None = None) -> dict[str, Any]:
    """``env rollback`` with the API's access check (the service calls it under the lock)."""
    return mgr.environments.rollback(who, name, to, jobs_env.allow(who, "env-rollback", name))


def _remove(mgr: JobManager, jobs_env: JobsEnv, who: Requester, name: str) -> dict[str, Any]:
    return mgr.environments.remove(who, name, jobs_env.allow(who, "env-remove", name))


def test_rollback_remove_and_gc(jobs_env: JobsEnv, manager_factory: Factory) -> None:
    mgr = manager_factory(jobs_env.config(keep_versions=2, gc_grace=600.0))
    alice, bob = jobs_env.requester("alice"), jobs_env.requester("bob")
    admin = jobs_env.requester("mallory", admin=True)
    for v in ("1.0", "2.0", "1.0"):
        _build(mgr, jobs_env, "rb", APP.format(v=v), replace=True)
    stable = jobs_env.root / "rb"
    assert os.readlink(stable) == ".envctl/envs/rb/v3"
    with pytest.raises(NotAuthorised, match="belongs to .*alice"):
        _rollback(mgr, jobs_env, bob, "rb")
    t0 = time.monotonic()
    done = _rollback(mgr, jobs_env, alice, "rb")
    assert time.monotonic() - t0 < 1.0
    assert done == {"name": "rb", "current": "v2", "previous": "v3"}
    assert (stable / "share/app/VERSION").read_text() == "2.0\n"
    # admins may; forward too
    assert _rollback(mgr, jobs_env, admin, "rb", "v3")["current"] == "v3"
    with pytest.raises(NotFound):
        _rollback(mgr, jobs_env, alice, "rb", "v9")
    # GC: v3 current, v2 among the 2 newest, v1 retired under the grace: all kept
    assert mgr.environments.gc()["removed"] == []
    _age(jobs_env, "rb", 601)
    assert mgr.environments.gc(dry_run=True)["removed"] == [{"name": "rb", "version": "v1"}]
    assert (stable.resolve().parent / "v1").is_dir()  # a dry run removes nothing
    assert mgr.environments.gc()["removed"] == [{"name": "rb", "version": "v1"}]
    assert sorted(os.listdir(stable.resolve().parent)) == [
        "env.json", "v2", "v2.json", "v2.use", "v3", "v3.json", "v3.use"]
    # remove: the name goes at once, the versions after the grace
    with pytest.raises(NotAuthorised):
        _remove(mgr, jobs_env, bob, "rb")
    assert _remove(mgr, jobs_env, alice, "rb") == {"name": "rb", "removed": "v3"}
    assert not os.path.lexists(stable)
    listed = {e["name"]: e for e in mgr.environments.list()}
    assert listed["rb"]["status"] == "removed"
    # a removed name keeps no newest versions: v2 (not current for over the grace) goes now,
    # v3 (current until just now) only after the grace
    assert mgr.environments.gc()["removed"] == [{"name": "rb", "version": "v2"}]
    _age(jobs_env, "rb", 601)
    assert mgr.environments.gc()["removed"] == [{"name": "rb", "version": "v3"}]
    assert not (jobs_env.root / ".envctl" / "envs" / "rb").exists()
    assert "rb" not in {e["name"] for e in mgr.environments.list()}



def test_a_name_no_build_succeeded_for_is_not_found(jobs_env: JobsEnv,
                                                   manager_factory: Factory) -> None:
    """A name whose only build failed has a directory (the failed version's record) and no
    current version: rollback and remove say there is nothing (not-found, 65), not "no version
    before None" or a conflict to wait out (75); so does a second remove. A name never
    requested is "no environment" for export too, with the list as the hint."""
    mgr = manager_factory(jobs_env.config(gc_grace=600.0))
    admin = jobs_env.requester("mallory", admin=True)
    failed = wait_done(mgr, mgr.submit(admin, "broke", APP.format(v="1.0"),
                                       tests=["exit 3"]).id)
    assert failed.state is State.FAILED, full_log(mgr, failed.id)
    with pytest.raises(NotFound, match="'broke' has no built version to roll back to"):
        _rollback(mgr, jobs_env, admin, "broke")
    with pytest.raises(NotFound, match="'broke' has no current version: removed already"):
        _remove(mgr, jobs_env, admin, "broke")
    _build(mgr, jobs_env, "gone", APP.format(v="1.0"))
    _remove(mgr, jobs_env, admin, "gone")
    with pytest.raises(NotFound, match="removed already"):
        _remove(mgr, jobs_env, admin, "gone")
    assert _rollback(mgr, jobs_env, admin, "gone")["current"] == "v1"  # a remove undone
    with pytest.raises(NotFound, match="no environment 'nope' built by envctl") as err:
        mgr.environments.export("nope")
    assert err.value.hint == "see: envctl env list"

def test_hand_made_env_is_unmanaged_and_never_touched(jobs_env: JobsEnv,
                                                      manager_factory: Factory) -> None:
    mgr = manager_factory(jobs_env.config(gc_grace=0.0))
    hand = jobs_env.root / "byhand"
    (hand / "bin").mkdir(parents=True)
    (hand / "bin" / "tool").write_text("mine\n")
    before = sorted((p.name, p.stat().st_ino) for p in hand.rglob("*"))
    (jobs_env.root / "notes.txt").write_text("a file is not an env\n")
    _build(mgr, jobs_env, "managed", APP.format(v="1.0"))
    listed = {e["name"]: e for e in mgr.environments.list()}
    assert sorted(listed) == ["byhand", "managed"]
    assert listed["byhand"]["status"] == "unmanaged" and listed["byhand"]["current"] is None
    assert listed["managed"]["status"] == "ready" and listed["managed"]["current"] == "v1"
    assert listed["managed"]["owner"]["uid"] == jobs_env.accounts.alice.uid
    assert listed["managed"]["backend"] == "rattler" and listed["managed"]["size_bytes"] > 0
    admin = jobs_env.requester("mallory", admin=True)
    with pytest.raises(Conflict, match="not an environment envctl manages"):
        mgr.submit(admin, "byhand", APP.format(v="1.0"), replace=True)
    with pytest.raises(NotFound):
        _remove(mgr, jobs_env, admin, "byhand")
    with pytest.raises(NotFound):
        _rollback(mgr, jobs_env, admin, "byhand")
    mgr.environments.gc()
    assert sorted((p.name, p.stat().st_ino) for p in hand.rglob("*")) == before
    # show and export: the exact packages, and a spec create accepts back
    shown = mgr.environments.show("managed")
    pkgs = shown["versions"][0]["packages"]
    assert {(p["name"], p["version"]) for p in pkgs} == {("app", "1.0")}
    text = mgr.environments.export("managed")["text"]
    assert "- app ==1.0 0" in text
    again = _build(mgr, jobs_env, "copy", text)
    assert (jobs_env.root / "copy" / "share/app/VERSION").read_text() == "1.0\n", again


def test_the_daemon_collects_periodically(jobs_env: JobsEnv, manager_factory: Factory) -> None:
    """Nobody runs ``env gc``: the daemon's own pass (``gc_interval``) removes v1 once v2 is
    current (keep_versions 1, no grace), and leaves the current version alone."""
    mgr = manager_factory(jobs_env.config(keep_versions=1, gc_grace=0.0, gc_interval=0.3))
    _build(mgr, jobs_env, "periodic", APP.format(v="1.0"))
    _build(mgr, jobs_env, "periodic", APP.format(v="2.0"), replace=True)
    versions = jobs_env.root / ".envctl" / "envs" / "periodic"
    # v1 goes out of its name first (.gc-v1-*), then away
    wait_for(lambda: sorted(os.listdir(versions)) == ["env.json", "v2", "v2.json", "v2.use"], 10,
             what="v1 collected")
    assert (jobs_env.root / "periodic" / "share/app/VERSION").read_text() == "2.0\n"


def test_owner_on_a_shared_uid_is_the_hub_user(jobs_env: JobsEnv, manager_factory: Factory) -> None:
    """Two hub users on one uid (verified hub users, as the API hands them over): the env
    belongs to the one who built its first version, not to the uid."""
    mgr = manager_factory()
    ann = replace(jobs_env.requester("alice"), hub_user="ann")
    ben = replace(ann, hub_user="ben")
    for v in ("1.0", "2.0"):
        job = wait_done(mgr, mgr.submit(ann, "hubenv", APP.format(v=v), replace=True).id)
        assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
    assert mgr.environments.owner("hubenv")["hub_user"] == "ann"  # type: ignore[index]
    with pytest.raises(NotAuthorised, match="belongs to hub user ann"):
        _rollback(mgr, jobs_env, ben, "hubenv")
    with pytest.raises(NotAuthorised, match="belongs to hub user ann"):
        _remove(mgr, jobs_env, ben, "hubenv")
    assert _rollback(mgr, jobs_env, ann, "hubenv")["current"] == "v1"


def test_an_owner_renamed_on_the_hub_keeps_the_env_and_a_new_user_of_the_name_does_not(
        jobs_env: JobsEnv, manager_factory: Factory) -> None:
    """The record keeps the hub's stable identity (``hub_id``: the user's ``created`` time,
    which the hub keeps across a rename); a record without one (older envs) goes by name."""
    mgr = manager_factory()
    ann = replace(jobs_env.requester("alice"), hub_user="ann", hub_id="2026-01-01T00:00:00Z")
    job = wait_done(mgr, mgr.submit(ann, "renamed", APP.format(v="1.0")).id)
    assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
    job = wait_done(mgr, mgr.submit(ann, "renamed", APP.format(v="2.0"), replace=True).id)
    assert mgr.environments.owner("renamed") == {  # as the record keeps it
        "uid": ann.uid, "name": ann.username, "hub_user": "ann",
        "hub_id": "2026-01-01T00:00:00Z", "claimed_user": None}
    newcomer = replace(ann, hub_id="2026-06-01T00:00:00Z")  # a new "ann" after the rename
    with pytest.raises(NotAuthorised, match="belongs to hub user ann"):
        _rollback(mgr, jobs_env, newcomer, "renamed")
    unproven = replace(ann, hub_id=None)  # a token that does not show the creation time
    with pytest.raises(NotAuthorised, match="belongs to hub user ann"):
        _rollback(mgr, jobs_env, unproven, "renamed")
    anna = replace(ann, hub_user="anna")  # ann, renamed on the hub
    assert _rollback(mgr, jobs_env, anna, "renamed")["current"] == "v1"
    # a record from before hub_id: the name decides (and the decision is logged)
    path = jobs_env.root / ".envctl" / "envs" / "renamed" / "env.json"
    env = json.loads(path.read_text())
    del env["owner"]["hub_id"]
    tmp = path.with_name(".env.json.test")
    tmp.write_text(json.dumps(env))
    os.replace(tmp, path)
    with pytest.raises(NotAuthorised):
        _rollback(mgr, jobs_env, anna, "renamed", "v2")
    assert _rollback(mgr, jobs_env, newcomer, "renamed", "v2")["current"] == "v2"


RECORD_READER = """
import json, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
n = bad = 0
while not os.path.exists(stop):
    try:
        with open(path) as f:
            json.load(f)
    except ValueError:
        bad += 1
    n += 1
    if n == 1:
        print("reading", flush=True)
print(n, bad)
"""


def test_rollback_and_remove_are_atomic_for_readers(jobs_env: JobsEnv, manager_factory: Factory,
                                                    scratch: Path) -> None:
    """Readers of the stable path during 60 rollbacks see 1.0 or 2.0, never an error; readers
    of ``env.json`` (rewritten at each one) never see a torn record; during remove, the name
    goes from the version to absent in one step."""
    mgr = manager_factory()
    for v in ("1.0", "2.0"):
        _build(mgr, jobs_env, "atomic", APP.format(v=v), replace=True)
    stable = jobs_env.root / "atomic"
    alice = jobs_env.requester("alice")
    poller = Poller(jobs_env, stable / "share/app/VERSION", scratch)
    stop = scratch / "stop-records"
    bob = jobs_env.accounts.bob
    records = subprocess.Popen(
        ["setpriv", f"--reuid={bob.uid}", f"--regid={bob.gid}", "--init-groups",
         sys.executable, "-c", RECORD_READER, str(stable.resolve().parent / "env.json"),
         str(stop)], stdout=subprocess.PIPE, text=True)
    assert records.stdout is not None and records.stdout.readline() == "reading\n"
    try:
        for i in range(60):
            _rollback(mgr, jobs_env, alice, "atomic", "v1" if i % 2 == 0 else "v2")
            time.sleep(0.005)
    finally:
        samples, runs = poller.finish()
        stop.touch()
        out, _ = records.communicate(timeout=30)
    assert set(runs) == {"1.0", "2.0"} and samples > 10, runs
    reads, torn = map(int, out.split())
    assert torn == 0 and reads > 100, out
    (scratch / "rm").mkdir()
    poller = Poller(jobs_env, stable / "share/app/VERSION", scratch / "rm")
    try:
        _remove(mgr, jobs_env, alice, "atomic")
        poller.wait_seen("<No such file or directory>")
    finally:
        samples, runs = poller.finish()
    assert runs == ["2.0", "<No such file or directory>"], runs


FAKE_CONDA = """#!/bin/sh
# envctl test stand-in for `conda env create --prefix P --file F` (no conda here): a prefix
# with a conda-meta record and a script that names the prefix it was made for.
while [ $# -gt 0 ]; do case "$1" in --prefix) p="$2"; shift ;; esac; shift; done
mkdir -p "$p/conda-meta" "$p/bin"
printf '{"name": "fake", "version": "1.0", "build": "0", "channel": "local"}' \\
    > "$p/conda-meta/fake-1.0-0.json"
printf '#!/bin/sh\\necho "fake in %s"\\n' "$p" > "$p/bin/fake"
chmod 755 "$p/bin/fake"
"""


def test_conda_backend_builds_versions_the_same_way(jobs_env: JobsEnv, manager_factory: Factory,
                                                   scratch: Path) -> None:
    """The conda family goes the same way (first build and update): built at the version's
    path, switched, inventoried from conda-meta. conda itself cannot run here: a stand-in
    takes its command line."""
    exe = scratch / "conda"
    exe.write_text(FAKE_CONDA)
    os.chmod(exe, 0o755)
    mgr = manager_factory(jobs_env.config(allowed_backends=["rattler", "conda"],
                                          conda_exe=str(exe)))
    for _ in range(2):
        _build(mgr, jobs_env, "condaenv", "dependencies: [fake]\n", "conda", replace=True)
    stable = jobs_env.root / "condaenv"
    assert os.readlink(stable) == ".envctl/envs/condaenv/v2"
    out = subprocess.run([str(stable / "bin" / "fake")], capture_output=True, text=True)
    assert out.stdout == f"fake in {stable.resolve()}\n"
    assert (stable.resolve().parent / "v1" / "bin" / "fake").exists()
    shown = mgr.environments.show("condaenv")
    assert shown["backend"] == "conda" and shown["versions"][1]["packages"] == [
        {"manager": "conda", "name": "fake", "version": "1.0", "build": "0",
         "channel": "local"}]


def test_cancelled_update_leaves_the_current_version(jobs_env: JobsEnv,
                                                     manager_factory: Factory) -> None:
    mgr = manager_factory()
    _build(mgr, jobs_env, "cu", APP.format(v="1.0"))
    alice = jobs_env.requester("alice")
    job = mgr.submit(alice, "cu", DEMO.format(v="1.0"), backend="venv", replace=True)
    versions = jobs_env.root / ".envctl" / "envs" / "cu"
    wait_for(lambda: mgr.get(job.id).phase == "creating" and (versions / "v2").is_dir(), 60,
             what="v2 being built")
    assert mgr.cancel(job.id, alice).state is State.CANCELLED
    assert os.readlink(jobs_env.root / "cu") == ".envctl/envs/cu/v1"
    assert (jobs_env.root / "cu" / "share/app/VERSION").read_text() == "1.0\n"
    assert sorted(os.listdir(versions)) == ["env.json", "v1", "v1.json", "v1.use"]
    assert "removed the unfinished version v2" in full_log(mgr, job.id)
