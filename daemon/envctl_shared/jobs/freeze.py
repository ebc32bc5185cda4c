"""Freezing a built version: the daemon's, read-only to everyone, with a digest of its tree.

Why: a shared environment is trusted by everyone who starts it. A version left to the build
user with group write (as the healer's policy for the rest of the root wants) could be
rewritten by any member or any later build: a ``.pth`` planted in ``site-packages`` runs as
every user of the env. So, once built (and byte-compiled), a version is frozen in the daemon:
owner = the daemon's uid, group = the requests root's group, no write bit for anyone
(directories ``r-x`` + SGID, files keep their execute bits), others' access by the root's
``others`` policy. Nothing in it can then be added, changed, renamed or removed but by root.

How, and why so: the tree was made by the build's uid, which may have left anything in it.
So the walk is the jobs layer's one walk, ``layout.walk_listed`` (fd-based, never following a
symlink, iterative, a bounded number of directory fds whatever the depth or width: the tree GC
and ``remove_tree`` walk alike), and changes are made through fds: ``fchown``/``fchmod`` of the
opened entry, ``lchown`` for symlinks. The freeze once kept a stack of its own, whose directory
fds were shared with the files still queued for hashing, and refused a tree with more than 512
directories pending at once: a build could make a version that could be neither frozen nor
verified, yet GC removed it. A file hashed on a worker now holds a ``dup`` of its directory's
fd instead (``_file``), bounded by the queue (``IN_FLIGHT``). Setuid/setgid files and
special files (fifo, socket, device) fail the freeze with their path: a shared env never needs
them, and freezing one would hand the daemon's ownership to whatever it is. So does a file that
something still holds open for writing (``_writer_left``): taking its write bits off revokes no
open fd, and a build can hand one to a process outside it (an fd passed over a unix socket to
the requester's own process): that holder would then rewrite the frozen version and, through
the store, every later version of anyone with the same file. Asked of the kernel with a read
lease, on local filesystems only: an NFSv4 client grants none without a delegation (every file
would look held), nor can it see another client's writers; there, every file the daemon may
not simply take (not its own, or writable by others) is frozen as a fresh copy (``_own_copy``),
which no one else ever had open.

The digest: sha256 over the sorted manifest, one JSON line per entry (relative path, type,
mode, size, content sha256, link target). The manifest is kept in the store under its digest
(``store/manifests/<hex>.gz``: identical versions share it) so that ``verify`` names every
path that differs, not only "changed"; the record holds the digest, so altering the manifest
is a difference too. Files from ``PARALLEL_BYTES`` up are hashed on worker threads (a pool
sized from the CPU count; hashlib releases the GIL on large buffers), the rest on the walking
thread: measured on a 60k-entry CPython install (2 CPUs), handing every file to the pool made
the freeze 2.8x slower (each syscall of the walk then waited for the GIL: a convoy), and even
the six files of 8 to 44 MB there cost the walk 1 to 2 s of such waits on a loaded machine
(0.25 s to hash them inline); a few very large libraries (a 500 MB ``libtorch``) do hash in
parallel with the walk.

The store: each frozen regular file is hard-linked to one content-addressed copy in
``<root>/.envctl/store/<sha[:2]>/<sha>-<mode>`` (daemon-owned, read-only, like
``nix-store --optimise``): an identical file already there replaces the version's copy (link to
a temporary name, rename over), else the version's file becomes the store's copy. Versions and
envs then share their bytes; freezing an inode freezes it everywhere it is linked, which is
what the store and conda's cache (daemon-owned, read-only) want anyway. So a version's file
that is one of the store's copies already (a link from conda's cache, after its first freeze)
is found by its inode in the store's index (``Store.index``) and neither opened nor hashed
again: a rebuild from a warm cache pays for its new files only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps' own, in C
from typing import Any

from .. import fsinfo
from ..config import RootConfig
from ..errors import BuildFailed
from ..heal.fsops import DIR_FLAGS
from ..policy import Kind, wanted_mode
from ..quoting import quote_name
from . import layout

STORE = "store"  # <root>/.envctl/store
MANIFESTS = "manifests"  # <root>/.envctl/store/manifests/<digest hex>.gz
PARALLEL_BYTES = 64 << 20  # files from this size are hashed on workers (see the docstring)
_CHUNK = 1 << 20
# The bytes of all paths of a version, at most: its manifest lists each entry by its path, so
# a chain of directories makes it grow with the square of the depth (100k levels, made by a
# build in a second: 10 GB in the daemon's memory). A 60k-file conda env takes ~6 MB. Counted
# as the manifest's JSON spells them (``_json_str``): a character counted as one byte let names
# of emoji (12 bytes each there) or control characters (6) through at 12 or 6 times the cap.
MAX_PATH_BYTES = 256 << 20
IN_FLIGHT = 16  # large files queued or hashed at once (each holds its fd, its directory's dup)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_LINK_TMP = ".envctl-link-"
_WRITE = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
_SETID = stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True)
class Target:
    """Whom a frozen tree belongs to: the daemon's uid, the root's group and others policy;
    ``dir_write``: the owner keeps write on directories (a daemon that is not root: without
    it, it could neither share files with the store nor remove its versions at GC; root
    needs no bit for either)."""

    uid: int
    gid: int
    others: str
    dir_write: bool = False

    @classmethod
    def of(cls, root: RootConfig) -> Target:
        return cls(os.geteuid(), root.gid, root.others, dir_write=os.geteuid() != 0)

    def mode(self, st_mode: int) -> int:
        """The permission bits of a frozen directory or regular file: the root's policy for
        it (``policy.wanted_mode``: the group's r and X, SGID on directories, others as
        configured) with the owner's read (and a directory's search) and no write bit for
        anyone (but ``dir_write``)."""
        if stat.S_ISDIR(st_mode):
            perm = wanted_mode(st_mode, Kind.DIR, self.others) | stat.S_IRUSR | stat.S_IXUSR
            return perm & ~_WRITE | (stat.S_IWUSR if self.dir_write else 0)
        return (wanted_mode(st_mode, Kind.FILE, self.others) | stat.S_IRUSR) & ~_WRITE


def _type(st_mode: int) -> str:
    """One letter per file type, as in the manifest (``d f l`` and the refused ``p s c b``)."""
    for test, letter in ((stat.S_ISDIR, "d"), (stat.S_ISREG, "f"), (stat.S_ISLNK, "l"),
                         (stat.S_ISFIFO, "p"), (stat.S_ISSOCK, "s"), (stat.S_ISCHR, "c")):
        if test(st_mode):
            return letter
    return "b"


_KINDS = {"p": "a fifo", "s": "a socket", "c": "a device", "b": "a device"}


@dataclass
class Entry:
    """One manifest line: what the digest covers of an entry."""

    type: str
    mode: int
    size: int
    sha: str = ""
    target: str = ""

    def line(self, rel: str) -> bytes:
        return json.dumps([rel, self.type, f"{self.mode:04o}", self.size, self.sha,
                           self.target]).encode() + b"\n"


def manifest_bytes(entries: dict[str, Entry]) -> bytes:
    return b"".join(entries[rel].line(rel) for rel in sorted(entries))


def digest_of(manifest: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def parse_manifest(data: bytes) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for line in data.splitlines():
        rel, kind, mode, size, sha, target = json.loads(line)
        out[rel] = Entry(kind, int(mode, 8), size, sha, target)
    return out


@dataclass
class _Walk:
    """One walk of a version: frozen (``store`` set when deduplicating) or only read."""

    target: Target
    mutate: bool
    shown: str  # the version's path, for messages
    store: Store | None = None
    leases: bool = False  # ask whether a writer is left (``_writer_left``)
    copies: bool = False  # freeze every file the daemon may not simply take as a copy
    entries: dict[str, Entry] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # verify: rel -> wrong owner/group
    linked: int = 0  # files replaced by a link to the store
    lock: threading.Lock = field(default_factory=threading.Lock)
    _hashes: dict[tuple[int, int], str] = field(default_factory=dict)
    _stored: dict[int, tuple[str, int]] = field(default_factory=dict)  # Store.index
    _store_dev: int = -1
    # root reads without touching atimes: an atime update is an inode write per file
    _flags: int = field(
        default_factory=lambda: _FILE_FLAGS | (os.O_NOATIME if os.geteuid() == 0 else 0))

    def run(self, parent_fd: int, tree: str) -> None:
        if self.store is not None:
            self._store_dev, self._stored = self.store.index()
        workers = max(2, os.cpu_count() or 2)
        gate = threading.BoundedSemaphore(IN_FLIGHT)
        futures: list[Future[None]] = []
        top = os.open(tree, DIR_FLAGS, dir_fd=parent_fd)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="envctl-freeze") as pool:
                def submit(fn: Callable[[], None]) -> None:
                    gate.acquire()

                    def task() -> None:
                        try:
                            fn()
                        finally:
                            gate.release()
                    try:
                        futures.append(pool.submit(task))
                    except BaseException:
                        gate.release()
                        raise
                try:
                    self._visit(top, submit)
                finally:
                    for fut in futures:
                        fut.exception()  # every file closed before the error is raised
        finally:
            os.close(top)
        for fut in futures:
            fut.result()

    def _visit(self, top: int, submit: Callable[[Callable[[], None]], None]) -> None:
        """Freeze (or read) the directory ``top`` and every entry below it, in the one
        walk's order; large files go to ``submit``."""
        self._entry(".", top, os.fstat(top))
        path_bytes = 0
        for parent, where, name, kind, ino, opened in layout.walk_listed(
                top, lambda st: True, shown=self.shown, paths=True):  # unpacked
            rel = f"{where}/{name}" if where else name
            path_bytes += len(_json_str(rel))
            if path_bytes > MAX_PATH_BYTES:
                raise BuildFailed(
                    f"{self.shown}: its paths take more than {MAX_PATH_BYTES >> 20} MiB (a "
                    f"manifest lists each entry by its path; reached at {quote_name(rel[:80])}...)",
                    hint="a tree this shape (directories nested thousands deep) is not an "
                    "environment")
            if opened is not None:
                self._entry(rel, *opened)
            elif kind == "l":
                self._symlink(parent, name, rel)
            elif kind != "f":  # never opened: opening a device may act on it
                self._entry(rel, -1, os.stat(name, dir_fd=parent, follow_symlinks=False))
            elif not self._as_frozen(parent, name, ino, rel):
                self._file(parent, name, rel, submit)

    def _as_frozen(self, dir_fd: int, name: str, ino: int, rel: str) -> bool:
        """Note a file that is one of the store's copies already, without opening it: its
        inode is listed in ``Store.index`` (the trusted step links conda's cache, whose inodes
        the first freeze made the store's), its owner and mode are the target's (nothing to
        change) and the store's name carries its hash: only the daemon writes the store, and
        nobody can write a read-only inode it owns (nor held it open for writing: the freeze
        that stored it asked, ``_writer_left``, or copied it). A verify never takes this path."""
        stored = self._stored.get(ino)
        if stored is None:
            return False
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        perm = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & _SETID or (st.st_dev, st.st_ino) != (
                self._store_dev, ino) or st.st_nlink < 2 or perm != stored[1] \
                or perm != self.target.mode(st.st_mode) \
                or (st.st_uid, st.st_gid) != (self.target.uid, self.target.gid):
            return False
        self.entries[rel] = Entry("f", perm, st.st_size, stored[0])
        return True

    def _entry(self, rel: str, fd: int, st: os.stat_result) -> Entry:
        """Freeze (or, verifying, note the owner of) a directory or file opened as ``fd``."""
        kind = _type(st.st_mode)
        if kind not in "df" or (kind == "f" and st.st_mode & _SETID):
            what = _KINDS.get(kind, "a setuid/setgid file")
            if self.mutate:
                raise BuildFailed(f"{self.shown}/{rel} is {what}: a shared environment never "
                                  "holds one, and the daemon will not own it",
                                  hint="remove it in the build (or do not install what makes it)")
        perm = stat.S_IMODE(st.st_mode)
        if self.mutate:
            if (st.st_uid, st.st_gid) != (self.target.uid, self.target.gid):
                os.fchown(fd, self.target.uid, self.target.gid)  # clears no bit we keep
            want = self.target.mode(st.st_mode)
            if perm != want or st.st_uid != self.target.uid:
                os.fchmod(fd, want)
            perm = want
        else:
            self._owner(rel, st)
        entry = self.entries[rel] = Entry(kind, perm, st.st_size if kind == "f" else 0)
        return entry

    def _owner(self, rel: str, st: os.stat_result) -> None:
        if (st.st_uid, st.st_gid) != (self.target.uid, self.target.gid):
            with self.lock:
                self.owners[rel] = f"owner {st.st_uid}:{st.st_gid}, want " \
                                   f"{self.target.uid}:{self.target.gid}"

    def _symlink(self, dir_fd: int, name: str, rel: str) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            raise BuildFailed(f"{self.shown}/{rel} changed type while it was frozen",
                              hint="nothing may run in a version being frozen; retry")
        if self.mutate:
            if (st.st_uid, st.st_gid) != (self.target.uid, self.target.gid):
                os.chown(name, self.target.uid, self.target.gid, dir_fd=dir_fd,
                         follow_symlinks=False)
        else:
            self._owner(rel, st)
        target = os.fsdecode(os.readlink(name, dir_fd=dir_fd))
        self.entries[rel] = Entry("l", 0o777, 0, target=target)

    def _file(self, dir_fd: int, name: str, rel: str,
              submit: Callable[[Callable[[], None]], None]) -> None:
        """Freeze and hash a regular file: inline if small, else on a worker, which gets the
        file's fd and a ``dup`` of its directory's (for the store's rename: the walk may have
        left and closed that directory by then), both closed when it is done. The gate
        (``IN_FLIGHT``) bounds how many are held so."""
        fd = os.open(name, self._flags, dir_fd=dir_fd)  # O_NONBLOCK: a fifo swapped in
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BuildFailed(f"{self.shown}/{rel} changed type while it was read",
                                  hint="nothing may run in a frozen version; retry")
            takeable = st.st_uid == self.target.uid and not st.st_mode & (_WRITE & ~stat.S_IWUSR)
            if self.mutate and not takeable and not st.st_mode & _SETID and \
                    (st.st_nlink > 1 or self.copies):
                fd, st = self._own_copy(dir_fd, name, fd, st)
            entry = self._entry(rel, fd, st)
            if self.leases and _writer_left(fd):
                raise BuildFailed(f"{self.shown}/{rel} is still open for writing by a process "
                                  "outside the build: it cannot be frozen",
                                  hint="a build must not hand its files to other processes")
        except BaseException:
            os.close(fd)
            raise
        if st.st_size < PARALLEL_BYTES:
            self._finish(dir_fd, name, fd, st, entry)
            return
        try:
            held = os.dup(dir_fd)
        except BaseException:
            os.close(fd)
            raise

        def task() -> None:
            try:
                self._finish(held, name, fd, st, entry)
            finally:
                os.close(held)
        try:
            submit(task)
        except BaseException:
            os.close(fd)
            os.close(held)
            raise

    def _finish(self, dir_fd: int, name: str, fd: int, st: os.stat_result, entry: Entry
                ) -> None:
        """Hash the frozen file ``name`` open as ``fd`` (closed here) and share it with the
        store."""
        try:
            entry.sha = self._hash(fd, st)
            if self.store is not None and st.st_size and \
                    self.store.link(dir_fd, name, fd, st, entry):
                with self.lock:
                    self.linked += 1
        finally:
            os.close(fd)

    def _own_copy(self, dir_fd: int, name: str, fd: int, st: os.stat_result
                  ) -> tuple[int, os.stat_result]:
        """Put a copy of the file ``name`` (open as ``fd``, closed on success) in its place and
        return it opened: a file the daemon may not simply take (not its own, or writable by
        others) that has other names, maybe outside the version, keeps its inode for them. A
        build account can hard-link whatever it may read and write (protected_hardlinks): a
        member's group-writable file, which the freeze made the daemon's and read-only."""
        tmp = f"{_LINK_TMP}{secrets.token_hex(6)}"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dir_fd)
        try:
            try:
                while os.sendfile(out, fd, None, 1 << 30):
                    pass
                os.fchmod(out, stat.S_IMODE(st.st_mode))
            finally:
                os.close(out)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        new = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        os.close(fd)
        return new, os.fstat(new)

    def _hash(self, fd: int, st: os.stat_result) -> str:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            with self.lock:
                known = self._hashes.get(key)
            if known is not None:
                return known
        h = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):  # hashlib releases the GIL on buffers this large
            h.update(chunk)
        sha = h.hexdigest()
        if st.st_nlink > 1:
            with self.lock:
                self._hashes[key] = sha
        return sha


def _writer_left(fd: int) -> bool:
    """Whether any open file description (in any process, or in flight over a socket) can
    still write the file open as ``fd`` (read-only), asked once its write bits are off: the
    kernel grants a read lease only when none can. A filesystem without leases cannot tell
    (False: as before)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def _manifest_name(digest: str) -> str:
    return f"{digest.removeprefix('sha256:')}.gz"


class Store:
    """``<root>/.envctl/store``: one read-only copy per (content, mode), the daemon's."""

    def __init__(self, area_fd: int, shown: str, target: Target) -> None:
        self.fd = layout.checked_dir(area_fd, STORE, 0o755, shown)
        self.shown = shown
        self.target = target
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def in_area(cls, area: layout.RootArea, area_fd: int, target: Target) -> Store:
        """The store of the root's area (``area_fd``: its ``.envctl``)."""
        return cls(area_fd, str(area.path(STORE)), target)

    def close(self) -> None:
        for fd in self._subs.values():
            os.close(fd)
        self._subs.clear()
        os.close(self.fd)

    def _sub(self, prefix: str) -> int:
        with self._lock:
            fd = self._subs.get(prefix)
            if fd is None:
                fd = self._subs[prefix] = layout.checked_dir(
                    self.fd, prefix, 0o755, f"{self.shown}/{prefix}")
            return fd

    def index(self) -> tuple[int, dict[int, tuple[str, int]]]:
        """The store's device and its copies by inode number: {st_ino: (sha256, mode)}, read
        from their names as listed (readdir gives the inode: nothing is stat'ed, ~50 ms for
        60k copies). What a freeze lists may be collected meanwhile; it is then only absent
        from what the freeze walks (a collected copy was linked nowhere else)."""
        out: dict[int, tuple[str, int]] = {}
        for prefix in os.listdir(self.fd):
            if len(prefix) != 2 or prefix.startswith("."):
                continue  # manifests, a temporary name
            with os.scandir(self._sub(prefix)) as it:
                for entry in it:
                    sha, _, mode = entry.name.partition("-")
                    if len(sha) == 64 and len(mode) == 4:
                        out[entry.inode()] = (sha, int(mode, 8))
        return os.fstat(self.fd).st_dev, out

    def write_manifest(self, manifest: bytes) -> str:
        """Keep ``manifest`` under its digest (atomically: temporary name, fsync, rename; the
        daemon's, 0444) unless an identical version's is there already; returns the digest."""
        digest = digest_of(manifest)
        sub = self._sub(MANIFESTS)
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(_manifest_name(digest), dir_fd=sub, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                return digest  # (verify says so if it was altered since)
        tmp = f".tmp-{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o444, dir_fd=sub)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(gzip.compress(manifest, compresslevel=1, mtime=0))
                fh.flush()
                os.fchown(fd, self.target.uid, self.target.gid)
                os.fchmod(fd, 0o444)
                os.fsync(fd)
            os.rename(tmp, _manifest_name(digest), src_dir_fd=sub, dst_dir_fd=sub)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=sub)
            raise
        return digest

    def read_manifest(self, digest: str) -> bytes | None:
        """The manifest of ``digest`` if the daemon wrote it and it still hashes to it."""
        try:
            fd = os.open(_manifest_name(digest), _FILE_FLAGS, dir_fd=self._sub(MANIFESTS))
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return None
            try:
                data = gzip.decompress(fh.read())
            except (OSError, EOFError):
                return None
        return data if digest_of(data) == digest else None

    def sweep(self, referenced: set[str], now: float, min_age: float = 3600.0) -> dict[str, int]:
        """GC of the store: copies no version links any more (``st_nlink`` 1: only the store's
        name is left), and manifests no record names (``referenced`` digests) older than
        ``min_age`` (a freeze writes its manifest before its record)."""
        out = {"files": 0, "bytes": 0, "manifests": 0}
        for prefix in sorted(os.listdir(self.fd)):
            if prefix.startswith("."):
                continue
            sub = self._sub(prefix)
            for name in os.listdir(sub):
                st = os.stat(name, dir_fd=sub, follow_symlinks=False)
                if prefix == MANIFESTS:
                    gone = (f"sha256:{name.removesuffix('.gz')}" not in referenced
                            and now - st.st_mtime >= min_age)
                else:  # a concurrent freeze that links it after this finds it gone (ENOENT)
                    gone = st.st_nlink == 1
                if gone and stat.S_ISREG(st.st_mode):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=sub)
                        key = "manifests" if prefix == MANIFESTS else "files"
                        out[key] += 1
                        out["bytes"] += st.st_size
        return out

    def link(self, dir_fd: int, name: str, fd: int, st: os.stat_result, entry: Entry) -> bool:
        """Share the frozen file ``name`` (open as ``fd``) with the store; True when the
        version's copy was replaced by a link to an identical one already there."""
        key = f"{entry.sha}-{entry.mode:04o}"
        sub = self._sub(entry.sha[:2])
        for _ in range(2):
            try:  # this very inode (not whatever the name holds now) becomes the copy
                os.link(f"/proc/self/fd/{fd}", key, dst_dir_fd=sub, follow_symlinks=True)
                return False
            except FileExistsError:
                pass  # stored before (or it is this inode already): share it
            except OSError as exc:
                if exc.errno in (errno.EMLINK, errno.EXDEV):
                    return False
                raise
            try:
                have = os.stat(key, dir_fd=sub, follow_symlinks=False)
            except FileNotFoundError:
                continue  # collected meanwhile: this one becomes the copy
            if (have.st_dev, have.st_ino) == (st.st_dev, st.st_ino):
                return False
            if not (stat.S_ISREG(have.st_mode) and have.st_uid == self.target.uid
                    and have.st_gid == self.target.gid and have.st_size == st.st_size
                    and stat.S_IMODE(have.st_mode) == entry.mode):
                return False  # not ours as it should be: leave both alone
            tmp = f"{_LINK_TMP}{secrets.token_hex(6)}"
            try:
                os.link(key, tmp, src_dir_fd=sub, dst_dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.EMLINK, errno.EXDEV, errno.ENOENT):
                    return False
                raise
            try:
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            return True
        return False


@dataclass(frozen=True)
class Frozen:
    """What a freeze recorded: the digest (and its manifest), the counts, when."""

    digest: str
    manifest: bytes
    entries: int
    linked: int
    frozen_at: float
    stamp: list[int]

    def fields(self) -> dict[str, Any]:
        """The record's keys."""
        return {"digest": self.digest, "frozen_at": self.frozen_at, "stamp": self.stamp}


def stamp(dir_fd: int, name: str) -> list[int]:
    """The top-level stamp of a frozen tree, recorded after the freeze: what changes when
    anything is done to its directory (a ``chmod``/``chown``, an entry added, removed or
    renamed at its top). The daemon's periodic check compares it without hashing."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    return [st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns, st.st_ctime_ns]


def freeze(dir_fd: int, name: str, target: Target, shown: str, store: Store,
           old: bool = False) -> Frozen:
    """Freeze the tree ``name`` in ``dir_fd`` for ``target``, its files shared with ``store``
    and its manifest kept there; returns its digest. Raises BuildFailed naming a path that
    cannot be frozen (a special or setuid/setgid file, one still open for writing). ``old``:
    a version built before freezing existed, whose files were every member's to write until
    now: on a network filesystem they are taken as they are, not copied (that would copy
    every old env at the first start)."""
    remote = fsinfo.mount_of(shown).remote
    walk = _Walk(target, mutate=True, shown=shown, store=store, leases=not remote,
                 copies=remote and not old)
    walk.run(dir_fd, name)
    manifest = manifest_bytes(walk.entries)
    digest = store.write_manifest(manifest)
    return Frozen(digest, manifest, len(walk.entries), walk.linked, time.time(),
                  stamp(dir_fd, name))


@dataclass(frozen=True)
class Difference:
    """One path that is not as frozen: ``what`` is added, removed, type, mode, size, owner,
    content, link target or manifest."""

    path: str
    what: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "what": self.what, "detail": self.detail}


MAX_DIFFERENCES = 1000  # listed in a record and a reply; the count is always exact


def verify(dir_fd: int, name: str, target: Target, digest: str, shown: str,
           store: Store) -> tuple[str, list[Difference]]:
    """Walk the frozen tree ``name`` again (reading only) and compare it with the manifest
    of the record's ``digest``: (the digest now, every difference)."""
    walk = _Walk(target, mutate=False, shown=shown)
    walk.run(dir_fd, name)
    now = manifest_bytes(walk.entries)
    out: list[Difference] = []
    stored = store.read_manifest(digest)
    if stored is None:
        out.append(Difference(".", "manifest", f"the manifest of {digest} is missing from "
                              "the store or altered: every entry is listed as added"))
    old = parse_manifest(stored) if stored is not None else {}
    for rel in sorted(set(old) | set(walk.entries)):
        out.extend(_compare(rel, old.get(rel), walk.entries.get(rel)))
        if rel in walk.owners:
            out.append(Difference(rel, "owner", walk.owners[rel]))
    return digest_of(now), out


def _compare(rel: str, was: Entry | None, now: Entry | None) -> Iterator[Difference]:
    if was is None:
        yield Difference(rel, "added", f"type {now.type if now else '?'}")
        return
    if now is None:
        yield Difference(rel, "removed", f"type {was.type}")
        return
    if was.type != now.type:
        yield Difference(rel, "type", f"{now.type}, was {was.type}")
        return
    if was.mode != now.mode and was.type != "l":
        yield Difference(rel, "mode", f"{now.mode:04o}, was {was.mode:04o}")
    if was.size != now.size:
        yield Difference(rel, "size", f"{now.size}, was {was.size}")
    if was.sha != now.sha:
        yield Difference(rel, "content", f"sha256 {now.sha[:16]}…, was {was.sha[:16]}…")
    if was.target != now.target:
        yield Difference(rel, "link target", f"{now.target!r}, was {was.target!r}")
