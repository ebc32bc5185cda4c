"""``envctl request ...``: ask the daemon to build an environment, and follow, list or cancel it.

Why the CLI does so little: the daemon validates, authorises and builds; this module only sends
the protocol and formats what comes back (``--json`` prints the daemon's data as it is). Exit
codes carry the outcome so scripts need not parse text: ``create`` (when it waits) and
``status`` exit 0 for a job that succeeded or is still on its way, 1 (BuildFailed) for one that
failed, was cancelled or was interrupted; refusals keep their own codes (65 invalid request,
75 conflict, 77 not authorised or socket permission, 69 daemon not running).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from datetime import datetime
from typing import Any

from ..errors import EX_OK, BuildFailed, FilesystemError, UsageError, ValidationError
from ..quoting import quote_name, quote_text
from .output import emit_json, local_time, table
from .status_cmd import add_socket_option, client_for

_ID_HELP = "job id, or a unique prefix of it (at least 4 digits)"
CLAIM_ENV = "JUPYTERHUB_USER"  # on JupyterHub every user is uid jovyan; this says who it is
_FAILED = ("failed", "cancelled", "interrupted")


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("request", help="ask the daemon to build shared environments",
                              description="Environment builds performed by the envctl daemon.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True

    c = sub.add_parser("create", help="build an environment from an environment.yml",
                       description="Queue a build, then follow it until it ends (exit 0 on "
                       "success, printing the prefix and how to activate it).")
    c.add_argument("name", help="environment name (letters, digits, . _ -)")
    c.add_argument("-f", "--file", required=True, metavar="FILE",
                   help="environment.yml (name/channels/dependencies; '-' reads stdin)")
    c.add_argument("--backend", help="build backend, if the daemon allows choosing one")
    c.add_argument("--replace", action="store_true",
                   help="replace an existing environment of that name once the new one is built")
    c.add_argument("--test", action="append", default=[], metavar="CMD", dest="tests",
                   help="a shell command the new version must pass before it is made current "
                        "(run inside it, activated, as the build user; repeatable)")
    c.add_argument("--description", metavar="TEXT",
                   help="what the environment is for (one paragraph, at most 500 "
                        "characters): shown in 'env list', 'env show' and its kernel's name; "
                        "with --replace, the new one")
    c.add_argument("--no-wait", action="store_true", help="print the job id and return")
    c.add_argument("--json", action="store_true", help="print the job as JSON")
    c.set_defaults(func=run_create)

    s = sub.add_parser("status", help="show one job (exit 1 if it failed)",
                       description="Show one job: state, phase, requester, times (in your "
                       "time zone), prefix. Exit 0 when it succeeded or is on its way, 1 when it "
                       "failed, was cancelled or was interrupted.")
    s.add_argument("id", help=_ID_HELP)
    s.add_argument("--json", action="store_true", help="print the job as JSON")
    s.set_defaults(func=run_status)

    ls = sub.add_parser("list", help="list your jobs (or everyone's with --all)",
                        description="List your queued and running jobs, oldest first; "
                        "--finished adds finished ones, --all shows everyone's (requesters and "
                        "admins). Times are in your time zone.")
    ls.add_argument("--all", action="store_true", help="everyone's jobs (requesters and admins)")
    ls.add_argument("--finished", action="store_true", help="include finished jobs")
    ls.add_argument("--json", action="store_true", help="print the jobs as JSON")
    ls.set_defaults(func=run_list)

    lg = sub.add_parser("logs", help="print a job's build log",
                        description="Print a job's build log (your own jobs; requesters and "
                        "admins: anyone's); -f keeps following it until the job ends. On a "
                        "terminal, control characters other than newline and tab are shown "
                        "escaped (\\033, \\r...); redirected, the log is written exactly.")
    lg.add_argument("id", help=_ID_HELP)
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until it ends")
    lg.add_argument("--json", action="store_true",
                    help="print the log so far as one JSON document: {text, offset} (not with "
                    "-f)")
    lg.set_defaults(func=run_logs)

    x = sub.add_parser("cancel", help="cancel a queued or running job (yours; admins any)",
                       description="Cancel a queued job, or stop a running build (its "
                       "processes are killed and nothing of it is kept). Yours only; admins "
                       "may cancel any.")
    x.add_argument("id", help=_ID_HELP)
    x.add_argument("--json", action="store_true", help="print the job as JSON")
    x.set_defaults(func=run_cancel)

    for parser in (c, s, ls, lg, x):
        add_socket_option(parser)


# The most of a spec file the CLI reads. The daemon's own limits (requests.max_spec_bytes,
# max_request_bytes: 64 KiB and 256 KiB by default) are not known here, so this is generous;
# what it prevents is reading -f /dev/zero (or an endless pipe) until memory runs out.
MAX_SPEC_FILE = 1 << 20


def _read_spec(path: str) -> str:
    """The spec file (``-``: stdin) as text, read up to MAX_SPEC_FILE + 1 bytes only: one more
    than the cap tells a file that is too large without reading the rest of it."""
    shown = "standard input" if path == "-" else quote_name(path)
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_SPEC_FILE + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_SPEC_FILE + 1)
        if len(data) > MAX_SPEC_FILE:
            raise ValidationError(f"{shown} is too large for an environment file "
                                  f"(more than {MAX_SPEC_FILE >> 20} MiB)",
                                  hint="pass -f with the environment.yml (a few KiB)")
        # text as read_text() gives it: UTF-8, universal newlines
        return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise FilesystemError(f"cannot read {shown}: {reason}",
                              hint="pass -f with a readable environment.yml") from None


def run_create(args: argparse.Namespace) -> int:
    spec = _read_spec(args.file)
    return queue(args, "create", {
        "name": args.name, "spec": spec, "backend": args.backend, "replace": args.replace,
        "claimed_user": os.environ.get(CLAIM_ENV) or None, "tests": args.tests or None,
        "description": args.description})


def queue(args: argparse.Namespace, op: str, request: dict[str, Any]) -> int:
    """Send ``op`` (a build: ``create``, ``env-add``...), then print the job id and return
    (``--no-wait``), or follow it to its end and exit with its outcome."""
    if args.no_wait:
        with client_for(args) as client:
            queued = client.call(op, **request)
        if args.json:
            emit_json(with_iso_times(queued))
        else:
            print(queued["id"])
            print(f"queued {queued['name']} ({queued['backend']}); follow with: "
                  f"envctl request logs {queued['id']} -f", file=sys.stderr)
        return EX_OK
    # A queued build may stay silent for a long time: no read timeout while following (a dead
    # daemon closes the socket, which ends the stream with DaemonUnavailable).
    job: dict[str, Any] = {}
    with client_for(args, timeout=None) as client:
        for msg in client.stream(op, follow=True, **request):
            job = _progress(msg, job, quiet=args.json)
    return _outcome(job, as_json=args.json)


def _progress(msg: dict[str, Any], job: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Print one stream message for people; return the latest job object."""
    kind, data = msg.get("event"), msg.get("data") or {}
    if msg.get("end"):
        return dict(data or job)
    if kind == "created":
        if not quiet:
            print(data["id"], flush=True)
            print(f"queued {data['name']} ({data['backend']})", file=sys.stderr, flush=True)
        return dict(data)
    if kind == "job":
        if not quiet:
            step = data["state"] + (f": {data['phase']}" if data.get("phase") else "")
            print(f"==> {step}", file=sys.stderr, flush=True)
        return dict(data)
    if kind == "log" and not quiet:
        _show_log(data["text"])
    return job


def _show_log(text: str) -> None:
    """Write build output: on a terminal with its control characters escaped, since whoever
    requested the build wrote it (an escape sequence would retitle, clear or forge the reader's
    screen); redirected, exactly as the daemon stored it."""
    sys.stdout.write(quote_text(text) if sys.stdout.isatty() else text)
    sys.stdout.flush()


def _outcome(job: dict[str, Any], as_json: bool) -> int:
    """Exit 0 and say how to activate on success; BuildFailed (exit 1) otherwise."""
    if as_json:
        emit_json(with_iso_times(job))
    state = job.get("state")
    if state == "succeeded":
        if not as_json:
            prefix = job["prefix"]
            how = (f"source {prefix}/bin/activate" if job.get("backend") == "venv"
                   else f"conda activate {prefix}")
            print(f"environment {job['name']} is ready: {prefix}")
            print(f"activate it with: {how}")
        return EX_OK
    if state in _FAILED:
        detail = f": {job['exit_detail']}" if job.get("exit_detail") else ""
        raise BuildFailed(f"job {job.get('id')} ({job.get('name')}) {state}{detail}",
                          hint=failed_hint(job))
    return EX_OK  # still queued/running (only when following was cut short)


def failed_hint(job: dict[str, Any]) -> str:
    """Where to look, and for a build the daemon's stop interrupted: it never resumes, so it
    must be requested again."""
    log = f"the full log: envctl request logs {job.get('id')}"
    if job.get("state") == "interrupted":
        return f"request it again (envctl request create {job.get('name')} -f FILE); {log}"
    return log


def run_status(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        job = client.call("get", id=args.id)
    if args.json:
        emit_json(with_iso_times(job))
    else:
        print(render_job(job))
    if job["state"] in _FAILED:
        raise BuildFailed(f"job {job['id']} {job['state']}", hint=failed_hint(job))
    return EX_OK


def _requester(job: dict[str, Any]) -> str:
    """The verified hub user when there is one (uid's name otherwise), plus any claim."""
    name = (job.get("requester") or {}).get("name", "?")
    if job.get("hub_user"):
        name = f"{job['hub_user']} (hub, uid {(job.get('requester') or {}).get('uid')})"
    claim = job.get("claimed_user")
    return name + (f" (claims {claim})" if claim and claim != job.get("hub_user") else "")


def render_job(job: dict[str, Any]) -> str:
    who = _requester(job)
    rows = [("id", job["id"]), ("name", job["name"]), ("state", job["state"]),
            ("phase", job.get("phase") or "-"), ("backend", job.get("backend")),
            ("requester", who), ("replace", "yes" if job.get("replace") else "no"),
            ("created", local_time(job.get("created_at"))),
            ("started", local_time(job.get("started_at"))),
            ("finished", local_time(job.get("finished_at"))), ("prefix", job.get("prefix") or "-"),
            ("detail", job.get("exit_detail") or "-")]
    return "\n".join(f"{k + ':':<11}{v}" for k, v in rows)


_TIMES = ("created", "started", "finished")


def with_iso_times(job: dict[str, Any]) -> dict[str, Any]:
    """The job for ``--json``: the daemon's epoch seconds (``created_at``...) as they are, plus
    ``created``/``started``/``finished`` in ISO 8601 with the local UTC offset (or null)."""
    out = dict(job)
    for key in _TIMES:
        ts = job.get(f"{key}_at")
        out[key] = (None if ts is None else
                    datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds"))
    return out


def run_list(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        jobs = client.call("list", all=args.all, finished=args.finished)
    if args.json:
        emit_json([with_iso_times(j) for j in jobs])
        return EX_OK
    if not jobs:
        print("no jobs" + ("" if args.finished else " (--finished shows finished ones)"))
        return EX_OK
    rows = [[j["id"], j["name"], j["state"], j.get("phase") or "-", j["backend"],
             _requester(j),
             local_time(j.get("created_at"))] for j in jobs]
    headers = ["ID", "NAME", "STATE", "PHASE", "BACKEND", "USER", "CREATED"]
    if any(j.get("host") for j in jobs):  # other hosts' jobs (records in the shared root)
        for row, j in zip(rows, jobs):
            row.append(_host(j))
        headers.append("HOST")
    print(table(rows, headers))
    return EX_OK


def _host(job: dict[str, Any]) -> str:
    """Where a job runs: ``-`` for this daemon's own, else the host, marked when it is gone."""
    host = job.get("host")
    if not host:
        return "-"
    return quote_name(host) + (" (gone)" if job.get("host_alive") is False else "")


def run_logs(args: argparse.Namespace) -> int:
    if args.follow:
        if args.json:
            raise UsageError("--json prints one document when the command ends: it cannot "
                             "follow a log", hint="leave out -f for the log so far as JSON, "
                             "or --json to follow it as text")
        with client_for(args, timeout=None) as client:
            for msg in client.stream("logs", id=args.id, follow=True):
                if msg.get("event") == "log":
                    _show_log(msg["data"]["text"])
        return EX_OK
    offset = 0
    texts = []
    with client_for(args) as client:
        while True:
            chunk = client.call("logs", id=args.id, offset=offset)
            if args.json:
                texts.append(chunk["text"])
            else:
                _show_log(chunk["text"])
            if chunk["offset"] == offset:
                break
            offset = chunk["offset"]
    if args.json:
        emit_json({"text": "".join(texts), "offset": offset})
    return EX_OK


def run_cancel(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        job = client.call("cancel", id=args.id)
    if args.json:
        emit_json(with_iso_times(job))
    else:
        print(f"job {job['id']} ({job['name']}): {job['state']}")
    return EX_OK
