"""Who a JupyterHub token belongs to, as the hub (not the client) says.

Why: on JupyterHub every user's server runs as one Unix uid (jovyan, 1000), so the kernel's
peer credentials cannot tell alice from bob. What does tell them apart is the API token the hub
put into each user's server (``JUPYTERHUB_API_TOKEN``): the CLI sends it, and the daemon asks the
hub whose it is (``GET {api_url}/user`` with ``Authorization: token ...``). Name, groups, admin
flag and creation time are taken from the hub's answer only; whatever the client claims
(``JUPYTERHUB_USER``) is never consulted.

The rules that keep the token safe and the daemon responsive:

- the token is sent only to ``jupyterhub.api_url`` (in a header, never in a URL; no proxy, no
  redirect followed), never logged, never stored, never handed to a build; the caches are keyed
  by its SHA-256: answers the hub accepted for ``cache_seconds``, tokens it refused for
  ``refusal_cache_seconds`` (both bounded in size);
- a change (``fresh``) asks the hub again whatever the cache holds, so a revoked token stops
  working at the next change; reads may use the cache;
- one question per token at a time: concurrent requests with the same token share one answer
  (a flood of one token costs one call per cache window);
- tokens not seen accepted are checked at most ``verify_burst`` at once and ``verify_rate`` per
  second per peer uid (:class:`LimitReached` beyond): invented tokens cannot make the daemon
  flood the hub. A token the hub accepted within ``cache_seconds`` is never held back, so on a
  shared uid the hub users who are using the daemon keep working through someone's flood;
- the hub is asked from the connection's own thread (never the accept loop), with
  ``jupyterhub.timeout`` and at most :data:`MAX_ANSWER` bytes of answer read;
- an unreachable or misbehaving hub is :class:`DaemonUnavailable` (exit 69): never a fallback
  to trusting anyone; a token the hub rejects is :class:`NotAuthorised` (exit 77). Both are
  logged by the caller, which knows the peer (``refusals``).

**Identity across renames.** A hub user is named by the hub, and a name can be given to somebody
else (rename alice, create a new alice). The hub keeps a user's ``created`` time across a rename
(its database row is renamed, not replaced), and the user model carries it to tokens that may
``read:users`` of their owner: that time is ``HubUser.hub_id``, the identity records keep
(``jobs.model.Requester.hub_id``). A single-user server's default token (the hub's ``server``
role) reads only name and groups: ``hub_id`` is then None and ownership falls back to the name
(``Requester.matches``); giving server tokens ``read:users!user``
(``c.Spawner.server_token_scopes``) makes owners rename-proof.
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
from ..errors import DaemonUnavailable, LimitReached, NotAuthorised
from ..untrusted import brief

log = logging.getLogger(__name__)

MAX_ANSWER = 1 << 20  # a user model is a few KB; a hub (or impostor) sending more is refused
MAX_CACHE = 4096  # answers per cache; expired ones are dropped first, then the older half
MAX_UIDS = 1024  # peer uids with a rate bucket; full buckets are dropped first
_NAME_MAX = 255
_CREATED_MAX = 64  # an ISO 8601 time
TOKEN_HINT = ("run envctl inside your JupyterHub server, where JUPYTERHUB_API_TOKEN is set; "
              "if it is, the token may have expired: restart your server from the hub's "
              "control panel")


@dataclass(frozen=True)
class HubUser:
    """A hub user as the hub described the owner of a token."""

    name: str
    groups: tuple[str, ...]
    admin: bool
    hub_id: str | None = None  # the user's ``created`` time: kept across a rename


class _Flight:
    """One question to the hub, shared by concurrent requests with the same token."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.user: HubUser | None = None
        self.error: NotAuthorised | DaemonUnavailable | None = None


class _Buckets:
    """Token buckets per peer uid: ``burst`` checks at once, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._left: dict[int, tuple[float, float]] = {}  # uid -> (checks left, when)

    def take(self, uid: int, now: float) -> bool:
        """One check for ``uid`` if it has one left (called with the verifier's lock held)."""
        left, when = self._left.get(uid, (float(self.burst), now))
        left = min(float(self.burst), left + (now - when) * self.rate)
        if left < 1:
            self._left[uid] = (left, now)
            return False
        if uid not in self._left and len(self._left) >= MAX_UIDS:
            self._left = {u: (n, w) for u, (n, w) in self._left.items()
                          if n + (now - w) * self.rate < self.burst}
        self._left[uid] = (left - 1, now)
        return True


class HubVerifier:
    """Asks the hub who owns a token; caches answers and refusals by the token's hash."""

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
        self._accepted: dict[bytes, tuple[float, HubUser]] = {}
        self._refused: dict[bytes, float] = {}
        self._flights: dict[bytes, _Flight] = {}
        self._buckets = _Buckets(cfg.verify_rate, cfg.verify_burst)
        self._lock = threading.Lock()
        self._told_no_created = False

    def user(self, token: str, uid: int, fresh: bool = False) -> HubUser:
        """The hub user owning ``token``, sent by a peer of ``uid``; or NotAuthorised,
        LimitReached, DaemonUnavailable. ``fresh``: ask the hub even when an accepted answer
        is cached (a change). A refusal is reused for ``refusal_cache_seconds`` either way."""
        key = hashlib.sha256(token.encode()).digest()
        with self._lock:
            now = time.monotonic()
            if self._refused.get(key, 0.0) > now:
                raise _refused("it refused it moments ago")
            hit = self._accepted.get(key)
            if hit is not None and hit[0] > now and not fresh:
                return hit[1]
            flight = self._flights.get(key)
            asking = flight is None
            if flight is None:
                if (hit is None or hit[0] <= now) and not self._buckets.take(uid, now):
                    raise LimitReached(
                        f"too many JupyterHub tokens checked for uid {uid}: at most "
                        f"{self.cfg.verify_burst} at once, then {self.cfg.verify_rate:g} per "
                        "second (jupyterhub.verify_burst, jupyterhub.verify_rate)",
                        hint="retry in a few seconds with your own server's "
                             "JUPYTERHUB_API_TOKEN")
                flight = self._flights[key] = _Flight()
        if asking:
            self._fly(key, token, flight)
        else:
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.user is not None
        return flight.user

    def _fly(self, key: bytes, token: str, flight: _Flight) -> None:
        """Ask the hub, cache the answer, wake whoever waits for it."""
        try:
            flight.user = self._ask(token)
        except (NotAuthorised, DaemonUnavailable) as exc:
            flight.error = exc
        finally:
            with self._lock:
                now = time.monotonic()
                del self._flights[key]
                if flight.user is not None and self.cfg.cache_seconds > 0:
                    self._accepted = _bounded(self._accepted, now)
                    self._accepted[key] = (now + self.cfg.cache_seconds, flight.user)
                elif isinstance(flight.error, NotAuthorised):
                    self._accepted.pop(key, None)  # revoked: no longer good for reads either
                    if self.cfg.refusal_cache_seconds > 0:
                        self._refused = _bounded(self._refused, now)
                        self._refused[key] = now + self.cfg.refusal_cache_seconds
            flight.done.set()

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
                raise _refused(f"HTTP {exc.code}") from None
            raise self._unavailable(f"answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise self._unavailable(f"cannot be reached ({_short(reason)})") from None
        user = self._parse(body)
        if user.hub_id is None and not self._told_no_created:
            self._told_no_created = True  # once per daemon: it is the hub's configuration
            log.warning("hub no-created-time user=%s: the hub does not show this token's owner's "
                        "creation time, so envs and jobs of hub users go by name (a new user "
                        "given a renamed user's name would own them); give server tokens "
                        "read:users!user (c.Spawner.server_token_scopes)", user.name)
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
        """Name, groups, admin and ``created`` of a ``kind: user`` model; anything else is
        refused. A token whose scopes hide ``groups``, ``admin`` or ``created`` gets none (least
        privilege), not an error."""
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
        created = model.get("created")
        if not isinstance(name, str) or not 0 < len(name) <= _NAME_MAX or \
                not name.isprintable() or any(c.isspace() for c in name):
            raise self._unavailable(f"sent a user name that is not one: {brief(name)}")
        if not isinstance(groups, list) or not all(isinstance(g, str) and 0 < len(g) <= _NAME_MAX
                                                   for g in groups):
            raise self._unavailable("sent groups that are not a list of names")
        if created is not None and not (isinstance(created, str) and created.isprintable()
                                        and 0 < len(created) <= _CREATED_MAX):
            raise self._unavailable(f"sent a creation time that is not one: {brief(created)}")
        return HubUser(name=name, groups=tuple(sorted(set(groups))), admin=admin is True,
                       hub_id=created)

    def _unavailable(self, what: str) -> DaemonUnavailable:
        return DaemonUnavailable(f"the JupyterHub API at {self.cfg.api_url} {what}; hub users "
                                 "cannot be identified, so the request is refused",
                                 hint="retry in a moment; if it persists, an administrator "
                                 "checks jupyterhub.api_url and the hub")


def _refused(how: str) -> NotAuthorised:
    return NotAuthorised(f"JupyterHub does not accept the API token sent with this request "
                         f"({how})", hint=TOKEN_HINT)


def _bounded(cache: dict[bytes, Any], now: float) -> dict[bytes, Any]:
    """``cache`` with room for one more (called with the lock held): expired entries dropped,
    then the older half. An entry is its expiry, or ``(expiry, answer)``."""
    if len(cache) < MAX_CACHE:
        return cache

    def expiry(item: tuple[bytes, Any]) -> float:
        value = item[1]
        return float(value[0] if isinstance(value, tuple) else value)

    live = dict(item for item in cache.items() if expiry(item) > now)
    if len(live) >= MAX_CACHE:
        live = dict(sorted(live.items(), key=expiry)[MAX_CACHE // 2:])
    return live


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the HTTP error it is (``_ask`` reports it as unavailable)."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _short(reason: object) -> str:
    return brief(str(reason)).strip("'\"")

