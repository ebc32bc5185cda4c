"""The web service's calls to the daemon: a user's hub token on every request, never its own.

Why a module: three rules hold for every call, and they are kept here once.

- Each call carries the signed-in user's hub token, so the daemon asks the hub who it is, as
  for the CLI. The service's own token (``JUPYTERHUB_API_TOKEN``, which ``HubOAuth`` needs) is
  taken out of the environment at start-up (:func:`take_service_token`), so a call without a
  user's token can never fall back to it.
- The daemon must see the service as a *shared* uid (``jupyterhub.shared_uids``): otherwise it
  would act on the service's own uid for whoever signed in. This is checked with the daemon
  before the first forwarded call, and again after the daemon was unreachable (a restart may
  have come with another configuration); until it holds, every call is refused.
- The client is blocking; calls run in a thread pool so a slow daemon or hub never holds up
  the pages of others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..api.client import HUB_TOKEN_ENV, Client
from ..errors import ConfigError, DaemonUnavailable, EnvctlError
from .routes import unsupported

log = logging.getLogger(__name__)
T = TypeVar("T")
THREADS = 16  # concurrent daemon calls (a follow stream holds one for its length)


def take_service_token() -> str | None:
    """Take the service's own token out of the environment (for ``HubOAuth`` only)."""
    return os.environ.pop(HUB_TOKEN_ENV, None)


class Session:
    """Calls on one connection, as one user: ``call`` raises NotSupported for an op the
    daemon does not know yet (instead of a protocol error): the API answers 501."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.aborted = False

    def call(self, op: str, **args: Any) -> Any:
        try:
            return self._client.call(op, **args)
        except EnvctlError as err:
            raise unsupported(err, op) from None

    def stream(self, op: str, **args: Any) -> Iterator[dict[str, Any]]:
        return self._client.stream(op, **args)

    def abort(self) -> None:
        """From another thread: end the call or stream waiting on the daemon (its reader is
        gone); it raises DaemonUnavailable, which says nothing of the daemon."""
        self.aborted = True
        self._client.interrupt()


class DaemonLink:
    """The socket path, the thread pool, and whether the shared-uid rule was checked."""

    def __init__(self, socket: Path, timeout: float = 30.0, hub: bool = True) -> None:
        """``hub=False``: the local mode, where the service acts as its own uid (no token)."""
        self.socket = socket
        self.hub = hub
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="envctl-web")
        self._checked = False
        self._lock = threading.Lock()

    async def run(self, token: str | None, work: Callable[[Session], T]) -> T:
        """``work`` on a fresh connection as the user of ``token``, in the pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run, token, work, self.timeout)

    def run_sync(self, token: str | None, work: Callable[[Session], T],
                 timeout: float | None = None) -> T:
        """``run`` from a pool thread: a stream's reader, with no timeout by default (the
        daemon sends nothing while a build is quiet; the stream ends when the job does)."""
        return self._run(token, work, timeout)

    def _run(self, token: str | None, work: Callable[[Session], T],
             timeout: float | None) -> T:
        if self.hub and not token:
            raise ConfigError("no hub token to forward")  # the handlers never get here
        session = None
        try:
            if self.hub:
                self._check_shared_uid()
            with Client(self.socket, timeout=timeout, hub_token=token) as client:
                session = Session(client)
                return work(session)
        except DaemonUnavailable:
            if session is None or not session.aborted:
                self._checked = False  # check again once it is back
            raise

    def _check_shared_uid(self) -> None:
        """Refuse to forward anything while the daemon would see the service's own uid as a
        person (not on ``jupyterhub.shared_uids``) — or while the service runs as root."""
        if self._checked:
            return
        with self._lock:
            if self._checked:
                return
            if os.geteuid() == 0:
                raise ConfigError("envctl web runs as root, which the daemon takes for an "
                                  "admin whatever hub user signed in; refusing every request",
                                  hint="run the service as the uid your hub users share "
                                  "(the hub's service 'user' key), see docs/web.md")
            with Client(self.socket, timeout=self.timeout, hub_token=None) as client:
                me = client.call("whoami")
            if not me.get("shared_uid"):
                raise ConfigError(
                    f"the daemon does not list this service's uid {os.geteuid()} in "
                    "jupyterhub.shared_uids, so it would act as that uid for every hub user; "
                    "refusing every request",
                    hint="add the uid to jupyterhub.shared_uids in the daemon's configuration "
                    "(docs/web.md)")
            log.info("web daemon-checked socket=%s uid=%d", self.socket, os.geteuid())
            self._checked = True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
