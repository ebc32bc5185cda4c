"""The ``env-*`` ops: environments as versions behind their stable path (``jobs.envs``).

Why a module of its own: these ops read and change what is in the shared root, not jobs; they
are mixed into :class:`~envctl_shared.api.handlers.Handlers` (which dispatches ``env-list`` to
``op_env_list``). Who may do what: anyone who can connect may list, show and export (the
records are world-readable in the root anyway), diff, and verify (it only reads, and records
its result); describe, rollback and remove are for the env's owner —
the requester of its first version, as the daemon recorded it — or admins (the jobs layer
checks it under the name's lock); GC is for admins. ``env-add`` and ``env-update`` are a create
with replace whose spec the daemon takes from the current version's record (the one copy it
trusts), so they are authorised, queued and followed exactly as such a create; a refusal says
what everyone else can do instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import EnvctlError, NotAuthorised, ValidationError
from ..jobs import kernels, spec_edit
from ..jobs.model import Requester
from ..jobs.spec import validate_name
from . import protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..jobs.manager import JobManager
    from ..jobs.model import Job
    from .auth import Authoriser

log = logging.getLogger(__name__)

Message = dict[str, Any]


class EnvHandlers:
    """Mixin: needs ``_manager()``, ``auth`` and ``config`` from the class it is mixed into."""

    config: Config
    auth: Authoriser

    def _manager(self) -> JobManager:
        raise NotImplementedError

    def _queue(self, op: str, who: Requester, gone: Callable[[], bool], follow: bool,
               submit: Callable[[], Job]) -> Iterator[Message]:
        raise NotImplementedError

    def _require_env_owner(self, who: Requester, name: str) -> None:
        raise NotImplementedError

    def op_env_list(self, who: Requester, gone: Callable[[], bool]) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.list())

    def op_env_show(self, who: Requester, gone: Callable[[], bool],
                    name: str) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.show(name))

    def op_env_diff(self, who: Requester, gone: Callable[[], bool], name: str, to: str | None,
                    **since: str | None) -> Iterator[Message]:
        """(``from`` is the argument's name on the wire, and a keyword in Python.)"""
        yield protocol.ok(self._manager().environments.diff(name, since["from"], to))

    def op_env_describe(self, who: Requester, gone: Callable[[], bool], name: str,
                        description: str) -> Iterator[Message]:
        self._may_change(who, "env-describe", name)
        yield protocol.ok(self._manager().environments.set_description(who, name, description))

    def op_env_export(self, who: Requester, gone: Callable[[], bool], name: str,
                      version: str | None) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.export(name, version))

    def op_env_verify(self, who: Requester, gone: Callable[[], bool], name: str,
                      version: str | None) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.verify(name, version))

    def op_env_rollback(self, who: Requester, gone: Callable[[], bool], name: str,
                        to: str | None) -> Iterator[Message]:
        self._may_change(who, "env-rollback", name)
        yield protocol.ok(self._manager().environments.rollback(who, name, to))

    def op_env_remove(self, who: Requester, gone: Callable[[], bool],
                      name: str) -> Iterator[Message]:
        self._may_change(who, "env-remove", name)
        done = self._manager().environments.remove(who, name)
        if self.config.kernels.dir is not None:  # the kernelspec goes away with the env
            try:
                done["kernel"] = kernels.publish(self.config, name, False)
            except (OSError, EnvctlError) as exc:
                log.warning("env-remove kernelspec name=%s error=%s", name, exc)
        yield protocol.ok(done)

    def op_env_add(self, who: Requester, gone: Callable[[], bool], name: str,
                   packages: list[str], pip: list[str], tests: list[str],
                   follow: bool) -> Iterator[Message]:
        if not packages and not pip:
            raise ValidationError("env-add needs at least one package (packages or pip)",
                                  hint=f"to solve the same spec again: envctl env update {name}")
        why = "env add: " + ", ".join([*packages, *(f"pip {p}" for p in pip)])
        yield from self._change("env-add", who, gone, name, tests, follow,
                                lambda text: spec_edit.add_packages(text, packages, pip), why)

    def op_env_update(self, who: Requester, gone: Callable[[], bool], name: str,
                      tests: list[str], follow: bool) -> Iterator[Message]:
        yield from self._change("env-update", who, gone, name, tests, follow, None,
                                "env update")

    def _change(self, op: str, who: Requester, gone: Callable[[], bool], name: str,
                tests: list[str], follow: bool,
                change: Callable[[str], str] | None, why: str) -> Iterator[Message]:
        """A replace of ``name`` from its current spec (``change``d): a create's checks;
        ``why`` goes into the new version's record."""
        jobs = self._manager()
        try:
            self.auth.require_create(who)
            self._require_env_owner(who, validate_name(name))
        except NotAuthorised as exc:
            log.info("api refused op=%s uid=%d user=%s hub_user=%s name=%s", op, who.uid,
                     who.username, who.hub_user, name)
            raise NotAuthorised(exc.message, hint=alternatives(name)) from None
        yield from self._queue(op, who, gone, follow,
                               lambda: jobs.submit_change(who, name, change, tests, why))

    def op_env_gc(self, who: Requester, gone: Callable[[], bool],
                  dry_run: bool) -> Iterator[Message]:
        if not who.is_admin or self.auth.unverified(who):
            raise NotAuthorised("only envctl admins may run the environment GC",
                                hint="the daemon runs it every requests.gc_interval seconds; "
                                     "'envctl env list' shows what is kept")
        yield protocol.ok(self._manager().environments.gc(dry_run))

    def _may_change(self, who: Requester, op: str, name: str) -> None:
        """Requesters and admins only (the owner check itself happens under the lock)."""
        if not self.auth.may_create(who):
            log.info("api refused op=%s uid=%d hub_user=%s name=%s", op, who.uid, who.hub_user,
                     name)
            raise NotAuthorised(f"user {who.username} (uid {who.uid}) may not change "
                                "environments on this daemon",
                                hint="only an environment's owner or an envctl admin may")


def alternatives(name: str) -> str:
    """What a user who may not change the shared environment ``name`` can do instead."""
    return (f"ask its owner or an envctl admin; meanwhile, test changes in a separate "
            f"environment first: envctl request create {name}-test -f FILE (envctl env export "
            f"{name} > FILE gives its spec), or install into a personal layer over it: "
            f"envctl env layer {name}")
