"""Boot a real systemd in ``systemd-nspawn`` for a test, and always tear it down completely.

Why: unit files are only proven by the systemd that runs them — socket activation, Type=notify
readiness, the watchdog and the sandbox (ProtectSystem=, capabilities, SystemCallFilter=) cannot
be faked. PID 1 of this machine kind is not systemd, so each test boots its own system manager in
a "host overlay" container (``docs/testing-systemd.md``): the host's ``/`` read-only
under a throwaway overlay, no image to build, ready in well under a second.

Isolation and cleanup, in order of what could leak:
- cgroups: the nspawn process is moved into its own cgroup in both hierarchies before it starts
  (``envctl-nspawn-<pid>-<n>``), so nspawn's ``payload/`` and ``supervisor/`` land under it; at
  the end every process still in it is killed and the tree is removed depth-first;
- mounts: everything (the tmpfs on ``/run/systemd/nspawn``, the bind of ``/``, the overlay) is
  made inside a private mount namespace (``unshare -m``) that dies with the nspawn process;
- processes: the container is a PID namespace; SIGTERM to nspawn halts it, SIGKILL is the
  fallback, and the cgroup sweep catches anything else;
- a test process killed outright (no finally runs): nspawn dies with it (pdeathsig), and the
  next boot sweeps the cgroups and workdir named after the dead pid.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"))
_COUNTER = itertools.count()
WORK_BASE = "/tmp"  # workdirs and cgroups are both named envctl-nspawn-<test pid>-<n>
BOOT_TIMEOUT = 30.0
STATE_DIR = "/var/lib/envctl"  # the units' StateDirectory=: hidden from the host, see boot()


def unavailable_reason() -> str | None:
    """Why a container cannot be booted here, or None when it can (the only reason to skip)."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container util-linux)"
    if not Path("/lib/systemd/systemd").exists():
        return "no systemd binary at /lib/systemd/systemd"
    return None


@dataclass(frozen=True)
class Bind:
    """A host path made visible inside the container at ``dest`` (same path when None)."""

    source: Path
    dest: Path | None = None
    readonly: bool = True

    def option(self) -> str:
        flag = "--bind-ro" if self.readonly else "--bind"
        return f"{flag}={self.source}:{self.dest or self.source}"


class Machine:
    """A booted container: run commands in it, drive its systemd, read its journal."""

    def __init__(self, leader: int, console_log: Path) -> None:
        self.leader = leader
        self.console_log = console_log

    def path(self, inside: str | os.PathLike[str]) -> Path:
        """The host path of a path inside the container (through ``/proc/<init>/root``)."""
        return Path(f"/proc/{self.leader}/root") / str(inside).lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        """Create or replace a file inside the container (its overlay, never the host's)."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        os.chmod(target, mode)

    def run(self, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside every namespace of the container's init (``nsenter -a``)."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full = ["nsenter", "-t", str(self.leader), "-a", "env", "-i",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", *argv]
        done = subprocess.run(full, text=True, capture_output=True, timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"in container: {shlex.join(argv)} exited {done.returncode}\n"
                                 f"stdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS``; a failure's message carries the journal's tail (the reason)."""
        done = self.run(["systemctl", "--no-ask-password", *args], check=False, timeout=timeout)
        if check and done.returncode != 0:
            self.run(["journalctl", "--sync"], check=False)
            tail = self.run(["journalctl", "--no-pager", "-n", "60", "-o", "short-monotonic"],
                            check=False).stdout
            raise AssertionError(f"systemctl {' '.join(args)} exited {done.returncode}: "
                                 f"{done.stderr}\n--- journal ---\n{tail}")
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit as a dict."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, unit: str, timeout: float = 20.0, **want: str) -> dict[str, str]:
        """Poll until every property has the wanted value; fail with the last values seen."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.show(unit, *want)
            if all(seen.get(k) == v for k, v in want.items()):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}: wanted {want}, still {seen} after {timeout}s\n"
                                     + self.journal_text(unit))
            time.sleep(0.05)

    def journal(self, unit: str | None = None) -> list[dict[str, object]]:
        """Journal entries (``journalctl -o json``), of one unit or of the whole boot."""
        self.run(["journalctl", "--sync"], check=False)
        args = ["journalctl", "--no-pager", "-o", "json"] + (["-u", unit] if unit else [])
        out = self.run(args, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def journal_text(self, unit: str) -> str:
        """The unit's journal as text, for assertion messages."""
        self.run(["journalctl", "--sync"], check=False)
        return self.run(["journalctl", "--no-pager", "-o", "short-monotonic", "-u", unit],
                        check=False).stdout[-6000:]


def _cgroup_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for procs in top.rglob("cgroup.procs") if top.exists() else ():
        try:
            pids.update(int(x) for x in procs.read_text().split())
        except OSError:
            pass
    return pids


def _remove_cgroups(name: str) -> None:
    """Kill whatever is still in the test's cgroups, then remove them deepest first."""
    tops = [h / name for h in CGROUP_HIERARCHIES]
    deadline = time.monotonic() + 10
    while True:
        pids = set().union(*(_cgroup_pids(t) for t in tops))
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {sorted(pids)} survive in cgroup {name}")
        time.sleep(0.05)
    for top in tops:
        if top.exists():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True):
                d.rmdir()
            top.rmdir()


def _sweep_stale() -> None:
    """Remove what earlier test processes left when they were killed before tearing down:
    their containers and cgroups, then their workdirs (the mounts in those lived in mount
    namespaces that died with the processes, so here they are plain directories)."""
    places = [*CGROUP_HIERARCHIES, Path(WORK_BASE)]
    for place in places:
        for top in place.glob("envctl-nspawn-*-*") if place.exists() else ():
            owner = top.name.split("-")[2]
            if not owner.isdigit() or Path(f"/proc/{owner}").exists():
                continue
            if place in CGROUP_HIERARCHIES:
                _remove_cgroups(top.name)
            elif top.is_dir():
                shutil.rmtree(top)


def _find_leader(nspawn: subprocess.Popen[bytes], deadline: float) -> int:
    """The container's systemd: a child of nspawn named systemd (the first child is brief)."""
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {nspawn.returncode} while booting")
        done = subprocess.run(["pgrep", "-x", "systemd", "-P", str(nspawn.pid)],
                              capture_output=True, text=True)
        if done.stdout.split():
            return int(done.stdout.split()[0])
        time.sleep(0.02)
    raise RuntimeError("systemd did not start inside the container")


def _wait_booted(machine: Machine, deadline: float) -> None:
    state = ""
    while time.monotonic() < deadline:
        state = machine.run(["systemctl", "is-system-running"], check=False).stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.03)
    raise RuntimeError(f"container did not finish booting (state {state!r})")


@contextmanager
def boot(binds: Sequence[Bind] = (), units: Mapping[str, Path] = {},
         timeout: float = BOOT_TIMEOUT, network: bool = False) -> Iterator[Machine]:
    """Boot systemd (basic.target only) in a host-overlay container; tear it down on exit.

    ``units`` maps unit names to host files bound read-only into ``/etc/systemd/system`` — the
    files under test, unchanged. The container has no network (``--private-network``) unless
    ``network`` shares the host's (only for what must download, like ``make install``).
    """
    _sweep_stale()
    name = f"envctl-nspawn-{os.getpid()}-{next(_COUNTER)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK_BASE))
    rootdir = workdir / "root"
    rootdir.mkdir()
    console = workdir / "console.log"
    all_binds = list(binds) + [Bind(src, Path("/etc/systemd/system") / unit)
                               for unit, src in units.items()]
    # The overlay shows the host's /var: a daemon run on this host (by hand, or by a test of
    # the host's units) left its state there — jobs, daemon-id, lock — which the container's
    # daemon must not take over. An empty tmpfs there, as on a fresh machine.
    nspawn_argv = ["systemd-nspawn", "--quiet", "-D", str(rootdir), "--volatile=overlay",
                   f"--tmpfs={STATE_DIR}",
                   "--register=no", "--keep-unit", "--boot", "--console=passive",
                   *([] if network else ["--private-network"]),
                   *(b.option() for b in all_binds),
                   "--", "--unit=basic.target"]
    inner = ("set -e; mount --make-rprivate /; mkdir -p /run/systemd/nspawn; "
             "mount -t tmpfs tmpfs /run/systemd/nspawn; "
             f"mount --bind / {shlex.quote(str(rootdir))}; exec {shlex.join(nspawn_argv)}")
    cgroup_join = "; ".join(f"mkdir -p {h / name} && echo $$ > {h / name}/cgroup.procs"
                            for h in CGROUP_HIERARCHIES)
    # pdeathsig: if the test process is killed outright, nspawn (and with it the container)
    # goes too; the cgroups it leaves are swept by the next boot (_sweep_stale).
    wrapper = (f"set -e; {cgroup_join}; exec setpriv --pdeathsig KILL -- "
               f"unshare -m sh -c {shlex.quote(inner)}")
    nspawn: subprocess.Popen[bytes] | None = None
    try:
        with console.open("wb") as log:
            nspawn = subprocess.Popen(["sh", "-c", wrapper], stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            machine = Machine(_find_leader(nspawn, deadline), console)
            _wait_booted(machine, deadline)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"{exc}\n--- console ---\n"
                               f"{console.read_text(errors='replace')[-4000:]}") from None
        yield machine
    finally:
        if nspawn is not None:
            if nspawn.poll() is None:
                nspawn.send_signal(signal.SIGTERM)
            try:
                nspawn.wait(timeout=15)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait(timeout=15)
        _remove_cgroups(name)
        rootdir.rmdir()  # fails loudly if the bind of / outlived its namespace
        shutil.rmtree(workdir)
