"""The wire protocol: the op table, JSON-lines framing, envelopes and argument checking.

Why this shape: one JSON object per line is trivially debuggable (``socat``, ``nc -U``), needs
no schema compiler, and can be parsed safely from an untrusted peer with the stdlib — never pickle,
never eval. The op table below is the single source of truth: the server dispatches from it, it
validates every request's arguments before any handler sees them, and ``python -m
envctl_shared.api.protocol`` prints it as the reference in ``docs/protocol.md``.

Request: ``{"v": 1, "op": "<op>", "args": {...}}``. Replies: ``{"ok": true, "data": ...}`` or
``{"ok": false, "error": {"code", "message"[, "hint"]}}``. Streaming ops send any number of
``{"ok": true, "event": "<kind>", "data": ...}`` lines and then ``{"ok": true, "end": true,
"data": ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import EnvctlError, ProtocolError

VERSION = 1
ENCODING = "utf-8"


@dataclass(frozen=True)
class Arg:
    """One argument of an op: accepted JSON types, whether it is required, what it means."""

    types: tuple[type, ...]
    help: str
    required: bool = False
    default: Any = None


@dataclass(frozen=True)
class Op:
    """One operation: who may call it is decided in ``auth``; here only its shape."""

    name: str
    summary: str
    args: dict[str, Arg] = field(default_factory=dict)
    streaming: bool = False  # True when ``follow`` turns the reply into an event stream
    aliases: tuple[str, ...] = ()


_ID = Arg((str, int), "job id, as printed by create/list", required=True)
_FOLLOW = Arg((bool,), "stream events until the job ends instead of replying once", default=False)

OPS: dict[str, Op] = {op.name: op for op in (
    Op("ping", "Liveness check; replies {pong, version, protocol}. Anyone who can connect."),
    Op("version", "Daemon and protocol version. Anyone who can connect."),
    Op("whoami", "Your identity as the kernel reports it, your claim, and what you may do."),
    Op("status", "Daemon status: roots, watch modes, healer counters, job counts, uptime. "
       "Anyone who can connect (used by readiness probes).", aliases=("daemon-status",)),
    Op("create", "Queue an environment build (requires allow_users/allow_groups or admin).", {
        "name": Arg((str,), "environment name, ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", required=True),
        "spec": Arg((str,), "environment.yml text (name/channels/dependencies)", required=True),
        "backend": Arg((str,), "one of requests.allowed_backends; default requests.backend"),
        "replace": Arg((bool,), "replace an existing environment of that name once the new "
                       "one is built", default=False),
        "claimed_user": Arg((str,), "who the client says it acts for (e.g. JUPYTERHUB_USER); "
                            "recorded, never trusted"),
        "follow": _FOLLOW,
    }, streaming=True),
    Op("get", "One job (state, phase, prefix, exit detail). Own jobs; everyone's for "
       "requesters and admins.", {"id": _ID}),
    Op("list", "Jobs: your own by default; everyone's with all=true (requesters and admins).", {
        "all": Arg((bool,), "include other users' jobs", default=False),
        "finished": Arg((bool,), "include finished jobs", default=False),
    }),
    Op("logs", "Build log bytes from an offset; with follow, stream until the job ends.", {
        "id": _ID,
        "offset": Arg((int,), "byte offset to start from", default=0),
        "follow": _FOLLOW,
    }, streaming=True),
    Op("cancel", "Cancel a queued or running job: your own; admins any.", {"id": _ID}),
)}
_BY_NAME: dict[str, Op] = {alias: op for op in OPS.values() for alias in (op.name, *op.aliases)}


@dataclass(frozen=True)
class Request:
    """A request that passed framing, version and argument checks (defaults filled in)."""

    op: Op
    args: dict[str, Any]


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line. ``ensure_ascii`` keeps every line valid whatever the log bytes were."""
    return (json.dumps(message, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


def ok(data: Any) -> dict[str, Any]:
    return {"ok": True, "data": data}


def event(kind: str, data: Any) -> dict[str, Any]:
    return {"ok": True, "event": kind, "data": data}


def end(data: Any) -> dict[str, Any]:
    return {"ok": True, "end": True, "data": data}


def error(err: EnvctlError) -> dict[str, Any]:
    return {"ok": False, "error": err.to_dict()}


def request(op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The message a client sends (``args`` without ``None`` values)."""
    return {"v": VERSION, "op": op, "args": {k: v for k, v in (args or {}).items()
                                             if v is not None}}


def parse_request(line: bytes) -> Request:
    """Decode and check one request line; every problem is a ProtocolError a user can act on."""
    try:
        msg = json.loads(line.decode(ENCODING))
    except UnicodeDecodeError:
        raise ProtocolError("request is not UTF-8 text",
                            hint="send one JSON object per line, see docs/protocol.md") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"request is not valid JSON: {exc.msg} at column {exc.colno}",
                            hint="send one JSON object per line, see docs/protocol.md") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"request must be a JSON object, not {type(msg).__name__}")
    unknown = sorted(set(msg) - {"v", "op", "args"})
    if unknown:
        raise ProtocolError(f"unknown request field {unknown[0]!r}",
                            hint="a request has only v, op and args")
    if msg.get("v") != VERSION or isinstance(msg.get("v"), bool):
        raise ProtocolError(f"unsupported protocol version {msg.get('v')!r}; this daemon "
                            f"speaks version {VERSION}",
                            hint="use an envctl client of the same release as the daemon")
    name = msg.get("op")
    op = _BY_NAME.get(name) if isinstance(name, str) else None
    if op is None:
        raise ProtocolError(f"unknown op {name!r}",
                            hint=f"known ops: {', '.join(sorted(OPS))}")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(f"{op.name}: args must be a JSON object")
    return Request(op, _check_args(op, args))


def _check_args(op: Op, args: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in args:
        if key not in op.args:
            known = ", ".join(sorted(op.args)) or "none"
            raise ProtocolError(f"{op.name}: unknown argument {key!r} (known: {known})")
    for key, spec in op.args.items():
        value = args.get(key)
        if value is None:
            if spec.required:
                raise ProtocolError(f"{op.name}: argument {key!r} is required")
            out[key] = spec.default
            continue
        if isinstance(value, bool) and bool not in spec.types or \
                not isinstance(value, spec.types):
            want = " or ".join(t.__name__ for t in spec.types)
            raise ProtocolError(f"{op.name}: argument {key!r} must be {want}, "
                                f"not {type(value).__name__}")
        out[key] = value
    return out


def reference() -> str:
    """The op table as Markdown: the reference section of docs/protocol.md."""
    lines = []
    for op in OPS.values():
        alias = f" (alias: {', '.join(op.aliases)})" if op.aliases else ""
        lines.append(f"### `{op.name}`{alias}\n\n{op.summary}\n")
        for key, spec in op.args.items():
            kind = "|".join(t.__name__ for t in spec.types)
            need = "required" if spec.required else f"default {json.dumps(spec.default)}"
            lines.append(f"- `{key}` ({kind}, {need}): {spec.help}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference())
