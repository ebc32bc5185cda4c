"""Trees and writers for the watcher/daemon tests: a root another user writes into, sources.

The root belongs to alice (the writer) with the shared group, mode 2770: writers run through
``as_user`` with no supplementary groups and umask 077, so everything they create is wrong for
the policy until the daemon heals it (group, g+rw, SGID), and only an independent ``find``
audit decides that it has.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import Accounts
from tests.helpers import VENV_BIN, as_user, find_violations, wait_for

SCALE = float(os.environ.get("ENVCTL_SOAK_SCALE", "1"))
INOTIFY = Path("/proc/sys/fs/inotify")
# Real time: seconds from a writer's end to a compliant tree, far below anything but the watch
# that could heal a local root (no poller there, the full reconcile is hourly).
REALTIME = 2.0
SETTLE = 15.0  # for set-up steps and reconciles, not for what a test proves


# ``python3 -c MANY_DIRS ROOT N``: N directories under ROOT/many, a file in each.
MANY_DIRS = ("import os,sys\n"
             "for i in range(int(sys.argv[2])):\n"
             "    p=os.path.join(sys.argv[1],'many',f'd{i}'); os.makedirs(p)\n"
             "    open(os.path.join(p,'f'),'w').close()\n")


def watches_of_uid0() -> int:
    """inotify watches held by root's processes now (the kernel's per-user count)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != 0:
                continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                    total += sum(1 for line in fh if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


@contextmanager
def out_of_watches(log_text: Callable[[], str], root: Path, acc: Accounts,
                   dirs: int) -> Iterator[None]:
    """A running daemon (``log_text``: its log) out of inotify watches: the machine-wide limit
    lowered to half of what alice's ``dirs`` new directories under ``root`` need, held until
    the daemon has logged its fallback to polling and the ``with`` body has run; restored
    after."""
    with sysctl("max_user_watches", watches_of_uid0() + dirs // 2):
        as_user(acc.alice.uid, acc.alice.gid,
                ["/usr/bin/python3", "-c", MANY_DIRS, str(root), str(dirs)])
        wait_for(lambda: "inotify watch limit reached" in log_text(), 15, 0.05,
                 "fallback to polling logged")
        yield


def make_root(base: Path, acc: Accounts, name: str = "root") -> Path:
    """A root owned by alice:shared, 2770, ready for alice to write into."""
    root = base / name
    root.mkdir()
    os.chown(root, acc.alice.uid, acc.shared_gid)
    os.chmod(root, 0o2770)
    return root


def make_source(base: Path, dirs: int, files_per_dir: int, name: str = "src") -> Path:
    """A world-readable tree (nested two levels, files with and without x, symlinks)."""
    src = base / name
    for d in range(dirs):
        sub = src / f"pkg{d // 20}" / f"mod{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(files_per_dir):
            p = sub / f"f{f}.py"
            p.write_text("x")
            if f % 7 == 0:
                p.chmod(0o755)
        (sub / "link").symlink_to("f0.py")
    for dirpath, _dirs, _files in os.walk(src):
        os.chmod(dirpath, 0o755)
    return src


def alice_tmp(base: Path, acc: Accounts, name: str = "alice-tmp") -> Path:
    """A directory outside the root where alice may prepare trees to move in."""
    d = base / name
    d.mkdir()
    os.chown(d, acc.alice.uid, acc.alice.gid)
    return d


def scaled(n: int) -> int:
    return max(1, int(n * SCALE))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def sysctl(name: str, value: int) -> Iterator[int]:
    """Set /proc/sys/fs/inotify/<name>; always restore the old value. Machine-wide: hold it
    only for the moment it must be (``max_queued_events`` applies to instances created while
    it is set)."""
    path = INOTIFY / name
    old = int(path.read_text())
    path.write_text(str(value))
    try:
        yield old
    finally:
        path.write_text(str(old))


def daemon_status(sock: Path) -> dict[str, Any]:
    """``envctl status --json`` of the daemon on ``sock`` (it must answer)."""
    r = subprocess.run([str(VENV_BIN / "envctl"), "status", "--json", "--socket", str(sock)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode in (0, 75), r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def wait_poll_passes(sock: Path, passes: int, what: str, timeout: float = SETTLE) -> None:
    """Until the first root of the daemon on ``sock`` has ended ``passes`` more poll passes
    than it had now (its status counter; a pass under way now counts when it ends)."""
    def done() -> int:
        return int(daemon_status(sock)["roots"][0]["poll_passes"])
    start = done()
    wait_for(lambda: done() >= start + passes, timeout, 0.05, what)


def wait_quiet(sock: Path, what: str, timeout: float = SETTLE) -> None:
    """Until the first root of the daemon on ``sock`` is quiet: its queue empty and no event,
    echo or fix counted between two status reads (each one a CLI round trip apart)."""
    last: list[tuple[int, int, int]] = []

    def quiet() -> bool:
        root = daemon_status(sock)["roots"][0]
        now = (root["events"], root["echoes"], root["fixed"])
        same = last == [now]
        last[:] = [now]
        return same and root["queue"] == 0
    wait_for(quiet, timeout, 0.05, what)


def alice_sh(accounts: Accounts, root: Path, script: str) -> None:
    """Run shell ``script`` in ``root`` as alice (umask 077, no supplementary groups)."""
    a = accounts.alice
    as_user(a.uid, a.gid, f"cd {root} && {script}")


def settled(root: Path, accounts: Accounts, what: str, timeout: float = SETTLE) -> float:
    """Wait until the ``find`` audit finds nothing wrong under ``root``."""
    return wait_for(lambda: not find_violations(root, accounts.shared_gid), timeout, 0.02, what)


def new_entries_healed(root: Path, accounts: Accounts, dirs: list[str],
                       tag: str = "new") -> float:
    """alice creates a file, and a directory with a file, in each of ``dirs`` (relative to
    ``root``); all must be healed within ``REALTIME``. Returns the seconds it took."""
    alice_sh(accounts, root, " && ".join(
        f"echo > {d}/{tag}-file && mkdir {d}/{tag}-dir && echo > {d}/{tag}-dir/f" for d in dirs))
    return settled(root, accounts, f"new entries in {dirs} healed in real time", REALTIME)


def chain_wrong(root: Path, gid: int, depth: int, name: str, leaf: tuple[str, ...] = ()) -> int:
    """How many directories of a ``depth``-level chain of ``name`` (and entries ``leaf`` at its
    bottom) break the policy, looked at through fds opened level by level (no path is ever
    longer than a name, however deep the chain)."""
    wrong = 0
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            nxt = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
            st = os.stat(fd)
            wrong += st.st_gid != gid or st.st_mode & 0o2070 != 0o2070
        for entry in leaf:
            st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            want = 0o2070 if stat.S_ISDIR(st.st_mode) else 0o060
            wrong += st.st_gid != gid or st.st_mode & want != want
    finally:
        os.close(fd)
    return wrong
