"""The tornado application: pages for people, the HTTP API for scripts, sign-in by the hub.

Why tornado and ``HubOAuth``: it is what JupyterHub and its services are built on, so sign-in,
tokens and CSRF follow the hub's own conventions: a browser signs in through the hub's OAuth
(the access token is kept in a signed cookie), a script sends ``Authorization: token ...``.
A cookie-authenticated request that changes something must carry the ``_xsrf`` token of the
page it came from, or ``HubOAuth`` does not accept the cookie at all (no user: 403 for a form,
401 for the API). Whoever signed in, the request goes to the daemon with *their* token
(``link``); the daemon decides what they may do, and its refusal is shown as it said it.

Pages are server-rendered tornado templates (autoescaped: names, descriptions and build logs
are other people's text), with one small script that follows a job's state and log over the
HTTP API and shows a badge when one of your builds ends — no reload, no build step, no CDN.
"""

from __future__ import annotations

import asyncio
import getpass
import hmac
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from jupyterhub.services.auth import (  # type: ignore[import-untyped]
    HubOAuthCallbackHandler,
    HubOAuthenticated,
)
from jupyterhub.utils import url_path_join  # type: ignore[import-untyped]
from tornado import web

from .. import __version__
from ..api import protocol
from ..cli.env_cmd import _size as size_text
from ..cli.env_cmd import _who as who_text
from ..cli.output import error_document, hint_of, local_time
from ..errors import EnvctlError, LimitReached, NotAuthorised, NotFound, ValidationError
from ..jobs import envs
from ..jobs.model import Requester
from ..untrusted import brief
from .link import DaemonLink, Session
from .routes import ROUTES, Route, arguments, http_status

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
MAX_STREAMS = 8  # log streams at once (each holds a thread while the build runs)
STREAM_BACKLOG = 16  # messages read ahead of a slow reader (each at most a 64 KiB log chunk)
MAX_SPEC_BYTES = 256 * 1024  # an upload bigger than this is no environment.yml
MAX_BODY_BYTES = 4 * MAX_SPEC_BYTES  # a request body: the form (spec, upload, tests) and no more
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'")


class Base(HubOAuthenticated, web.RequestHandler):  # type: ignore[misc]
    """Sign-in by the hub; the daemon call with the signed-in user's token; errors shown.

    In the local mode (``envctl web --local``, no hub) the one user is whoever knows the
    secret printed at start: it is the prefix of every URL (tornado's ``_xsrf`` instead of the
    hub's)."""

    def set_default_headers(self) -> None:
        """Only our own script and stylesheet run; no page of ours in another site's frame."""
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")

    @property
    def link(self) -> DaemonLink:
        return self.settings["envctl_link"]  # type: ignore[no-any-return]

    @property
    def local_secret(self) -> str | None:
        return self.settings.get("envctl_local_secret")

    async def prepare(self) -> None:
        """Ask the hub who the token is without holding the service: ``HubAuthenticated``'s
        ``get_current_user`` asks synchronously, stalling every other request while the hub
        answers (a slow hub, or one question per invented token of a stranger's flood). Its
        answer is kept on the request, where ``get_current_user`` then finds it."""
        if self.local_secret is None:
            await self.hub_auth.get_user(self, sync=False)

    def get_current_user(self) -> Any:
        if self.local_secret is None:
            return super().get_current_user()
        return self._local_user(self.local_secret)

    def _local_user(self, secret: str) -> dict[str, str] | None:
        """Whoever reached a page under the secret prefix (every page is), or sends the secret
        in the header (scripts, no ``_xsrf`` then); a write from a page needs its ``_xsrf``.
        No cookie says who you are: cookies go to every port of 127.0.0.1, so another local
        user's server would receive it and could replay it."""
        user = {"name": getpass.getuser(), "kind": "user"}
        header = self.request.headers.get("Authorization", "")
        if hmac.compare_digest(header.encode(), f"token {secret}".encode()):
            return user
        if self.request.method not in ("GET", "HEAD"):
            try:
                web.RequestHandler.check_xsrf_cookie(self)
            except web.HTTPError:
                return None
        return user

    @property
    def xsrf_token(self) -> bytes:
        if self.local_secret is None:
            return super().xsrf_token  # type: ignore[no-any-return]
        return web.RequestHandler.xsrf_token.fget(self)  # type: ignore[attr-defined,no-any-return]

    def token(self) -> str | None:
        """The signed-in user's hub token (header or the OAuth cookie): what the daemon
        verifies. No user, no token: nothing is sent. Local mode: none (the daemon sees the
        uid that runs the service: the person who started it)."""
        token = None
        if self.current_user:
            if self.local_secret is not None:
                return None
            token = self.hub_auth.get_token(self)
        if not token:
            raise NotAuthorised("sign in through JupyterHub, or send a hub API token",
                                hint="Authorization: token <your JupyterHub API token>")
        return str(token)

    async def daemon(self, work: Any) -> Any:
        return await self.link.run(self.token(), work)

    def url(self, *parts: str) -> str:
        return str(url_path_join(self.settings["envctl_prefix"], *parts))


class Page(Base):
    """A page: errors are rendered with the daemon's message and hint, never a traceback."""

    def render_page(self, template: str, **kw: Any) -> None:
        self.render(template, url=self.url, size=size_text, who=who_text, when=local_time,
                    version=__version__, **kw)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, EnvctlError):
            message, hint, code = exc.message, hint_of(exc), exc.code
        elif isinstance(exc, web.HTTPError) and exc.log_message:
            message, hint, code = exc.log_message % exc.args if exc.args else \
                exc.log_message, None, None
        else:
            message, hint, code = self._reason, None, None
        if status_code >= 500 and not isinstance(exc, EnvctlError):
            message, hint = "internal error in the envctl web service", "see its log"
        self.render_page("error.html", status=status_code, message=message, hint=hint,
                         code=code, me=None)

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, EnvctlError):
            self.send_error(http_status(e), exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)


class EnvsPage(Page):
    @web.authenticated
    async def get(self) -> None:
        me, found = await self.daemon(lambda s: (s.call("whoami"), s.call("env-list")))
        self.render_page("envs.html", me=me, envs=found)


def _owns(me: dict[str, Any], owner: Any) -> bool:
    """Whether a page shows the owner's buttons (rollback, remove, cancel): the daemon's own
    rule, applied to the user as ``whoami`` describes them; the daemon decides either way."""
    who = Requester(uid=me["uid"], gid=me["gid"], groups=tuple(me["groups"]), pid=me["pid"],
                    username=me["username"], claimed_user=None, is_admin=bool(me["is_admin"]),
                    hub_user=me.get("hub_user"), hub_groups=tuple(me.get("hub_groups") or ()),
                    hub_id=me.get("hub_id"))
    return who.is_admin or envs.owned_by(owner, who)


class EnvPage(Page):
    @web.authenticated
    async def get(self, name: str) -> None:
        me, env = await self.daemon(lambda s: (s.call("whoami"), s.call("env-show", name=name)))
        self.render_page("env.html", me=me, env=env, may_change=_owns(me, env.get("owner")))


class EnvAction(Page):
    """The env page's forms: rollback, remove, description."""

    @web.authenticated
    async def post(self, name: str, action: str) -> None:
        if action == "rollback":
            to = self.get_body_argument("to", None) or None
            await self.daemon(lambda s: s.call("env-rollback", name=name, to=to))
        elif action == "remove":
            await self.daemon(lambda s: s.call("env-remove", name=name))
            self.redirect(self.url())
            return
        elif action == "description":
            text = self.get_body_argument("description", "")
            await self.daemon(lambda s: s.call("env-describe", name=name, description=text))
        else:
            raise web.HTTPError(404)
        self.redirect(self.url("envs", name))


class ExportDownload(Page):
    @web.authenticated
    async def get(self, name: str) -> None:
        version = self.get_query_argument("version", None) or None
        out = await self.daemon(lambda s: s.call("env-export", name=name, version=version))
        self.set_header("Content-Type", "text/yaml; charset=utf-8")
        self.set_header("Content-Disposition",
                        f"attachment; filename=\"{name}-{out.get('version')}.yml\"")
        self.write(out["text"])


class NewRequest(Page):
    @web.authenticated
    async def get(self) -> None:
        me = await self.daemon(lambda s: s.call("whoami"))
        self._form(me, {}, None)

    def _form(self, me: dict[str, Any], form: dict[str, str], error: EnvctlError | None) -> None:
        """The form, filled with what was sent when the daemon refused it (nothing typed is
        lost), its refusal above it. The description field only where this release's protocol
        has it (a daemon of an older one says so in its error if it is given one anyway)."""
        self.render_page("new.html", me=me, form=form, error=error,
                         hint=None if error is None else hint_of(error),
                         describe="description" in protocol.OPS["create"].args)

    @web.authenticated
    async def post(self) -> None:
        form = {k: self.get_body_argument(k, "") for k in
                ("name", "spec", "tests", "backend", "description")}
        upload = self.request.files.get("spec_file")
        if upload and upload[0]["body"]:
            if len(upload[0]["body"]) > MAX_SPEC_BYTES:
                raise ValidationError(f"the uploaded file is over {MAX_SPEC_BYTES} bytes",
                                      hint="upload the environment.yml itself")
            form["spec"] = upload[0]["body"].decode("utf-8", "replace")
        args: dict[str, Any] = {
            "name": form["name"].strip(), "spec": form["spec"],
            "replace": self.get_body_argument("replace", "") == "on",
            "tests": [t for t in form["tests"].splitlines() if t.strip()],
            "backend": form["backend"].strip() or None,
            "description": form["description"].strip() or None}
        try:
            job = await self.daemon(lambda s: s.call("create", **args))
        except EnvctlError as err:
            if http_status(err) != 422:
                raise  # not the form's fault: the error page says what is
            me = await self.daemon(lambda s: s.call("whoami"))
            self.set_status(422)
            self._form(me, {**form, "replace": "on" if args["replace"] else ""}, err)
            return
        self.redirect(self.url("jobs", str(job["id"])))


class JobsPage(Page):
    @web.authenticated
    async def get(self) -> None:
        everyone = self.get_query_argument("all", "") == "1"
        me, jobs = await self.daemon(lambda s: (s.call("whoami"), s.call(
            "list", all=everyone, finished=True)))
        self.render_page("jobs.html", me=me, jobs=jobs, everyone=everyone)


class JobPage(Page):
    @web.authenticated
    async def get(self, job_id: str) -> None:
        me, job = await self.daemon(lambda s: (s.call("whoami"), s.call("get", id=job_id)))
        owner = {**job["requester"], "hub_user": job.get("hub_user")}
        self.render_page("job.html", me=me, job=job, may_cancel=_owns(me, owner))


class JobCancel(Page):
    @web.authenticated
    async def post(self, job_id: str) -> None:
        await self.daemon(lambda s: s.call("cancel", id=job_id))
        self.redirect(self.url("jobs", job_id))


class Api(Base):
    """One route of the HTTP API (``routes.ROUTES``): JSON in, JSON out, errors as the CLI's
    ``--json`` error document with a status that says what kind of failure it is.

    With the cookie (the pages' script), HubOAuth accepts a request only with the page's
    ``_xsrf`` token (``X-XSRFToken``), except a plain navigation: a failed check leaves no
    user, 401. With a token in the header, none is needed."""

    _streams = threading.BoundedSemaphore(MAX_STREAMS)
    _stream_threads = ThreadPoolExecutor(MAX_STREAMS, thread_name_prefix="envctl-web-stream")

    def initialize(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._gone = threading.Event()
        self._session: Session | None = None
        self._queue: asyncio.Queue[Any] | None = None

    def get_login_url(self) -> str:
        raise web.HTTPError(401)

    def on_connection_close(self) -> None:
        """A stream's reader went away: its daemon connection ends now, not when the build
        next writes a line, and the writer stops waiting (the slot is free at once)."""
        self._gone.set()
        if self._session is not None:
            self._session.abort()
        if self._queue is not None and not self._queue.full():
            self._queue.put_nowait(None)

    async def get(self, **params: str) -> None:
        await self._serve("GET", params)

    async def post(self, **params: str) -> None:
        await self._serve("POST", params)

    async def put(self, **params: str) -> None:
        await self._serve("PUT", params)

    async def delete(self, **params: str) -> None:
        await self._serve("DELETE", params)

    async def _serve(self, method: str, params: dict[str, str]) -> None:
        if not self.routes:
            raise NotFound(f"no such API path: {brief(self.request.path)}",
                           hint="the routes are listed in docs/http-api.md")
        route = self.routes.get(method)
        if route is None:
            raise ValidationError(f"{method} is not allowed here",
                                  hint=f"allowed: {', '.join(sorted(self.routes))}")
        args = arguments(route, params, self.request.query_arguments, self.request.body)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        if route.streams and self.get_query_argument("follow", "") in ("1", "true"):
            await self._stream(route, args)
            return
        data = await self.daemon(lambda s: s.call(route.op, **args))
        self.write(json.dumps(data))

    async def _stream(self, route: Route, args: dict[str, Any]) -> None:
        """The op's events as JSON lines (``{"event", "data"}`` ..., then ``{"end": true,
        "data"}``), read by a thread of its own and written here as they come: at most
        STREAM_BACKLOG ahead of the reader (a slow one slows the daemon's stream, not the
        service's memory); a reader that goes away ends it (``on_connection_close``)."""
        if not self._streams.acquire(blocking=False):
            raise LimitReached(f"{MAX_STREAMS} log streams are open already",
                               hint="retry in a moment, or read the log without follow")
        reader = None
        try:
            queue = self._queue = asyncio.Queue(STREAM_BACKLOG)
            loop = asyncio.get_running_loop()
            token = self.token()

            def put(item: Any) -> bool:
                """Hand ``item`` to the writer; False once the reader is gone."""
                handed = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
                while not self._gone.is_set():
                    try:
                        handed.result(timeout=1.0)
                        return True
                    except FutureTimeout:
                        continue
                handed.cancel()
                return False

            def read(session: Session) -> None:
                self._session = session
                if self._gone.is_set():
                    return
                for msg in session.stream(route.op, follow=True, **args):
                    if not put(msg):
                        return

            def pump() -> None:
                try:
                    self.link.run_sync(token, read)
                except EnvctlError as err:
                    put(err)
                finally:
                    put(None)

            reader = loop.run_in_executor(self._stream_threads, pump)
            self.set_header("Content-Type", "application/x-ndjson; charset=utf-8")
            started = False
            while (item := await queue.get()) is not None and not self._gone.is_set():
                if isinstance(item, EnvctlError):
                    if not started:
                        raise item
                    item = {**error_document(item), "end": True}
                else:
                    item = {"ok": True, **item}  # the protocol's lines (the client drops ok)
                started = True
                self.write(json.dumps(item) + "\n")
                await self.flush()
        finally:
            self._gone.set()  # the reader stops handing over, whatever ended the writer
            if self._session is not None:
                self._session.abort()
            if reader is not None:
                await reader
            self._streams.release()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, EnvctlError):
            if status_code == 401:
                exc = EnvctlError("no hub user: no token, or one JupyterHub does not accept",
                                  hint="send 'Authorization: token <your JupyterHub API token>' "
                                  "(a token with access:services!service=envctl)")
            else:
                exc = EnvctlError(self._reason)
            exc.code = {401: "not-signed-in", 403: "not-authorised"}.get(  # type: ignore[misc]
                status_code, "http-error")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(error_document(exc)))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, EnvctlError):
            self.send_error(http_status(e), exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    async def prepare(self) -> None:
        await super().prepare()
        if not self.current_user:
            raise web.HTTPError(401)


def make_app(prefix: str, link: DaemonLink, cookie_secret: bytes,
             local_secret: str | None = None) -> web.Application:
    """Every URL under ``prefix`` (which ends in ``/``); ``local_secret``: the local mode,
    whose prefix holds it: a URL outside it gets a bare 404 (our page would link the prefix)."""
    by_path: dict[str, dict[str, Route]] = {}
    for route in ROUTES:
        by_path.setdefault(route.pattern, {})[route.method] = route
    api = [(url_path_join(prefix, "api", pattern) + "$", Api, {"routes": routes})
           for pattern, routes in by_path.items()]
    api.append((url_path_join(prefix, "api") + "/.*", Api, {"routes": {}}))  # none of them
    word = r"([A-Za-z0-9][A-Za-z0-9._-]{0,63})"
    pages = [
        (prefix, EnvsPage),
        (url_path_join(prefix, "envs", word) + "$", EnvPage),
        (url_path_join(prefix, "envs", word, "export.yml") + "$", ExportDownload),
        (url_path_join(prefix, "envs", word, "(rollback|remove|description)") + "$", EnvAction),
        (url_path_join(prefix, "new") + "$", NewRequest),
        (url_path_join(prefix, "jobs") + "$", JobsPage),
        (url_path_join(prefix, "jobs", word) + "$", JobPage),
        (url_path_join(prefix, "jobs", word, "cancel") + "$", JobCancel),
    ]
    if local_secret is None:
        pages.append((url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler))
        missing: dict[str, Any] = {"default_handler_class": NotFoundPage}
    else:
        assert local_secret in prefix
        missing = {"default_handler_class": web.ErrorHandler,
                   "default_handler_args": {"status_code": 404}}
    return web.Application(
        [*api, *pages], cookie_secret=cookie_secret, envctl_link=link, envctl_prefix=prefix,
        envctl_local_secret=local_secret,
        template_path=str(HERE / "templates"), static_path=str(HERE / "static"),
        static_url_prefix=url_path_join(prefix, "static") + "/",
        xsrf_cookie_kwargs={"path": prefix}, **missing)


class NotFoundPage(Page):
    async def prepare(self) -> None:
        raise web.HTTPError(404, "no such page")
