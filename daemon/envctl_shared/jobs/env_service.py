"""Environments as versions behind their stable path: what the ``env-*`` ops read and change.

Why apart from :class:`~envctl_shared.jobs.manager.JobManager`: the manager schedules and
recovers *jobs*; this service reads and changes what is in the shared root (list, show, diff,
export, describe, rollback, remove, verify, GC and the periodic integrity check), under the same
per-name lock as builds (``locked``), so neither needs the other's state. The manager uses
``current`` and ``locked`` to check a request against what is built.

Two things stop no more than what they are about. An env whose GC fails (whatever its tree
holds) is reported on that env — ``failure`` in ``env list``/``env show`` (its ``env.json``,
for every host) and in ``status`` — and GC goes on with the next one. And the area itself
(``<root>/.envctl``): every use re-checks it (``layout.RootArea.open_area``), and so does a
tick every ``AREA_CHECK_S``; while it cannot be trusted, ``area`` says why and how to fix it
(``status`` is then not ready) and every request that needs it is refused with that message;
once fixed, the next check picks up where start-up left off.
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
from ..errors import AreaUntrusted, Conflict, EnvctlError, NotFound
from ..names import is_env_name
from . import envs, integrity, kernels, layout
from .lock import NameLock, secure_all
from .model import Requester
from .spec import validate_name

log = logging.getLogger(__name__)

AREA_CHECK_S = 10.0  # how often the periodic loop looks at the area (GC: requests.gc_interval)

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
        # Why the area cannot be trusted ({path, problem, fix}), or None: ``status``'s ``area``.
        self.area: dict[str, str] | None = None
        self._started = False  # the start-up work on the area (``_first_use``) is done
        # env -> its recorded failure, as of the last GC, start, or list/show of it
        self.failures: dict[str, str] = {}

    @contextlib.contextmanager
    def _root(self) -> Iterator[layout.AreaFds]:
        """The root's fds (``layout.RootArea.open``); every use is a check of the area."""
        try:
            with layout.RootArea(self._config.requests_root.path).open() as fds:
                self._area_ok()
                yield fds
        except AreaUntrusted as exc:
            self._area_bad(exc)
            raise

    def _area_bad(self, exc: AreaUntrusted) -> None:
        found = {"path": str(exc.context.get("path")), "problem": str(exc.context.get("problem")),
                 "fix": exc.hint or ""}
        if found != self.area:
            log.warning("env-area-untrusted path=%s problem=%r", found["path"], found["problem"])
        self.area = found

    def _area_ok(self) -> None:
        if self.area is not None:
            log.info("env-area-trusted path=%s", self.area["path"])
            self.area = None

    def check_area(self) -> bool:
        """Look at the area now (creating it if missing): True when it can be used."""
        try:
            with self._root():
                return True
        except AreaUntrusted:
            return False

    def current(self, name: str) -> envs.Current:
        """What ``<root>/<name>`` is; AreaUntrusted while the area cannot be trusted (so no
        request is queued that could only fail)."""
        with self._root() as fds:
            return envs.current(fds.root, name)

    @contextlib.contextmanager
    def locked(self, name: str, why: str) -> Iterator[tuple[layout.AreaFds, int]]:
        """The root's fds and the env's directory, with the name's lock held (no build of it
        runs, here or on another host); NotFound when envctl never built that name."""
        name = validate_name(name)
        with self._root() as fds:
            lock = NameLock(fds.locks, str(self._config.requests_root.path), name, why)
            lock.acquire()
            try:
                with envs.env_dir(fds, name, create=False) as env_fd:
                    if env_fd is None:
                        raise _never_built(name)
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
        """Every env in the request root, hand-made ones included (``unmanaged``); one env
        that cannot be read is listed ``broken`` with its ``failure``, never fails the list."""
        with self._root() as fds:
            return [d for name in envs.scan_names(fds.root, fds.envs)
                    if (d := self._describe_safely(fds, name)) is not None]

    def _describe_safely(self, fds: layout.AreaFds, name: str) -> dict[str, Any] | None:
        try:
            return self._describe(fds, name, versions=False)
        except (OSError, EnvctlError) as exc:
            log.warning("env-list-failed name=%s error=%s", name, envs.failure_message(exc))
            return {"name": name, "prefix": str(self._config.requests_root.path / name),
                    "status": "broken", "current": None, "kernel": None, "description": None,
                    "failure": f"cannot be read: {envs.failure_message(exc)}"}

    def show(self, name: str) -> dict[str, Any]:
        with self._root() as fds:
            found = self._describe(fds, validate_name(name), versions=True)
        if found is None:
            raise NotFound(f"no environment {name!r}", hint="see: envctl env list")
        return found

    def _describe(self, fds: layout.AreaFds, name: str,
                  versions: bool) -> dict[str, Any] | None:
        cur = envs.current(fds.root, name)
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
            found = {**out, **envs.describe(env_fd, name, cur, versions)}
        if found["failure"]:  # what ``status`` says follows what was just read
            self.failures[name] = found["failure"]
        else:
            self.failures.pop(name, None)
        return found

    def _kernel(self, name: str) -> str | None:
        kdir = self._config.kernels.dir
        if kdir is None:
            return None
        kname = kernels.kernel_name(name)
        return kname if kname and (kdir / kname / "kernel.json").is_file() else None

    def diff(self, name: str, old: str | None = None, new: str | None = None) -> dict[str, Any]:
        """What changed from version ``old`` to ``new`` of ``name`` (``envs.changes``), who
        built ``new``, when and why. Defaults: ``new`` the current version, ``old`` the built
        version before ``new``; a first version has everything ``added``."""
        with self._root() as fds, envs.env_dir(fds, validate_name(name), False) as env_fd:
            if env_fd is None:
                raise NotFound(f"no environment {name!r} built by envctl",
                               hint="see: envctl env list")
            done = [v for v in envs.versions(env_fd) if envs.ready(env_fd, v) is not None]
            new = new or envs.current(fds.root, name).version or (done[-1] if done else None)
            for version in (new, old):
                if version is not None and version not in done:
                    envs.version_number(version)  # NotFound for a malformed name
                    raise NotFound(f"{name!r} has no built version {version}",
                                   hint=f"see: envctl env show {name}")
            if new is None:
                raise NotFound(f"{name!r} has no built version", hint="see: envctl env list")
            if old is None:
                older = [v for v in done if envs.version_number(v) < envs.version_number(new)]
                old = older[-1] if older else None
            after = envs.ready(env_fd, new) or {}
            before = envs.ready(env_fd, old) if old is not None else None
        return {"name": name, **envs.changes(before, after), "by": after.get("requester"),
                "at": after.get("built_at")}

    def set_description(self, who: Requester, name: str, description: str,
                        allow: Allow) -> dict[str, Any]:
        """The env's description (``envs.validate_description``; "" clears it); ``allow`` (the
        API's access check) is called with the recorded owner under the name's lock; its
        kernel's display name follows."""
        text = envs.validate_description(description)
        with self.locked(name, "describe") as (fds, env_fd):
            allow(self.owner_of(env_fd))
            env = envs.read_record(env_fd, envs.ENV_FILE)
            if env is None or envs.current(fds.root, name).kind != "managed":
                raise Conflict(f"{name!r} is not a current environment envctl manages",
                               hint="see: envctl env list")
            envs.write_record(env_fd, envs.ENV_FILE, {**env, "description": text or None})
            kernel = kernels.refresh(self._config, name)
        log.info("env-describe name=%s chars=%d by=%s", name, len(text), who.who)
        reply: dict[str, Any] = {"name": name, "description": text or None}
        return reply if kernel is None else {**reply, "kernel": kernel}

    def export(self, name: str, version: str | None = None) -> dict[str, Any]:
        """An environment.yml with exact pins of ``version`` (default: the current one)."""
        with self._root() as fds, envs.env_dir(fds, validate_name(name), False) as env_fd:
            cur = envs.current(fds.root, name)
            version = version or cur.version
            rec = envs.ready(env_fd, version) if env_fd is not None and version else None
        if env_fd is None:
            raise _never_built(name)
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
            cur = envs.current(fds.root, name)
            if cur.kind == "unmanaged":
                raise Conflict(f"{name!r} is not an environment envctl manages")
            done = [v for v in envs.versions(env_fd) if envs.ready(env_fd, v) is not None]
            if to is None:
                older = [v for v in done if cur.version is None or
                         envs.version_number(v) < envs.version_number(cur.version)]
                if not older and cur.version is None:  # its builds all failed
                    raise NotFound(f"{name!r} has no built version to roll back to",
                                   hint=f"see: envctl env show {name}")
                if not older:
                    raise Conflict(f"{name!r} has no version before {cur.version} to roll back "
                                   "to", hint=f"see: envctl env show {name}")
                to = older[-1]
            elif to not in done:
                envs.version_number(to)  # NotFound for a malformed name
                raise NotFound(f"{name!r} has no built version {to}",
                               hint=f"see: envctl env show {name}")
            previous = envs.switch(fds.root, env_fd, name, to)
            kernel = kernels.refresh(self._config, name)
        log.info("env-rollback name=%s from=%s to=%s by=%s", name, previous, to, who.who)
        reply: dict[str, Any] = {"name": name, "current": to, "previous": previous}
        return reply if kernel is None else {**reply, "kernel": kernel}

    def remove(self, who: Requester, name: str, allow: Allow) -> dict[str, Any]:
        """The name disappears at once; its versions go at GC (after gc_grace). ``allow`` as
        for ``rollback``."""
        with self.locked(name, "remove") as (fds, env_fd):
            allow(self.owner_of(env_fd))
            was = envs.unlink_name(fds.root, env_fd, name)
        log.info("env-remove name=%s version=%s by=%s", name, was, who.who)
        return {"name": name, "removed": was}

    def gc(self, dry_run: bool = False) -> dict[str, Any]:
        """Remove the versions nobody may need any more (see ``envs.collectable``) and what
        dead builds left; names being built are skipped (their lock is taken). An env whose GC
        fails is recorded as failed (``envs.set_failure``) and the next one is collected all
        the same."""
        cfg = self._config.requests
        now = time.time()
        removed: list[dict[str, str]] = []
        skipped: list[str] = []
        failed: list[dict[str, str]] = []
        failures: dict[str, str] = {}
        with self._root() as fds:
            for name in sorted(os.listdir(fds.envs)):
                if not is_env_name(name):
                    continue
                lock = NameLock(fds.locks, str(self._config.requests_root.path), name, "gc")
                try:
                    lock.acquire()
                except Conflict:
                    skipped.append(name)
                    if name in self.failures:  # known until its GC can run again
                        failures[name] = self.failures[name]
                    continue
                error = None
                try:
                    removed.extend({"name": name, "version": v}
                                   for v in self._gc_env(fds, name, now, dry_run))
                except Exception as exc:  # noqa: BLE001 - whatever it is, the next env is GCed
                    error = envs.failure_message(exc)
                    log.warning("env-gc-failed name=%s error=%s", name, error,
                                exc_info=not isinstance(exc, (OSError, EnvctlError)))
                    failed.append({"name": name, "error": error})
                finally:
                    lock.release()
                text = self._recorded_failure(fds, name) or (error and f"GC failed: {error}")
                if text:
                    failures[name] = text
        if not dry_run:
            self.failures = failures
        if removed or failed:
            log.info("env-gc removed=%d dry_run=%s skipped=%d failed=%d", len(removed),
                     dry_run, len(skipped), len(failed))
        store = None if dry_run else integrity.sweep_store(self._config)
        return {"removed": removed, "skipped": skipped, "failed": failed, "dry_run": dry_run,
                "keep_versions": cfg.keep_versions, "gc_grace": cfg.gc_grace, "store": store}

    def _gc_env(self, fds: layout.AreaFds, name: str, now: float,
                dry_run: bool) -> builtins.list[str]:
        """GC of one env (its lock held); what stops it is recorded on the env, then raised."""
        cfg = self._config.requests
        with envs.env_dir(fds, name, create=False) as env_fd:
            if env_fd is None:
                return []
            try:
                cur = envs.current(fds.root, name).version
                return envs.gc_one(fds.envs, env_fd, name, cur, cfg.keep_versions,
                                   cfg.gc_grace, now, dry_run, cfg.max_versions)
            except Exception as exc:
                if not dry_run:
                    with contextlib.suppress(Exception):  # its env.json may be what fails
                        envs.set_failure(env_fd, name, "gc", envs.failure_message(exc))
                raise

    @staticmethod
    def _recorded_failure(fds: layout.AreaFds, name: str) -> str | None:
        """The failure the env's ``env.json`` records (None: none, or it cannot be read)."""
        try:
            with envs.env_dir(fds, name, create=False) as env_fd:
                rec = envs.read_record(env_fd, envs.ENV_FILE) if env_fd is not None else None
        except (OSError, EnvctlError):
            return None
        return envs.failure_text(rec or {})

    def failure_line(self) -> str | None:
        """``status``'s ``failure`` when the daemon itself is fine: the envs that failed."""
        if not self.failures:
            return None
        first = sorted(self.failures)[0]
        more = len(self.failures) - 1
        return (f"environment {first!r}: {self.failures[first]}"
                + (f" (and {more} more: envctl env list)" if more else ""))

    def verify(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Recompute a version's digest and list every difference (see ``integrity.verify``)."""
        return integrity.verify(self._config, validate_name(name), version)

    def check_integrity(self) -> None:
        self.integrity = {**integrity.check(self._config), "checked_at": time.time()}

    def start(self) -> None:
        """Before any build: create ``<root>/.envctl`` (an untrusted one: ``area`` says so,
        the daemon runs on), do the start-up work on it (``_first_use``), and start the
        periodic loop (area check, GC)."""
        self._first_use()
        threading.Thread(target=self._gc_loop, name="envctl-gc", daemon=True).start()

    def _first_use(self) -> None:
        """Once the area can be used: freeze the versions built before freezing existed
        (once: then they have a digest), take the first integrity check and read the
        failures the envs record (for ``status`` until the first GC). A tampered
        subdirectory fails each job, not the daemon."""
        if not self.check_area():
            return
        self._started = True
        try:
            with self._root() as fds:
                envs.mark_current(fds)
                secure_all(fds.locks, str(self._config.requests_root.path))
                self.failures = {name: text for name in sorted(os.listdir(fds.envs))
                                 if is_env_name(name)
                                 and (text := self._recorded_failure(fds, name))}
            frozen = integrity.freeze_old(self._config)
            if frozen:
                log.info("env-freeze-old frozen=%d", frozen)
            self.check_integrity()
        except (OSError, EnvctlError) as exc:
            log.warning("jobs-area-unusable root=%s error=%s", self._config.requests_root.path,
                        exc)

    def stop(self) -> None:
        self._gc_stop.set()

    def reload(self, config: Config) -> None:
        """New keep/grace/GC settings from the next call (the GC loop's wait included)."""
        self._config = config

    def _gc_loop(self) -> None:
        """The area check (every ``AREA_CHECK_S``: start-up work left undone waits for it),
        the periodic GC and integrity check (``requests.gc_interval``); a failure is logged,
        never fatal."""
        last = time.monotonic()
        while True:
            left = last + self._config.requests.gc_interval - time.monotonic()  # after a reload too
            if self._gc_stop.wait(min(AREA_CHECK_S, max(0.0, left))):
                return
            if not self._started:
                self._first_use()
            if not self.check_area() or \
                    time.monotonic() < last + self._config.requests.gc_interval:
                continue
            last = time.monotonic()
            try:
                self.gc()
                self.check_integrity()
            except Exception:  # noqa: BLE001 - e.g. a tampered subdirectory: try again later
                log.exception("env-gc-failed")


def _never_built(name: str) -> NotFound:
    """A name envctl has no directory for: never requested (or collected since)."""
    return NotFound(f"no environment {name!r} built by envctl", hint="see: envctl env list")
