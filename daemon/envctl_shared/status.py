"""The daemon's status (the ``status`` op, ``envctl status --json``) as typed records.

Why: the status was a dict built in ``watch.service``, grown in ``daemon.service`` and the API
handler, read by key in the daemon's log lines, ``envctl status`` and ``doctor``, and documented
by hand: a renamed key broke a reader without a word, and the docs drifted. Now each object is a
frozen dataclass. Producers fill its fields, readers use attributes, ``to_dict`` makes the JSON
at the boundary (the wire shape is what it was), ``from_dict`` reads it back on the client (a
key a daemon of another version does not send is None), and :func:`reference` writes the
section of ``docs/protocol.md`` that a test keeps equal to it. A new key is one field here, its
meaning in its ``doc``.

This module imports nothing of the daemon: the CLI reads the status with it at no start-up cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def _doc(text: str, **kw: Any) -> Any:
    """A field and what it means (the docs' column)."""
    return field(metadata={"doc": text}, **kw)


class _Record:
    """``to_dict``/``from_dict`` for the status records."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: object) -> T:
        """The record a daemon sent; keys it did not send are None, unknown keys ignored."""
        src = data if isinstance(data, dict) else {}
        nested = getattr(cls, "_NESTED", {})
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            value = src.get(f.name)
            sub = nested.get(f.name)
            if sub is not None and isinstance(value, list):
                value = [sub.from_dict(v) for v in value if isinstance(v, dict)]
            elif sub is not None and isinstance(value, dict):
                value = sub.from_dict(value)
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class RootStatus(_Record):
    """One watched root, since the daemon started watching it."""

    path: str = _doc("the root")
    mode: str = _doc("how it is watched: `inotify`, `poll`, `rebuilding` joined by `+` "
                     "(`inotify+poll` when this daemon also polls for other hosts' writes, "
                     "`inotify+standby` when another daemon sharing the root does); `starting`, "
                     "or `failed`")
    failure: str | None = _doc("null, or why the root failed (the daemon then exits 70)")
    queue: int = _doc("entries waiting to be healed")
    watches: int | None = _doc("inotify watches held (null in the periodic STATUS= line)")
    watches_needed: int | None = _doc("watches the root needs, one per directory of the last "
                                      "full pass, whatever the mode (0 when configured to "
                                      "poll): what to size `fs.inotify.max_user_watches` by")
    scanned: int = _doc("entries looked at")
    violations: int = _doc("entries found wrong")
    fixed: int = _doc("entries changed (at most the violations)")
    fixed_by: dict[str, int] = _doc("writes that took, by `group`/`mode` (a wrong group and a "
                                    "wrong mode are two writes to one entry)")
    skipped: dict[str, int] = _doc("entries left alone, per reason: `protected`, `mount`, "
                                   "`special`, `excluded`, `vanished`...")
    errors: int = _doc("entries that could not be read or fixed")
    events: int = _doc("inotify events read")
    echoes: int = _doc("queued entries found already compliant (mostly the events of our own "
                       "fixes: one `lstat`, no write)")
    overflows: int = _doc("inotify queue overflows (each ends in a rebuild and a reconcile)")
    rebuilds: int = _doc("inotify watches rebuilt (after an overflow, a resync or an error)")
    watch_errors: int = _doc("exceptions in the watch layer (reader, rebuilds, this root's "
                             "threads)")
    poll_dirs: int = _doc("directories in the poller's table (0 without a poller)")
    poll_passes: int = _doc("poll passes run by this daemon")
    last_poll_duration: float | None = _doc("seconds the last poll pass took")
    full_passes: int = _doc("full reconciles (at start, after losses, every "
                            "`watch.full_scan_interval`)")
    last_full_pass: float | None = _doc("when the last full reconcile ended (Unix time)")
    last_full_duration: float | None = _doc("seconds it took")
    poller: dict[str, Any] | None = _doc("null when the root is not polled for several hosts, "
                                         "else `{role (leader, follower, standalone, "
                                         "unreachable), host, error, leader {host, pid, since}}`"
                                         ": the daemon that polls this root for every host "
                                         "sharing it")


@dataclass(frozen=True)
class InotifyBudget(_Record):
    """The watches every root needs against the kernel's per-user limit (which every process
    of the daemon's uid shares)."""

    needed: int = _doc("watches all roots need")
    max_user_watches: int | None = _doc("`fs.inotify.max_user_watches` (null: unknown)")


@dataclass(frozen=True)
class DaemonStatus(_Record):
    """The whole reply of ``status``."""

    _NESTED = {"roots": RootStatus, "inotify": InotifyBudget}

    version: str = _doc("the daemon's envctl version")
    protocol: int = _doc("the protocol version it speaks")
    pid: int = _doc("the daemon's process id")
    ready: bool = _doc("every root watched and reconciled (what `READY=1` tells systemd)")
    failure: str | None = _doc("null, or why a root failed at run time (the daemon then "
                               "exits 70), or else the last GC or update failure of an "
                               "environment (`environment 'x': ...`; the daemon stays ready, "
                               "`env list` names each env's own)")
    area: dict[str, str] | None = _doc(
        "null, or `{path, problem, fix}`: the requests root's `.envctl` cannot be trusted (a "
        "symlink, not a directory, not the daemon's, writable by everyone); `ready` is false "
        "and every request is refused with this message until it is fixed (checked again every "
        "10 s, no restart needed)")
    config: str = _doc("the configuration file it runs on")
    uptime_s: float = _doc("seconds since it started")
    progress_age_s: float = _doc("seconds since the stalest worker, poller or server loop "
                                 "showed progress: a liveness probe's figure (`envctl status` "
                                 "exits 75 past `--stale`)")
    requests_enabled: bool = _doc("whether it takes environment requests")
    containment: str | None = _doc("how builds are kept from outliving their job: `cgroup` (a "
                                   "cgroup v2 per build) or `sweep` (process groups, then every "
                                   "process of the build user); null without requests")
    sandbox: str | None = _doc("how builds are kept from each other: `mount-namespace` (each "
                               "step in its own: the roots, state dir and kernels dir "
                               "read-only but for the step's own places) or `none` (uids and "
                               "file modes only); null without requests")
    max_builds: int | None = _doc("how many builds run at once, one per build account at most "
                                  "(`min(max_concurrent, len(build_users))`); null without "
                                  "requests")
    limits: dict[str, Any] | None = _doc(
        "`{memory, tasks, disk, cpu_weight, controllers, missing}`: what one build may use "
        "(`requests.limits`; memory and disk in bytes), `controllers`: the cgroup controllers "
        "that enforce them here (`memory`, `pids`, `cpu`; in cgroup v2, or the v1 hierarchy a "
        "hybrid host binds them to), `missing`: those the daemon has not got (builds run "
        "without that limit; `envctl doctor` says so). Null without requests")
    jobs: dict[str, int] | None = _doc("job counts per state (null without requests)")
    cluster: dict[str, str] | None = _doc(
        "`{daemon_id, host}`: this daemon's identity among the daemons sharing the requests "
        "root (see the job object); null without requests or when the root cannot hold job "
        "records")
    integrity: dict[str, Any] | None = _doc(
        "`{tampered [{name, version, what}], failed_verify [{name, version, verified_at, "
        "differences}], checked_at}`: current versions whose top-level stamp (owner, mode, "
        "mtime, ctime of the version's directory) or record changed since the freeze, by the "
        "check the daemon runs every `requests.gc_interval` without hashing, and versions whose "
        "last `env verify` found differences (null without requests)")
    inotify: InotifyBudget = _doc("watches all roots need against the kernel's limit")
    roots: list[RootStatus] = _doc("one object per root")


def reference() -> str:
    """The status objects as Markdown: the reference section of docs/protocol.md."""
    out = ["`status` replies one object; `envctl status --json` prints it. Generated from "
           "`envctl_shared/status.py` (`python -m envctl_shared.status`); a test keeps the two "
           "equal."]
    for cls, title in ((DaemonStatus, "The reply"), (RootStatus, "Each of `roots`"),
                       (InotifyBudget, "`inotify`")):
        out += ["", f"{title}:", "", "| key | type | meaning |", "|---|---|---|"]
        for f in fields(cls):
            kind = str(f.type).replace("|", "\\|")  # a table cell's | is written \|
            out.append(f"| `{f.name}` | `{kind}` | {f.metadata['doc']} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
