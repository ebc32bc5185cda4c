"""The directories the daemon owns: ``<root>/.envctl`` in the shared root, and the state dir.

Why so careful: the shared root is writable by every member of its group, and the daemon is
root. A member could plant ``.envctl/staging -> /etc`` and wait for the daemon to build, chown or
delete "its" staging directory. So every daemon-owned directory is created and re-opened one
component at a time relative to a parent fd with ``O_NOFOLLOW|O_DIRECTORY``, its owner is checked
to be the daemon's uid (anything else is refused as tampered), and its mode is put back to the
expected one (the healer may have added group write when the daemon is not root and not a
``protected_owner``). Callers then act only through the returned fds (``mkdir``/``rename``/
``remove_tree`` with ``dir_fd``), never through path strings.

Layout in the root: ``.envctl/locks/<name>.lock`` (the names' locks, 0600 in a 0700 directory:
no member can open one, see ``jobs.lock``) and
``.envctl/envs/<name>/`` (0755, the daemon's): the versions of one environment, each built at
the path it keeps for its whole life (``v<N>/``, the build user's, then frozen: the daemon's),
its metadata (``v<N>.json``, ``env.json``, the daemon's, 0644), while ``<root>/<name>`` is the
daemon's symlink to the current version (see ``envs``). Layout of the state dir (local disk, 0711 so
the build user can reach its own job files without listing anyone else's): ``envctld.lock``
(see ``StateDir.ensure``), ``jobs.db``,
``jobs/<id>/{environment.yml,build.json}`` (root:build-group 0640: the build user reads them,
the requester cannot), ``jobs/<id>/build.log`` (written by the daemon only),
``jobs/<id>/home`` (the build's HOME/TMPDIR), ``jobs/<id>/tests.json`` (the ``--test``
commands, the daemon's).

The conda package cache is ``<root>/.envctl/cache/conda`` (the daemon's): on the versions'
filesystem, so that installing hard-links from it. Only trusted steps (running as the daemon)
write it, and :func:`seal_cache` takes every group/other write bit off what they added: a
build uid can never change a file linked from it into its version, so one build cannot poison
the next. ``.envctl/cache`` itself is 0700 (``CACHE_MODE``): a package's file is extracted with
the mode its tarball says (0666 too) and stays so until the seal, and anyone who could reach
it could open it for writing meanwhile and write the shared cache with that fd for ever after.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pwd
import shlex
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..config import DAEMON_AREA
from ..errors import AreaUntrusted, Conflict, FilesystemError
from ..heal.fsops import DIR_FLAGS, Ident, ident, reopen, stat_at
from ..locks import LockFile
from ..quoting import quote_name

log = logging.getLogger(__name__)

AREA = DAEMON_AREA
# In AreaFds' order. locks: the daemon's alone (see ``jobs.lock``).
AREA_DIRS = {"locks": 0o700, "envs": 0o755}
CACHE_MODE = 0o700  # .envctl/cache: the daemon's alone (see the module docstring)


def checked_dir(parent_fd: int | None, path: str, mode: int, shown: str,
                 create: bool = True) -> int:
    """Open (creating if missing, unless ``create`` is False: then FileNotFoundError) a
    daemon-owned directory without following symlinks."""
    kw = {} if parent_fd is None else {"dir_fd": parent_fd}
    created = create
    if create:
        try:
            os.mkdir(path, mode, **kw)  # type: ignore[arg-type]
        except FileExistsError:
            created = False
    try:
        fd = os.open(path, DIR_FLAGS, **kw)  # type: ignore[arg-type]
    except FileNotFoundError:
        if not create:
            raise
        raise FilesystemError(f"{shown} vanished as it was created", hint="retry") from None
    except OSError as exc:
        raise FilesystemError(f"{shown} cannot be opened as a directory: {exc.strerror} "
                              "(a symlink or a file where the daemon's directory should be)",
                              hint="someone tampered with it: inspect it and remove it; the "
                                   "daemon recreates it") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise FilesystemError(f"{shown} is owned by uid {st.st_uid}, not by the daemon "
                              f"(uid {os.geteuid()}): refusing to use it",
                              hint="someone tampered with it: inspect it and remove it; the "
                                   "daemon recreates it")
    if stat.S_IMODE(st.st_mode) != mode:  # umask, an SGID parent, or the healer
        if not created:
            log.warning("layout mode-reset path=%s mode=%04o want=%04o", shown,
                        stat.S_IMODE(st.st_mode), mode)
        os.fchmod(fd, mode)
    return fd


@dataclass(frozen=True)
class AreaFds:
    """The directories of an open :class:`RootArea`, as ``O_NOFOLLOW`` fds: the root, its
    ``.envctl`` (``area``) and the area's subdirectories (``AREA_DIRS``). Valid while the
    ``RootArea.open()`` that made them is."""

    root: int
    area: int
    locks: int
    envs: int


class RootArea:
    """``<root>/.envctl``: name locks and the environments' versions in the shared root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def open(self) -> Iterator[AreaFds]:
        """fds of the root, ``.envctl`` (see ``open_area``) and its subdirectories."""
        opened: list[int] = []
        try:
            opened.append(os.open(self.root, DIR_FLAGS))
            opened.append(self.open_area(opened[0]))
            for sub, mode in AREA_DIRS.items():
                opened.append(checked_dir(opened[1], sub, mode, f"{self.root}/{AREA}/{sub}"))
            yield AreaFds(*opened)
        finally:
            for fd in opened:
                os.close(fd)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(AREA, *parts)

    def open_area(self, root_fd: int) -> int:
        """``.envctl`` in the root (created when missing), or AreaUntrusted saying what is
        wrong with it and how an admin fixes it.

        Why refused rather than repaired: whoever made it (a member, before the daemon's first
        start: the root is the group's to write) owns what the daemon would keep there — its
        locks, its records, every version's path —, and the daemon can neither take it over
        (that member's entries and hard links would come with it) nor remove what it did not
        make. A symlink or a file in its place, or a directory everyone may write, is no more
        the daemon's. Group write alone on the daemon's own directory is taken off (as
        ``checked_dir`` does: an older healer added it)."""
        shown = self.path()
        problem = _area_problem(root_fd)
        if problem is None:
            try:
                return checked_dir(root_fd, AREA, 0o755, str(shown))
            except FilesystemError:
                problem = _area_problem(root_fd)  # made or changed since the first look
                if problem is None:
                    raise
        # One process that moves the other away and makes the daemon's own area: a member who
        # loops making hers again would win any wait for the daemon's next check, and the
        # start of a second command too (``mv ... && mkdir ...`` lost to such a loop about 4
        # times in 5 on a loaded machine); between a rename and a mkdir of one process she has
        # microseconds. Made 0700, then 0755: nobody else can enter it in between. Moved into
        # a directory of its own at each run (mkdtemp: root's, 0700, a name nobody could
        # plant before): run again after a lost race, it must not meet the first run's (a
        # rename onto a full directory fails), and a name she can guess (the pid: 32768 of
        # them) she plants a symlink at, onto which every run's rename failed.
        path = shlex.quote(str(shown))
        owner = f"; os.chown(p, {os.geteuid()}, -1)" if os.geteuid() != 0 else ""
        script = ("import os, sys, tempfile; p = sys.argv[1]; os.rename(p, os.path.join("
                  'tempfile.mkdtemp(prefix=".envctl.untrusted-", dir=os.path.dirname(p)), '
                  f'"envctl")); os.mkdir(p, 0o700); os.chmod(p, 0o755){owner}')
        # run by the daemon's own interpreter: a host may have no python3 (python3.11 alone)
        python = shlex.quote(sys.executable or "python3")
        fix = (f"as root, look at what is in {shown}, then: {python} -c {shlex.quote(script)} "
               f"{path}" if problem[0] != "mode" else
               f"as root, look at what was put in {shown}, then: chmod 755 {path}")
        raise AreaUntrusted(f"{shown} {problem[1]}: the daemon uses nothing in it and refuses "
                            "every request until an admin fixes it", hint=fix,
                            path=str(shown), problem=problem[1])

    def conda_cache(self, fds: AreaFds) -> Path:
        """``.envctl/cache/conda``, created (or checked) as the daemon's own."""
        cache = checked_dir(fds.area, "cache", CACHE_MODE, str(self.path("cache")))
        try:
            os.close(checked_dir(cache, "conda", 0o755, str(self.path("cache", "conda"))))
        finally:
            os.close(cache)
        return self.path("cache", "conda")


HELD_LEVELS = 64  # directory fds a walk keeps open (its top levels); deeper ones are closed


class Listed(NamedTuple):
    """An entry as :func:`walk_listed` finds it: the fd of the directory it is in and that
    directory's path relative to the top (``""`` for the top itself), its name, its type and
    inode number as the directory lists them (``kind``: ``d`` directory, ``f`` regular file,
    ``l`` symlink, ``?`` anything else; nothing stat'ed), and for a directory (``opened``) its
    own ``O_NOFOLLOW`` fd and that fd's ``fstat``. Both fds are valid until the next item."""

    parent: int
    where: str
    name: str
    kind: str
    ino: int
    opened: tuple[int, os.stat_result] | None


@dataclass
class _Level:
    """One directory a walk is in: its fd (-1 once closed to stay within ``HELD_LEVELS``), the
    entries still to visit (name, kind, inode, as listed), its name in its parent and path from
    the top, and its identity once its fd is closed (to prove the re-open)."""

    fd: int
    names: Iterator[tuple[str, str, int]]
    name: str
    path: str
    key: Ident | None = None  # taken when its fd is closed


_listed = tuple.__new__  # a Listed without its generated __new__: 0.5 us less per entry


def _listing(fd: int) -> Iterator[tuple[str, str, int]]:
    """The entries of the directory ``fd``: their types are taken from the listing (``d_type``;
    a filesystem that gives none is asked with an ``lstat`` here, while ``fd`` is open)."""
    with os.scandir(fd) as it:
        return iter([(e.name, "d" if e.is_dir(follow_symlinks=False) else
                      "f" if e.is_file(follow_symlinks=False) else
                      "l" if e.is_symlink() else "?", e.inode()) for e in it])


def _up(child_fd: int, want: Ident, shown: str) -> int:
    """The parent of the directory ``child_fd``, opened through its ``..``, which must be the
    directory the walk came from (``fsops.reopen``): a tree moved meanwhile is refused."""
    fd = reopen(lambda: os.open("..", DIR_FLAGS, dir_fd=child_fd), want)
    if fd < 0:
        raise FilesystemError(f"{shown}: a directory moved while the daemon walked it",
                              hint="retry; if it happens again, someone is moving it on purpose")
    return fd


def _area_problem(root_fd: int) -> tuple[str, str] | None:
    """(kind, what is wrong) with the entry ``.envctl`` in the root, or None."""
    try:
        st = os.stat(AREA, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "type", f"is a symlink (to {quote_name(os.readlink(AREA, dir_fd=root_fd))}), " \
            "not the daemon's directory"
    if not stat.S_ISDIR(st.st_mode):
        return "type", "is not a directory"
    if st.st_uid != os.geteuid():
        return "owner", f"is owned by {_user(st.st_uid)}, not by the daemon ({_user(os.geteuid())})"
    if st.st_mode & 0o002:
        return "mode", f"is writable by everyone (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def walk_listed(top_fd: int, descend: Callable[[os.stat_result], bool],
                leave: Callable[[int, str], None] | None = None, shown: str = "a tree",
                racing: bool = False, paths: bool = False) -> Iterator[Listed]:
    """Every entry below the directory ``top_fd``, as listed (:class:`Listed`): THE walk of
    the jobs layer — GC, ``remove_tree``, ``hand_over``, the cache's seal and the versions'
    sizes through :func:`walk`, the freeze and ``verify`` of a version directly (they ask for
    no ``lstat`` of a file they open anyway). One walk, so that whatever a build user can make
    (a tree of any depth or width) is walked by all of them alike: the freeze kept a stack of
    its own, and refused a deep tree GC removed without a word.

    fd-based, never following a symlink, depth-first with an explicit stack (no recursion,
    whatever the depth). Its fds are bounded whatever the shape of the tree: one per level for
    the top ``HELD_LEVELS`` levels and the one it is in, the deeper levels closed on the way
    down and re-opened through ``..`` on the way up (checked to be the same directory:
    ``_up``). Neither a directory of 100k subdirectories nor a chain of 100k levels (which a
    build user makes in a second with ``mkdirat``) takes the daemon near its fd limit — one fd
    per level did: ``EMFILE`` at 1,024 levels under systemd's default limit, so GC and every
    later build of the name failed. A caller that needs a directory's fd for longer (work
    handed to a thread) takes a ``dup`` of it. A directory is entered when ``descend(its
    stat)`` is true, and ``leave(its parent's fd, its name)`` is called once its fd is closed,
    after its last entry. ``racing``: a tree a build is still writing; a directory that
    vanishes or changes type before it is opened is skipped. ``paths``: each item's ``where``
    is its directory's path from the top (else ""). Only for a caller that keeps every path
    anyway (the freeze's manifest, which bounds their total): the open levels then hold their
    paths, whose sum grows with the square of the depth (a 20,000-level chain of one-letter
    names: 0.4 GB; a 100k one, 10 GB)."""
    stack = [_Level(os.dup(top_fd), iter(()), "", "")]
    try:
        stack[0].names = _listing(stack[0].fd)
        while stack:
            level = stack[-1]
            fd, where = level.fd, level.path
            for name, kind, ino in level.names:  # left (and resumed) to enter a directory
                if kind != "d":
                    yield _listed(Listed, (fd, where, name, kind, ino, None))
                    continue
                try:
                    sub = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if racing and exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        continue
                    raise
                try:
                    st = os.fstat(sub)
                    yield _listed(Listed, (fd, where, name, kind, ino, (sub, st)))
                    entered = descend(st)
                    if entered:
                        path = (f"{where}/{name}" if where else name) if paths else ""
                        stack.append(_Level(sub, _listing(sub), name, path))
                except BaseException:
                    os.close(sub)
                    raise
                if not entered:
                    os.close(sub)
                    continue
                if len(stack) > HELD_LEVELS + 1:
                    level.key = ident(stat_at(fd))
                    os.close(fd)  # re-opened through ``..`` when the walk comes back up
                    level.fd = -1
                break
            else:  # its last entry: back to its parent
                stack.pop()
                try:
                    if stack and stack[-1].fd < 0:
                        assert stack[-1].key is not None  # taken when it was closed
                        stack[-1].fd = _up(fd, stack[-1].key, shown)
                finally:  # off the stack: closed here, also when the climb is refused
                    os.close(fd)
                    level.fd = -1
                if leave is not None and stack:
                    leave(stack[-1].fd, level.name)
    finally:
        for level in stack:
            if level.fd >= 0:
                os.close(level.fd)


def walk(top_fd: int, descend: Callable[[os.stat_result], bool],
         leave: Callable[[int, str], None] | None = None, shown: str = "a tree",
         racing: bool = False) -> Iterator[tuple[int, str, os.stat_result, int | None]]:
    """:func:`walk_listed` with every entry's stat: yields (parent fd, name, lstat, fd),
    ``fd`` the entry's own ``O_NOFOLLOW`` fd when it is a directory (``fstat`` then; valid until
    the next item), else None. ``racing``: an entry that vanishes meanwhile is skipped."""
    for item in walk_listed(top_fd, descend, leave, shown, racing):
        if item.opened is not None:
            yield item.parent, item.name, item.opened[1], item.opened[0]
            continue
        try:
            st = os.stat(item.name, dir_fd=item.parent, follow_symlinks=False)
        except FileNotFoundError:
            if racing:
                continue
            raise
        yield item.parent, item.name, st, None


def hand_over(parent_fd: int, name: str, uid: int, gid: int) -> int:
    """Give the directories of ``name`` (a version the daemon made for a trusted step) to the
    build uid, files untouched: what a trusted step linked from the cache stays the daemon's
    and read-only. Returns how many directories changed owner."""
    def give(fd: int, st: os.stat_result) -> int:
        if (st.st_uid, st.st_gid) == (uid, gid):
            return 0
        os.fchown(fd, uid, gid)
        return 1

    top = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        changed = give(top, os.fstat(top))
        for _parent, _name, st, fd in walk(top, lambda st: True):
            if fd is not None:
                changed += give(fd, st)
    finally:
        os.close(top)
    return changed


def seal_cache(fds: AreaFds, since: float) -> int:
    """Take group and other write off what a trusted step added to the conda cache since
    ``since`` (a directory changed since then is entered: new entries change its ctime);
    returns how many entries changed."""
    fd = checked_dir(fds.area, "cache", CACHE_MODE, "cache", create=False)
    try:
        conda = checked_dir(fd, "conda", 0o755, "cache/conda", create=False)
    finally:
        os.close(fd)
    changed = 0
    try:
        for parent, name, st, sub in walk(conda, lambda st: st.st_ctime >= since):
            mode = stat.S_IMODE(st.st_mode)
            if not mode & 0o022 or stat.S_ISLNK(st.st_mode):
                continue
            if sub is not None:
                os.fchmod(sub, mode & ~0o022)
            else:
                os.chmod(name, mode & ~0o022, dir_fd=parent, follow_symlinks=False)
            changed += 1
    finally:
        os.close(conda)
    return changed


STATE_LOCK = "envctld.lock"
# (st_dev, st_ino) of a state dir -> (its lock, job managers using it), per process.
_STATE_LOCKS: dict[tuple[int, int], tuple[LockFile, int]] = {}
_STATE_LOCKS_GUARD = threading.Lock()


def make_owned_dir(parent_fd: int, name: str, uid: int, gid: int, mode: int) -> None:
    """Create ``name`` under ``parent_fd`` for the build user; it must not exist already.

    Why the mode is given to ``mkdir`` and not set after the ``chown``: in the shared root the
    healer watches this directory appear, and a heal computes its ``chmod`` from the mode it
    read. A ``chmod`` of ours landing between that read and the healer's write was undone by it
    (a version made ``0700``, then ``0755``, stayed ``2770``: unreadable to other users). So the
    mode only ever grows after creation; ``fchmod`` remains for a umask that took bits away
    (the daemon sets 022 at start: see ``daemon.main``)."""
    os.mkdir(name, mode, dir_fd=parent_fd)
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        os.fchown(fd, uid, gid)
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def remove_tree(parent_fd: int, name: str) -> bool:
    """Remove ``name`` under ``parent_fd`` (fd-based, never follows symlinks); True if it was
    there. A symlink or file in its place is unlinked, never followed. Iterative (``walk``):
    a build leaves trees of any depth, and ``shutil.rmtree`` recursed past Python's limit on
    one 1,000 levels deep (RecursionError: the version stayed, and so did every later build
    of its name, failing to clear it)."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return True
    top = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        for dfd, entry, _st, sub in walk(top, lambda st: True,
                                         leave=lambda dfd, sub: os.rmdir(sub, dir_fd=dfd),
                                         shown=name):
            if sub is None:
                os.unlink(entry, dir_fd=dfd)
    finally:
        os.close(top)
    os.rmdir(name, dir_fd=parent_fd)
    return True


def exists(parent_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write_new(dir_fd: int, name: str, text: str, uid: int, gid: int) -> None:
    """Write a fresh file (any old one unlinked first, never followed), 0640 uid:gid."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o640)


class StateDir:
    """The daemon's private state on local disk: the database and per-job directories."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_key: tuple[int, int] | None = None  # set while this holds the state dir

    def ensure(self) -> None:
        """Create the state dir (0711, the daemon's own), take its lock, then ``jobs/``;
        refuse a foreign state dir, and one another daemon uses (Conflict, exit 75).

        Why the lock: two daemons on one state dir share its job store and cgroup names, and
        the second one's recovery would kill the first one's running builds and tell their
        requesters the daemon had stopped. So before anything in it is opened, the daemon takes
        an exclusive lock on ``envctld.lock`` (``locks.LockFile``: 0600, whoever could open it
        could hold a shared lock and keep every daemon from starting) and writes its pid there,
        so a refusal names the holder. The kernel drops the lock when the holder dies,
        ``kill -9`` included: no stale lock. The fd is ``O_CLOEXEC`` (builds are also spawned
        with ``close_fds``), so a build that outlives its daemon never keeps the lock. The lock
        is the process's: a job manager started again in it before the last one let go (a stop
        that timed out with builds still running) shares it, and ``release`` by the last user
        unlocks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = checked_dir(None, str(self.path), 0o711, str(self.path))
        try:
            self._lock(fd)
        finally:
            os.close(fd)
        os.close(checked_dir(None, str(self.path / "jobs"), 0o711, str(self.path / "jobs")))

    def _lock(self, dir_fd: int) -> None:
        if self._lock_key is not None:
            return
        st = os.fstat(dir_fd)
        key = (st.st_dev, st.st_ino)
        with _STATE_LOCKS_GUARD:
            if key in _STATE_LOCKS:
                held, users = _STATE_LOCKS[key]
                _STATE_LOCKS[key] = (held, users + 1)
                self._lock_key = key
                return
            lock = LockFile(dir_fd, STATE_LOCK, str(self.path / STATE_LOCK))
            try:
                by = lock.acquire("state dir")
            except OSError as exc:
                raise FilesystemError(f"cannot lock {self.path / STATE_LOCK}: "
                                      f"{exc.strerror}") from None
            if by is not None:
                raise Conflict(f"another envctld (pid {by.pid or 'unknown'}) is using the "
                               f"state dir {self.path}",
                               hint="stop that daemon first, or give this one a "
                               "requests.state_dir of its own")
            _STATE_LOCKS[key] = (lock, 1)
            self._lock_key = key

    def release(self) -> None:
        """Let go of the lock ``ensure`` took (idempotent): once the job manager has closed
        the store, with no build left running, another daemon may have the state dir."""
        with _STATE_LOCKS_GUARD:
            if self._lock_key is None:
                return
            held, users = _STATE_LOCKS.pop(self._lock_key)
            if users > 1:
                _STATE_LOCKS[self._lock_key] = (held, users - 1)
            else:
                held.release()
            self._lock_key = None

    @property
    def db_path(self) -> Path:
        return self.path / "jobs.db"

    def job_dir(self, job_id: str) -> Path:
        return self.path / "jobs" / job_id

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "build.log"

    def create_job_dir(self, job_id: str) -> None:
        """``jobs/<id>`` (0711, the daemon's) with an empty log, at submit time."""
        os.close(checked_dir(None, str(self.job_dir(job_id)), 0o711, str(self.job_dir(job_id))))
        os.close(self.open_log(job_id))

    def remove_job_dir(self, job_id: str) -> bool:
        """Delete ``jobs/<id>`` (retention); True if it was there."""
        fd = os.open(self.path / "jobs", DIR_FLAGS)
        try:
            return remove_tree(fd, job_id)
        finally:
            os.close(fd)

    def prepare_job(self, job_id: str, uid: int, gid: int, files: dict[str, str]) -> Path:
        """(Re)create ``jobs/<id>/home`` for the build user and write the build's inputs.

        Plain names are written root-owned, group ``gid``, 0640 (the build user reads them,
        nobody else); ``home/<name>`` goes into the build's writable HOME, owned by it.
        """
        jdir = self.job_dir(job_id)
        fd = checked_dir(None, str(jdir), 0o711, str(jdir))
        try:
            remove_tree(fd, "home")
            make_owned_dir(fd, "home", uid, gid, 0o700)
            home = os.open("home", DIR_FLAGS, dir_fd=fd)
            try:
                for name, text in files.items():
                    in_home = name.startswith("home/")
                    _write_new(home if in_home else fd, name.removeprefix("home/"), text,
                               uid if in_home else -1, gid)
            finally:
                os.close(home)
        finally:
            os.close(fd)
        return jdir

    def write_tests(self, job_id: str, tests: list[str]) -> None:
        """The job's ``--test`` commands (kept with its log: a queued job survives a restart)."""
        self._write_json(job_id, "tests.json", tests)

    def read_tests(self, job_id: str) -> list[str]:
        return [str(t) for t in self._read_json(job_id, "tests.json") or []]

    def write_note(self, job_id: str, description: str | None, why: str | None) -> None:
        """What the requester said about the build (``create --description``: the env's new
        description, and why the version was made) or the daemon did (``why``: ``env add``
        and its packages), for the version's record; kept like the tests."""
        self._write_json(job_id, "note.json", {"description": description, "why": why})

    def read_note(self, job_id: str) -> dict[str, str | None]:
        note = self._read_json(job_id, "note.json") or {}
        return {k: note[k] if isinstance(note.get(k), str) else None
                for k in ("description", "why")}

    def _write_json(self, job_id: str, name: str, value: Any) -> None:
        fd = os.open(self.job_dir(job_id), DIR_FLAGS)
        try:
            _write_new(fd, name, json.dumps(value), -1, -1)
        finally:
            os.close(fd)

    def _read_json(self, job_id: str, name: str) -> Any:
        """One of the job's files the daemon wrote (None when there is none)."""
        try:
            fd = os.open(self.job_dir(job_id) / name, os.O_RDONLY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, encoding="utf-8") as fh:
            return json.load(fh)

    def open_log(self, job_id: str) -> int:
        """An append fd on the job's log, created 0600 by the daemon, never via a symlink."""
        return os.open(self.log_path(job_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND
                       | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
