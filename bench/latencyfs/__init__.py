"""latencyfs, our FUSE latency filesystem (``latencyfs.c``): build it, mount it, read its counters.

Why: envctl's walks are concurrent because every metadata call on NFS/EFS is a round trip.
Tests and benchmarks need that cost on one machine, with requests that overlap as parallel RPCs
do, from a server that is never the bottleneck it models: a passthrough of a backing directory,
in C on libfuse3's multi-threaded loop, that answers each metadata call after ``latency_ms``
and counts what it served (see the header of ``latencyfs.c`` for the model).

The binary is compiled here from source the first time it is needed (gcc, ``pkg-config fuse3``;
Debian: ``libfuse3-dev``), cached under ``build/latencyfs/`` by a hash of the source and flags;
so is ``statstorm.c``, the client that measures its capacity.
By hand: ``python -c 'from bench.latencyfs import binary; print(binary())'``, then
``latencyfs BACKING MNT -f -o latency=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("latencyfs.c")
BUILD_DIR = SOURCE.parent.parent.parent / "build" / "latencyfs"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"]
DEFAULT_THREADS = 16  # workers; requests in flight are bounded by the callers (late replies)
_MOUNT_TIMEOUT = 20.0


def _build(name: str, libs: list[str]) -> Path:
    """``name``.c from this directory compiled with gcc, cached by a hash of source and flags."""
    source = SOURCE.with_name(f"{name}.c")
    digest = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS + libs).encode())
    exe = BUILD_DIR / f"{name}-{digest.hexdigest()[:16]}"
    if exe.is_file():
        return exe
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")  # concurrent builders never collide
    out = subprocess.run(["gcc", *CFLAGS, "-o", str(tmp), str(source), *libs],
                         capture_output=True, text=True)
    if out.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {name} failed:\n{out.stderr}")
    os.replace(tmp, exe)
    return exe


def binary() -> Path:
    """The compiled latencyfs for the current source, built now if this source never was."""
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                               capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError("latencyfs needs libfuse3's headers and pkg-config "
                           "(Debian: apt-get install libfuse3-dev pkg-config)") from exc
    return _build("latencyfs", flags)


@dataclass(frozen=True)
class Counters:
    """What latencyfs served: calls per operation (``getattr`` includes every LOOKUP), the total,
    errors, and the most requests it had in flight at once (how far callers overlapped)."""

    ops: dict[str, int]
    total: int
    errors: int
    inflight_max: int
    uptime_s: float

    @classmethod
    def parse(cls, text: str) -> Counters:
        d = json.loads(text)
        return cls(d["ops"], d["total"], d["errors"], d["inflight_max"], d["uptime_s"])

    def since(self, earlier: Counters) -> Counters:
        """The calls served between ``earlier`` and this snapshot (``inflight_max`` is this
        snapshot's: a maximum cannot be subtracted)."""
        return Counters({k: v - earlier.ops.get(k, 0) for k, v in self.ops.items()},
                        self.total - earlier.total, self.errors - earlier.errors,
                        self.inflight_max, self.uptime_s - earlier.uptime_s)

    @property
    def ops_per_s(self) -> float:
        return self.total / self.uptime_s if self.uptime_s > 0 else 0.0


class LatencyFs:
    """A mounted latencyfs: its mount point (``path``) and its live and final counters."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], stats: Path) -> None:
        self.path = path
        self._proc = proc
        self._stats = stats
        self.final: Counters | None = None  # set once unmounted

    def _read(self) -> tuple[int, str]:
        try:
            text = self._stats.read_text()
        except FileNotFoundError:
            return 0, ""
        return json.loads(text)["seq"], text

    def crash(self) -> None:
        """Kill the server: the mount stays, every call on it now fails (ENOTCONN), as a
        network filesystem whose server is gone fails its clients. Unmounted at the end of the
        ``latencyfs`` block as usual."""
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()

    def counters(self) -> Counters:
        """A fresh snapshot: ask for one (SIGUSR1) and wait until it is written."""
        seq, _ = self._read()
        self._proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new, text = self._read()
            if new > seq:
                return Counters.parse(text)
            time.sleep(0.005)
        raise TimeoutError("latencyfs wrote no counters within 10 s")


@contextlib.contextmanager
def latencyfs(backing: Path, mountpoint: Path, latency_ms: float, *,
              threads: int = DEFAULT_THREADS, history: Path | None = None,
              stats_interval: float = 0,
              cache_timeout: float | None = None) -> Iterator[LatencyFs]:
    """Mount ``backing`` at ``mountpoint`` with ``latency_ms`` per metadata call; always unmounted.

    The filesystem process ends with the thread that started it (it is the parent that
    ``PR_SET_PDEATHSIG`` watches), so a killed run leaves no server behind. ``history``: every
    snapshot also appended there as a JSON line, one each ``stats_interval`` seconds if > 0.
    ``cache_timeout``: seconds the kernel keeps entries and attributes (libfuse's 1 s if None);
    0 sends every call to the filesystem, so that its counters do not depend on timing.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="latencyfs-"))
    stats = work / "stats.json"
    opts = f"latency={latency_ms},threads={threads},stats={stats}"
    if history is not None:
        opts += f",history={history},stats_interval={stats_interval}"
    if cache_timeout is not None:
        opts += f",entry_timeout={cache_timeout},attr_timeout={cache_timeout}"
    proc = subprocess.Popen([str(binary()), str(backing), str(mountpoint), "-f", "-o", opts],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fs = LatencyFs(mountpoint, proc, stats)
    try:
        deadline = time.monotonic() + _MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"latencyfs did not mount {mountpoint}: "
                                   f"{_stderr(proc).strip()}")
            time.sleep(0.01)
        yield fs
    finally:
        _unmount(mountpoint, proc)
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            fs.final = Counters.parse(stats.read_text())
        shutil.rmtree(work, ignore_errors=True)


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return proc.stderr.read().decode(errors="replace") if proc.stderr else ""


def _unmount(mountpoint: Path, proc: subprocess.Popen[bytes]) -> None:
    """Unmount (lazily if something still holds it) and make sure the server has exited.

    The server leaves its loop when the kernel ends the connection; a copy of the mount in
    another mount namespace can keep the connection alive, hence SIGTERM (a clean exit that
    still writes the final counters), then SIGKILL."""
    if os.path.ismount(mountpoint):
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.stderr:
        proc.stderr.close()


def stat_storm(fs: LatencyFs, prefix: str, count: int, threads: int) -> tuple[float, Counters]:
    """``lstat`` the names ``prefix0`` .. ``prefix{count-1}`` in the mount's top directory (never
    looked up before: each is one LOOKUP that reaches the filesystem), each once, from
    ``threads`` threads of a small C client (``statstorm.c``: a Python client would be the
    bottleneck). Returns the calls per second sustained and what the filesystem's own counters
    say it served meanwhile."""
    before = fs.counters()
    out = subprocess.run([str(_build("statstorm", ["-lpthread"])), str(fs.path), prefix,
                          str(count), str(threads)], capture_output=True, text=True, check=True)
    return count / float(out.stdout), fs.counters().since(before)
