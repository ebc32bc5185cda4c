"""Shared test helpers: real other users, an independent audit, waiting without fixed sleeps.

Everything here uses real parts: ``setpriv`` to run as another uid with its own umask, GNU
``find`` to audit a tree independently of envctl's own code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Debian's python: other uids cannot execute the pyenv build under /root (mode 700).
SYSTEM_PYTHON = "/usr/bin/python3"
VENV_BIN = Path(sys.executable).parent


def as_user(uid: int, gid: int, cmd: list[str] | str, *, umask: int = 0o077,
            check: bool = True, init_groups: bool = False,
            **kw: object) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as uid/gid with the given umask; supplementary groups cleared unless
    ``init_groups`` (then the user's groups from /etc/group, as a login would have)."""
    if isinstance(cmd, str):
        cmd = ["sh", "-c", cmd]
    groups = "--init-groups" if init_groups else "--clear-groups"
    full = ["setpriv", f"--reuid={uid}", f"--regid={gid}", groups,
            "sh", "-c", f'umask {umask:03o}; exec "$@"', "sh", *cmd]
    res = subprocess.run(full, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if check and res.returncode != 0:  # the user's stderr says why (CalledProcessError hides it)
        raise AssertionError(f"as uid {uid}: {cmd!r} exited {res.returncode}: {res.stderr.strip()}")
    return res


def find_violations(root: Path, gid: int, only: list[str] | None = None) -> list[str]:
    """Entries under ``root`` that break the policy, found by GNU find (not by envctl).

    Directories: wrong group, or missing g+rwx or SGID. Files: wrong group, missing g+rw, or
    group x differing from user x. Symlinks: wrong group. With ``only`` (paths an earlier
    audit found wrong), just those entries are judged, by the same expression.
    """
    expr = [
        "(", "-type", "d", "(", "!", "-group", str(gid), "-o", "!", "-perm", "-2070", ")", ")",
        "-o", "(", "-type", "f", "(", "!", "-group", str(gid), "-o", "!", "-perm", "-0060",
        "-o", "-perm", "-0100", "!", "-perm", "-0010", "-o", "!", "-perm", "-0100",
        "-perm", "-0010", ")", ")",
        "-o", "(", "-type", "l", "!", "-group", str(gid), ")",
    ]
    if only is None:
        # The daemon's own area (``.envctl``: its locks, env records, the poller election) is
        # root's, 0755, by design: not the group's to write, and left alone by the healer.
        out = subprocess.run(["find", str(root), "-path", f"{root}/.envctl", "-prune", "-o",
                              "(", *expr, ")", "-print"], check=True,
                             text=True, errors="surrogateescape", capture_output=True).stdout
    else:
        out = subprocess.run(["find", "-files0-from", "-", "-maxdepth", "0", "(", *expr, ")",
                              "-print"], check=True, text=True, errors="surrogateescape",
                             capture_output=True,
                             input="\0".join(only) + "\0" if only else "").stdout
    return [line for line in out.splitlines() if line]


def make_chain(top: Path, levels: int, bottom: str | None = None, name: str = "d") -> None:
    """``levels`` nested directories named ``name`` below the directory ``top`` (and a file
    ``bottom`` in the deepest), made through fds: no path to the bottom need be resolvable."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        if bottom is not None:
            os.close(os.open(bottom, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.02,
             what: str = "condition") -> float:
    """Poll ``pred`` until true; return the seconds it took, fail the test after ``timeout``."""
    start = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_escapees(home: Path, timeout: float = 60) -> list[int]:
    """The pids a build's escapees wrote into ``$HOME/escapees``, once a line is whole: the
    shell's ``>>`` creates the file before its ``echo`` writes the pid."""
    pids_file = home / "escapees"
    wait_for(lambda: pids_file.exists() and pids_file.read_text().endswith("\n"), timeout,
             what="an escapee")
    return [int(p) for p in pids_file.read_text().split()]


def snapshot(path: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, uid, gid) of every entry under ``path`` (lstat): to prove nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_uid, st.st_gid)
    st = os.lstat(path)
    out[str(path)] = (st.st_mode, st.st_uid, st.st_gid)
    return out


def live_processes(uids: set[int] | None = None, pgrp: int | None = None,
                   home_under: Path | None = None,
                   reap_adopted: bool = False) -> dict[int, str]:
    """pid -> "state ppid=P cmd=... HOME=..." of every live (not zombie) process, optionally
    only of ``uids``, of process group ``pgrp``, or with HOME under ``home_under`` (a build's
    scrubbed environment has HOME in its job dir: tells one test's builds from another's).

    Read from /proc directly, not through envctl's own process code. A zombie is dead: it holds
    no resources and runs no code, whoever is slow to reap it. ``reap_adopted`` collects the
    matching zombies whose parent is this process — orphans adopted once a job manager running
    in the suite made it a subreaper, which nothing else would collect (never use it while a
    ``Popen`` of this process may still be waiting for its child).
    """
    prefix = f"HOME={home_under}/".encode() if home_under is not None else None
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if uids is not None and os.stat(f"/proc/{entry}").st_uid not in uids:
                continue
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2:].split()
            if pgrp is not None and int(fields[2]) != pgrp:
                continue
            if fields[0] == b"Z":
                if reap_adopted and int(fields[1]) == os.getpid():
                    os.waitpid(int(entry), os.WNOHANG)
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").strip()
            home = [v for v in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                    if v.startswith(b"HOME=")]
        except (OSError, ChildProcessError):
            continue  # it ended while being looked at
        if prefix is not None and not (home and home[0].startswith(prefix)):
            continue
        found[int(entry)] = (f"state={fields[0].decode()} ppid={int(fields[1])} "
                             f"cmd={cmd.decode(errors='replace')[:200]!r} "
                             f"{home[0].decode(errors='replace') if home else 'HOME=?'}")
    return found
