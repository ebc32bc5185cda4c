"""Start the service from what the hub hands a service: its environment.

Why from the environment: a hub-managed service (``c.JupyterHub.services`` with a
``command``) gets ``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_API_URL``, ``JUPYTERHUB_CLIENT_ID``,
``JUPYTERHUB_SERVICE_PREFIX``, ``JUPYTERHUB_SERVICE_URL``, ``JUPYTERHUB_OAUTH_CALLBACK_URL``
(and, with the hub's ``internal_ssl``, ``JUPYTERHUB_SSL_*``); an externally run one is given
the same variables by whoever runs it (docs/web.md). ``HubOAuth`` reads them; this module only
refuses to start where they cannot work: no hub to sign people in with, no service name to
know who may use the service by (``HubOAuth`` would let in any hub token), or an ``https``
service URL without the certificate the hub would expect it to serve with.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import ssl
from pathlib import Path
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth  # type: ignore[import-untyped]
from jupyterhub.utils import make_ssl_context  # type: ignore[import-untyped]
from tornado.httpserver import HTTPServer

from ..errors import ConfigError
from .app import MAX_BODY_BYTES, make_app
from .link import DaemonLink, take_service_token

log = logging.getLogger(__name__)
NEEDED = ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL", "JUPYTERHUB_CLIENT_ID",
          "JUPYTERHUB_SERVICE_PREFIX")
_HINT = ("run it as a JupyterHub service (c.JupyterHub.services with a command), or give an "
         "external one the variables the hub would: see docs/web.md")


def listen_address(ip: str | None, port: int | None) -> tuple[str, int, bool]:
    """Where to listen: ``--ip``/``--port``, else ``JUPYTERHUB_SERVICE_URL``; and whether
    it is https."""
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101"))
    host = ip if ip is not None else (url.hostname or "127.0.0.1")
    return host, port if port is not None else (url.port or 10101), url.scheme == "https"


def _local(ip: str | None, port: int | None) -> tuple[str, int, str, str]:
    """The local mode: no hub, so no one to tell users apart — the pages act as the uid
    running them (your own CLI, in a browser). Safe only for its starter: loopback only (other
    users of the machine reach loopback too, so every URL starts with the secret: the prefix;
    no cookie, which the browser would send to their servers on other ports), and the
    service's environment token is dropped all the same."""
    host = ip or "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"envctl web --local listens on loopback only, not {host}",
                          hint="run it as a JupyterHub service to serve others (docs/web.md)")
    take_service_token()
    secret = secrets.token_urlsafe(24)
    return host, port if port is not None else 10101, f"/{secret}/", secret


def tls_context(https: bool) -> ssl.SSLContext | None:
    """The hub's internal TLS for an ``https`` service URL; refusing to serve plain HTTP there
    (the hub and the proxy would speak TLS to us). Plain HTTP where the hub uses it."""
    if not https:
        return None
    cert, key = os.environ.get("JUPYTERHUB_SSL_CERTFILE"), os.environ.get("JUPYTERHUB_SSL_KEYFILE")
    if not cert or not key:
        raise ConfigError("the service URL is https, but no certificate was given "
                          "(JUPYTERHUB_SSL_CERTFILE, JUPYTERHUB_SSL_KEYFILE): refusing to "
                          "serve without TLS", hint="the hub sets them with internal_ssl; an "
                          "external service is given its own (docs/web.md)")
    return make_ssl_context(key, cert, cafile=os.environ.get("JUPYTERHUB_SSL_CLIENT_CA"),
                            purpose=ssl.Purpose.CLIENT_AUTH)  # type: ignore[no-any-return]


def serve(socket: Path, ip: str | None = None, port: int | None = None,
          local: bool = False) -> None:
    """Serve until stopped; ``local``: the dev-only mode without a hub (:func:`_local`)."""
    if local:
        host, port, prefix, secret = _local(ip, port)
        link, context = DaemonLink(socket, hub=False), None
    else:
        missing = [name for name in NEEDED if not os.environ.get(name)]
        if missing:
            raise ConfigError(f"envctl web is a JupyterHub service, and {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not set",
                              hint=f"{_HINT}; to try it on this machine without a hub: "
                              "'envctl web --local'")
        host, port, https = listen_address(ip, port)
        context, secret = tls_context(https), None
        # The service's token goes to HubOAuth (its OAuth client secret) and out of the
        # environment: no daemon call may fall back to it. The hub's URLs come from there too.
        auth = HubOAuth.instance(api_token=take_service_token())
        if not auth.access_scopes:
            raise ConfigError("envctl web does not know its service name (JUPYTERHUB_SERVICE_NAME "
                              "or JUPYTERHUB_OAUTH_ACCESS_SCOPES), so it would let in any hub "
                              "token, whatever the hub's roles say about who may use it",
                              hint="the hub sets it for a service it starts; give an external "
                              "one JUPYTERHUB_SERVICE_NAME=<its name in c.JupyterHub.services> "
                              "(docs/web.md)")
        prefix = os.environ["JUPYTERHUB_SERVICE_PREFIX"].rstrip("/") + "/"
        link = DaemonLink(socket)
    app = make_app(prefix, link, cookie_secret=secrets.token_bytes(32), local_secret=secret)
    # Bodies are read whole before any handler runs: no more than a request form needs.
    server = HTTPServer(app, ssl_options=context, xheaders=not local,
                        max_body_size=MAX_BODY_BYTES)
    try:
        server.listen(port, host)
    except OSError as exc:  # another server has the port (a second make run, say)
        raise ConfigError(f"envctl web cannot listen on {host}:{port}: {exc.strerror}",
                          hint=f"see who has it ('ss -ltnp sport = :{port}'), or choose another "
                          "port with --port N (make run: 'make run WEB_PORT=N')") from None
    log.info("web listening url=%s://%s:%d%s socket=%s local=%s",
             "https" if context else "http", host, port,
             prefix if secret is None else "/<secret>/", socket, local)
    if secret is not None:
        print(f"envctl web (local mode: you, uid {os.geteuid()}, and only who has this URL):\n"
              f"    http://{host}:{port}{prefix}", flush=True)
    try:
        asyncio.get_event_loop_policy().get_event_loop().run_forever()
    finally:
        server.stop()
        link.close()
