"""Hostile conda packages against the trusted (root) rattler step, with real builds.

Why: the rattler step runs as the daemon (root) to fill the shared package cache, and reads
every package's files from that cache to link or copy them into the version. A package's
tarball is the requester's (a channel they may publish to): it may make an entry of its cache
directory a symlink that leads out (``vt -> /var/tmp``) and list ``vt/secret`` in its
``info/paths.json``. Root then copied (or hard-linked) any file of the host into the version,
and the freeze made it readable by the root's group and others. The build must fail naming the
package and the path, and nothing of the host file may reach the root.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envctl_shared.jobs import JobManager, State, layout, procs

from tests.helpers import as_user
from tests.jobs_support import JobsEnv, _add, build_channel, full_log, wait_done

pytest_plugins = ("tests.fixtures_jobs",)
Factory = Callable[..., JobManager]
SECRET = b"envctl-attack-secret-4f1c\n"


@pytest.fixture
def host_secret() -> Iterator[Path]:
    """A root-only file outside every place the build's mount namespace covers (/var/lib is
    neither private nor read-only there; /tmp, /var/tmp and /run/lock are private)."""
    base = Path(f"/var/lib/envctl-attack-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o700)
    (base / "secret").write_bytes(SECRET)
    os.chmod(base / "secret", 0o600)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _raw_package(subdir: Path, name: str, paths: list[dict[str, object]],
                 links: dict[str, str]) -> None:
    """A .tar.bz2 whose paths.json is ``paths`` and whose payload is the symlinks ``links``."""
    index = {"name": name, "version": "1.0", "build": "0", "build_number": 0, "depends": [],
             "subdir": "noarch", "license": "MIT", "noarch": "generic"}
    subdir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(subdir / f"{name}-1.0-0.tar.bz2", "w:bz2") as tar:
        _add(tar, "info/index.json", json.dumps(index).encode())
        _add(tar, "info/paths.json", json.dumps({"paths": paths, "paths_version": 1}).encode())
        _add(tar, "info/files", "".join(f"{p['_path']}\n" for p in paths).encode())
        for rel, target in links.items():
            info = tarfile.TarInfo(rel)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def _grep_root(root: Path) -> str:
    """Files below ``root`` holding the secret (GNU grep, not envctl)."""
    res = subprocess.run(["grep", "-rlF", SECRET.decode().strip(), str(root)],
                         capture_output=True, text=True, check=False)
    return res.stdout


@pytest.mark.parametrize("how", ["through-dir", "file-is-link"])
def test_a_package_cannot_make_root_copy_a_host_file(jobs_env: JobsEnv,
                                                     manager_factory: Factory, scratch: Path,
                                                     host_secret: Path, how: str) -> None:
    channel = scratch / "hostile-channel"
    entry = {"path_type": "hardlink", "sha256": hashlib.sha256(SECRET).hexdigest(),
             "size_in_bytes": len(SECRET)}
    if how == "through-dir":  # an ancestor of a listed file leads out of the cache
        _raw_package(channel / "noarch", "leaky", [{"_path": "vt/secret", **entry}],
                     {"vt": str(host_secret)})
    else:  # the listed file itself is a symlink out (copied, the link followed)
        _raw_package(channel / "noarch", "leaky", [{"_path": "share/secret", **entry}],
                     {"share/secret": str(host_secret / "secret")})
    build_channel(channel, [])
    mgr = manager_factory(jobs_env.config(channels=[str(channel)],
                                          default_channels=[str(channel)]))
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "leaky",
                                    "dependencies:\n  - leaky\n").id, 120)
    log = full_log(mgr, job.id)
    assert _grep_root(jobs_env.root) == "", log
    assert job.state is State.FAILED, log
    assert "package leaky 1.0: " in log and "symlink" in log, log


_GRABBER = r"""
import os, select, sys
path = sys.argv[1]
while True:  # until it opens, or the test says the build is over (a line on stdin)
    try:
        fd = os.open(path, os.O_WRONLY)
        break
    except OSError:
        if select.select([sys.stdin], [], [], 0.001)[0]:
            print("never", flush=True)
            sys.exit(0)
print("opened", flush=True)
sys.stdin.readline()  # the build is over: the cache was sealed long ago
os.pwrite(fd, b"POISON", 0)
print("wrote", flush=True)
"""


def test_nobody_keeps_a_writable_fd_on_the_cache(jobs_env: JobsEnv, manager_factory: Factory,
                                                 scratch: Path) -> None:
    """A package's file extracted with mode 0666 is the cache's until ``seal_cache`` takes the
    write bits off, after the trusted step: any local user who opened it meanwhile (its path
    is predictable) could write the shared cache for ever after, and every later version
    linked from it."""
    channel = scratch / "wide-channel"
    fillers = {f"share/filler/{n}": (f"{n}\n", False) for n in range(3000)}
    from tests.jobs_support import CondaPackage, write_conda_package
    pkg = CondaPackage("wide", files={"share/w": ("GOOD\n", False), **fillers})
    (channel / "noarch").mkdir(parents=True)
    path = write_conda_package(pkg, channel / "noarch")
    with tarfile.open(path) as tar:  # the same package, its share/w world-writable
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                   for m in tar.getmembers()]
    with tarfile.open(path, "w:bz2", compresslevel=1) as tar:
        for member, data in members:
            if member.name == "share/w":
                member.mode = 0o666
            tar.addfile(member, io.BytesIO(data))
    build_channel(channel, [])
    cfg = jobs_env.config(channels=[str(channel)], default_channels=[str(channel)])
    mgr = manager_factory(cfg)
    target = jobs_env.root / ".envctl/cache/conda/wide-1.0-0/share/w"
    mallory = jobs_env.accounts.mallory
    grab = subprocess.Popen(["setpriv", f"--reuid={mallory.uid}", f"--regid={mallory.gid}",
                             "--clear-groups", "/usr/bin/python3", "-c", _GRABBER, str(target)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        job = wait_done(mgr, mgr.submit(jobs_env.requester(), "wide1",
                                        "dependencies:\n  - wide\n").id, 120)
        assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
        assert grab.stdout is not None and grab.stdin is not None
        grab.stdin.write("\n")
        grab.stdin.flush()
        said = grab.stdout.read()
    finally:
        grab.kill()
        grab.wait()
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "wide2",
                                    "dependencies:\n  - wide\n").id, 120)
    assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
    assert (jobs_env.root / "wide2/share/w").read_bytes() == b"GOOD\n", said
    assert said.split() == ["never"]


def test_hand_over_holds_no_fd_per_pending_directory(scratch: Path) -> None:
    """A package's wide directory (here 3,000 empty subdirectories of one) made the hand-over
    hold one fd per subdirectory waiting to be entered: past the daemon's RLIMIT_NOFILE it
    failed, and every other thread of the daemon (builds, the socket, the healer) got EMFILE
    meanwhile. A walk holds one fd per level it is in, whatever the width."""
    top = scratch / "v1"
    for n in range(3000):
        (top / "wide" / str(n)).mkdir(parents=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert layout.hand_over(fd, "v1", 12345, 12345) == 3002
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(fd)
    assert os.stat(top / "wide" / "2999").st_uid == 12345


_DEEP_PYTHON = """#!/bin/sh
# the compile step runs PREFIX/bin/python: this one leaves a 1,500-level tree and fails
cd "$(dirname "$0")/.." || exit 2
i=0
while [ $i -lt 1500 ]; do mkdir d && cd d || exit 3; i=$((i+1)); done
exit 1
"""


def test_a_failed_build_deep_tree_is_removed(jobs_env: JobsEnv, manager_factory: Factory,
                                             scratch: Path) -> None:
    """A build that leaves a tree deeper than Python's recursion limit in its version and
    fails: its removal (``shutil.rmtree``, recursive) raised RecursionError, the job ended in
    "internal error", the tree stayed, and every later build of the name failed the same way
    clearing it."""
    from tests.jobs_support import CondaPackage, hello_packages

    channel = build_channel(scratch / "deep-channel", [
        *hello_packages(), CondaPackage("deep", files={"bin/python": (_DEEP_PYTHON, True)})])
    mgr = manager_factory(jobs_env.config(channels=[str(channel)],
                                          default_channels=[str(channel)]))
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "deep",
                                    "dependencies:\n  - deep\n").id, 120)
    assert job.state is State.FAILED, full_log(mgr, job.id)
    assert "status 1" in job.exit_detail, job.exit_detail
    assert os.listdir(jobs_env.root / ".envctl/envs/deep") == [], full_log(mgr, job.id)
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "deep",
                                    "dependencies:\n  - hello\n").id, 120)
    assert job.state is State.SUCCEEDED, full_log(mgr, job.id)


_FD_PYTHON = """#!/bin/sh
# run by the compile step as the build uid: makes share/x and hands an O_RDWR fd on it to a
# process outside the build (an abstract unix socket: the sandbox has no network namespace)
p="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$p/share" && printf 'GOOD-CONTENT-123\\n' > "$p/share/x" || exit 2
exec /usr/bin/python3 -c '
import os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(chr(0) + sys.argv[2])
socket.send_fds(s, [b"x"], [fd])
s.recv(1)
' "$p/share/x" SOCKET
"""
GOOD = b"GOOD-CONTENT-123\n"


@pytest.mark.parametrize("fs", ["local", "nfs4"])
def test_a_write_fd_kept_outside_the_build_cannot_change_what_is_frozen(
        jobs_env: JobsEnv, manager_factory: Factory, scratch: Path, fs: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A build hands an fd open for writing on a file of its version to a process outside it
    (the requester's own, here the test's): the freeze's chown/chmod does not revoke it. The
    file became the store's copy, so writing it later changed the frozen version and every
    later version of anyone with the same file (the store links by content, size and mode).
    The freeze refuses a file something still holds open for writing (a read lease refused);
    on a network filesystem, where leases cannot tell, it freezes a fresh copy."""
    import socket

    from envctl_shared import fsinfo

    from tests.jobs_support import CondaPackage

    sock_name = f"envctl-attack-{os.getpid()}"
    channel = build_channel(scratch / "fd-channel", [
        CondaPackage("handfd", files={"bin/python": (_FD_PYTHON.replace("SOCKET", sock_name),
                                                     True)}),
        CondaPackage("honest", files={"share/y": (GOOD.decode(), False)})])
    mgr = manager_factory(jobs_env.config(channels=[str(channel)],
                                          default_channels=[str(channel)]))
    if fs != "local":  # the freeze's view only (the config refuses a venv_python there)
        monkeypatch.setattr(fsinfo, "mount_of", lambda path: fsinfo.MountInfo("/", fs))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + sock_name)
    server.listen(1)
    server.settimeout(60)
    got: list[int] = []
    conns: list[socket.socket] = []

    def receive() -> None:
        conn, _ = server.accept()
        conns.append(conn)
        _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
        got.extend(fds)
        conn.send(b"k")
    import threading
    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        job = wait_done(mgr, mgr.submit(jobs_env.requester(), "handfd",
                                        "dependencies:\n  - handfd\n").id, 120)
        thread.join(10)
        assert got, full_log(mgr, job.id)
        os.pwrite(got[0], b"POISONED-CONT-99\n", 0)  # after the freeze, as the holder
        if fs == "local":
            assert not (jobs_env.root / "handfd").exists(), "the version was made current"
            assert job.state is State.FAILED, full_log(mgr, job.id)
            assert "share/x is still open for writing" in (job.exit_detail or "")
        else:
            assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
            assert (jobs_env.root / "handfd/share/x").read_bytes() == GOOD
        job = wait_done(mgr, mgr.submit(jobs_env.requester(), "honest",
                                        "dependencies:\n  - honest\n").id, 120)
        assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
        assert (jobs_env.root / "honest/share/y").read_bytes() == GOOD
    finally:
        for fd in got:
            os.close(fd)
        for conn in conns:
            conn.close()
        server.close()


def test_the_variables_are_never_written_through_a_package_link(
        jobs_env: JobsEnv, manager_factory: Factory, scratch: Path, host_secret: Path) -> None:
    """The trusted step (root) writes the spec's ``variables:`` to ``conda-meta/state``; a
    package that ships ``conda-meta/state`` as a symlink made root overwrite the file it
    points to (any file of the host) with that JSON. It is replaced, never written through."""
    from tests.jobs_support import CondaPackage

    channel = build_channel(scratch / "state-channel", [CondaPackage(
        "stately", links={"conda-meta/state": str(host_secret / "secret")})])
    mgr = manager_factory(jobs_env.config(channels=[str(channel)],
                                          default_channels=[str(channel)]))
    spec = "dependencies:\n  - stately\nvariables:\n  OWNED: 'yes'\n"
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "stately", spec).id, 120)
    assert (host_secret / "secret").read_bytes() == SECRET
    assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
    state = jobs_env.root / "stately/conda-meta/state"
    assert not state.is_symlink()
    assert json.loads(state.read_text()) == {"env_vars": {"OWNED": "yes"}}


def test_a_deep_tree_builds(jobs_env: JobsEnv, manager_factory: Factory,
                            scratch: Path) -> None:
    """A version holding a tree deeper than Python's recursion limit: frozen (the freeze is
    iterative), but the record's size (``os.fwalk``, recursive) raised RecursionError: the
    build ended in "internal error". It is built, its size and entries counted."""
    from tests.jobs_support import CondaPackage

    script = _DEEP_PYTHON.replace("exit 1\n", "exit 0\n")
    channel = build_channel(scratch / "deep-ok-channel",
                            [CondaPackage("deepok", files={"bin/python": (script, True)})])
    mgr = manager_factory(jobs_env.config(channels=[str(channel)],
                                          default_channels=[str(channel)]))
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "deepok",
                                    "dependencies:\n  - deepok\n").id, 120)
    try:
        assert job.state is State.SUCCEEDED, job.exit_detail
        record = json.loads((jobs_env.root / ".envctl/envs/deepok/v1.json").read_text())
        assert record["entries"] >= 1500
    finally:  # the scratch dir's rmtree recurses too
        mgr.stop(timeout=20)
        fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
        try:
            layout.remove_tree(fd, "root")
        finally:
            os.close(fd)


_LINK_PYTHON = """#!/bin/sh
# run by the compile step as the build uid: links a member's group-writable file into the
# version (protected_hardlinks lets whoever may read and write a file link it)
p="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$p/share" && ln VICTIM "$p/share/stolen"
exit 0
"""


def test_a_build_cannot_take_over_a_file_it_links_from_outside(
        jobs_env: JobsEnv, manager_factory: Factory, scratch: Path, pool: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a mount namespace (the shipped unit has none), a build account in the root's
    group hard-linked a member's group-writable file into its version; the freeze then made
    that inode the daemon's and read-only, and the store's: the member's own file was taken
    from them. A file with links outside the version is frozen as a copy of its own."""
    from tests.jobs_support import CondaPackage

    monkeypatch.setattr(procs, "_NAMESPACES", ["no mount namespace in this test"])
    alice = jobs_env.accounts.alice
    handmade = jobs_env.root / "handmade"
    handmade.mkdir()
    os.chown(handmade, alice.uid, jobs_env.accounts.shared_gid)
    os.chmod(handmade, 0o2770)
    data = handmade / "data.txt"
    data.write_text("alice's data\n")
    os.chown(data, alice.uid, jobs_env.accounts.shared_gid)
    os.chmod(data, 0o660)
    channel = build_channel(scratch / "link-channel", [CondaPackage("linker", files={
        "bin/python": (_LINK_PYTHON.replace("VICTIM", str(data)), True)})])
    mgr = manager_factory(jobs_env.config(channels=[str(channel)],
                                          default_channels=[str(channel)],
                                          build_user=pool.names[0]))
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "linker",
                                    "dependencies:\n  - linker\n").id, 120)
    assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
    assert (jobs_env.root / "linker/share/stolen").read_text() == "alice's data\n"
    st = data.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (alice.uid, 0o660)
    as_user(alice.uid, alice.gid, f"echo more >> '{data}'")
    assert (jobs_env.root / "linker/share/stolen").read_text() == "alice's data\n"


def _lying_channel(channel: Path, claim: dict[str, Any] | None) -> None:
    """Rewrite the channel's index: every package's sha256/md5/size replaced by ``claim``
    (another package's), or dropped (None); only repodata.json is left to read."""
    for path in list(channel.rglob("*")):
        if path.name == "repodata.json":
            data = json.loads(path.read_text())
            for key in ("packages", "packages.conda"):
                for rec in data.get(key, {}).values():
                    for field in ("sha256", "md5", "size"):
                        rec.pop(field, None)
                    rec.update(claim or {})
            path.write_text(json.dumps(data))
        elif path.is_file() and (path.name.startswith("repodata") or "shard" in path.name):
            path.unlink()


@pytest.mark.parametrize("lie", ["borrowed-sha256", "no-sha256"])
def test_a_channel_cannot_poison_the_shared_cache(jobs_env: JobsEnv, manager_factory: Factory,
                                                  scratch: Path, lie: str) -> None:
    """The conda cache is shared by every build and keyed by name-version-build. A hostile
    channel's index that gives its package the sha256 of the honest channel's package of the
    same file name (or none) had rattler cache the hostile content under it, unchecked; an
    honest user's later build from the honest channel installed it. A package whose archive
    does not match its index's sha256, or that has none, is refused before anything is
    fetched."""
    from tests.jobs_support import CondaPackage

    honest = build_channel(scratch / "honest", [
        CondaPackage("samename", files={"share/s": ("GOOD\n", False)})])
    hostile = build_channel(scratch / "hostile", [
        CondaPackage("samename", files={"share/s": ("EVIL\n", False)})])
    rec = json.loads((honest / "noarch/repodata.json").read_text())["packages"]
    claim = {k: v for k, v in next(iter(rec.values())).items() if k in ("sha256", "md5", "size")}
    _lying_channel(hostile, claim if lie == "borrowed-sha256" else None)
    mgr = manager_factory(jobs_env.config(channels=[str(honest), str(hostile)],
                                          default_channels=[str(honest)]))
    spec = f"channels: ['{hostile}']\ndependencies:\n  - samename\n"
    job = wait_done(mgr, mgr.submit(jobs_env.requester("bob"), "evil", spec).id, 120)
    log = full_log(mgr, job.id)
    assert job.state is State.FAILED, log
    assert "package samename 1.0 (file:" in log and "sha256" in log, log
    spec = f"channels: ['{honest}']\ndependencies:\n  - samename\n"
    job = wait_done(mgr, mgr.submit(jobs_env.requester(), "good", spec).id, 120)
    assert job.state is State.SUCCEEDED, full_log(mgr, job.id)
    assert (jobs_env.root / "good/share/s").read_text() == "GOOD\n"


def test_the_archive_installed_is_the_one_checked(scratch: Path) -> None:
    """Whoever writes a local channel may swap an archive between the trusted step's check of
    its sha256 and rattler's read (inotify says when the check closed it): what is installed
    is the copy that was checked."""
    import asyncio

    import rattler
    from envctl_shared.jobs.backends import rattler_child

    from tests.jobs_support import CondaPackage

    honest = build_channel(scratch / "honest", [
        CondaPackage("swapped", files={"share/s": ("GOOD\n", False)})])
    evil = build_channel(scratch / "evil", [
        CondaPackage("swapped", files={"share/s": ("EVIL\n", False)})])
    records = asyncio.run(rattler.solve([honest.as_uri()], [rattler.MatchSpec("swapped")],
                                        platforms=["noarch"]))
    rattler_child.check_records(records, scratch / "private")
    shutil.copy(evil / "noarch/swapped-1.0-0.tar.bz2", honest / "noarch/swapped-1.0-0.tar.bz2")
    prefix = scratch / "prefix"
    asyncio.run(rattler.install(records, target_prefix=prefix, cache_dir=scratch / "cache",
                                show_progress=False, execute_link_scripts=False))
    assert (prefix / "share/s").read_text() == "GOOD\n"


def test_the_manifest_of_a_version_still_testing_is_kept(jobs_env: JobsEnv) -> None:
    """A freeze writes the manifest before the record names its digest (the tests run in
    between); the store's sweep took a manifest no record named once an hour old, so a build
    whose tests ran past that (``requests.timeout`` allows hours) lost it: its every verify
    then failed, listing every entry as added. Kept as long as a build may run."""
    from envctl_shared.jobs import freeze, integrity

    config = jobs_env.config(timeout=4 * 3600.0)
    area = layout.RootArea(jobs_env.root)
    with area.open() as fds:
        store = freeze.Store.in_area(area, fds.area, freeze.Target.of(config.requests_root))
        try:
            digest = store.write_manifest(b'["x", "f", "0444", 1, "", ""]\n')
        finally:
            store.close()
    path = jobs_env.root / ".envctl/store/manifests" / f"{digest.removeprefix('sha256:')}.gz"
    two_hours_ago = time.time() - 2 * 3600
    os.utime(path, (two_hours_ago, two_hours_ago))
    integrity.sweep_store(config)
    assert path.exists()
