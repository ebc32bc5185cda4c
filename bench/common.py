"""Shared benchmark plumbing: a throwaway writer account, timing, syscall counts, result tables.

Benchmarks print a table and write it (plus the raw numbers as JSON) under ``bench/results/``;
every comparison is made in the same run, on the same machine state, and reported as a ratio.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import platform
import pwd
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Where tables go: bench/results/ (committed), or ENVCTL_BENCH_RESULTS (the test suite's smoke
# runs write to a scratch dir, so running the tests never rewrites the committed results).
RESULTS = Path(os.environ.get("ENVCTL_BENCH_RESULTS")
               or Path(__file__).resolve().parent / "results")
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Writer:
    """An unprivileged account (the one who leaves broken trees) and the shared group."""

    uid: int
    gid: int
    group: str
    shared_gid: int


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks remove accounts, mounts and trees."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@contextlib.contextmanager
def writer_account(tag: str) -> Iterator[Writer]:
    """Create ``envb<pid>-<tag>`` and a shared group for the benchmark; always removed."""
    user, group = f"envb{os.getpid()}-{tag}", f"envb{os.getpid()}-shared"
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(["useradd", "-M", "-U", "-s", "/bin/sh", "-G", group, user], check=True)
    try:
        pw = pwd.getpwnam(user)
        yield Writer(pw.pw_uid, pw.pw_gid, group, grp.getgrnam(group).gr_gid)
    finally:
        subprocess.run(["userdel", user], check=False)
        subprocess.run(["groupdel", user], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False)


@contextlib.contextmanager
def fresh_ext4(mountpoint: Path, size_gb: int = 8, inodes: int = 2_000_000) -> Iterator[Path]:
    """A new ext4 filesystem (sparse loop image beside ``mountpoint``) mounted there; always
    unmounted and deleted.

    Why: the machine's own disk is shared by every run, and ext4 slows inode allocation after
    mass deletions (``recently_deleted`` scans the inode tables): seen here, the same
    ``cp -r`` of 60k entries took 3.5 s on a fresh filesystem and 9–32 s on the churned
    root disk. A slow writer flatters a healer racing it, so the local-disk parts of the
    benchmarks run on a filesystem of their own, in the same state every time.
    """
    image = mountpoint.with_name(mountpoint.name + ".img")
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["truncate", "-s", f"{size_gb}G", str(image)], check=True)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", str(inodes), str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
        try:
            os.chmod(mountpoint, 0o755)
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        image.unlink(missing_ok=True)


def timed(cmd: list[str] | Callable[[], object], repeat: int = 3,
          setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``repeat`` runs (``setup`` before each, untimed).

    Dirty data is flushed before each run: the writeback of a tree a setup just wrote would
    otherwise land in whichever measurement comes next."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        os.sync()
        start = time.perf_counter()
        if callable(cmd):
            cmd()
        else:
            subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_syscalls(cmd: list[str], names: str) -> int:
    """How many of the syscalls ``names`` (strace syntax) ``cmd`` made, following children."""
    out = subprocess.run(["strace", "-f", "-c", "-e", f"trace={names}", "-o", "/dev/stderr",
                          *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in out.stderr.splitlines():
        parts = line.split()
        if parts and parts[-1] == "total":
            return int(parts[3])  # % time, seconds, usecs/call, calls[, errors], total
    return 0


def write_results(name: str, title: str, headers: list[str], rows: list[list[str]],
                  raw: dict[str, object]) -> str:
    """Print a Markdown table and store it with the raw numbers under ``RESULTS``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [f"## {title}", "",
             f"_{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
             f"{os.cpu_count()} CPUs, python {platform.python_version()}_", "",
             fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
             *[fmt(r) for r in rows], ""]
    text = "\n".join(lines)
    print(text)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return text


@contextlib.contextmanager
def requests_daemon(base: Path, group: str, build_user: str,
                    requests: dict[str, object]) -> Iterator[Path]:
    """A real ``envctld`` on ``base/envs`` (SGID, ``group``) with requests on for ``group``
    (``requests`` adds the backend's keys); yields its socket (in ``base/run``) once it answers
    ``ping``, and stops it when the block ends (killed if it does not stop in 60 s; its own
    session: a kill reaches nothing else)."""
    import yaml
    from envctl_shared.api.client import Client
    from envctl_shared.errors import EnvctlError

    root = base / "envs"
    root.mkdir(mode=0o2775)
    os.chown(root, -1, grp.getgrnam(group).gr_gid)
    os.chmod(root, 0o2775)
    (base / "run").mkdir()
    sock = base / "run" / "envctld.sock"
    config = {
        "roots": [{"path": str(root), "group": group}],
        "socket": {"path": str(sock), "mode": "0666"},
        "requests": {"root": str(root), "state_dir": str(base / "state"),
                     "build_user": build_user, "allow_groups": [group], **requests},
        "logging": {"level": "WARNING"},
    }
    (base / "envctld.yaml").write_text(yaml.safe_dump(config))
    with open(base / "envctld.log", "wb") as log:
        proc = subprocess.Popen([str(VENV_BIN / "envctld"), "--config",
                                 str(base / "envctld.yaml")],
                                stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(sock, timeout=2) as c:
                    c.call("ping")
                break
            except EnvctlError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((base / "envctld.log").read_text()) from None
                time.sleep(0.05)
        yield sock
        proc.terminate()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
