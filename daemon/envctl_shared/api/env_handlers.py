"""The ``env-*`` ops: environments as versions behind their stable path (``jobs.envs``).

Why a module of its own: these ops read and change what is in the shared root, not jobs; they
are mixed into :class:`~envctl_shared.api.handlers.Handlers` (which dispatches ``env-list`` to
``op_env_list``). Who may do what: anyone who can connect may list, show and export (the
records are world-readable in the root anyway), and verify (it only reads, and records its
result); rollback and remove are for the env's owner —
the requester of its first version, as the daemon recorded it — or admins (the jobs layer
checks it under the name's lock); GC is for admins.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import EnvctlError, NotAuthorised
from ..jobs import kernels
from ..jobs.model import Requester
from . import protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..jobs.manager import JobManager
    from .auth import Authoriser

log = logging.getLogger(__name__)

Message = dict[str, Any]


class EnvHandlers:
    """Mixin: needs ``_manager()``, ``auth`` and ``config`` from the class it is mixed into."""

    config: Config
    auth: Authoriser

    def _manager(self) -> JobManager:
        raise NotImplementedError

    def op_env_list(self, who: Requester, gone: Callable[[], bool]) -> Iterator[Message]:
        yield protocol.ok(self._manager().env_list())

    def op_env_show(self, who: Requester, gone: Callable[[], bool],
                    name: str) -> Iterator[Message]:
        yield protocol.ok(self._manager().env_show(name))

    def op_env_export(self, who: Requester, gone: Callable[[], bool], name: str,
                      version: str | None) -> Iterator[Message]:
        yield protocol.ok(self._manager().env_export(name, version))

    def op_env_verify(self, who: Requester, gone: Callable[[], bool], name: str,
                      version: str | None) -> Iterator[Message]:
        yield protocol.ok(self._manager().env_verify(name, version))

    def op_env_rollback(self, who: Requester, gone: Callable[[], bool], name: str,
                        to: str | None) -> Iterator[Message]:
        self._may_change(who, "env-rollback", name)
        yield protocol.ok(self._manager().env_rollback(who, name, to))

    def op_env_remove(self, who: Requester, gone: Callable[[], bool],
                      name: str) -> Iterator[Message]:
        self._may_change(who, "env-remove", name)
        done = self._manager().env_remove(who, name)
        if self.config.kernels.dir is not None:  # the kernelspec goes away with the env
            try:
                done["kernel"] = kernels.publish(self.config, name, False)
            except (OSError, EnvctlError) as exc:
                log.warning("env-remove kernelspec name=%s error=%s", name, exc)
        yield protocol.ok(done)

    def op_env_gc(self, who: Requester, gone: Callable[[], bool],
                  dry_run: bool) -> Iterator[Message]:
        if not who.is_admin or self.auth.unverified(who):
            raise NotAuthorised("only envctl admins may run the environment GC",
                                hint="the daemon runs it every requests.gc_interval seconds; "
                                     "'envctl env list' shows what is kept")
        yield protocol.ok(self._manager().env_gc(dry_run))

    def _may_change(self, who: Requester, op: str, name: str) -> None:
        """Requesters and admins only (the owner check itself happens under the lock)."""
        if not self.auth.may_create(who):
            log.info("api refused op=%s uid=%d hub_user=%s name=%s", op, who.uid, who.hub_user,
                     name)
            raise NotAuthorised(f"user {who.username} (uid {who.uid}) may not change "
                                "environments on this daemon",
                                hint="only an environment's owner or an envctl admin may")
