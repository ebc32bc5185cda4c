"""Environments as versions behind their stable path: what the ``env-*`` ops read and change.

Why apart from :class:`~envctl_shared.jobs.manager.JobManager`: the manager schedules and
recovers *jobs*; this service reads and changes what is in the shared root (list, show, export,
rollback, remove, verify, GC and the periodic integrity check), under the same per-name lock as
builds (``locked``), so neither needs the other's state. The manager uses ``current`` and
``locked`` to check a request against what is built.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..config import Config
from ..errors import Conflict, EnvctlError, NotFound
from . import envs, integrity, kernels, layout
from .lock import NameLock
from .model import Requester
from .spec import validate_name

log = logging.getLogger(__name__)

# Who may change an env is the API's decision (``api.auth``): it hands the service a check that
# raises NotAuthorised, called with the owner ``env.json`` records, under the name's lock.
Allow = Callable[[dict[str, Any] | None], None]


class EnvService:
    """The request root's environments, for one daemon; every method is safe from any thread."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._gc_stop = threading.Event()
        # The last periodic integrity check (see ``integrity.check``), for ``status``.
        self.integrity: dict[str, Any] = {"tampered": [], "failed_verify": [], "checked_at": None}

    @contextlib.contextmanager
    def _root(self) -> Iterator[dict[str, int]]:
        with layout.RootArea(self._config.requests_root.path).open() as fds:
            yield fds

    def current(self, name: str) -> envs.Current:
        fd = os.open(self._config.requests_root.path, layout.DIR_FLAGS)
        try:
            return envs.current(fd, name)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked(self, name: str, why: str) -> Iterator[tuple[dict[str, int], int]]:
        """The root's fds and the env's directory, with the name's lock held (no build of it
        runs, here or on another host); NotFound when envctl never built that name."""
        name = validate_name(name)
        area = layout.RootArea(self._config.requests_root.path)
        with area.open() as fds:
            lock = NameLock(fds["locks"], str(area.root), name, why)
            lock.acquire()
            try:
                with envs.env_dir(fds, name, create=False) as env_fd:
                    if env_fd is None:
                        raise NotFound(f"no environment {name!r} built by envctl",
                                       hint="see: envctl env list")
                    yield fds, env_fd
            finally:
                lock.release()

    def owner(self, name: str) -> dict[str, Any] | None:
        """The owner recorded (by the daemon) for a managed env; None when there is none."""
        with self._root() as fds, envs.env_dir(fds, validate_name(name), False) as env_fd:
            return self.owner_of(env_fd) if env_fd is not None else None

    def owner_of(self, env_fd: int) -> dict[str, Any] | None:
        """The owner recorded in the env's directory ``env_fd`` (None: no trusted record)."""
        owner = (envs.read_record(env_fd, envs.ENV_FILE) or {}).get("owner")
        return owner if isinstance(owner, dict) else None

    def list(self) -> builtins.list[dict[str, Any]]:  # (``list`` is a method here)
        """Every env in the request root, hand-made ones included (``unmanaged``)."""
        with self._root() as fds:
            return [d for name in envs.scan_names(fds[""], fds["envs"])
                    if (d := self._describe(fds, name, versions=False)) is not None]

    def show(self, name: str) -> dict[str, Any]:
        with self._root() as fds:
            found = self._describe(fds, validate_name(name), versions=True)
        if found is None:
            raise NotFound(f"no environment {name!r}", hint="see: envctl env list")
        return found

    def _describe(self, fds: dict[str, int], name: str,
                  versions: bool) -> dict[str, Any] | None:
        cur = envs.current(fds[""], name)
        root = self._config.requests_root.path
        out: dict[str, Any] = {"name": name, "prefix": str(root / name), "current": None,
                               "kernel": self._kernel(name)}
        if cur.kind == "unmanaged":
            return {**out, "status": "unmanaged"}
        with envs.env_dir(fds, name, create=False) as env_fd:
            if env_fd is None and cur.kind == "managed":  # our link, its versions gone
                log.warning("env-broken name=%s current=%s reason=no-versions-in-area", name,
                            cur.version)
                return {**out, "status": "broken", "current": cur.version}
            if env_fd is None or cur.kind == "missing" and not envs.versions(env_fd):
                return None  # never built, or nothing left of a failed first build
            return {**out, **envs.describe(env_fd, name, cur, versions)}

    def _kernel(self, name: str) -> str | None:
        kdir = self._config.kernels.dir
        if kdir is None:
            return None
        kname = kernels.kernel_name(name)
        return kname if kname and (kdir / kname / "kernel.json").is_file() else None

    def export(self, name: str, version: str | None = None) -> dict[str, Any]:
        """An environment.yml with exact pins of ``version`` (default: the current one)."""
        with self._root() as fds, envs.env_dir(fds, validate_name(name), False) as env_fd:
            cur = envs.current(fds[""], name)
            version = version or cur.version
            rec = envs.ready(env_fd, version) if env_fd is not None and version else None
        if rec is None:
            raise NotFound(f"no built version {version or '(current)'} of {name!r}",
                           hint="see: envctl env show " + name)
        return {"name": name, "version": version, "text": envs.export(rec)}

    def rollback(self, who: Requester, name: str, to: str | None,
                 allow: Allow) -> dict[str, Any]:
        """Make an earlier (or ``to``) version current again: one atomic rename. ``allow``
        (the API's access check) is called with the recorded owner under the name's lock."""
        with self.locked(name, "rollback") as (fds, env_fd):
            allow(self.owner_of(env_fd))
            cur = envs.current(fds[""], name)
            if cur.kind == "unmanaged":
                raise Conflict(f"{name!r} is not an environment envctl manages")
            done = [v for v in envs.versions(env_fd) if envs.ready(env_fd, v) is not None]
            if to is None:
                older = [v for v in done if cur.version is None or
                         envs.version_number(v) < envs.version_number(cur.version)]
                if not older:
                    raise Conflict(f"{name!r} has no version before {cur.version} to roll back "
                                   "to", hint=f"see: envctl env show {name}")
                to = older[-1]
            elif to not in done:
                envs.version_number(to)  # NotFound for a malformed name
                raise NotFound(f"{name!r} has no built version {to}",
                               hint=f"see: envctl env show {name}")
            previous = envs.switch(fds[""], env_fd, name, to)
            kernel = kernels.refresh(self._config, name)
        log.info("env-rollback name=%s from=%s to=%s by=%s", name, previous, to, who.who)
        reply: dict[str, Any] = {"name": name, "current": to, "previous": previous}
        return reply if kernel is None else {**reply, "kernel": kernel}

    def remove(self, who: Requester, name: str, allow: Allow) -> dict[str, Any]:
        """The name disappears at once; its versions go at GC (after gc_grace). ``allow`` as
        for ``rollback``."""
        with self.locked(name, "remove") as (fds, env_fd):
            allow(self.owner_of(env_fd))
            was = envs.unlink_name(fds[""], env_fd, name)
        log.info("env-remove name=%s version=%s by=%s", name, was, who.who)
        return {"name": name, "removed": was}

    def gc(self, dry_run: bool = False) -> dict[str, Any]:
        """Remove the versions nobody may need any more (see ``envs.collectable``) and what
        dead builds left; names being built are skipped (their lock is taken)."""
        cfg = self._config.requests
        now = time.time()
        removed: list[dict[str, str]] = []
        skipped: list[str] = []
        area = layout.RootArea(self._config.requests_root.path)
        with area.open() as fds:
            for name in sorted(os.listdir(fds["envs"])):
                if not envs.is_env_name(name):
                    continue
                lock = NameLock(fds["locks"], str(area.root), name, "gc")
                try:
                    lock.acquire()
                except Conflict:
                    skipped.append(name)
                    continue
                try:
                    with envs.env_dir(fds, name, create=False) as env_fd:
                        if env_fd is not None:
                            cur = envs.current(fds[""], name).version
                            gone = envs.gc_one(fds["envs"], env_fd, name, cur, cfg.keep_versions,
                                               cfg.gc_grace, now, dry_run)
                            removed.extend({"name": name, "version": v} for v in gone)
                finally:
                    lock.release()
        if removed:
            log.info("env-gc removed=%d dry_run=%s skipped=%d", len(removed), dry_run,
                     len(skipped))
        store = None if dry_run else integrity.sweep_store(self._config)
        return {"removed": removed, "skipped": skipped, "dry_run": dry_run,
                "keep_versions": cfg.keep_versions, "gc_grace": cfg.gc_grace, "store": store}

    def verify(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Recompute a version's digest and list every difference (see ``integrity.verify``)."""
        return integrity.verify(self._config, validate_name(name), version)

    def check_integrity(self) -> None:
        self.integrity = {**integrity.check(self._config), "checked_at": time.time()}

    def start(self) -> None:
        """Before any build: create ``<root>/.envctl``, freeze the versions built before
        freezing existed (once: then they have a digest), take the first integrity check, and
        start the periodic GC. A tampered area fails each job, not the daemon."""
        try:
            with self._root():
                pass
            frozen = integrity.freeze_old(self._config)
            if frozen:
                log.info("env-freeze-old frozen=%d", frozen)
            self.check_integrity()
        except (OSError, EnvctlError) as exc:
            log.warning("jobs-area-unusable root=%s error=%s", self._config.requests_root.path,
                        exc)
        threading.Thread(target=self._gc_loop, name="envctl-gc", daemon=True).start()

    def stop(self) -> None:
        self._gc_stop.set()

    def reload(self, config: Config) -> None:
        """New keep/grace/GC settings from the next call (the GC loop's wait included)."""
        self._config = config

    def _gc_loop(self) -> None:
        """The periodic GC and integrity check (``requests.gc_interval``); a failure is logged,
        never fatal."""
        while not self._gc_stop.wait(self._config.requests.gc_interval):
            try:
                self.gc()
                self.check_integrity()
            except Exception:  # noqa: BLE001 - e.g. a tampered .envctl: say so, try again later
                log.exception("env-gc-failed")
