"""The performance rows of issue 21 item 7, each against its alternative in the same run.

- start-up: ``envctl --version`` vs a bare ``python -c pass`` of the same interpreter (target
  ≤ 2.5×);
- ``envctl check -j1`` of a compliant ≥60k-entry tree vs ``find ROOT ! -group G -o ! -perm
  -g+rw``, both as whole processes (target ≤ 1.25×);
- ``status`` as a user sees it (``envctl status``, a whole process; and the socket op alone)
  from a real ``envctld`` watching 1,000 directories and from one watching 160,000: the same
  at both (it re-read /proc/self/fdinfo per call before: 0.07 → 0.38 s). The bench raises
  ``fs.inotify.max_user_watches`` for itself if it must, and restores it (``--quick``: small
  sizes, never);
- a writer (an unprivileged account, umask 077: ``tar x`` of an env-shaped tree, then ``chmod``
  of every directory as installers do) inside a root a real ``envctld`` watches vs the same
  writer outside it, on the same filesystem (target ≤ 1.2× on 2 cores).

Rows alternate their runs (A, B, A, B...) and report medians; the load average is printed with
the results, since the machine may be shared. Usage: ``bench/bench_walk.py [--entries N]
[--watches N] [--repeat N] [--quick] [--only startup,check,watches,writer]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import envctl_shared  # noqa: E402
from envctl_shared.api.client import Client  # noqa: E402
from envctl_shared.status import DaemonStatus, RootStatus  # noqa: E402
from envctl_shared.watch.inotify import max_user_watches  # noqa: E402

from bench.common import (  # noqa: E402
    VENV_BIN,
    Writer,
    exit_on_sigterm,
    fresh_ext4,
    write_results,
    writer_account,
)
from bench.envtree import copy_as, count_entries, make_template  # noqa: E402
from tests.daemon_support import Envctld, write_config  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.watch_support import daemon_status, sysctl, watches_of_uid0  # noqa: E402

ENVCTL = str(VENV_BIN / "envctl")
PACKAGE = Path(envctl_shared.__file__).parent


def alternate(a: Callable[[], object], b: Callable[[], object], repeat: int,
              setup: Callable[[], object] | None = None) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run in turns (load drifts hit both alike)."""
    ta, tb = [], []
    for _ in range(repeat):
        for fn, out in ((a, ta), (b, tb)):
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def run(cmd: list[str]) -> Callable[[], object]:
    return lambda: subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ratio(a: float, b: float) -> str:
    if not b:
        return "-"
    return f"{a / b:.2f}×" if a / b >= 0.01 else f"{a / b:.0e}×"


def startup(repeat: int) -> tuple[list[list[str]], dict[str, float]]:
    py, ver = alternate(run([sys.executable, "-c", "pass"]), run([ENVCTL, "--version"]),
                        repeat * 10)
    return ([[f"python -c pass ({Path(sys.executable).name})", f"{py:.4f}", "1.00×", ""],
             ["envctl --version", f"{ver:.4f}", ratio(ver, py), "≤ 2.5×"]],
            {"python_pass": py, "envctl_version": ver})


def check_vs_find(work: Path, template: Path, w: object,
                  repeat: int) -> tuple[list[list[str]], dict[str, float]]:
    tree = work / "check" / "compliant"  # copy_as gives its parent to the writer
    copy_as(w.uid, w.gid, template, tree)  # type: ignore[attr-defined]
    g = w.group  # type: ignore[attr-defined]
    subprocess.run([ENVCTL, "heal", "--group", g, str(tree)], check=True,
                   stdout=subprocess.DEVNULL)
    find, check = alternate(run(["find", str(tree), "!", "-group", g, "-o", "!", "-perm",
                                 "-g+rw"]),
                            run([ENVCTL, "check", "--group", g, "-j", "1", str(tree)]),
                            repeat * 3)
    n = count_entries(tree)
    shutil.rmtree(tree)
    return ([[f"compliant {n}: find ! -group -o ! -perm", f"{find:.3f}", "1.00×", ""],
             [f"compliant {n}: envctl check -j1", f"{check:.3f}", ratio(check, find),
              "≤ 1.25×"]],
            {"find_audit": find, "check": check, "check_entries": n})


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _calls(fn: Callable[[], object], n: int) -> None:
    for _ in range(n):
        fn()


def _fdinfo_count(pid: int) -> int:
    """What ``status`` did per root before the table kept the count: read the kernel's lines
    for the inotify instance of process ``pid`` (its only one: one root) and count them."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as fh:
                return sum(1 for line in fh if line.startswith("inotify wd:"))
    raise SystemExit(f"process {pid} holds no inotify instance")


FAN = 400  # directories per level: 160k watches in 400 × 400, not one huge listing


def make_dirs(root: Path, n: int, gid: int) -> None:
    """``root`` and ``n - 1`` directories under it, two levels of ``FAN``: ``n`` watches. Made
    compliant (the root's group and SGID inherited, umask 002: g+rwx) so that the daemon's
    first reconcile only reads."""
    root.mkdir()
    os.chown(root, -1, gid)
    os.chmod(root, 0o2775)
    old = os.umask(0o002)
    try:
        made, top = 1, 0
        while made < n:
            parent = f"{root}/t{top}"
            os.mkdir(parent)
            subs = min(FAN, n - made - 1)
            for j in range(subs):
                os.mkdir(f"{parent}/d{j}")
            made, top = made + 1 + subs, top + 1
    finally:
        os.umask(old)


@contextlib.contextmanager
def watch_limit(needed: int, may_raise: bool) -> Iterator[None]:
    """``fs.inotify.max_user_watches`` at least ``needed`` more than root's processes hold now
    (every process of a uid shares the limit). When it is not, raised while the block adds its
    watches (held ones stay when it is lowered again) and restored after if ``may_raise`` (the
    bench's choice: the daemon never changes a sysctl), else refused. ``max_user_instances``
    (one instance per root: two here) and ``max_queued_events`` (no writes while status is
    timed) do not matter."""
    limit = max_user_watches() or 0
    want = watches_of_uid0() + needed + max(1000, needed // 20)
    if want <= limit:
        yield
    elif not may_raise:
        raise SystemExit(f"fs.inotify.max_user_watches is {limit}: {want} needed")
    else:
        with sysctl("max_user_watches", want):
            yield


def _root_status(sock: Path) -> RootStatus:
    return DaemonStatus.from_dict(daemon_status(sock)).roots[0]


def _watching(sock: Path, n: int) -> bool:
    return _root_status(sock).watches == n


def _status_call(sock: Path) -> None:
    """The ``status`` op alone, as ``envctl status`` makes it: connect, one call."""
    with Client(sock) as c:
        c.call("status")


def status_by_watches(work: Path, w: Writer, sizes: tuple[int, int], repeat: int,
                      may_raise: bool) -> tuple[list[list[str]], dict[str, object]]:
    """``envctl status`` (the whole process) and the ``status`` op alone (the client API,
    many calls), against a real ``envctld`` watching ``sizes[0]`` directories and another
    watching ``sizes[1]``, alternated: the same at every size is the target. The old cost
    (re-reading /proc/<pid>/fdinfo) is measured beside it on the same daemons."""
    daemons: list[Envctld] = []
    socks: list[Path] = []
    raw: dict[str, object] = {}
    try:
        with watch_limit(sum(sizes), may_raise):
            for n in sizes:
                root = work / f"watched-{n}"
                start = time.perf_counter()
                make_dirs(root, n, w.shared_gid)
                raw[f"tree_s_{n}"] = time.perf_counter() - start
                run_dir = work / f"daemon-{n}"
                run_dir.mkdir(mode=0o755)
                d = Envctld(write_config(run_dir, [(root, w.group)]), run_dir)
                daemons.append(d)
                start = time.perf_counter()
                d.start(timeout=600)
                sock = run_dir / "envctld.sock"
                wait_for(partial(_watching, sock, n), 60, 0.1, f"{n} watches")
                raw[f"ready_s_{n}"] = time.perf_counter() - start
                st = _root_status(sock)
                if (st.watches, st.mode, st.fixed) != (n, "inotify", 0):
                    raise SystemExit(f"daemon on {n} directories not as expected: {st}")
                socks.append(sock)
        (s0, s1), pids = socks, [d.proc.pid for d in daemons if d.proc is not None]
        cli = alternate(run([ENVCTL, "status", "--socket", str(s0)]),
                        run([ENVCTL, "status", "--socket", str(s1)]), repeat * 10)
        # One call per sample: a median of single calls drops the stalls another process's
        # time slice puts into some of them. The daemon's CPU per call does not see the load.
        calls = repeat * 300  # the CPU is counted in 10 ms ticks; a call takes ~0.4 ms
        cpu0 = [_proc_cpu(p) for p in pids]
        op = alternate(partial(_status_call, s0), partial(_status_call, s1), calls)
        cpu = [(_proc_cpu(p) - c) / calls for p, c in zip(pids, cpu0)]
        fdinfo = alternate(partial(_calls, partial(_fdinfo_count, pids[0]), 3),
                           partial(_calls, partial(_fdinfo_count, pids[1]), 3),
                           repeat)  # a reference: 0.4 s a call at 160k
        fdinfo = (fdinfo[0] / 3, fdinfo[1] / 3)
    finally:
        for d in daemons:
            d.stop() if d.alive else d.cleanup()
        for n in sizes:
            shutil.rmtree(work / f"watched-{n}", ignore_errors=True)
    small, large = sizes
    rows = []
    for what, (a, b), digits, note in (
            ("envctl status", cli, 4, ""),
            ("status op (socket, one call)", op, 6, ""),
            ("envctld CPU per status op", cpu, 6,
             f"; re-reading fdinfo, as before: {fdinfo[0]:.4f} → {fdinfo[1]:.4f} s")):
        rows += [[f"{what}, {small} watches", f"{a:.{digits}f}", "1.00×", ""],
                 [f"{what}, {large} watches", f"{b:.{digits}f}", ratio(b, a),
                  "the same at every size" + note]]
    for key, pair in (("status_cli", cli), ("status_op", op), ("status_cpu", cpu),
                      ("fdinfo", fdinfo)):
        raw |= {f"{key}_{n}": t for n, t in zip(sizes, pair)}
    return rows, raw


# What an installer does: unpack (umask 077 here: the broken modes users leave), then set the
# directories' modes from its archive.
WRITER = 'umask 077; mkdir "$1" && tar xf "$0" -C "$1" && find "$1" -type d -exec chmod 755 {} +'


def writer(work: Path, template: Path, w: object,
           repeat: int) -> tuple[list[list[str]], dict[str, float]]:
    """The writer's own wall time, in a watched root and outside any."""
    tar = work / "tree.tar"
    subprocess.run(["tar", "cf", str(tar), "-C", str(template), "."], check=True)
    os.chmod(tar, 0o644)
    inside = work / "watched"
    inside.mkdir()
    os.chown(inside, w.uid, w.shared_gid)  # type: ignore[attr-defined]
    os.chmod(inside, 0o2770)
    outside = work / "plain"
    outside.mkdir()
    os.chown(outside, w.uid, w.gid)  # type: ignore[attr-defined]
    run_dir = work / "daemon"  # root's: the daemon refuses a socket directory a user owns
    run_dir.mkdir(mode=0o755)
    d = Envctld(write_config(run_dir, [(inside, w.group)]), run_dir)  # type: ignore[attr-defined]
    d.start()
    sock = run_dir / "envctld.sock"

    spent: list[float] = []  # the daemon's CPU seconds per inside run, catch-up included
    started: list[float] = []

    def write_into(base: Path) -> Callable[[], object]:
        def go() -> None:
            if base == inside:
                started.append(_proc_cpu(d.proc.pid))  # type: ignore[union-attr]
            dest = base / "env"
            subprocess.run(["setpriv", f"--reuid={w.uid}", f"--regid={w.gid}",  # type: ignore[attr-defined]
                            "--clear-groups", "sh", "-c", WRITER, str(tar), str(dest)],
                           check=True)
        return go

    def idle() -> None:
        deadline = time.monotonic() + 120
        while daemon_status(sock)["roots"][0]["queue"] and time.monotonic() < deadline:
            time.sleep(0.05)

    def clean() -> None:
        idle()  # the daemon done with the last write
        if started:
            spent.append(_proc_cpu(d.proc.pid) - started.pop())  # type: ignore[union-attr]
        for base in (inside, outside):
            shutil.rmtree(base / "env", ignore_errors=True)
        idle()  # and with the removal's events
        os.sync()

    try:
        out, inn = alternate(write_into(outside), write_into(inside), repeat, clean)
        clean()
        overflows = daemon_status(sock)["roots"][0]["overflows"]
    finally:
        d.stop()
    n = count_entries(template)
    return ([[f"writer ({n} entries) outside any root", f"{out:.3f}", "1.00×", ""],
             [f"writer ({n} entries) in a watched root", f"{inn:.3f}", ratio(inn, out),
              "≤ 1.2× on 2 cores"],
             [f"envctld CPU per inside run ({n} entries)", f"{statistics.median(spent):.3f}",
              ratio(statistics.median(spent), out),
              f"CPU s, vs the writer's wall time; {overflows} overflow(s) in {repeat} runs"]],
            {"writer_outside": out, "writer_inside": inn, "writer_entries": n,
             "envctld_cpu": spent, "overflows": overflows})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=60000)
    ap.add_argument("--watches", type=int, default=160000,
                    help="directories (watches) of the large root; the small one has 1000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small trees, one repeat (CI smoke)")
    ap.add_argument("--only", default="startup,check,watches,writer")
    args = ap.parse_args()
    if args.quick:
        args.entries, args.watches, args.repeat = 2000, 3000, 1
    parts = set(args.only.split(","))
    exit_on_sigterm()
    load0 = os.getloadavg()
    base = Path("/tmp/envctl-bench-walk")
    base.mkdir(mode=0o755, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=base))
    scratch.chmod(0o755)
    rows: list[list[str]] = []
    raw: dict[str, object] = {}
    # The package as pip installs it: byte-compiled. A checkout's modules run with
    # PYTHONDONTWRITEBYTECODE set (as in CI) would be compiled again at every start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(PACKAGE)], check=True)
    try:
        if "startup" in parts:
            r, x = startup(args.repeat)
            rows, raw = rows + r, raw | x
        with fresh_ext4(scratch / "fs") as work, writer_account("w") as w:
            template = work / "template"
            if parts & {"check", "writer"}:
                make_template(template, args.entries)
            if "check" in parts:
                r, x = check_vs_find(work, template, w, args.repeat)
                rows, raw = rows + r, raw | x
            if "watches" in parts:
                r, x = status_by_watches(work, w, (1000, args.watches), args.repeat,
                                         may_raise=not args.quick)
                rows, raw = rows + r, raw | x
            if "writer" in parts:
                r, x = writer(work, template, w, args.repeat)
                rows, raw = rows + r, raw | x
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load1 = os.getloadavg()
    raw |= {"load_before": load0, "load_after": load1, "quick": args.quick}
    name = "walk-quick" if args.quick else "walk"
    write_results(name, f"issue 21 item 7 rows (load {load0[0]:.1f} → {load1[0]:.1f})",
                  ["pass", "seconds", "ratio", "target / note"], rows, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
