"""One error hierarchy for the whole project.

Every failure a user or an admin can meet is an :class:`EnvctlError` with a stable kebab-case
``code``, a one-line ``message``, an optional ``hint`` saying what to do about it, and the process
``exit_code`` the CLI returns for it. The same object is serialised as the socket protocol's error
envelope (``to_dict``) and rebuilt on the client side (``from_dict``), so a daemon-side refusal
reaches the user with the same words and the same exit code. Exit codes follow sysexits(3) where
one fits, so scripts can tell "fix your input" from "the daemon is down".
"""

from __future__ import annotations

from typing import Any, ClassVar

# sysexits(3) values used across the CLI.
EX_OK = 0
EX_FAILURE = 1  # the operation ran and found/produced a failure (violations, failed build)
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78


class EnvctlError(Exception):
    """Base of every error envctl reports on purpose (anything else is a bug)."""

    code: ClassVar[str] = "error"
    exit_code: ClassVar[int] = EX_FAILURE

    def __init__(self, message: str, hint: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.context = context

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The protocol's error object: ``{"code", "message"[, "hint"][, "context"]}``."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        if self.context:
            out["context"] = self.context
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> EnvctlError:
        """Rebuild the error a daemon sent, as the matching class when the code is known."""
        code = str(data.get("code", "error"))
        cls = _BY_CODE.get(code, EnvctlError)
        err = cls(str(data.get("message", "unknown error")), data.get("hint"),
                  **dict(data.get("context") or {}))
        if cls is EnvctlError:
            err.code = code  # type: ignore[misc]  # keep an unknown code verbatim
        return err


class UsageError(EnvctlError):
    """The command line itself is wrong."""

    code = "usage"
    exit_code = EX_USAGE


class ConfigError(EnvctlError):
    """The configuration file cannot be used; the message names the file and the key."""

    code = "config-invalid"
    exit_code = EX_CONFIG


class ValidationError(EnvctlError):
    """A request (env name, spec, parameters) is malformed or not allowed by policy."""

    code = "invalid-request"
    exit_code = EX_DATAERR


class NotFound(EnvctlError):
    """A job, path or environment that was named does not exist."""

    code = "not-found"
    exit_code = EX_DATAERR


class Conflict(EnvctlError):
    """The request clashes with existing state (env exists, a build of that name is running)."""

    code = "conflict"
    exit_code = EX_TEMPFAIL


class LimitReached(EnvctlError):
    """A requester already has as many jobs queued or running as one may
    (``requests.max_queued_per_user``): try again when one has ended."""

    code = "limit-reached"
    exit_code = EX_TEMPFAIL


class NotAuthorised(EnvctlError):
    """The daemon knows who you are, and policy says no."""

    code = "not-authorised"
    exit_code = EX_NOPERM


class PermissionDenied(EnvctlError):
    """Something the kernel would refuse you for want of permission (a chgrp to a group you are
    not in, a directory you cannot write), found before anything was changed."""

    code = "permission-denied"
    exit_code = EX_NOPERM


class SocketPermissionDenied(EnvctlError):
    """The kernel refused to let us connect to the socket (mode/group of the socket file)."""

    code = "socket-permission-denied"
    exit_code = EX_NOPERM


class UntrustedSocket(EnvctlError):
    """The socket is served by a uid that cannot be the daemon (neither root nor the owner of
    the socket's directory); nothing was sent to it. Client-side only. Exit 77 like the
    kernel's refusal of the socket: retrying does not help, an administrator has to look."""

    code = "socket-untrusted"
    exit_code = EX_NOPERM


class DaemonUnavailable(EnvctlError):
    """No daemon is listening on the socket."""

    code = "daemon-unavailable"
    exit_code = EX_UNAVAILABLE


class ExtensionMissing(EnvctlError):
    """The healer's C extension was not built with this install (no compiler at install time):
    ``heal``/``check`` cannot run, the commands that talk to the daemon still do."""

    code = "extension-missing"
    exit_code = EX_UNAVAILABLE


class ProtocolError(EnvctlError):
    """A peer sent something that is not a valid protocol message."""

    code = "protocol-error"
    exit_code = EX_PROTOCOL


class BuildFailed(EnvctlError):
    """An environment build ended in failure, cancellation or interruption."""

    code = "build-failed"
    exit_code = EX_FAILURE


class FilesystemError(EnvctlError):
    """A path the user named cannot be used (missing, not a directory, unreadable)."""

    code = "filesystem-error"
    exit_code = EX_IOERR


_BY_CODE: dict[str, type[EnvctlError]] = {
    cls.code: cls
    for cls in (UsageError, ConfigError, ValidationError, NotFound, Conflict, LimitReached,
                NotAuthorised, PermissionDenied, UntrustedSocket,
                SocketPermissionDenied, DaemonUnavailable, ProtocolError, BuildFailed,
                FilesystemError)
}


class NotSupported(EnvctlError):
    """The daemon does not know an operation a client asked for (a daemon of an older release
    than the web service or CLI): a page hides what needs it."""

    code = "not-supported"
    exit_code = EX_UNAVAILABLE


_BY_CODE[NotSupported.code] = NotSupported


class AreaUntrusted(FilesystemError):
    """The daemon's own area in the requests root (``<root>/.envctl``) is not the daemon's (a
    member made it before the daemon did, a symlink, writable by everyone): the daemon uses
    nothing in it and refuses every request that needs it until an admin fixes it. Its
    ``context`` holds ``path`` and ``problem``, its hint the fix (``status``'s ``area``)."""

    code = "area-untrusted"
    exit_code = EX_UNAVAILABLE


_BY_CODE[AreaUntrusted.code] = AreaUntrusted
