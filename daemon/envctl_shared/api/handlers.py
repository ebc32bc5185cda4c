"""What each op does: authorise, call the jobs layer or the status callback, shape the reply.

Why separate from ``server``: the server owns bytes, threads and sockets; this module owns
meaning. Every handler takes the checked :class:`~envctl_shared.api.protocol.Request` and the peer's
identity (the kernel's, and on a shared uid the hub user the hub verified) and yields protocol
messages — one for plain ops, a stream of events ending in an
``end`` message for ``create``/``logs`` with ``follow``. Handlers raise
:class:`~envctl_shared.errors.EnvctlError`; the server turns that into the error envelope.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..config import Config
from ..errors import DaemonUnavailable, NotAuthorised, ValidationError
from ..jobs import kernels
from ..jobs.model import Job, Requester
from ..jobs.spec import validate_name
from ..status import DaemonStatus
from . import protocol
from .auth import Authoriser
from .env_handlers import EnvHandlers
from .hub import TOKEN_HINT, HubUser, HubVerifier
from .peercred import PeerCred

if TYPE_CHECKING:  # the manager is only ever handed to us by the daemon
    from ..jobs.manager import JobManager

log = logging.getLogger(__name__)

Message = dict[str, Any]
StatusFn = Callable[[], DaemonStatus]

# How often a follow stream re-reads the log when nothing else woke it (the jobs layer's wait()
# wakes on state/phase changes only, log growth is polled).
FOLLOW_POLL = 0.25
LOG_CHUNK = 65536
# What a peer on a shared uid may ask without proving which hub user it is: nothing about jobs.
ANONYMOUS_OPS = frozenset({"ping", "version", "status", "whoami"})
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
        """Dispatch one request; ``gone()`` tells a stream its client has hung up. Runs in the
        connection's thread, so asking the hub never holds up the accept loop."""
        claimed = req.args.get("claimed_user") if req.op.name == "create" else None
        who = self.auth.requester(cred, claimed, self._hub_user(req, cred))
        method: Callable[..., Iterator[Message]] = getattr(self, "op_" + req.op.name.replace(
            "-", "_"))
        yield from method(who, gone=gone, **req.args)

    def _hub_user(self, req: protocol.Request, cred: PeerCred) -> HubUser | None:
        """The hub user of a peer on a shared uid, as the hub names the owner of its token.
        Peers on other uids are who the kernel says (their token, if any, is not used)."""
        if self.hub is None or cred.uid not in self.auth.shared_uids:
            return None
        if req.hub_token is None:
            if req.op.name in ANONYMOUS_OPS:
                return None
            log.info("api refused reason=no-hub-token op=%s uid=%d pid=%d", req.op.name,
                     cred.uid, cred.pid)
            raise NotAuthorised(f"uid {cred.uid} is shared by the users of JupyterHub "
                                "(jupyterhub.shared_uids): a request from it must carry the "
                                "hub API token that says which hub user you are",
                                hint=TOKEN_HINT)
        if req.op.name in ("ping", "version", "status"):
            return None  # nothing to decide: the hub is not asked
        return self.hub.user(req.hub_token)

    # -- ops anyone who can connect may call ---------------------------------------------

    def op_ping(self, who: Requester, gone: Callable[[], bool]) -> Iterator[Message]:
        yield protocol.ok({"pong": True, "version": __version__, "protocol": protocol.VERSION})

    def op_version(self, who: Requester, gone: Callable[[], bool]) -> Iterator[Message]:
        yield protocol.ok({"version": __version__, "protocol": protocol.VERSION})

    def op_whoami(self, who: Requester, gone: Callable[[], bool]) -> Iterator[Message]:
        yield protocol.ok(self.auth.describe(who))

    def op_status(self, who: Requester, gone: Callable[[], bool]) -> Iterator[Message]:
        yield protocol.ok(self.status_fn().to_dict())  # the daemon's (``status.DaemonStatus``)

    # -- job ops ---------------------------------------------------------------------------

    def _manager(self) -> JobManager:
        if self.jobs is None:
            raise DaemonUnavailable("environment requests are disabled on this daemon",
                                    hint="an administrator can set requests.enabled: true")
        return self.jobs

    def _visible(self, who: Requester, job_id: str | int) -> Job:
        job = self._manager().get(str(job_id))
        self.auth.require_view(who, job)
        return job

    def op_create(self, who: Requester, gone: Callable[[], bool], name: str, spec: str,
                  backend: str | None, replace: bool, claimed_user: str | None,
                  follow: bool, tests: list[str],
                  description: str | None) -> Iterator[Message]:
        jobs = self._manager()
        try:
            self.auth.require_create(who)
            if replace:
                self._require_env_owner(who, validate_name(name))
        except NotAuthorised:
            log.info("api refused op=create uid=%d user=%s hub_user=%s claimed=%s name=%s "
                     "replace=%s", who.uid, who.username, who.hub_user, who.claimed_user, name,
                     replace)
            raise
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

    def _require_env_owner(self, who: Requester, name: str) -> None:
        """An existing environment belongs to the requester of its first version, as the
        daemon recorded it in the root (``jobs.envs``; an env without a record: admins)."""
        if not os.path.lexists(self.config.requests_root.path / name):
            return
        owner = self._manager().environments.owner(name)
        self.auth.require_env_owner(who, owner, f"environment {name!r}")

    def op_get(self, who: Requester, gone: Callable[[], bool], id: str | int) -> Iterator[Message]:
        yield protocol.ok(self._visible(who, id).to_dict())

    def op_list(self, who: Requester, gone: Callable[[], bool], all: bool,
                finished: bool) -> Iterator[Message]:
        if all:
            self.auth.require_view_all(who)
        jobs = self._manager().list(uid=None if all else who.uid, include_finished=finished,
                                    hub_user=who.hub_user)
        yield protocol.ok([j.to_dict() for j in jobs])

    def op_logs(self, who: Requester, gone: Callable[[], bool], id: str | int, offset: int,
                follow: bool) -> Iterator[Message]:
        job = self._visible(who, id)
        if not follow:
            data, new_offset = self._manager().read_log(job.id, offset, LOG_CHUNK)
            yield protocol.ok({"offset": new_offset, "text": data.decode("utf-8", "replace"),
                               "terminal": job.terminal})
            return
        yield from self._follow(job.id, offset, gone, job_events=False)

    def op_cancel(self, who: Requester, gone: Callable[[], bool],
                  id: str | int) -> Iterator[Message]:
        job = self._manager().cancel(self._manager().get(str(id)).id, who)  # a prefix too
        log.debug("api cancel job=%s name=%s uid=%d user=%s hub_user=%s", job.id, job.name,
                  who.uid, who.username, who.hub_user)
        yield protocol.ok(job.to_dict())

    def op_kernels_sync(self, who: Requester, gone: Callable[[], bool]) -> Iterator[Message]:
        if not who.is_admin:
            raise NotAuthorised("only envctl admins may rewrite the kernelspecs",
                                hint="ask an administrator to run 'envctl kernels sync'")
        if self.config.kernels.dir is None:
            raise ValidationError("this daemon keeps no kernelspecs (kernels.dir is not set)",
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
