"""What each op does: identify, authorise, call the jobs layer or the status callback, shape
the reply.

Why separate from ``server``: the server owns bytes, threads and sockets; this module owns
meaning. :meth:`Handlers.handle` resolves the peer's identity as far as the op's access needs it
(the kernel's; on a shared uid the hub user the hub verified — never asked for ops anyone may
call, asked afresh for changes), runs ``Authoriser.check`` and hands the handler ``allow``: the
same check bound to the op, for the target only the handler knows (a job; an environment's owner,
under its lock). Handlers yield protocol messages — one for plain ops, a stream of events ending
in an ``end`` message for ``create``/``logs`` with ``follow`` — and raise
:class:`~envctl_shared.errors.EnvctlError`; the server turns that into the error envelope. Every
refusal is logged once, bounded under a flood (``refusals``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..config import Config
from ..errors import ConfigError, DaemonUnavailable, LimitReached, NotAuthorised
from ..jobs import kernels
from ..jobs.model import Job, Requester
from ..jobs.spec import validate_name
from ..status import DaemonStatus
from . import protocol
from .auth import Authoriser, EnvTarget
from .env_handlers import Allow, EnvHandlers
from .hub import HubUser, HubVerifier
from .peercred import PeerCred
from .refusals import Refusals

if TYPE_CHECKING:  # the manager is only ever handed to us by the daemon
    from ..jobs.manager import JobManager

log = logging.getLogger(__name__)

Message = dict[str, Any]
StatusFn = Callable[[], DaemonStatus]

# How often a follow stream re-reads the log when nothing else woke it (the jobs layer's wait()
# wakes on state/phase changes only, log growth is polled).
FOLLOW_POLL = 0.25
LOG_CHUNK = 65536
# Specs checked at once, across all connections, and how long a create waits for a turn. Parsing
# a spec is CPU-bound Python holding the GIL (~0.1 s for 60 KB even with libyaml's parser): with
# one turn per connection thread, a requester holding dozens of connections would starve every
# other thread (root's status/ping, the healer's). A turn not had in PARSE_WAIT is answered
# "busy, try again" rather than queued without bound.
PARSE_SLOTS = 2
PARSE_WAIT = 5.0
_parse_turns = threading.BoundedSemaphore(PARSE_SLOTS)


class Handlers(EnvHandlers):
    """The op implementations, bound to one daemon's jobs, status source and authoriser."""

    def __init__(self, config: Config, jobs: JobManager | None, status: StatusFn,
                 stopping: threading.Event) -> None:
        self.jobs = jobs
        self.status_fn = status
        self.stopping = stopping
        self.config = config
        self.hub: HubVerifier | None = None
        self.refusals = Refusals()
        self.reload(config)

    def reload(self, config: Config) -> None:
        """New allow/admin lists take effect for the next request; open streams keep going.
        The hub verifier (and its cache) is kept unless the jupyterhub section changed."""
        hub = config.jupyterhub
        if self.hub is None or self.hub.cfg != hub:
            self.hub = HubVerifier(hub) if hub.api_url is not None else None
        self.config = config
        self.auth = Authoriser(config.requests, hub)

    def handle(self, req: protocol.Request, cred: PeerCred,
               gone: Callable[[], bool]) -> Iterator[Message]:
        """Identify, authorise and dispatch one request; ``gone()`` tells a stream its client
        has hung up. Runs in the connection's thread, so asking the hub never holds up the
        accept loop."""
        hub_user: HubUser | None = None
        try:
            try:
                hub_user = self._hub_user(req, cred)
            except DaemonUnavailable as exc:
                self.refusals.note(req.op.name, cred, exc, None)
                raise
            claimed = req.args.get("claimed_user") if req.op.name == "create" else None
            who = self.auth.requester(cred, claimed, hub_user)
            self.auth.check(req.op, who, args=req.args)
            allow: Allow = functools.partial(self.auth.check, req.op, who, args=req.args)
            method: Callable[..., Iterator[Message]] = getattr(
                self, "op_" + req.op.name.replace("-", "_"))
            yield from method(who, gone=gone, allow=allow, **req.args)
        except (NotAuthorised, LimitReached) as exc:
            self.refusals.note(req.op.name, cred, exc,
                               None if hub_user is None else hub_user.name)
            raise

    def _hub_user(self, req: protocol.Request, cred: PeerCred) -> HubUser | None:
        """The hub user of a peer on a shared uid, as the hub names the owner of its token —
        when the op's access uses an identity at all (so what anyone may call answers while
        the hub is down), asked afresh for a change. Peers on other uids are who the kernel
        says (their token, if any, is not used); a missing token is the check's to refuse."""
        access, _ = req.op.access_for(req.args)
        if self.hub is None or cred.uid not in self.auth.shared_uids or \
                req.hub_token is None or not access.identified:
            return None
        return self.hub.user(req.hub_token, cred.uid, fresh=access.changes)

    # -- ops anyone who can connect may call ---------------------------------------------

    def op_ping(self, who: Requester, gone: Callable[[], bool],
                allow: Allow) -> Iterator[Message]:
        yield protocol.ok({"pong": True, "version": __version__, "protocol": protocol.VERSION})

    def op_version(self, who: Requester, gone: Callable[[], bool],
                   allow: Allow) -> Iterator[Message]:
        yield protocol.ok({"version": __version__, "protocol": protocol.VERSION})

    def op_whoami(self, who: Requester, gone: Callable[[], bool],
                  allow: Allow) -> Iterator[Message]:
        yield protocol.ok(self.auth.describe(who))

    def op_status(self, who: Requester, gone: Callable[[], bool],
                  allow: Allow) -> Iterator[Message]:
        yield protocol.ok(self.status_fn().to_dict())  # the daemon's (``status.DaemonStatus``)

    # -- job ops ---------------------------------------------------------------------------

    def _manager(self) -> JobManager:
        if self.jobs is None:
            raise DaemonUnavailable("environment requests are disabled on this daemon",
                                    hint="an administrator can set requests.enabled: true")
        return self.jobs

    def op_create(self, who: Requester, gone: Callable[[], bool], allow: Allow, name: str,
                  spec: str, backend: str | None, replace: bool, claimed_user: str | None,
                  follow: bool, tests: list[str],
                  description: str | None) -> Iterator[Message]:
        jobs = self._manager()
        if replace:
            self._allow_env(allow, validate_name(name))
        yield from self._queue("create", who, gone, follow, lambda: jobs.submit(
            who, name, spec, backend=backend, replace=replace, tests=tests,
            description=description))

    def _queue(self, op: str, who: Requester, gone: Callable[[], bool], follow: bool,
               submit: Callable[[], Job]) -> Iterator[Message]:
        """Queue a build (``submit`` parses its spec: in one of the PARSE_SLOTS turns) and
        reply with the job, or with ``follow`` stream it to its end."""
        if not _parse_turns.acquire(timeout=PARSE_WAIT):
            log.debug("api busy op=%s uid=%d user=%s parse_slots=%d", op, who.uid,
                      who.username, PARSE_SLOTS)
            raise DaemonUnavailable("the daemon is busy checking other requests' specs",
                                    hint="try again in a few seconds")
        try:
            job = submit()
        finally:
            _parse_turns.release()
        log.debug("api %s job=%s name=%s backend=%s uid=%d user=%s hub_user=%s claimed=%s "
                  "replace=%s", op, job.id, job.name, job.backend, who.uid, who.username,
                  who.hub_user, who.claimed_user, job.replace)
        if not follow:
            yield protocol.ok(job.to_dict())
            return
        yield protocol.event("created", job.to_dict())
        yield from self._follow(job.id, 0, gone, job_events=True,
                                last=(job.state.value, job.phase))

    def _allow_env(self, allow: Allow, name: str) -> None:
        """The env-owner check of an existing environment, against the owner the daemon
        recorded for it (``jobs.envs``; none: admins only). Nothing to check for a new name."""
        if os.path.lexists(self.config.requests_root.path / name):
            allow(EnvTarget(name, self._manager().environments.owner(name)))

    def _job(self, allow: Allow, job_id: str | int) -> Job:
        """The job (a prefix of its id too), once ``allow``ed."""
        job = self._manager().get(str(job_id))
        allow(job)
        return job

    def op_get(self, who: Requester, gone: Callable[[], bool], allow: Allow,
               id: str | int) -> Iterator[Message]:
        yield protocol.ok(self._job(allow, id).to_dict())

    def op_list(self, who: Requester, gone: Callable[[], bool], allow: Allow, all: bool,
                finished: bool) -> Iterator[Message]:
        jobs = self._manager().list(uid=None if all else who.uid, include_finished=finished,
                                    hub_user=who.hub_user)
        yield protocol.ok([j.to_dict() for j in jobs])

    def op_logs(self, who: Requester, gone: Callable[[], bool], allow: Allow, id: str | int,
                offset: int, follow: bool) -> Iterator[Message]:
        job = self._job(allow, id)
        if not follow:
            data, new_offset = self._manager().read_log(job.id, offset, LOG_CHUNK)
            yield protocol.ok({"offset": new_offset, "text": data.decode("utf-8", "replace"),
                               "terminal": job.terminal})
            return
        yield from self._follow(job.id, offset, gone, job_events=False)

    def op_cancel(self, who: Requester, gone: Callable[[], bool], allow: Allow,
                  id: str | int) -> Iterator[Message]:
        job = self._manager().cancel(self._job(allow, id).id, who)
        log.debug("api cancel job=%s name=%s uid=%d user=%s hub_user=%s", job.id, job.name,
                  who.uid, who.username, who.hub_user)
        yield protocol.ok(job.to_dict())

    def op_kernels_sync(self, who: Requester, gone: Callable[[], bool],
                        allow: Allow) -> Iterator[Message]:
        if self.config.kernels.dir is None:
            raise ConfigError("this daemon keeps no kernelspecs (kernels.dir is not set)",
                                  hint="an administrator sets kernels.dir in the configuration")
        busy = {job.name for job in self._manager().list()}  # queued or running builds
        result = kernels.sync(self.config, busy)
        log.info("api kernels-sync uid=%d hub_user=%s written=%d removed=%d", who.uid,
                 who.hub_user, len(result.written), len(result.removed))
        yield protocol.ok(asdict(result))

    # -- streaming -------------------------------------------------------------------------

    def _follow(self, job_id: str, offset: int, gone: Callable[[], bool], job_events: bool,
                last: tuple[str, str | None] | None = None) -> Iterator[Message]:
        """Log chunks (and job state/phase changes) until the job is over and the log drained.

        The job is read *before* the log: once a terminal state has been seen, the runner has
        finished writing, so an empty read afterwards means the log is complete.
        """
        jobs = self._manager()
        while not self.stopping.is_set():
            job = jobs.get(job_id)
            if job_events and (job.state.value, job.phase) != last:
                last = (job.state.value, job.phase)
                yield protocol.event("job", job.to_dict())
            data, new_offset = jobs.read_log(job_id, offset, LOG_CHUNK)
            if data:
                yield protocol.event("log", {"offset": offset,
                                             "text": data.decode("utf-8", "replace")})
                offset = new_offset
                continue
            if job.terminal:
                yield protocol.end({**job.to_dict(), "log_offset": offset})
                return
            if gone():
                return
            jobs.wait(job_id, FOLLOW_POLL)
        raise DaemonUnavailable("the daemon is shutting down",
                                hint="a queued job starts when the daemon is back; a running "
                                "build is interrupted and must be requested again: see "
                                f"'envctl request status {job_id}' then")
