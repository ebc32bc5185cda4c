"""Frozen versions (issue 17, items 1 and 2), with real builds, real other users, a real daemon:

- a built version is the daemon's, the root's group, with no write bit anywhere: a member's
  write, create, rename or unlink in it is refused by the kernel (EACCES), as a real user;
- its record holds a digest; ``verify`` recomputes it and names every difference a root made
  (content, mode, an added file), exit 1, and 0 when clean; ``env show``/``env list``/
  ``status`` say so;
- the freeze walks any depth (a 3,000-level chain; a 1,000-level tree with directories
  pending at every level, within a few dozen fds, and verify names a change at its bottom),
  refuses fifos and setuid files naming them, and shares identical files through the store
  (3 copies ≈ the disk of one);
- versions built before freezing existed are frozen when the daemon starts;
- a running daemon adds no inotify watch for a version, and leaves it without write bits.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from envctl_shared import fsinfo
from envctl_shared.api.client import Client
from envctl_shared.errors import BuildFailed
from envctl_shared.jobs import JobManager, State, envs, freeze, integrity, layout
from envctl_shared.jobs.lock import NameLock

from tests.api_support import ApiDaemon, start_api_daemon
from tests.helpers import VENV_BIN, as_user, make_chain, wait_for
from tests.jobs_support import ENV_HELLO, JobsEnv, full_log, wait_done
from tests.watch_support import wait_quiet

pytest_plugins = ("tests.fixtures_jobs",)
Factory = Callable[..., JobManager]


def _build(mgr: JobManager, env: JobsEnv, name: str, spec: str = ENV_HELLO) -> Path:
    job = wait_done(mgr, mgr.submit(env.requester(), name, spec).id, 120)
    assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
    return (env.root / name).resolve()


def _writable(tree: Path) -> list[str]:
    """Entries with any write bit, found by GNU find (not by envctl)."""
    out = subprocess.run(["find", str(tree), "!", "-type", "l", "-perm", "/0222"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def _owners(tree: Path) -> set[str]:
    out = subprocess.run(["find", str(tree), "-printf", "%U:%G\n"], capture_output=True,
                         text=True, check=True).stdout
    return set(out.split())


def test_members_cannot_change_a_version(jobs_env: JobsEnv, manager_factory: Factory) -> None:
    mgr = manager_factory()
    version = _build(mgr, jobs_env, "frozen")
    acc = jobs_env.accounts
    assert _writable(version) == []
    assert _owners(version) == {f"0:{acc.shared_gid}"}
    assert stat.S_IMODE(version.stat().st_mode) == 0o2555  # others: read (the root's policy)
    assert (version / "bin" / "hello").stat().st_mode & 0o777 == 0o555  # x kept, no w
    rec = json.loads((version.parent / "v1.json").read_text())
    assert rec["digest"].startswith("sha256:") and 0 < rec["frozen_at"] <= rec["built_at"]
    for attack in (f"touch {version}/bin/planted.pth",
                   f"echo evil >> {version}/bin/hello",
                   f"mv {version}/bin {version}/bin2",
                   f"rm -f {version}/bin/hello",
                   f"chmod u+w {version}/bin/hello"):
        res = as_user(acc.alice.uid, acc.alice.gid, attack, check=False, init_groups=True)
        assert res.returncode != 0 and ("Permission denied" in res.stderr
                                        or "not permitted" in res.stderr), (attack, res.stderr)
    assert (version / "bin" / "hello").read_text().startswith("#!/bin/sh")
    assert subprocess.run([str(jobs_env.root / "frozen" / "bin" / "hello")], check=True,
                          capture_output=True, text=True).stdout == "hello from envctl\n"


def test_verify_names_what_root_changed(jobs_env: JobsEnv, manager_factory: Factory) -> None:
    mgr = manager_factory()
    version = _build(mgr, jobs_env, "checked")
    locks = os.open(jobs_env.root / ".envctl" / "locks", os.O_RDONLY)
    update = NameLock(locks, str(jobs_env.root), "checked", "an update")
    update.acquire()  # an update of the name under way does not hold a verify back
    try:
        clean = mgr.environments.verify("checked")
    finally:
        update.release()
        os.close(locks)
    assert clean["ok"] and clean["differences"] == [] and clean["digest_now"] == clean["digest"]
    shown = mgr.environments.show("checked")["versions"][0]
    assert shown["verify"]["ok"] and shown["verified_at"] == clean["verified_at"]
    # root tampers: a content change, a chmod, an added file at the top
    (version / "share/greet/message").write_text("pwned\n")
    os.chmod(version / "lib/greet/VERSION", 0o666)
    (version / "zz.pth").write_text("import os\n")
    out = mgr.environments.verify("checked")
    found = {(d["path"], d["what"]) for d in out["differences"]}
    assert not out["ok"] and out["count"] == len(out["differences"])
    assert {("share/greet/message", "content"), ("share/greet/message", "size"),
            ("lib/greet/VERSION", "mode"), ("zz.pth", "added")} <= found, found
    assert mgr.environments.list()[0]["failed_verify"] == ["v1"]
    checked = integrity.check(jobs_env.config())
    assert [(t["name"], t["version"]) for t in checked["tampered"]] == [("checked", "v1")]
    assert [(f["name"], f["version"]) for f in checked["failed_verify"]] == [("checked", "v1")]


def test_a_3000_level_chain_freezes(scratch: Path, accounts: object) -> None:
    tree = scratch / "deep" / "v1"
    fd = os.open(scratch, os.O_RDONLY)
    try:
        os.mkdir("deep", dir_fd=fd)
    finally:
        os.close(fd)
    cur = os.open(scratch / "deep", os.O_RDONLY)
    os.mkdir("v1", dir_fd=cur)
    for _ in range(3000):  # deeper than PATH_MAX: made and checked through fds only
        nxt = os.open("v1" if _ == 0 else "d", os.O_RDONLY, dir_fd=cur)
        os.close(cur)
        cur = nxt
        os.mkdir("d", 0o777, dir_fd=cur)
        os.chown("d", 1, 1, dir_fd=cur)
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=cur), "w") as fh:
        fh.write("bottom\n")
    os.close(cur)
    target = freeze.Target(0, accounts.shared_gid, "none")  # type: ignore[attr-defined]
    parent = os.open(tree.parent, os.O_RDONLY)
    store_parent = os.open(scratch, os.O_RDONLY)
    store = freeze.Store(store_parent, str(scratch / "store"), target)
    try:
        frozen = freeze.freeze(parent, "v1", target, str(tree), store)
        assert frozen.entries == 3002
        assert freeze.verify(parent, "v1", target, frozen.digest, str(tree), store)[1] == []
    finally:
        store.close()
        os.close(parent)
        os.close(store_parent)
    assert _writable(tree) == [] and _owners(tree) == {f"0:{target.gid}"}
    depth = subprocess.run(["find", str(tree), "-type", "d", "-perm", "2550"],
                           capture_output=True, text=True, check=True).stdout.count("\n")
    assert depth == 3001
    subprocess.run(["rm", "-rf", str(scratch / "deep")], check=True)  # rmtree recurses per level


def test_a_deep_bushy_tree_freezes_and_verify_finds_a_change_at_its_bottom(
        scratch: Path, accounts: object) -> None:
    """A chain of 1,000 levels with three more directories (a file in each) and a file at
    every level: the freeze's own walk once let at most 512 directories pend and refused this
    tree (a version GC removes without a word could be neither frozen nor verified). Frozen
    and verified through the jobs layer's one walk under an fd limit far below one fd per
    level; a file changed and a file given away at the bottom are named by verify."""
    levels = 1000
    tree = scratch / "env" / "v1"
    try:
        _bushy_freeze_and_tamper(tree, levels, accounts.shared_gid)  # type: ignore[attr-defined]
    finally:
        subprocess.run(["rm", "-rf", str(tree.parent)], check=True)  # rmtree recurses per level


def _bushy_freeze_and_tamper(tree: Path, levels: int, gid: int) -> None:
    cur = tree
    for level in range(levels):
        for sib in ("s0", "s1", "s2"):
            (cur / sib).mkdir(parents=True)
            (cur / sib / "f").write_text("same\n")
        (cur / "f").write_text("same\n")
        if level in (300, 700):  # hashed on a worker, its directory closed by the walk meanwhile
            with open(cur / "big", "wb") as fh:
                fh.truncate(freeze.PARALLEL_BYTES)  # sparse: no disk
        cur = cur / "d"
    cur.mkdir()
    (cur / "f").write_text("bottom\n")
    (cur / "g").write_text("given away\n")  # unique: the store links the same ones together
    bottom = "/".join(["d"] * levels)
    target = freeze.Target(0, gid, "none")
    fsinfo.mount_of(str(tree))  # its mount table stays open (MountWatch), not the walk's
    fds = len(os.listdir("/proc/self/fd"))
    parent = os.open(tree.parent, os.O_RDONLY)
    store = freeze.Store(parent, str(tree.parent / "store"), target)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (in_use + layout.HELD_LEVELS + 2 * freeze.IN_FLIGHT + 32, hard))
        try:
            frozen = freeze.freeze(parent, "v1", target, str(tree), store)
            assert (frozen.entries, frozen.linked) == (5 + 8 * levels, 4 * levels)
            assert freeze.verify(parent, "v1", target, frozen.digest, str(tree), store)[1] == []
            (cur / "f").write_text("BOTTOM\n")  # root writes a read-only file
            os.chown(cur / "g", 1, 1)
            now, diffs = freeze.verify(parent, "v1", target, frozen.digest, str(tree), store)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        store.close()
        os.close(parent)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert now != frozen.digest
    assert [(d.path, d.what) for d in diffs] == [
        (f"{bottom}/f", "content"),
        (f"{bottom}/g", "owner")]


# The GC's walk of a chain in a process of its own: its peak memory, less what it held before.
CHAIN_WALK = """
import os, resource, sys
from envctl_shared.jobs import layout
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(1 for _ in layout.walk(fd, lambda st: True))
print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_deep_chain_costs_the_gc_walk_memory_by_its_depth_not_its_square(
        scratch: Path) -> None:
    """Attack: a build leaves a chain of 20,000 levels (a second of mkdirat). The walk once
    kept each open level's path from the top: their sum grows with the square of the depth
    (0.4 GB here; 10 GB for 100k levels, the daemon killed by the OOM killer at GC)."""
    top = scratch / "chain"
    top.mkdir()
    make_chain(top, 20000)
    try:
        out = subprocess.run([str(VENV_BIN / "python"), "-c", CHAIN_WALK, str(top)], check=True,
                             capture_output=True, text=True).stdout.split()
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)  # rmtree recurses per level
    assert int(out[0]) == 20000 and int(out[1]) < 64, f"{out[1]} MB more for the walk"


@pytest.mark.parametrize(("levels", "name"), [(2000, "d"), (500, "\U0001f600"), (700, "\x01")])
def test_a_version_whose_paths_outgrow_the_cap_fails_the_freeze_and_closes_its_fds(
        scratch: Path, monkeypatch: pytest.MonkeyPatch, levels: int, name: str) -> None:
    """The manifest lists every entry by its path, so a chain's paths sum to the square of
    its depth: past MAX_PATH_BYTES the freeze is refused, not paid for with the daemon's
    memory (a lower cap here: a chain of 2,000 levels, 4 MB of paths, against 1 MiB). The
    paths are counted as the manifest spells them: a name of one emoji (4 bytes, 12 in the
    manifest's JSON) or a control character (6) counted as one let a chain of 500 or 700
    levels (0.25 M and 0.49 M characters: 1.6 and 1.7 MB of manifest) through a 1 MiB cap:
    the real cap was up to 12 times the one set."""
    monkeypatch.setattr(freeze, "MAX_PATH_BYTES", 1 << 20)
    tree = scratch / "env" / "v1"
    tree.mkdir(parents=True)
    make_chain(tree, levels, name=name)
    target = freeze.Target(0, os.getegid(), "none")
    fsinfo.mount_of(str(tree))  # its mount table stays open (MountWatch), not the walk's
    parent = os.open(tree.parent, os.O_RDONLY)
    store = freeze.Store(parent, str(tree.parent / "store"), target)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(BuildFailed, match="its paths take more than 1 MiB"):
            freeze.freeze(parent, "v1", target, str(tree), store)
        assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        store.close()
        os.close(parent)
        subprocess.run(["rm", "-rf", str(tree.parent)], check=True)


@pytest.mark.parametrize("kind", ["fifo", "setuid"])
def test_specials_fail_the_freeze_naming_the_path(scratch: Path, kind: str) -> None:
    tree = scratch / "v1" / "lib"
    tree.mkdir(parents=True)
    (tree / "ok").write_text("fine\n")
    if kind == "fifo":
        os.mkfifo(tree / "odd")
    else:
        (tree / "odd").write_text("#!/bin/sh\n")
        os.chmod(tree / "odd", 0o4755)
    for n in range(20):  # directories still to visit when it fails: their fds are let go
        (scratch / "v1" / f"z{n}" / "sub").mkdir(parents=True)
    target = freeze.Target(0, 0, "keep")
    fsinfo.mount_of(str(scratch))  # its mount table stays open (MountWatch), not the walk's
    fds = len(os.listdir("/proc/self/fd"))
    fd = os.open(scratch, os.O_RDONLY)
    store = freeze.Store(fd, str(scratch / "store"), target)
    try:
        with pytest.raises(BuildFailed) as err:
            freeze.freeze(fd, "v1", target, str(scratch / "v1"), store)
    finally:
        store.close()
        os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert f"{scratch}/v1/lib/odd is a" in err.value.message
    assert ("fifo" if kind == "fifo" else "setuid") in err.value.message


def test_store_shares_identical_versions(scratch: Path) -> None:
    """Three copies of one tree, frozen with one store: du (which counts a hard-linked inode
    once) sees little more than one copy."""
    src = scratch / "one"
    for d in range(10):
        (src / f"pkg{d}").mkdir(parents=True)
        for f in range(20):
            (src / f"pkg{d}" / f"m{f}.py").write_bytes(os.urandom(65536))
    (src / "libbig.so").write_bytes(os.urandom(freeze.PARALLEL_BYTES + 1))  # hashed on a worker
    single = int(subprocess.run(["du", "-sk", str(src)], capture_output=True, text=True,
                                check=True).stdout.split()[0])
    env = scratch / "env"
    env.mkdir()
    for n in (1, 2, 3):
        subprocess.run(["cp", "-a", str(src), str(env / f"v{n}")], check=True)
    shutil.rmtree(src)
    target = freeze.Target(0, 0, "read")
    fd = os.open(env, os.O_RDONLY)
    store = freeze.Store(fd, str(env / "store"), target)
    try:
        linked = [freeze.freeze(fd, f"v{n}", target, f"v{n}", store).linked for n in (1, 2, 3)]
    finally:
        store.close()
        os.close(fd)
    assert linked == [0, 201, 201]
    total = int(subprocess.run(["du", "-sk", str(env)], capture_output=True, text=True,
                               check=True).stdout.split()[0])
    assert total <= 1.2 * single, (total, single)


def test_files_that_are_store_copies_are_not_read_again(scratch: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A version whose files are hard links to the store's copies (what the trusted step's
    links from conda's cache are after their first freeze) is frozen from the store's index:
    no file hashed again, the same digest, verify clean (it reads every file). A link whose
    mode is no longer the frozen one is not taken on trust: frozen and hashed as any file."""
    env = scratch / "env"
    for d in range(3):
        (env / "v1" / f"pkg{d}").mkdir(parents=True)
        for f in range(5):
            (env / "v1" / f"pkg{d}" / f"m{f}.py").write_bytes(os.urandom(4096))

    def linked_copy(name: str) -> None:  # as rattler links a version from its cache
        for path in sorted((env / "v1").rglob("*")):
            dest = env / name / path.relative_to(env / "v1")
            if path.is_dir():
                dest.mkdir(parents=True)
            else:
                os.link(path, dest)

    hashed: list[int] = []
    real = freeze._Walk._hash

    def spy(walk: freeze._Walk, fd: int, st: os.stat_result) -> str:
        hashed.append(st.st_ino)
        return real(walk, fd, st)

    target = freeze.Target(0, 0, "read")
    fd = os.open(env, os.O_RDONLY)
    store = freeze.Store(fd, str(env / "store"), target)
    try:
        first = freeze.freeze(fd, "v1", target, "v1", store)
        linked_copy("v2")
        monkeypatch.setattr(freeze._Walk, "_hash", spy)
        second = freeze.freeze(fd, "v2", target, "v2", store)
        assert second.digest == first.digest and hashed == []
        _, diffs = freeze.verify(fd, "v2", target, second.digest, "v2", store)
        assert diffs == [] and len(hashed) == 15
        hashed.clear()
        changed = env / "v1" / "pkg0" / "m0.py"
        os.chmod(changed, 0o644)  # the store's copy itself: it is one inode
        linked_copy("v3")
        third = freeze.freeze(fd, "v3", target, "v3", store)
        assert hashed == [changed.stat().st_ino] and third.digest == first.digest
        assert stat.S_IMODE(changed.stat().st_mode) == 0o444
    finally:
        store.close()
        os.close(fd)


def test_store_sweep_drops_what_only_removed_versions_held(scratch: Path) -> None:
    env = scratch / "env"
    for n in (1, 2):
        (env / f"v{n}").mkdir(parents=True)
        (env / f"v{n}" / "shared").write_text("in both\n")
        (env / f"v{n}" / "own").write_text(f"only in v{n}\n")
    target = freeze.Target(0, 0, "read")
    fd = os.open(env, os.O_RDONLY)
    store = freeze.Store(fd, str(env / "store"), target)
    try:
        digests = [freeze.freeze(fd, f"v{n}", target, f"v{n}", store).digest for n in (1, 2)]
        assert store.sweep(set(digests), time.time()) == {"files": 0, "bytes": 0,
                                                          "manifests": 0}
        subprocess.run(["rm", "-rf", str(env / "v1")], check=True)  # as GC drops a version
        out = store.sweep({digests[1]}, time.time() + 7200)  # v1's manifest: old enough
        assert (out["files"], out["manifests"]) == (1, 1) and out["bytes"] > len("only in v1")
        assert freeze.verify(fd, "v2", target, digests[1], "v2", store)[1] == []
    finally:
        store.close()
        os.close(fd)
    left = sorted(p.read_text() for p in (env / "store").glob("??/*"))
    assert left == ["in both\n", "only in v2\n"]


def test_versions_built_before_are_frozen_at_start(jobs_env: JobsEnv, manager_factory: Factory,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    first = manager_factory()
    version = _build(first, jobs_env, "legacy")
    first.stop()
    # as the code before freezing left a version: the build user's, group-writable, no digest
    acc = jobs_env.accounts
    subprocess.run(["chown", "-R", f"{acc.builder.uid}:{acc.shared_gid}", str(version)],
                   check=True)
    subprocess.run(["chmod", "-R", "g+w", str(version)], check=True)
    env_fd = os.open(version.parent, os.O_RDONLY)
    try:
        rec = envs.read_record(env_fd, "v1.json")
        assert rec is not None
        for key in ("digest", "frozen_at", "stamp"):
            rec.pop(key)
        envs.write_record(env_fd, "v1.json", rec)
    finally:
        os.close(env_fd)
    assert _writable(version)
    caplog.set_level("INFO", logger="envctl_shared.jobs.integrity")
    second = manager_factory()  # frozen in start, before any build
    assert "digest" in json.loads((version.parent / "v1.json").read_text())
    assert _writable(version) == [] and _owners(version) == {f"0:{acc.shared_gid}"}
    assert second.environments.verify("legacy")["ok"]
    second.stop()
    manager_factory()  # once: a later start has nothing to freeze
    said = [r.getMessage() for r in caplog.records if "env-freeze-old" in r.getMessage()]
    assert said == ["env-freeze-old name=legacy versions=v1"], said
    ran = subprocess.run([str(jobs_env.root / "legacy" / "bin" / "hello")], check=True,
                         capture_output=True, text=True)
    assert ran.stdout == "hello from envctl\n"


# -- with a real daemon: watches, the healer, the CLI, status ----------------------------------


@pytest.fixture(scope="module")
def api(accounts: object) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts, gc_interval=1)  # type: ignore[arg-type]


def _watches(pid: int) -> int:
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                total += sum(1 for line in fh if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def test_daemon_neither_watches_nor_heals_versions(api: ApiDaemon, accounts: object) -> None:
    acc = accounts
    assert api.daemon.proc is not None
    pid = api.daemon.proc.pid
    before = _watches(pid)
    spec = api.write_spec(api.hello_spec())
    res = api.cli(acc.alice, "request", "create", "watched",  # type: ignore[attr-defined]
                  "-f", str(spec))
    assert res.returncode == 0, res.stderr
    version = (api.root / "watched").resolve()
    wait_quiet(api.sock, "the build's events handled")
    assert _watches(pid) == before
    assert _writable(version) == []
    # a file root hands to the build user inside the version: the healer would make it g+w
    planted = version / "share" / "greet" / "message"
    os.chown(planted, acc.builder.uid, acc.shared_gid)  # type: ignore[attr-defined]
    wait_quiet(api.sock, "the chown's event, if any, handled")
    assert stat.S_IMODE(planted.stat().st_mode) == 0o444
    out = api.cli(acc.bob, "env", "verify", "watched")  # type: ignore[attr-defined]
    assert out.returncode == 1 and "share/greet/message: owner" in out.stdout, \
        (out, api.daemon.log_text()[-4000:])  # an internal error: the daemon's log says why
    os.chown(planted, 0, acc.shared_gid)  # type: ignore[attr-defined]
    out = api.cli(acc.bob, "env", "verify", "watched", "--json")  # type: ignore[attr-defined]
    assert out.returncode == 0 and json.loads(out.stdout)["ok"], out
    shown = api.cli(acc.bob, "env", "show", "watched")  # type: ignore[attr-defined]
    assert "last verified" in shown.stdout and "passed" in shown.stdout, shown.stdout
    # the periodic check (gc_interval 1) sees a chmod of the version in status, unhashed
    os.chmod(version, 0o2755)

    def tampered() -> list[dict[str, str]]:
        with Client(api.sock) as client:
            return client.call("status")["integrity"]["tampered"]
    wait_for(lambda: bool(tampered()), 15, 0.2, "status reports the tampered version")
    assert tampered()[0]["name"] == "watched"
    status = api.cli(acc.bob, "status")  # type: ignore[attr-defined]
    assert "TAMPERED: watched v1" in status.stdout, status.stdout
    os.chmod(version, 0o2555)
