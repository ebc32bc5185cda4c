"""The wire protocol: the op table, JSON-lines framing, envelopes and argument checking.

Why this shape: one JSON object per line is trivially debuggable (``socat``, ``nc -U``), needs
no schema compiler, and can be parsed safely from an untrusted peer with the stdlib — never
pickle, never eval. The op table below is the single source of truth: the server dispatches
from it, it validates every request's arguments before any handler sees them, and ``python -m
envctl_shared.api.protocol`` prints it as the reference in ``docs/protocol.md``.

Every request is untrusted: decoding is bounded (nesting depth, integer length, no NaN), every
string argument must be valid Unicode, every argument is checked for type *and* range before a
handler sees it (a job id is a short word, a log offset fits a file offset), and values are
quoted in messages through :func:`~envctl_shared.untrusted.brief`. Whatever a peer sends, the
answer is a ``protocol-error`` naming the problem, never an internal error.

Request: ``{"v": 1, "op": "<op>", "args": {...}[, "hub_token": "..."]}`` (``hub_token``: the
caller's ``JUPYTERHUB_API_TOKEN``, checked with the hub by the daemon; see ``hub``). Replies:
``{"ok": true, "data": ...}`` or ``{"ok": false, "error": {"code", "message"[, "hint"]}}``.
Streaming ops send any number of ``{"ok": true, "event": "<kind>", "data": ...}`` lines and then
``{"ok": true, "end": true,
"data": ...}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..errors import EnvctlError, ProtocolError, ValidationError
from ..names import ENV_NAME_RE, env_name_problem
from ..untrusted import brief

VERSION = 1
ENCODING = "utf-8"
MAX_INT_DIGITS = 20  # every integer the protocol uses fits (offsets < 2**53, ids, v)
MAX_OFFSET = 2**53 - 1  # the largest integer every JSON implementation represents exactly
_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HINT = "send one JSON object per line, see docs/protocol.md"
MAX_TOKEN = 512
_TOKEN_RE = re.compile(rf"[A-Za-z0-9._~+/=-]{{8,{MAX_TOKEN}}}")
FIELDS = ("v", "op", "args", "hub_token")


@dataclass(frozen=True)
class Arg:
    """One argument of an op: accepted JSON types, whether it is required, what it means."""

    types: tuple[type, ...]
    help: str
    required: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None  # a problem with the value, or None

    def takes_type(self, value: object) -> bool:
        """Whether ``value`` is of an accepted JSON type (a bool is no int here)."""
        return isinstance(value, self.types) and (bool in self.types
                                                  or not isinstance(value, bool))

    def problem(self, value: object) -> str | None:
        """What is wrong with ``value`` (of an accepted type), or None: the one check of an
        argument, asked by the daemon of every request and by a client before it sends one."""
        return _unicode_problem(value) or (self.check(value) if self.check else None)


def _job_id(value: str | int) -> str | None:
    if isinstance(value, int):
        return None if value >= 0 else "must not be negative"
    return None if _WORD_RE.fullmatch(value) else \
        "must be 1-64 letters, digits, '.', '_' or '-' (a job id as printed by create/list)"


def _offset(value: int) -> str | None:
    return None if 0 <= value <= MAX_OFFSET else f"must be between 0 and {MAX_OFFSET}"


def _word(value: str) -> str | None:
    return None if _WORD_RE.fullmatch(value) else "must be 1-64 letters, digits, '.', '_' or '-'"


def _commands(value: list[Any]) -> str | None:
    """Command lines: each a string of valid Unicode (their limits are the daemon's policy)."""
    if not all(isinstance(v, str) for v in value):
        return "must be a list of strings"
    return next(("must hold valid Unicode only" for v in value if _unicode_problem(v)), None)


class Access(str, Enum):
    """Who may call an op: declared per op below, enforced by ``auth.Authoriser.check`` alone.
    Admins may do everything but what needs no identity at all; the table in docs/protocol.md
    is generated from :data:`ACCESS_DOCS`."""

    ANYONE = "anyone"
    SELF = "self"
    VERIFIED = "verified"
    JOB_READER = "job reader"
    REQUESTER = "requester"
    JOB_OWNER = "job owner"
    ENV_OWNER = "env owner"
    ADMIN = "admin"

    @property
    def identified(self) -> bool:
        """The caller's identity is used: on a shared uid, the hub is asked about its token."""
        return self is not Access.ANYONE

    @property
    def needs_token(self) -> bool:
        """A peer on a shared uid must send a hub token (its identity decides)."""
        return self not in (Access.ANYONE, Access.SELF)

    @property
    def changes(self) -> bool:
        """The op changes something: the hub is asked again, whatever it said before."""
        return self in (Access.REQUESTER, Access.JOB_OWNER, Access.ENV_OWNER, Access.ADMIN)

    @property
    def target(self) -> str | None:
        """What the decision also needs, known only to the handler: a job, or the owner of an
        environment (read under the name's lock where it can change)."""
        return {Access.JOB_READER: "job", Access.JOB_OWNER: "job",
                Access.ENV_OWNER: "env"}.get(self)


ACCESS_DOCS = {
    Access.ANYONE: "anyone who can connect; no identity is used, so the hub is never asked "
                   "(answers while the hub is down)",
    Access.SELF: "anyone who can connect; the answer is about the caller (a hub token sent "
                 "is verified, none is needed)",
    Access.VERIFIED: "anyone whose identity is known (on a shared uid: a verified hub user); "
                     "each sees their own",
    Access.JOB_READER: "the job's owner, requesters and admins",
    Access.REQUESTER: "requesters and admins",
    Access.JOB_OWNER: "the job's owner and admins",
    Access.ENV_OWNER: "the environment's owner (a requester: the requester of its first "
                      "version) and admins; one envctl did not build: admins",
    Access.ADMIN: "admins",
}


@dataclass(frozen=True)
class Op:
    """One operation: its shape, and who may call it (``access``; ``action``: what a refusal
    says may not be done, "it" being the target of a job or env access; ``escalate``: a
    boolean argument that, when true, asks for another access and action)."""

    name: str
    summary: str
    args: dict[str, Arg] = field(default_factory=dict)
    streaming: bool = False  # True when ``follow`` turns the reply into an event stream
    aliases: tuple[str, ...] = ()
    access: Access = Access.ANYONE
    action: str = ""
    escalate: dict[str, tuple[Access, str]] = field(default_factory=dict)
    hint: str | None = None  # what a refused caller can do instead, when there is something

    def access_for(self, args: dict[str, Any]) -> tuple[Access, str]:
        """The access these arguments ask for, and the action a refusal names."""
        return next((more for key, more in self.escalate.items() if args.get(key)),
                    (self.access, self.action))


_ID = Arg((str, int), "job id, as printed by create/list", required=True, check=_job_id)
_FOLLOW = Arg((bool,), "stream events until the job ends instead of replying once", default=False)
_ENV = Arg((str,), "environment name", required=True, check=env_name_problem)
_DESCRIPTION = Arg((str,), "what the environment is for: one paragraph of plain text, at most "
                   "500 characters (no control characters); shown in env list, env show and "
                   "its kernel's name; \"\" clears it")
_ENV_VERSION = Arg((str,), "a version (v1, v2, ...)", check=_word)
_TESTS = Arg((list,), "shell command lines (at most 16, each at most 1000 characters) run as "
             "the build user inside the new version, activated, before it is made current; "
             "any failure: not promoted, the job fails", default=(), check=_commands)

OPS: dict[str, Op] = {op.name: op for op in (
    Op("ping", "Liveness check; replies {pong, version, protocol}."),
    Op("version", "Daemon and protocol version."),
    Op("whoami", "How the daemon sees you: uid and groups from the kernel, the hub user (verified "
       "by the hub when your uid is one of jupyterhub.shared_uids), and what you may do.",
       access=Access.SELF),
    Op("status", "Daemon status: roots, watch modes, healer counters, job counts, uptime (used "
       "by readiness probes).", aliases=("daemon-status",)),
    Op("create", "Queue an environment build (requesters: allow_users/allow_groups/"
       "allow_hub_groups); with replace, of an existing environment: its owner.", {
        "name": Arg((str,), f"environment name, ^{ENV_NAME_RE.pattern}$", required=True),
        "spec": Arg((str,), "environment.yml text (name/channels/dependencies)", required=True),
        "backend": Arg((str,), "one of requests.allowed_backends; default requests.backend",
                       check=_word),
        "replace": Arg((bool,), "replace an existing environment of that name once the new "
                       "one is built", default=False),
        "claimed_user": Arg((str,), "who the client says it acts for (e.g. JUPYTERHUB_USER); "
                            "recorded, never trusted (hub users are identified by hub_token)"),
        "follow": _FOLLOW,
        "tests": _TESTS,
        "description": _DESCRIPTION,
    }, streaming=True, access=Access.REQUESTER, action="request environments",
       escalate={"replace": (Access.ENV_OWNER, "replace it")},
       hint="pick another name, or ask its owner or an envctl admin"),
    Op("get", "One job (state, phase, prefix, exit detail).", {"id": _ID},
       access=Access.JOB_READER, action="see it", hint="you may see your own jobs"),
    Op("list", "Jobs: your own by default (on a shared uid: your verified hub user's); "
       "everyone's with all=true (requesters and admins).", {
        "all": Arg((bool,), "include other users' jobs", default=False),
        "finished": Arg((bool,), "include finished jobs", default=False),
    }, access=Access.VERIFIED, escalate={"all": (Access.REQUESTER, "list everyone's jobs")},
       hint="drop --all to see your own jobs"),
    Op("logs", "Build log bytes from an offset; with follow, stream until the job ends.", {
        "id": _ID,
        "offset": Arg((int,), f"byte offset to start from (0 to {MAX_OFFSET})", default=0,
                      check=_offset),
        "follow": _FOLLOW,
    }, streaming=True, access=Access.JOB_READER, action="read its log",
       hint="you may read your own jobs' logs"),
    Op("cancel", "Cancel a queued or running job (its owner: the same uid and, on a shared "
       "uid, the same verified hub user).", {"id": _ID}, access=Access.JOB_OWNER,
       action="cancel it", hint="ask an envctl admin"),
    Op("kernels-sync", "Rewrite the kernelspec of every environment in the root that has "
       "ipykernel (hand-made ones included) and remove those of environments that have none "
       "or are gone; replies {written, removed, skipped}.", access=Access.ADMIN,
       action="rewrite the kernelspecs",
       hint="ask an administrator to run 'envctl kernels sync'"),
    # environments: versions behind the stable path <root>/NAME (see docs/environments.md)
    Op("env-list", "Every environment in the request root: name, status (ready, building, "
       "removed, broken, unmanaged for hand-made ones), current version, backend, owner, when "
       "built, size, kernel."),
    Op("env-show", "One environment with all its versions (current marked): who built each, "
       "when, from which spec and tests, the exact packages installed.", {"name": _ENV}),
    Op("env-diff", "What changed from one version to another (default: from the built "
       "version before `to`, to the current one): packages added, removed and changed (conda "
       "and pip, with the direction: up, down, or other for a rebuild or versions that do not "
       "compare), who built `to`, when and why; replies {name, from, to, added, removed, "
       "changed, by, at, why}.", {"name": _ENV, "from": _ENV_VERSION, "to": _ENV_VERSION}),
    Op("env-describe", "Set (or, with \"\", clear) the environment's description, shown in "
       "env list, env show and its kernel's display name; replies {name, description}.",
       {"name": _ENV, "description": Arg((str,), _DESCRIPTION.help, required=True)},
       access=Access.ENV_OWNER, action="describe it", hint="ask its owner or an envctl admin"),
    Op("env-export", "An environment.yml with exact pins of a version (default: the current "
       "one), which create accepts back; replies {name, version, text}.",
       {"name": _ENV, "version": _ENV_VERSION}),
    Op("env-verify", "Recompute a version's digest (default: the current one) and list every "
       "difference from what was frozen (path: added, removed, type, mode, size, owner, "
       "content, link target); records verified_at and the result in the version's record; "
       "replies {name, version, digest, ok, count, differences}.",
       {"name": _ENV, "version": _ENV_VERSION}),
    Op("env-rollback", "Make an earlier version current again (default: the newest one older "
       "than the current), by one atomic rename.",
       {"name": _ENV, "to": Arg((str,), "the version to make current", check=_word)},
       access=Access.ENV_OWNER, action="roll it back", hint="ask its owner or an envctl admin"),
    Op("env-remove", "The name disappears at once (atomically); its versions are removed by "
       "GC after requests.gc_grace.", {"name": _ENV}, access=Access.ENV_OWNER,
       action="remove it", hint="ask its owner or an envctl admin"),
    Op("env-add", "A new version of an environment: the current version's spec (as its "
       "record keeps it) with packages added — a package already listed is replaced by the "
       "new entry of the same name —, built, tested (the current version's tests, then "
       "these) and made current: a create with replace (the same checks, queue and limits; "
       "cancel it like any job), refused with conflict when another version became current "
       "meanwhile. Replies (or streams, with follow) like create.", {
        "name": _ENV,
        "packages": Arg((list,), "conda match specs added to dependencies", default=(),
                        check=_commands),
        "pip": Arg((list,), "pip requirements added to the pip: list (created if absent)",
                   default=(), check=_commands),
        "tests": _TESTS,
        "follow": _FOLLOW,
    }, streaming=True, access=Access.ENV_OWNER, action="add packages to it"),
    Op("env-update", "A new version built from the current version's spec unchanged: solved "
       "again, so it takes newer packages where the spec allows them (with every pip entry "
       "pinned and no test to run, a solve that gives exactly the current packages makes no "
       "new version: \"no change\"); otherwise as env-add.",
       {"name": _ENV, "tests": _TESTS, "follow": _FOLLOW},
       streaming=True, access=Access.ENV_OWNER, action="update it"),
    Op("env-gc", "Remove versions that are neither current nor among the newest "
       "requests.keep_versions and stopped being current over requests.gc_grace ago, and "
       "what dead builds left; replies {removed, skipped, ...}.",
       {"dry_run": Arg((bool,), "only say what would be removed", default=False)},
       access=Access.ADMIN, action="run the environment GC",
       hint="the daemon runs it every requests.gc_interval seconds; 'envctl env list' shows "
            "what is kept"),
)}
_BY_NAME: dict[str, Op] = {alias: op for op in OPS.values() for alias in (op.name, *op.aliases)}


@dataclass(frozen=True)
class Request:
    """A request that passed framing, version and argument checks (defaults filled in)."""

    op: Op
    args: dict[str, Any]
    hub_token: str | None = field(default=None, repr=False)  # a secret: never shown


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


def request(op: str, args: dict[str, Any] | None = None,
            hub_token: str | None = None) -> dict[str, Any]:
    """The message a client sends (``args`` without ``None`` values; ``hub_token`` only when
    there is one, so a client outside JupyterHub sends what older daemons understand).

    A value that fails its argument's check is what a user typed (a job id, an env name):
    ValidationError here (exit 65) — the daemon's refusal of it is a protocol error, whose
    hint is about client and daemon versions."""
    msg: dict[str, Any] = {"v": VERSION, "op": op,
                           "args": {k: v for k, v in (args or {}).items() if v is not None}}
    known = _BY_NAME.get(op)
    for key, value in msg["args"].items():
        spec = known.args.get(key) if known is not None else None
        if spec is None or spec.check is None or not spec.takes_type(value):
            continue  # the daemon's to refuse: no value a user types
        problem = spec.problem(value)
        if problem:
            raise ValidationError(f"argument {key!r} {problem}, not {brief(value)}",
                                  hint=f"{key}: {spec.help}; check it for a typo")
    if hub_token:
        msg["hub_token"] = hub_token
    return msg


def parse_request(line: bytes) -> Request:
    """Decode and check one request line; every problem is a ProtocolError a user can act on."""
    try:
        msg = json.loads(line.decode(ENCODING), parse_int=_parse_int,
                         parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ProtocolError("request is not UTF-8 text", hint=_HINT) from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"request is not valid JSON: {exc.msg} at column {exc.colno}",
                            hint=_HINT) from None
    except RecursionError:
        raise ProtocolError("request is not acceptable JSON: nested too deeply",
                            hint=_HINT) from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"request must be a JSON object, not {type(msg).__name__}")
    unknown = sorted(set(msg) - set(FIELDS))
    if unknown:
        raise ProtocolError(f"unknown request field {brief(unknown[0])}",
                            hint="a request has only v, op, args and hub_token")
    if msg.get("v") != VERSION or isinstance(msg.get("v"), bool):
        raise ProtocolError(f"unsupported protocol version {brief(msg.get('v'))}; this daemon "
                            f"speaks version {VERSION}",
                            hint="use an envctl client of the same release as the daemon")
    name = msg.get("op")
    op = _BY_NAME.get(name) if isinstance(name, str) else None
    if op is None:
        raise ProtocolError(f"unknown op {brief(name)}",
                            hint=f"known ops: {', '.join(sorted(OPS))}")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(f"{op.name}: args must be a JSON object")
    token = msg.get("hub_token")
    problem = None if token is None else check_token(token)
    if problem:
        raise ProtocolError(f"hub_token {problem}",
                            hint="send the JUPYTERHUB_API_TOKEN of your JupyterHub server")
    return Request(op, _check_args(op, args), token)


def check_token(value: object) -> str | None:
    """What is wrong with a ``hub_token`` value, or None. The message never quotes the value:
    it may be a real token sent to the wrong place."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not _TOKEN_RE.fullmatch(value):
        return (f"must be 8-{MAX_TOKEN} letters, digits or ._~+/=- characters "
                "(a JupyterHub API token)")
    return None


def _parse_int(digits: str) -> int:
    """JSON integers, bounded before conversion (Python refuses > 4300 digits with a
    ValueError, and a long one costs quadratic time to convert)."""
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError(f"request is not acceptable JSON: a number has more than "
                            f"{MAX_INT_DIGITS} digits", hint=_HINT)
    return int(digits)


def _no_constant(name: str) -> Any:
    """Python's json accepts NaN and Infinity; JSON does not, and neither do we."""
    raise ProtocolError(f"request is not valid JSON: {name} is not a JSON value", hint=_HINT)


def _check_args(op: Op, args: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in args:
        if key not in op.args:
            known = ", ".join(sorted(op.args)) or "none"
            raise ProtocolError(f"{op.name}: unknown argument {brief(key)} (known: {known})")
    for key, spec in op.args.items():
        value = args.get(key)
        if value is None:
            if spec.required:
                raise ProtocolError(f"{op.name}: argument {key!r} is required")
            out[key] = spec.default
            continue
        if not spec.takes_type(value):
            want = " or ".join(t.__name__ for t in spec.types)
            raise ProtocolError(f"{op.name}: argument {key!r} must be {want}, "
                                f"not {type(value).__name__}")
        problem = spec.problem(value)
        if problem:
            raise ProtocolError(f"{op.name}: argument {key!r} {problem}, not {brief(value)}")
        out[key] = value
    return out


def _unicode_problem(value: object) -> str | None:
    """JSON's ``\\ud800`` escapes decode to lone surrogates: text no file, log line or SQLite
    column can hold."""
    if isinstance(value, str):
        try:
            value.encode(ENCODING)
        except UnicodeEncodeError:
            return "must be valid Unicode (it holds a lone surrogate such as \\ud800)"
    return None


def access_text(op: Op) -> str:
    """Who may call ``op``: its access level, and those its arguments escalate to."""
    more = "".join(f"; with `{key}`: {access.value}"
                   for key, (access, _) in op.escalate.items())
    return f"{op.access.value}{more}"


def reference() -> str:
    """The op table as Markdown: the reference section of docs/protocol.md (the access levels,
    the access of each op, then each op)."""
    lines = ["Access levels (declared per op in `api/protocol.py`, enforced by "
             "`api/auth.py`'s `Authoriser.check` alone):", ""]
    lines += [f"- `{access.value}`: {text}" for access, text in ACCESS_DOCS.items()]
    lines += ["", "| op | access |", "|---|---|"]
    lines += [f"| `{op.name}` | {access_text(op)} |" for op in OPS.values()]
    lines.append("")
    for op in OPS.values():
        alias = f" (alias: {', '.join(op.aliases)})" if op.aliases else ""
        lines.append(f"### `{op.name}`{alias}\n\n{op.summary}\n\nAccess: "
                     f"{access_text(op)}.\n")
        for key, spec in op.args.items():
            kind = "|".join(t.__name__ for t in spec.types)
            need = "required" if spec.required else f"default {json.dumps(spec.default)}"
            lines.append(f"- `{key}` ({kind}, {need}): {spec.help}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference())
