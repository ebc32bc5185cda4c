"""The HTTP API: the socket protocol's ops as JSON resources under ``<prefix>api/``.

Why a table: one route per op, whose arguments are the op's own (``protocol.OPS``), so the HTTP
API cannot drift from the protocol: ``reference()`` renders ``docs/http-api.md`` from this table
and the op table together (a test holds the file equal), and a test checks that every op has a
route. Errors are the CLI's ``--json`` error document with an HTTP status that says what kind
of failure it is (:func:`http_status`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..api import protocol
from ..errors import EnvctlError, NotSupported, ProtocolError, ValidationError
from ..untrusted import brief

# Path parameters: an env name or a job id, as the protocol's words.
_PARAM_RE = re.compile(r"\{(\w+)\}")
_WORD = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
# Arguments the HTTP layer decides itself: ``follow`` is the response's streaming (logs only),
# ``claimed_user`` is free text a web client has no use for.
_NOT_ARGS = frozenset({"follow", "claimed_user"})

# Error code -> HTTP status (every code errors.py knows). 401 (no hub user) is the web layer's
# own; a code not here (a newer daemon's) is 500.
STATUS = {
    "not-authorised": 403, "permission-denied": 403,
    "not-found": 404,
    "conflict": 409, "limit-reached": 409,
    "invalid-request": 422, "protocol-error": 422, "usage": 422, "filesystem-error": 422,
    "not-supported": 501,
    "daemon-unavailable": 503, "socket-permission-denied": 503, "socket-untrusted": 503,
    "config-invalid": 503, "extension-missing": 503, "area-untrusted": 503,  # an admin must look
    "build-failed": 200,  # the job document says how it failed
}


@dataclass(frozen=True)
class Route:
    """``method path`` runs ``op``; path parameters and the query (GET, DELETE) or the JSON body
    (POST, PUT) are the op's arguments."""

    method: str
    path: str
    op: str
    streams: bool = False  # ``?follow=true`` streams the op's events as JSON lines

    @property
    def pattern(self) -> str:
        return _PARAM_RE.sub(lambda m: f"(?P<{m.group(1)}>{_WORD})", self.path)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(_PARAM_RE.findall(self.path))


ROUTES: tuple[Route, ...] = (
    Route("GET", "ping", "ping"),
    Route("GET", "version", "version"),
    Route("GET", "whoami", "whoami"),
    Route("GET", "status", "status"),
    Route("GET", "jobs", "list"),
    Route("POST", "jobs", "create"),
    Route("GET", "jobs/{id}", "get"),
    Route("DELETE", "jobs/{id}", "cancel"),
    Route("GET", "jobs/{id}/logs", "logs", streams=True),
    Route("GET", "envs", "env-list"),
    Route("GET", "envs/{name}", "env-show"),
    Route("DELETE", "envs/{name}", "env-remove"),
    Route("GET", "envs/{name}/export", "env-export"),
    Route("GET", "envs/{name}/diff", "env-diff"),
    Route("PUT", "envs/{name}/description", "env-describe"),
    Route("POST", "envs/{name}/verify", "env-verify"),
    Route("POST", "envs/{name}/rollback", "env-rollback"),
    Route("POST", "envs/{name}/add", "env-add"),
    Route("POST", "envs/{name}/update", "env-update"),
    Route("POST", "gc", "env-gc"),
    Route("POST", "kernels/sync", "kernels-sync"),
)


def http_status(err: EnvctlError) -> int:
    return STATUS.get(err.code, 500)


def unsupported(err: EnvctlError, op: str) -> EnvctlError:
    """A daemon of an older release that does not know ``op`` yet: NotSupported (501), so
    pages hide what needs it instead of showing a protocol error."""
    if isinstance(err, ProtocolError) and err.message.startswith("unknown op"):
        return NotSupported(f"this envctl daemon does not know the operation {op!r} yet",
                            hint="an administrator upgrades the daemon to the web service's "
                            "release")
    return err


def arguments(route: Route, params: dict[str, str], query: dict[str, list[bytes]],
              body: bytes) -> dict[str, Any]:
    """The op's arguments from the path, and the query (GET/DELETE) or a JSON object body.

    Query values are converted to the argument's type (``true``/``false``, integers); the
    daemon checks every value again, as it does for any client."""
    op = protocol.OPS.get(route.op)
    if op is None:  # a route of a newer release than this protocol table
        raise NotSupported(f"this envctl does not know the operation {route.op!r} yet",
                           hint="upgrade envctl (the web service and the daemon)")
    known = {k: a for k, a in op.args.items() if k not in _NOT_ARGS}
    if route.method in ("POST", "PUT") and body.strip():
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ValidationError("the request body is not JSON",
                                  hint="send a JSON object of the operation's arguments "
                                  "(docs/http-api.md)") from None
        if not isinstance(data, dict):
            raise ValidationError("the request body must be a JSON object")
    else:
        data = {}
        for key, values in query.items():
            if key in _NOT_ARGS or key == "_xsrf":
                continue
            text = values[-1].decode("utf-8", "replace")
            data[key] = _from_query(key, text, known[key].types) if key in known else text
    for key in data:
        if key not in known:
            names = ", ".join(sorted(known)) or "none"
            raise ValidationError(f"{route.op}: unknown argument {brief(key)} (known: {names})",
                                  hint="see docs/http-api.md")
    return {**data, **params}


def _from_query(key: str, text: str, types: tuple[type, ...]) -> Any:
    if bool in types:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("", "0", "false", "no", "off"):
            return False
        raise ValidationError(f"{key} must be true or false, not {brief(text)}")
    if int in types and str not in types:
        if not text.isdigit() or len(text) > protocol.MAX_INT_DIGITS:
            raise ValidationError(f"{key} must be a non-negative integer, not {brief(text)}")
        return int(text)
    return text


def reference() -> str:
    """The route table as Markdown: the reference section of docs/http-api.md. Each route
    repeats the op's own summary, access and arguments from the protocol's op table."""
    lines = []
    for route in ROUTES:
        op = protocol.OPS.get(route.op)
        if op is None:  # an op of a newer daemon than this protocol table: documented there
            continue
        follow = " (`?follow=true`: streams JSON lines)" if route.streams else ""
        lines.append(f"### `{route.method} api/{route.path}` → `{route.op}`{follow}\n\n"
                     f"{op.summary}\n\nAccess: {protocol.access_text(op)} (levels: "
                     "[protocol.md](protocol.md)).\n")
        where = "body" if route.method in ("POST", "PUT") else "query"
        for key, spec in op.args.items():
            if key in _NOT_ARGS:
                continue
            kind = "|".join(t.__name__ for t in spec.types)
            need = "required" if spec.required else f"default {json.dumps(spec.default)}"
            origin = "path" if key in route.params else where
            lines.append(f"- `{key}` ({origin}, {kind}, {need}): {spec.help}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference())
