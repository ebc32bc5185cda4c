"""The ``env-*`` ops: environments as versions behind their stable path (``jobs.envs``).

Why a module of its own: these ops read and change what is in the shared root, not jobs; they
are mixed into :class:`~envctl_shared.api.handlers.Handlers` (which dispatches ``env-list`` to
``op_env_list``). Who may do what is each op's access in ``protocol.OPS``; the env-owner part
of it is checked by ``allow`` on the owner the daemon recorded, which the env service reads
under the name's lock (``EnvService.locked``), so no owner can change between the check and
the change. ``env-add`` and ``env-update`` are a create with replace whose spec the daemon takes
from the current version's record (the one copy it trusts), queued and followed exactly as such
a create; their refusal says what everyone else can do instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import EnvctlError, NotAuthorised, ValidationError
from ..jobs import kernels, spec_edit
from ..jobs.model import Requester
from . import protocol
from .auth import EnvTarget

if TYPE_CHECKING:
    from ..config import Config
    from ..jobs.manager import JobManager
    from ..jobs.model import Job

log = logging.getLogger(__name__)

Message = dict[str, Any]
# ``Authoriser.check`` bound to the request's op and caller: called with the target (a Job, an
# EnvTarget) where the decision needs one.
Allow = Callable[[Any], None]


class EnvHandlers:
    """Mixin: needs ``_manager()``, ``_queue()`` and ``config`` from the class it is mixed into."""

    config: Config

    def _manager(self) -> JobManager:
        raise NotImplementedError

    def _queue(self, op: str, who: Requester, gone: Callable[[], bool], follow: bool,
               submit: Callable[[], Job]) -> Iterator[Message]:
        raise NotImplementedError

    def op_env_list(self, who: Requester, gone: Callable[[], bool],
                    allow: Allow) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.list())

    def op_env_show(self, who: Requester, gone: Callable[[], bool], allow: Allow,
                    name: str) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.show(name))

    def op_env_diff(self, who: Requester, gone: Callable[[], bool], allow: Allow, name: str,
                    to: str | None, **since: str | None) -> Iterator[Message]:
        """(``from`` is the argument's name on the wire, and a keyword in Python.)"""
        yield protocol.ok(self._manager().environments.diff(name, since["from"], to))

    def op_env_describe(self, who: Requester, gone: Callable[[], bool], allow: Allow, name: str,
                        description: str) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.set_description(
            who, name, description, allow=lambda owner: allow(EnvTarget(name, owner))))

    def op_env_export(self, who: Requester, gone: Callable[[], bool], allow: Allow, name: str,
                      version: str | None) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.export(name, version))

    def op_env_verify(self, who: Requester, gone: Callable[[], bool], allow: Allow, name: str,
                      version: str | None) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.verify(name, version))

    def op_env_rollback(self, who: Requester, gone: Callable[[], bool], allow: Allow, name: str,
                        to: str | None) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.rollback(
            who, name, to, allow=lambda owner: allow(EnvTarget(name, owner))))

    def op_env_remove(self, who: Requester, gone: Callable[[], bool], allow: Allow,
                      name: str) -> Iterator[Message]:
        done = self._manager().environments.remove(
            who, name, allow=lambda owner: allow(EnvTarget(name, owner)))
        if self.config.kernels.dir is not None:  # the kernelspec goes away with the env
            try:
                done["kernel"] = kernels.publish(self.config, name, False)
            except (OSError, EnvctlError) as exc:
                log.warning("env-remove kernelspec name=%s error=%s", name, exc)
        yield protocol.ok(done)

    def op_env_add(self, who: Requester, gone: Callable[[], bool], allow: Allow, name: str,
                   packages: list[str], pip: list[str], tests: list[str],
                   follow: bool) -> Iterator[Message]:
        if not packages and not pip:
            raise ValidationError("env-add needs at least one package (packages or pip)",
                                  hint=f"to solve the same spec again: envctl env update {name}")
        why = "env add: " + ", ".join([*packages, *(f"pip {p}" for p in pip)])
        yield from self._change("env-add", who, gone, allow, name, tests, follow,
                                lambda text: spec_edit.add_packages(text, packages, pip), why)

    def op_env_update(self, who: Requester, gone: Callable[[], bool], allow: Allow, name: str,
                      tests: list[str], follow: bool) -> Iterator[Message]:
        yield from self._change("env-update", who, gone, allow, name, tests, follow, None,
                                "env update")

    def _change(self, op: str, who: Requester, gone: Callable[[], bool], allow: Allow,
                name: str, tests: list[str], follow: bool,
                change: Callable[[str], str] | None, why: str) -> Iterator[Message]:
        """A replace of ``name`` from its current spec (``change``d), its owner checked under
        the name's lock where the spec is read; ``why`` goes into the new version's record; a
        refusal names the ways out."""
        def allow_owner(owner: dict[str, Any] | None) -> None:
            try:
                allow(EnvTarget(name, owner))
            except NotAuthorised as exc:
                raise NotAuthorised(exc.message, hint=alternatives(name)) from None

        jobs = self._manager()
        yield from self._queue(op, who, gone, follow,
                               lambda: jobs.submit_change(who, name, change, tests,
                                                          allow_owner, why))

    def op_env_gc(self, who: Requester, gone: Callable[[], bool], allow: Allow,
                  dry_run: bool) -> Iterator[Message]:
        yield protocol.ok(self._manager().environments.gc(dry_run))


def alternatives(name: str) -> str:
    """What a user who may not change the shared environment ``name`` can do instead."""
    return (f"ask its owner or an envctl admin; meanwhile, test changes in a separate "
            f"environment first: envctl request create {name}-test -f FILE (envctl env export "
            f"{name} > FILE gives its spec), or install into a personal layer over it: "
            f"envctl env layer {name}")
