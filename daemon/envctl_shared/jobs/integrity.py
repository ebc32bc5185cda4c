"""Keeping frozen versions honest: verify on request, freeze what came before, cheap stamps.

Why three mechanisms: a frozen version gets no watches and no polling (that was ~1.1k inotify
watches per kept version), so what the daemon knows of it afterwards comes from here.
``verify`` recomputes a version's digest and names every path that differs from its manifest
(asked for: a full read). The periodic check (every ``requests.gc_interval``) only compares the
top-level stamp of each current version (owner, group, mode, mtime, ctime of its directory,
recorded at the freeze) and that its record is still the daemon's: a root who ``chmod``\\ s the
version or adds or removes an entry at its top shows up in ``status`` as ``tampered`` without a
hash. Versions built before freezing existed (the build user's, group-writable) are frozen
once when the daemon starts, so no version stays writable after an upgrade; a version that
cannot be frozen (a special file in it) is logged and left serving as it was: never broken.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import Conflict, EnvctlError, NotFound
from ..names import is_env_name
from . import envs, freeze, layout
from .base_python import AREA_DIR as BASE_DIR
from .lock import NameLock

log = logging.getLogger(__name__)


@dataclass
class Area:
    """The requests root's area, for one integrity task."""

    config: Config

    @property
    def target(self) -> freeze.Target:
        return freeze.Target.of(self.config.requests_root)

    @contextlib.contextmanager
    def open(self) -> Iterator[tuple[layout.RootArea, dict[str, int], freeze.Store]]:
        area = layout.RootArea(self.config.requests_root.path)
        with area.open() as fds:
            store = freeze.Store.in_area(area, fds["area"], self.target)
            try:
                yield area, fds, store
            finally:
                store.close()


def verify(config: Config, name: str, version: str | None) -> dict[str, Any]:
    """``env verify``: recompute the digest of ``version`` (default: the current one), list
    every difference, record ``verified_at`` and the result in its record.

    Without the name's lock: a frozen version does not change under a build of the name (a
    verify during an update would otherwise be refused, or hold the update back), and the
    record is rewritten atomically from a fresh read; a version GC removes meanwhile is
    NotFound."""
    with Area(config).open() as (area, fds, store), \
            envs.env_dir(fds, name, create=False) as env_fd:
        if env_fd is None:
            raise NotFound(f"no environment {name!r} built by envctl",
                           hint="see: envctl env list")
        version = version or envs.current(fds[""], name).version
        rec = envs.ready(env_fd, version) if version else None
        if rec is None or version is None:
            raise NotFound(f"no built version {version or '(current)'} of {name!r}",
                           hint=f"see: envctl env show {name}")
        if not rec.get("digest"):
            raise Conflict(f"{name} {version} has no digest yet (built before versions were "
                           "frozen)", hint="the daemon freezes it at its next start")
        shown = str(area.path("envs", name, version))
        try:
            digest, diffs = freeze.verify(env_fd, version, store.target, rec["digest"], shown,
                                          store)
        except FileNotFoundError:
            raise NotFound(f"{name} {version} was removed while it was verified",
                           hint=f"see: envctl env show {name}") from None
        now = time.time()
        result = {"ok": not diffs, "count": len(diffs),
                  "differences": [d.as_dict() for d in diffs[:freeze.MAX_DIFFERENCES]]}
        fresh = envs.ready(env_fd, version)
        if fresh is not None:
            envs.write_record(env_fd, f"{version}.json",
                              {**fresh, "verified_at": now, "verify": result})
    log.log(logging.INFO if diffs else logging.DEBUG,
            "env-verify name=%s version=%s ok=%s differences=%d", name, version, not diffs,
            len(diffs))
    return {"name": name, "version": version, "digest": rec["digest"], "digest_now": digest,
            "verified_at": now, **result}


def _versions(fds: dict[str, int]) -> Iterator[tuple[str, str, int]]:
    """(lock name, directory name, its fd) of every env and of the venv bases' area."""
    for name in sorted(os.listdir(fds["envs"])):
        if is_env_name(name):
            with envs.env_dir(fds, name, create=False) as env_fd:
                if env_fd is not None:
                    yield name, name, env_fd
    try:
        base_fd = layout.checked_dir(fds["area"], BASE_DIR, 0o755, BASE_DIR, create=False)
    except FileNotFoundError:
        return
    try:
        yield "", BASE_DIR, base_fd
    finally:
        os.close(base_fd)


def freeze_old(config: Config) -> int:
    """At start: freeze every ready version (and venv base) that has no digest, under its
    lock (a name being built is left for the next start); logged once per env. Returns how
    many were frozen."""
    done = 0
    with Area(config).open() as (area, fds, store):
        for lock_name, where, dir_fd in _versions(fds):
            names = [v.removesuffix(".json") for v in sorted(os.listdir(dir_fd))
                     if v.endswith(".json") and v != envs.ENV_FILE and not v.startswith(".")]
            old = [v for v in names if (rec := envs.ready(dir_fd, v)) is not None
                   and not rec.get("digest")]
            frozen = [v for v in old if _freeze_one(area, fds, lock_name, dir_fd, where, v,
                                                    store)]
            if frozen:
                log.info("env-freeze-old name=%s versions=%s", where, ",".join(frozen))
            done += len(frozen)
    return done


def _freeze_one(area: layout.RootArea, fds: dict[str, int], lock_name: str, dir_fd: int,
                where: str, version: str, store: freeze.Store) -> bool:
    """Freeze one old version under its lock; False when skipped or not freezable (logged:
    it stays serving as it was)."""
    lock = NameLock(fds["locks"], str(area.root), lock_name or f".base-{version}", "freeze")
    try:
        lock.acquire()
    except Conflict:
        return False
    try:
        rec = envs.ready(dir_fd, version)
        if rec is None or rec.get("digest"):
            return False
        shown = str(area.path(where if where == BASE_DIR else f"envs/{where}", version))
        try:
            frozen = freeze.freeze(dir_fd, version, store.target, shown, store, old=True)
        except (OSError, EnvctlError) as exc:
            log.warning("env-freeze-old-failed path=%s error=%s", shown, exc)
            return False
        envs.write_record(dir_fd, f"{version}.json", {**rec, **frozen.fields()})
        return True
    finally:
        lock.release()


def sweep_store(config: Config) -> dict[str, int]:
    """After the env GC: drop what the store keeps for versions that are gone (see
    ``freeze.Store.sweep``); the digests still referenced are read from every record."""
    with Area(config).open() as (_area, fds, store):
        digests = set()
        for _lock, _where, dir_fd in _versions(fds):
            for entry in os.listdir(dir_fd):
                if entry.endswith(".json") and not entry.startswith("."):
                    digest = (envs.read_record(dir_fd, entry) or {}).get("digest")
                    if isinstance(digest, str):
                        digests.add(digest)
        # a freeze writes its manifest before its record, its tests run in between: kept
        # for as long as a build may run
        swept = store.sweep(digests, time.time(), min_age=max(3600.0, config.requests.timeout))
    if swept["files"] or swept["manifests"]:
        log.info("env-store-sweep files=%d manifests=%d bytes=%d", swept["files"],
                 swept["manifests"], swept["bytes"])
    return swept


def check(config: Config) -> dict[str, list[dict[str, Any]]]:
    """The periodic check: ``tampered`` current versions (stamp or record no longer as the
    daemon left them) and versions whose last verify ``failed``; no hashing."""
    tampered: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    with Area(config).open() as (_area, fds, _store):
        for _lock, where, dir_fd in _versions(fds):
            cur = envs.current(fds[""], where).version if where != BASE_DIR else None
            for version in envs.versions(dir_fd) if where != BASE_DIR else []:
                rec = envs.read_record(dir_fd, f"{version}.json")
                ident = {"name": where, "version": version}
                if rec is not None and (rec.get("verify") or {}).get("ok") is False:
                    failed.append({**ident, "verified_at": rec.get("verified_at"),
                                   "differences": rec["verify"].get("count")})
                if version != cur:
                    continue
                what = _tampered(dir_fd, version, rec)
                if what:
                    tampered.append({**ident, "what": what})
    for item in tampered:
        log.warning("env-tampered name=%s version=%s what=%s", item["name"], item["version"],
                    item["what"])
    return {"tampered": tampered, "failed_verify": failed}


def _tampered(dir_fd: int, version: str, rec: dict[str, Any] | None) -> str | None:
    if rec is None:
        return "its record is missing or no longer the daemon's"
    want = rec.get("stamp")
    if not want:
        return None  # not frozen yet (the start's freeze will)
    try:
        now = freeze.stamp(dir_fd, version)
    except FileNotFoundError:
        return "its directory is gone"
    if now != want:
        return "its directory changed (owner, mode or top-level entries): run env verify"
    return None
