"""Who a JupyterHub token belongs to, as the hub (not the client) says.

Why: on JupyterHub every user's server runs as one Unix uid (jovyan, 1000), so the kernel's
peer credentials cannot tell alice from bob. What does tell them apart is the API token the hub
put into each user's server (``JUPYTERHUB_API_TOKEN``): the CLI sends it, and the daemon asks the
hub whose it is (``GET {api_url}/user`` with ``Authorization: token ...``). Name, groups and the
admin flag are taken from the hub's answer only; whatever the client claims (``JUPYTERHUB_USER``)
is never consulted.

The rules that keep the token safe and the daemon responsive:

- the token is sent only to ``jupyterhub.api_url`` (in a header, never in a URL; no proxy, no
  redirect followed), never logged,
  never stored, never handed to a build; the cache is keyed by its SHA-256, and holds answers
  for ``cache_seconds`` (bounded in size);
- the hub is asked from the connection's own thread (never the accept loop), with
  ``jupyterhub.timeout`` and at most :data:`MAX_ANSWER` bytes of answer read;
- an unreachable or misbehaving hub is :class:`DaemonUnavailable` (exit 69): never a fallback
  to trusting anyone; a token the hub rejects is :class:`NotAuthorised` (exit 77).
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..config import JupyterHubConfig
from ..errors import DaemonUnavailable, NotAuthorised
from ..untrusted import brief

log = logging.getLogger(__name__)

MAX_ANSWER = 1 << 20  # a user model is a few KB; a hub (or impostor) sending more is refused
MAX_CACHE = 4096  # cached identities; expired ones are dropped first, then the oldest
_NAME_MAX = 255
TOKEN_HINT = ("run envctl inside your JupyterHub server, where JUPYTERHUB_API_TOKEN is set; "
              "if it is, the token may have expired: restart your server from the hub's "
              "control panel")


@dataclass(frozen=True)
class HubUser:
    """A hub user as the hub described the owner of a token."""

    name: str
    groups: tuple[str, ...]
    admin: bool


class HubVerifier:
    """Asks the hub who owns a token; caches answers by the token's hash."""

    def __init__(self, cfg: JupyterHubConfig) -> None:
        assert cfg.api_url is not None
        self.cfg = cfg
        self._url = cfg.api_url + "/user"
        context = (ssl.create_default_context(cafile=str(cfg.ca_file))
                   if cfg.ca_file is not None else None)
        # No proxy from the daemon's environment and no redirects: the token goes to api_url
        # and nowhere else (urllib would repeat the Authorization header to a redirect target).
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context),
            _NoRedirect())
        self._cache: dict[bytes, tuple[float, HubUser]] = {}
        self._lock = threading.Lock()

    def user(self, token: str) -> HubUser:
        """The hub user owning ``token`` (cached), or NotAuthorised / DaemonUnavailable."""
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        user = self._ask(token)
        if self.cfg.cache_seconds > 0:
            with self._lock:
                if len(self._cache) >= MAX_CACHE:
                    self._evict(now)
                self._cache[key] = (now + self.cfg.cache_seconds, user)
        return user

    def _evict(self, now: float) -> None:
        """Drop expired entries; if none were, the oldest half (called with the lock held)."""
        live = {k: v for k, v in self._cache.items() if v[0] > now}
        if len(live) >= MAX_CACHE:
            live = dict(sorted(live.items(), key=lambda kv: kv[1][0])[MAX_CACHE // 2:])
        self._cache = live

    def _ask(self, token: str) -> HubUser:
        req = urllib.request.Request(self._url, headers={
            "Authorization": f"token {token}", "Accept": "application/json",
            "User-Agent": "envctld"})
        started = time.monotonic()
        try:
            with self._opener.open(req, timeout=self.cfg.timeout) as resp:
                body = self._read(resp, started + self.cfg.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403, 404):
                log.info("hub token-refused status=%d", exc.code)
                raise NotAuthorised(f"JupyterHub does not accept the API token sent with this "
                                    f"request (HTTP {exc.code})", hint=TOKEN_HINT) from None
            raise self._unavailable(f"answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise self._unavailable(f"cannot be reached ({_short(reason)})") from None
        user = self._parse(body)
        log.debug("hub verified user=%s admin=%s groups=%d seconds=%.3f", user.name,
                  user.admin, len(user.groups), time.monotonic() - started)
        return user

    def _read(self, resp: Any, deadline: float) -> bytes:
        """The whole answer within the timeout and MAX_ANSWER: the socket's timeout bounds
        each read only, and a hub trickling bytes must not hold a connection for long."""
        body = bytearray()
        while chunk := resp.read1(65536):
            body += chunk
            if len(body) > MAX_ANSWER:
                raise self._unavailable(f"sent more than {MAX_ANSWER} bytes for one user")
            if time.monotonic() > deadline:
                raise self._unavailable(f"did not answer within {self.cfg.timeout:g}s")
        return bytes(body)

    def _parse(self, body: bytes) -> HubUser:
        """Name, groups and admin of a ``kind: user`` model; anything else is refused. A token
        whose scopes hide ``groups`` or ``admin`` gets none (least privilege), not an error."""
        try:
            model = json.loads(body)
        except (ValueError, RecursionError):
            raise self._unavailable("sent an answer that is not JSON") from None
        if not isinstance(model, dict):
            raise self._unavailable("sent an answer that is not a user model")
        if model.get("kind", "user") != "user":
            raise NotAuthorised(f"the token belongs to a hub {brief(model.get('kind'))}, not a "
                                "user", hint="use your own server's JUPYTERHUB_API_TOKEN")
        name, groups, admin = model.get("name"), model.get("groups") or [], model.get("admin")
        if not isinstance(name, str) or not 0 < len(name) <= _NAME_MAX or \
                not name.isprintable() or any(c.isspace() for c in name):
            raise self._unavailable(f"sent a user name that is not one: {brief(name)}")
        if not isinstance(groups, list) or not all(isinstance(g, str) and 0 < len(g) <= _NAME_MAX
                                                   for g in groups):
            raise self._unavailable("sent groups that are not a list of names")
        return HubUser(name=name, groups=tuple(sorted(set(groups))), admin=admin is True)

    def _unavailable(self, what: str) -> DaemonUnavailable:
        log.warning("hub unavailable url=%s problem=%s", self._url, what)
        return DaemonUnavailable(f"the JupyterHub API at {self.cfg.api_url} {what}; hub users "
                                 "cannot be identified, so the request is refused",
                                 hint="retry in a moment; if it persists, an administrator "
                                 "checks jupyterhub.api_url and the hub")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the HTTP error it is (``_ask`` reports it as unavailable)."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _short(reason: object) -> str:
    return brief(str(reason)).strip("'\"")

