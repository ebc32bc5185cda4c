"""Environments as versions behind one stable path: ``<root>/<name>`` is a symlink to
``.envctl/envs/<name>/vN``, switched atomically.

Why versions and a symlink: conda and venv prefixes are not relocatable — an environment must
run at the path it was built at — and users, kernels and ``envs_dirs`` need one path that never
moves. So every build of a name gets a new version directory, at the path it keeps for its whole
life, and ``<root>/<name>`` is a symlink (owned by the daemon) that is switched to it by
``rename(2)`` of a new symlink over the old one: atomic on local filesystems, NFS and EFS alike,
so a reader of ``<root>/<name>/bin/x`` sees the old or the new version, never a gap. A process
started in the previous version keeps it: versions stay on disk until GC (``keep_versions``
newest, and ``gc_grace`` after they stopped being current).

Layout of ``<root>/.envctl/envs/<name>/`` (the daemon's, 0755; nothing in it is a user's to
change): ``vN/`` (the prefix, built by the build user, then frozen: see ``freeze``), ``vN.json``
(that version's record: ``state`` ``building`` until it is frozen, tested and inventoried, then
``ready``; who built it, when, from which spec and tests, the installed packages, its size),
``env.json`` (the owner — the requester of the first version —, when each version stopped being
current, whether the name was removed). The symlink is the truth about which version is current;
``env.json`` is written before every switch, so a crash between the two leaves at worst a
``retired`` time on a version that is still current, which GC ignores (it never removes the
current version). Records are written atomically (a temporary file renamed over) and trusted
only when the daemon wrote them: a regular file owned by the daemon's uid and writable by nobody
else. Every mutation runs under the name's lock (``lock``), so a version in state ``building``
found by a lock holder is a dead build's and is removed.

A hand-made environment (a plain directory, or a symlink the daemon did not make) at
``<root>/<name>`` is ``unmanaged``: listed, never moved, replaced or removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..accounts import person
from ..errors import Conflict, EnvctlError, LimitReached, NotFound, ValidationError
from ..heal.fsops import DIR_FLAGS
from ..names import is_env_name
from ..quoting import quote_name
from ..untrusted import load_json
from . import layout, usemarks
from .model import Requester

log = logging.getLogger(__name__)

FORMAT = 1
VERSION_RE = re.compile(r"v([1-9][0-9]{0,8})")
ENV_FILE = "env.json"
MAX_RECORD = 4 << 20  # a record holds a spec (≤ 64 KiB) and a package list
_TMP, _TRASH, _LINK = ".tmp-", ".gc-", ".link-"
MAX_PACKAGES = 20000
_FIELD = 256  # longest package name/version/build/channel kept from a build's metadata


def version_number(version: str) -> int:
    m = VERSION_RE.fullmatch(version)
    if m is None:
        raise NotFound(f"no version {version!r}", hint="versions are named v1, v2, ...")
    return int(m.group(1))


def link_target(name: str, version: str) -> str:
    """What ``<root>/<name>`` points to: relative, so the root may be mounted anywhere."""
    return f"{layout.AREA}/envs/{name}/{version}"


@dataclass(frozen=True)
class Current:
    """What ``<root>/<name>`` is: ``managed`` (our symlink to ``version``), ``unmanaged`` (a
    plain directory or anybody else's entry) or ``missing``."""

    kind: str
    version: str | None = None


def current(root_fd: int, name: str) -> Current:
    """Managed only when the entry is a symlink the daemon made (its owner: group members can
    replace entries of the root) pointing where the daemon points names."""
    try:
        st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return Current("missing")
    if stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid():
        target = os.readlink(name, dir_fd=root_fd)
        head, _, version = target.rpartition("/")
        if head == link_target(name, "").rstrip("/") and VERSION_RE.fullmatch(version):
            return Current("managed", version)
    return Current("unmanaged")


# -- records ---------------------------------------------------------------------------------


def write_record(dir_fd: int, name: str, data: dict[str, Any]) -> None:
    """Write ``name`` atomically (temporary file, fsync, rename): a reader on any host sees the
    old record or the new one, never a torn one."""
    tmp = f"{_TMP}{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def read_record(dir_fd: int, name: str) -> dict[str, Any] | None:
    """A record the daemon wrote, or None (missing, or not trustworthy: another owner, writable
    by others, not a regular file, too large, not a JSON object)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink in its place
        log.warning("envs record-refused name=%s error=%s", name, exc.strerror)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or \
                st.st_mode & 0o022 or st.st_size > MAX_RECORD:
            log.warning("envs record-refused name=%s uid=%d mode=%04o size=%d", name,
                        st.st_uid, stat.S_IMODE(st.st_mode), st.st_size)
            return None
        data = b""
        while chunk := os.read(fd, MAX_RECORD + 1 - len(data)):  # NFS may return less
            data += chunk
    finally:
        os.close(fd)
    try:  # the daemon's own: its depth is the daemon's (no ``load_json`` pass needed)
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


# -- one environment's directory --------------------------------------------------------------


@contextlib.contextmanager
def env_dir(fds: layout.AreaFds, name: str, create: bool) -> Iterator[int | None]:
    """The fd of ``.envctl/envs/<name>`` (None when it does not exist and ``create`` is off)."""
    try:
        fd = layout.checked_dir(fds.envs, name, 0o755, f".envctl/envs/{name}", create)
    except FileNotFoundError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def versions(env_fd: int) -> list[str]:
    """Version names present (a directory or a record), oldest first."""
    found = {entry.removesuffix(".json") for entry in os.listdir(env_fd)}
    return sorted((v for v in found if VERSION_RE.fullmatch(v)), key=version_number)


def next_version(env_fd: int) -> str:
    """One more than any version present or remembered in ``env.json``."""
    known = versions(env_fd) + list((read_record(env_fd, ENV_FILE) or {}).get("retired", {}))
    numbers = [version_number(v) for v in known if VERSION_RE.fullmatch(str(v))]
    return f"v{max(numbers, default=0) + 1}"


def ready(env_fd: int, version: str) -> dict[str, Any] | None:
    """The record of a complete version whose directory is there, else None."""
    rec = read_record(env_fd, f"{version}.json")
    if rec is None or rec.get("state") != "ready" or not layout.exists(env_fd, version):
        return None
    return rec


def drop_version(env_fd: int, version: str) -> None:
    """Remove one version: first renamed out of its name (so it is gone at once and a crash
    mid-removal leaves no half-deleted version under a valid name), then its record, then the
    tree (fd-based, never following a symlink)."""
    trash = f"{_TRASH}{version}-{secrets.token_hex(4)}"
    with contextlib.suppress(FileNotFoundError):
        os.rename(version, trash, src_dir_fd=env_fd, dst_dir_fd=env_fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{version}.json", dir_fd=env_fd)
    usemarks.forget(env_fd, version)
    layout.remove_tree(env_fd, trash)


def clear_dead(env_fd: int, cur: str | None, job_id: str | None = None) -> list[str]:
    """With the name's lock held: remove what no live build can be writing — versions still in
    state ``building`` (or without a record), temporary and half-removed entries — and, with
    ``job_id``, that job's versions unless current. Returns the versions removed."""
    removed = []
    for entry in os.listdir(env_fd):
        if entry.startswith((_TMP, _TRASH, _LINK)):
            layout.remove_tree(env_fd, entry)
    for version in versions(env_fd):
        if version == cur:
            continue
        rec = read_record(env_fd, f"{version}.json")
        dead = rec is None or rec.get("state") != "ready" or not layout.exists(env_fd, version)
        if dead or (job_id is not None and rec is not None and rec.get("job") == job_id):
            drop_version(env_fd, version)
            removed.append(version)
    return removed


def begin(env_fd: int, version: str, record: dict[str, Any], uid: int, gid: int) -> None:
    """Record the version as ``building``, then create its directory for the build user: a
    directory never exists without a record saying what it is."""
    write_record(env_fd, f"{version}.json", {**record, "state": "building"})
    layout.make_owned_dir(env_fd, version, uid, gid, 0o755)


def switch(root_fd: int, env_fd: int, name: str, version: str,
           owner: dict[str, Any] | None = None, description: str | None = None) -> str | None:
    """Make ``version`` current: ``env.json`` first (owner when the name is new, when the
    previous version stopped being current, ``description`` when one is given; a build's
    switch also ends an ``update`` failure), then a new symlink renamed over ``<root>/<name>``.
    Returns the previous version. Refuses (Conflict) an unmanaged entry at the name: rename
    cannot put a symlink over a directory, and the daemon never removes one."""
    cur = current(root_fd, name)
    if cur.kind == "unmanaged":
        raise Conflict(f"{name!r} in the root is not an environment envctl manages (a plain "
                       "directory or someone else's link): the daemon never replaces it",
                       hint="pick another name, or move it away yourself")
    now = time.time()
    env = read_record(env_fd, ENV_FILE) or {"format": FORMAT, "name": name}
    if owner is not None and (cur.kind == "missing" or "owner" not in env):
        env.update(owner=owner, created_at=now)  # a new name: its first version's requester
    retired = dict(env.get("retired", {}))
    if cur.version is not None and cur.version != version:
        retired[cur.version] = now
    retired.pop(version, None)
    env.update(retired=retired, removed_at=None, current=version)
    if description is not None:
        env["description"] = description or None
    if owner is not None:  # a build (a rollback passes no owner): an update went through
        env["failures"] = {k: v for k, v in (env.get("failures") or {}).items() if k != "update"}
    write_record(env_fd, ENV_FILE, env)
    usemarks.create(env_fd, version)  # before any kernel can resolve the name to it
    link = f"{_LINK}{secrets.token_hex(6)}"
    os.symlink(link_target(name, version), link, dir_fd=env_fd)
    try:  # the root's group, as if made in the (SGID) root: the healer has nothing to fix
        os.chown(link, -1, os.fstat(root_fd).st_gid, dir_fd=env_fd, follow_symlinks=False)
        os.rename(link, name, src_dir_fd=env_fd, dst_dir_fd=root_fd)
    except OSError as exc:
        os.unlink(link, dir_fd=env_fd)
        if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise Conflict(f"{name!r} in the root became a directory: the daemon never "
                           "replaces one", hint="move it away yourself") from None
        raise
    return cur.version


def mark_current(fds: layout.AreaFds) -> None:
    """A use mark (``usemarks``) for every current version: those made current before marks
    existed get theirs at the daemon's start."""
    for name in os.listdir(fds.envs):
        cur = current(fds.root, name) if is_env_name(name) else Current("missing")
        if cur.version is not None:
            with env_dir(fds, name, create=False) as env_fd:
                if env_fd is not None:
                    usemarks.create(env_fd, cur.version)


def unlink_name(root_fd: int, env_fd: int, name: str) -> str:
    """``env remove``: the name disappears at once (one unlink of the symlink); its versions
    stay until GC, counted from now."""
    cur = current(root_fd, name)
    if cur.kind == "missing":
        raise NotFound(f"{name!r} has no current version: removed already, or no build of it "
                       "succeeded", hint=f"see: envctl env show {name}")
    if cur.kind != "managed" or cur.version is None:
        raise Conflict(f"{name!r} is not a current environment envctl manages" + (
            " (a hand-made one: the daemon never removes those)"
            if cur.kind == "unmanaged" else ""), hint="see: envctl env list")
    now = time.time()
    env = read_record(env_fd, ENV_FILE) or {"format": FORMAT, "name": name}
    env.update(retired={**env.get("retired", {}), cur.version: now}, removed_at=now,
               current=None)
    write_record(env_fd, ENV_FILE, env)
    os.unlink(name, dir_fd=root_fd)
    return cur.version


def collectable(env_fd: int, cur: str | None, keep: int, grace: float, now: float,
                record: bool = True) -> list[str]:
    """Ready versions GC may remove: not current; not among the ``keep`` newest while the name
    exists (a removed name keeps none); stopped being current over ``grace`` seconds ago (a
    version with no retirement time recorded gets one now: its clock starts)."""
    env = read_record(env_fd, ENV_FILE) or {}
    retired: dict[str, float] = dict(env.get("retired", {}))
    done = [v for v in versions(env_fd) if ready(env_fd, v) is not None]
    kept = set(done[-keep:]) if cur is not None and keep > 0 else set()
    out = []
    for version in done:
        if version == cur or version in kept:
            continue
        since = retired.get(version)
        if not isinstance(since, (int, float)):
            retired[version] = now
            continue
        if now - since >= grace:
            out.append(version)
    if record and env and retired != env.get("retired", {}):
        write_record(env_fd, ENV_FILE, {**env, "retired": retired})
    return out


def over_cap(env_fd: int, cur: str | None, cap: int, going: Sequence[str] = ()) -> list[str]:
    """The hard cap (``requests.max_versions``), grace or not: the oldest ready versions, never
    the current one nor one a process holds now (``usemarks``), that take the versions on disk
    (all of them, built or building, but ``going``) beyond ``cap``."""
    present = [v for v in versions(env_fd) if v not in going]
    excess = len(present) - cap
    if excess <= 0:
        return []
    candidates = [v for v in present if v != cur and ready(env_fd, v) is not None
                  and not usemarks.in_use(env_fd, v, 0.0)]  # a running kernel's: never
    return candidates[:excess]


def make_room(env_fd: int, name: str, cur: str | None, cap: int) -> list[str]:
    """Before a build of the name (its lock held): remove what ``over_cap`` names so that the
    new version fits under the cap. Returns the versions removed; LimitReached when the
    versions processes use (``usemarks``) leave no room: the cap holds, in use or not."""
    gone = over_cap(env_fd, cur, cap - 1)
    for version in gone:
        drop_version(env_fd, version)
    present = versions(env_fd)
    if len(present) >= cap:
        held = [v for v in present if v != cur]
        raise LimitReached(
            f"{name!r} already has {cap} versions (requests.max_versions = {cap}) and "
            "processes use every old one: " + "; ".join(
                f"{v} by {usemarks.holders(env_fd, v)}" for v in held[:5]),
            hint="stop those kernels or processes (or ask their owners to), then request "
                 "again")
    return gone


# -- what people are told about an env: its description, its last failure ---------------------

MAX_DESCRIPTION = 500
FAILURE_KINDS = {"gc": "GC", "update": "update"}


def validate_description(text: str) -> str:
    """A description as kept: one paragraph of printable text (a control character, a line
    break, a bidi override is refused: ``env list``, the web page and the kernel launcher show
    it to everyone), at most ``MAX_DESCRIPTION`` characters, outer blanks dropped; "" clears."""
    text = text.strip()
    if len(text) > MAX_DESCRIPTION:
        raise ValidationError(f"the description has {len(text)} characters; at most "
                              f"{MAX_DESCRIPTION} are kept", hint="say it shorter")
    bad = next((c for c in text if not c.isprintable()), None)
    if bad is not None:
        raise ValidationError(f"the description holds the character U+{ord(bad):04X} (a "
                              "control or format character, or a line break)",
                              hint="one paragraph of plain text")
    return text


def set_failure(env_fd: int, name: str, kind: str, message: str | None) -> None:
    """Record (``message``) or clear (None) the env's last ``kind`` failure in ``env.json``
    (the name's lock held): ``env list`` on every host shows it until a later ``kind``
    succeeds."""
    env = read_record(env_fd, ENV_FILE) or {"format": FORMAT, "name": name}
    failures = dict(env.get("failures") or {})
    if message is None and kind not in failures:
        return
    if message is None:
        del failures[kind]
    else:
        failures[kind] = {"message": message, "at": time.time()}
    write_record(env_fd, ENV_FILE, {**env, "failures": failures})


def failure_text(env: dict[str, Any]) -> str | None:
    """The most recent failure ``env.json`` records, as one line (None: none)."""
    failures = env.get("failures")
    found = [(f.get("at") or 0, kind, f.get("message")) for kind, f in
             (failures.items() if isinstance(failures, dict) else ()) if isinstance(f, dict)]
    if not found:
        return None
    at, kind, message = max(found, key=lambda f: f[0])
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f"{FAILURE_KINDS.get(kind, kind)} failed at {when}: {_field(message, 1000)}"


def _description(env: dict[str, Any]) -> str | None:
    text = env.get("description")
    return _field(text, MAX_DESCRIPTION) or None if isinstance(text, str) else None


def description_of(fds: layout.AreaFds, name: str) -> str | None:
    """The description ``env.json`` of ``name`` holds (``fds`` of ``layout.RootArea.open``);
    None too when its directory cannot be read (a hand-made name, a tampered directory)."""
    try:
        with env_dir(fds, name, create=False) as env_fd:
            rec = read_record(env_fd, ENV_FILE) if env_fd is not None else None
    except (OSError, EnvctlError):
        return None
    return _description(rec or {})


def failure_message(exc: BaseException) -> str:
    """What went wrong, for a person: an envctl error's message, a system call's error with
    the file it was about, anything else by its type."""
    if isinstance(exc, EnvctlError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.filename or 'system call'}: {exc.strerror or exc}"
    return f"internal error: {type(exc).__name__}: {exc}"


# -- what a built version holds ---------------------------------------------------------------


def _child(dir_fd: int, name: str) -> int | None:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None


def _read_small(dir_fd: int, name: str, limit: int = 1 << 20) -> bytes | None:
    """A regular file's first ``limit`` bytes, never through a symlink or a fifo."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, limit) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)


def _field(value: object, limit: int = _FIELD) -> str:
    """A name, version, build or channel as the build's metadata says it, bounded and as
    printable text (a control character becomes U+FFFD): ``env show`` prints it to whoever
    looks, and a terminal obeys the escapes a package's METADATA may carry."""
    text = str(value)[:limit] if isinstance(value, (str, int, float)) else ""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else "\ufffd" for c in text)


def inventory(prefix_fd: int) -> list[dict[str, str]]:
    """The packages installed in a prefix, read from what the installers leave (conda-meta
    records; the ``.dist-info`` of every site directory whose INSTALLER is uv or pip). The tree
    belongs to the build user, so it is read as untrusted: relative to fds, no symlink
    followed, sizes and nesting bounded (a conda-meta record that is not JSON, or nests deeper
    than any record does, is a ValidationError naming it: the build fails saying so, as conda
    itself refuses such a prefix)."""
    found: list[dict[str, str]] = []
    meta = _child(prefix_fd, "conda-meta")
    if meta is not None:
        try:
            for entry in sorted(os.listdir(meta))[:MAX_PACKAGES]:
                raw = _read_small(meta, entry) if entry.endswith(".json") else None
                rec = load_json(raw, quote_name(f"conda-meta/{entry}")) if raw else None
                if isinstance(rec, dict) and rec.get("name"):
                    found.append({"manager": "conda", "name": _field(rec.get("name")),
                                  "version": _field(rec.get("version")),
                                  "build": _field(rec.get("build")),
                                  "channel": _field(rec.get("channel"))})
        finally:
            os.close(meta)
    for site in site_dirs(prefix_fd):
        try:
            for entry in sorted(os.listdir(site))[:MAX_PACKAGES]:
                if entry.endswith(".dist-info"):
                    pkg = _dist_info(site, entry)
                    if pkg is not None:
                        found.append(pkg)
        finally:
            os.close(site)
    return found


# Where a python's installers put packages: conda-forge's and a venv's site-packages, Debian's
# dist-packages (its pip and uv install under local/ when the prefix is not a venv).
_SITE_DIRS = (("lib",), ("local", "lib"))
_SITE_NAMES = ("site-packages", "dist-packages")
_INSTALLERS = (b"uv", b"pip")


def site_dirs(prefix_fd: int) -> Iterator[int]:
    """fds of a prefix's site directories (``lib/python*/{site,dist}-packages``,
    ``local/lib/python*/...``), opened without following a symlink; each is the caller's to
    close. The one list of where an env's packages are, for the inventory and for kernels."""
    for parts in _SITE_DIRS:
        lib = _descend(prefix_fd, parts)
        if lib is None:
            continue
        try:
            for entry in sorted(os.listdir(lib)):
                if not entry.startswith("python"):
                    continue
                py = _child(lib, entry)
                if py is None:
                    continue
                try:
                    for name in _SITE_NAMES:
                        site = _child(py, name)
                        if site is not None:
                            yield site
                finally:
                    os.close(py)
        finally:
            os.close(lib)


def _descend(dir_fd: int, parts: tuple[str, ...]) -> int | None:
    """The directory ``parts`` below ``dir_fd`` (never through a symlink), or None."""
    fd: int | None = os.dup(dir_fd)
    for part in parts:
        assert fd is not None
        below = _child(fd, part)
        os.close(fd)
        fd = below
        if fd is None:
            return None
    return fd


def _dist_info(site: int, entry: str) -> dict[str, str] | None:
    info = _child(site, entry)
    if info is None:
        return None
    try:
        if (_read_small(info, "INSTALLER", 64) or b"").strip() not in _INSTALLERS:
            return None  # conda's own python packages say "conda": listed above
        fields: dict[str, str] = {}
        for line in (_read_small(info, "METADATA", 65536) or b"").decode(
                "utf-8", "replace").splitlines():
            if not line:
                break
            key, _, value = line.partition(":")
            if key in ("Name", "Version"):
                fields.setdefault(key, value.strip())
    finally:
        os.close(info)
    if "Name" not in fields:
        return None
    return {"manager": "pip", "name": _field(fields["Name"]),
            "version": _field(fields.get("Version", ""))}


def ready_fields(dir_fd: int, name: str) -> dict[str, Any]:
    """What a ``ready`` record says of the built prefix ``name`` in ``dir_fd``: its packages,
    size and entry count (an env version and a venv base are recorded alike)."""
    prefix_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=dir_fd)
    try:
        packages = inventory(prefix_fd)
        size, entries = tree_size(prefix_fd)
    finally:
        os.close(prefix_fd)
    return {"state": "ready", "built_at": time.time(), "packages": packages,
            "size_bytes": size, "entries": entries}


def tree_size(prefix_fd: int, racing: bool = False,
              allocated: bool = False) -> tuple[int, int]:
    """(bytes, entries) of a prefix, walked without following symlinks, whatever its depth
    (``layout.walk``: ``os.fwalk`` recursed past Python's limit on a deep tree); ``racing``:
    one a build is still writing; ``allocated``: each entry counted as what it takes on disk
    when that is more than its size (the runner's disk limit: a one-byte file takes a block,
    and 24,000 of them were 24K of the limit while they took 94M)."""
    total = count = 0
    for _parent, _name, st, _fd in layout.walk(prefix_fd, lambda st: True, racing=racing):
        total += max(st.st_size, st.st_blocks * 512) if allocated else st.st_size
        count += 1
    return total, count


def export(record: dict[str, Any]) -> str:
    """An environment.yml with exact pins that ``request create -f`` accepts back: conda
    packages as ``name ==version build`` (the canonical match spec), pip packages as
    ``name==version`` (for a venv, the pip and setuptools the venv brings are left out unless
    the spec asked for them), and the version's activation ``variables:``."""
    import yaml

    spec = record.get("spec_channels") or []
    packages = record.get("packages") or []
    conda = [f"{p['name']} =={p['version']} {p['build']}".rstrip() for p in packages
             if p.get("manager") == "conda"]
    asked = {str(r).split("=")[0].split("<")[0].split(">")[0].strip().lower()
             for r in record.get("spec_pip") or []}
    pip = [f"{p['name']}=={p['version']}" for p in packages if p.get("manager") == "pip"
           and (record.get("backend") != "venv" or p["name"].lower() not in
                ("pip", "setuptools") or p["name"].lower() in asked)]
    deps: list[Any] = conda if conda else (["python", "pip"] if pip else [])
    if pip:
        deps.append({"pip": pip})
    doc: dict[str, Any] = {"name": record.get("name"), "channels": list(spec),
                           "dependencies": deps}
    if record.get("variables"):
        doc["variables"] = dict(record["variables"])
    head = (f"# {record.get('name')} {record.get('version')}: exported by envctl "
            f"(job {record.get('job')}, backend {record.get('backend')})\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


# -- what changed from one version to another ------------------------------------------------


def _pkg_key(pkg: dict[str, Any]) -> tuple[str, str]:
    """A package's identity across versions: its installer and its name as that installer
    compares names (pip: PEP 503's normalised name; conda: lower case)."""
    source, name = str(pkg.get("manager")), str(pkg.get("name"))
    if source == "pip":
        return source, re.sub(r"[-_.]+", "-", name).lower()
    return source, name.lower()


def compare_versions(source: str, old: str, new: str) -> str:
    """``up``, ``down`` or ``other`` (the same version, or versions that do not compare) by
    the ordering of the package's installer: conda's (rattler's ``Version``: ``1.10 > 1.9``,
    ``2.0a1 < 2.0``), pip's (PEP 440, ``packaging``); without those, numeric dot-segments."""
    try:
        if source == "pip":
            from packaging.version import Version as PipVersion

            a, b = PipVersion(old), PipVersion(new)
            return "up" if b > a else "down" if b < a else "other"
        from rattler import Version as CondaVersion

        c, d = CondaVersion(old), CondaVersion(new)
        return "up" if d > c else "down" if d < c else "other"
    except Exception:  # noqa: BLE001 - an unparsable version (any text a build left)
        pass
    x, y = _segments(old), _segments(new)
    if x is None or y is None or x == y:
        return "other"
    return "up" if y > x else "down"


_DIGITS = re.compile(r"[0-9]+")


def _segments(version: str) -> tuple[int, ...] | None:
    parts = re.split(r"[.\-_+]", version)
    # ASCII digits only: str.isdigit() takes "²", which int() refuses (a build's own code
    # writes the METADATA its inventory reads)
    return tuple(int(p) for p in parts) if all(_DIGITS.fullmatch(p) for p in parts) else None


def _shown_version(pkg: dict[str, Any], other: dict[str, Any]) -> str:
    """A package's version in a diff; with its build when only the build differs."""
    version = str(pkg.get("version"))
    same = version == str(other.get("version")) and pkg.get("build") != other.get("build")
    return f"{version} ({pkg.get('build')})" if same else version


def diff_packages(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, Any]:
    """What changed between two package lists (records' ``packages``): ``added`` and
    ``removed`` ({name, version, source}), ``changed`` ({name, from, to, source, direction}),
    each sorted by source and name."""
    before = {_pkg_key(p): p for p in old if isinstance(p, dict)}
    after = {_pkg_key(p): p for p in new if isinstance(p, dict)}

    def entry(pkg: dict[str, Any]) -> dict[str, str]:
        return {"name": str(pkg.get("name")), "version": str(pkg.get("version")),
                "source": str(pkg.get("manager"))}

    changed = []
    for key in sorted(before.keys() & after.keys()):
        a, b = before[key], after[key]
        if (a.get("version"), a.get("build")) != (b.get("version"), b.get("build")):
            changed.append({"name": str(b.get("name")), "from": _shown_version(a, b),
                            "to": _shown_version(b, a), "source": key[0],
                            "direction": compare_versions(key[0], str(a.get("version")),
                                                          str(b.get("version")))})
    return {"added": [entry(after[k]) for k in sorted(after.keys() - before.keys())],
            "removed": [entry(before[k]) for k in sorted(before.keys() - after.keys())],
            "changed": changed}


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The ``changes`` of version record ``new`` from ``old`` (None: it is the first):
    ``from``, ``to``, the package diff and ``why`` it was built."""
    return {"from": old.get("version") if old else None, "to": new.get("version"),
            **diff_packages((old or {}).get("packages") or [], new.get("packages") or []),
            "why": new.get("why")}


def scan_names(root_fd: int, envs_fd: int) -> list[str]:
    """Every directory or symlink in the root (hand-made envs included; files are not envs)
    and every name with versions."""
    with os.scandir(root_fd) as entries:
        names = {e.name for e in entries if not e.name.startswith(".") and
                 (e.is_symlink() or e.is_dir(follow_symlinks=False))}
    names.update(e for e in os.listdir(envs_fd) if not e.startswith("."))
    return sorted(names)


def owned_by(owner: object, who: Requester) -> bool:
    """The same rule as for jobs (``Requester.matches``), on the owner ``env.json`` records:
    ``{uid, name, hub_user, hub_id, claimed_user}``."""
    return isinstance(owner, dict) and \
        who.matches(owner.get("uid"), owner.get("hub_user"), owner.get("hub_id"))


def owner_name(owner: object) -> str:
    """The owner as refusals name them (``accounts.person`` of the name recorded: a renamed hub
    user's old one)."""
    return person(owner) if isinstance(owner, dict) else "nobody (envctl did not build it)"


_SUMMARY = ("job", "backend", "requester", "created_at", "built_at", "size_bytes", "entries",
            "prefix", "tests", "digest", "frozen_at", "verified_at", "verify")


def describe(env_fd: int, name: str, cur: Current, with_versions: bool) -> dict[str, Any]:
    """An env for ``env list`` (and, ``with_versions``, ``env show``: every version with its
    spec and packages). ``status``: ready (current version complete), building (no current
    version yet, a build under way), removed (``env remove``d, versions not yet collected),
    broken (the stable path is missing or points to no complete version)."""
    env = read_record(env_fd, ENV_FILE) or {}
    retired = env.get("retired", {})
    rows = []
    building = False
    before: dict[str, Any] | None = None  # the previous ready version's record
    for version in versions(env_fd):
        rec = read_record(env_fd, f"{version}.json") or {}
        state = rec.get("state") if layout.exists(env_fd, version) else "missing"
        building = building or state == "building"
        row = {"version": version, "state": state, "current": version == cur.version,
               "retired_at": retired.get(version), **{k: rec.get(k) for k in _SUMMARY}}
        if with_versions:
            row.update(spec=rec.get("spec"), packages=rec.get("packages") or [],
                       variables=rec.get("variables") or {}, why=rec.get("why"),
                       changes=changes(before, rec) if state == "ready" else None)
            if state == "ready":
                before = rec
        rows.append(row)
    now = next((r for r in rows if r["current"]), None)
    if now is not None and now["state"] == "ready":
        status = "ready"
    elif cur.kind == "missing" and env.get("removed_at") is not None:
        status = "removed"
    elif cur.kind == "missing" and building and not any(r["state"] == "ready" for r in rows):
        status = "building"
    else:
        status = "broken"
    out: dict[str, Any] = {
        "status": status, "current": cur.version, "updating": building,
        "owner": env.get("owner"), "created_at": env.get("created_at"),
        "removed_at": env.get("removed_at"), "description": _description(env),
        "failure": failure_text(env),
        "versions": rows if with_versions else len([r for r in rows if r["state"] == "ready"]),
        "failed_verify": [r["version"] for r in rows if (r["verify"] or {}).get("ok") is False]}
    for key in ("backend", "requester", "built_at", "size_bytes", "entries", "job"):
        out[key] = now.get(key) if now else None
    return out


def gc_one(envs_fd: int, env_fd: int, name: str, cur: str | None, keep: int, grace: float,
           now: float, dry_run: bool, cap: int) -> list[str]:
    """GC of one name (its lock held): dead builds' leftovers, then collectable versions that
    no process uses (``usemarks``) and those beyond the hard ``cap`` (``over_cap``); the env's
    directory itself once nothing of it is left."""
    if not dry_run:
        clear_dead(env_fd, cur)
    gone = [v for v in collectable(env_fd, cur, keep, grace, now, record=not dry_run)
            if not usemarks.in_use(env_fd, v, grace, now)]
    gone += over_cap(env_fd, cur, cap, gone)
    if dry_run:
        return gone
    for version in gone:
        drop_version(env_fd, version)
    if cur is None and not versions(env_fd):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ENV_FILE, dir_fd=env_fd)
        with contextlib.suppress(OSError):  # not empty: something appeared meanwhile
            os.rmdir(name, dir_fd=envs_fd)
    else:
        set_failure(env_fd, name, "gc", None)
    return gone
