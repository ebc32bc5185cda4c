"""Formatting shared by every command: JSON for scripts, short aligned text for people."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from ..errors import EnvctlError

# quote_name lives at the bottom of the stack (the daemon's logs use it too); commands import it
# from here.
from ..quoting import quote_name  # noqa: F401

_emitted = False  # a JSON document was printed by this process (see ``json_emitted``)


def emit_json(data: Any, stream: TextIO | None = None) -> None:
    """One JSON document per command (``--json``): stable keys, sorted, newline-terminated.

    ASCII only: a name's byte that is not UTF-8 (decoded with surrogateescape) is written as
    the lone surrogate ``\\udcXX``, which ``json.loads`` + ``os.fsencode`` turn back into
    the exact bytes."""
    global _emitted
    out = stream or sys.stdout
    out.write(json.dumps(data, sort_keys=True) + "\n")
    out.flush()
    _emitted = True


def json_emitted() -> bool:
    """Whether this process printed a JSON document already: ``--json`` promises one."""
    return _emitted


# The hint for an error raised without one (by code): true for every error of that code, so a
# user is never left with a bare message. Raisers should still give a more precise one.
DEFAULT_HINTS = {
    "usage": "run 'envctl --help'",
    "config-invalid": "fix the configuration file as the message says",
    "invalid-request": "change the request as the message says; 'envctl request create --help'",
    "not-found": "list what exists: 'envctl request list --finished', 'envctl env list'",
    "conflict": "wait for the other operation on that name to end ('envctl request list'), "
                "then retry",
    "limit-reached": "wait for one of your jobs to end, or cancel one ('envctl request list')",
    "not-authorised": "ask an envctl administrator ('envctl whoami' shows what you may do)",
    "permission-denied": "run it as a user the kernel allows (the message says what is "
                         "missing), or as root",
    "socket-permission-denied": "ask an administrator to add you to the socket's group",
    "socket-untrusted": "check --socket / ENVCTL_SOCKET, and tell an administrator",
    "daemon-unavailable": "check the daemon: 'envctl status', 'systemctl status envctld'",
    "extension-missing": "reinstall with a C compiler and python3-dev present",
    "protocol-error": "the CLI and the daemon may be of different versions: compare "
                      "'envctl --version' with 'envctl status'",
    "build-failed": "find the job with 'envctl request list --finished', then read its log "
                    "with 'envctl request logs' and its id",
    "filesystem-error": "check the path and its owner, group and mode: 'namei -l PATH'",
    "area-untrusted": "tell an administrator: 'envctl status' says what is wrong with the "
                      "daemon's area and how to fix it",
    "not-supported": "compare 'envctl --version' with 'envctl status': the daemon is older",
}
GENERIC_HINT = "re-run with --debug for details"


def hint_of(err: EnvctlError) -> str:
    """The error's own hint, else the one that is true of its kind."""
    return err.hint or DEFAULT_HINTS.get(err.code, GENERIC_HINT)


def error_document(err: EnvctlError) -> dict[str, Any]:
    """The one JSON document an error is for scripts (the CLI's ``--json``, the web API)."""
    return {"ok": False, "exit_code": err.exit_code,
            "error": {**err.to_dict(), "hint": hint_of(err)}}


def emit_error(err: EnvctlError, as_json: bool) -> None:
    """An error as the one JSON document of ``--json`` (on stdout, where a script reads:
    ``{"ok": false, "exit_code", "error": {"code", "message", "hint"}}``), or as text."""
    if as_json:
        emit_json(error_document(err))
    else:
        print_error(err)


def print_error(err: EnvctlError, stream: TextIO | None = None) -> None:
    """``envctl: error: <message>`` and ``  hint: <hint>`` (every error has one)."""
    out = stream or sys.stderr
    out.write(f"envctl: error: {err.message}\n")
    out.write(f"  hint: {hint_of(err)}\n")


def local_time(ts: object) -> str:
    """A time for people: their local time with the zone's name (a team spans zones, and a
    daemon's log is in UTC); ``-`` when there is none."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A plain left-aligned table (no colours, no box drawing: it ends up in emails and logs)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
