"""The performance rows of issue 21 item 7, each against its alternative in the same run.

- start-up: ``envctl --version`` vs a bare ``python -c pass`` of the same interpreter (target
  ≤ 2.5×);
- ``envctl check -j1`` of a compliant ≥60k-entry tree vs ``find ROOT ! -group G -o ! -perm
  -g+rw``, both as whole processes (target ≤ 1.25×);
- the watch count behind ``status``: the table's count (now) vs re-reading
  ``/proc/self/fdinfo`` (before), at a small and a large number of watches: the count must cost
  the same at both;
- a writer (an unprivileged account, umask 077: ``tar x`` of an env-shaped tree, then ``chmod``
  of every directory as installers do) inside a root a real ``envctld`` watches vs the same
  writer outside it, on the same filesystem (target ≤ 1.2× on 2 cores).

Rows alternate their runs (A, B, A, B...) and report medians; the load average is printed with
the results, since the machine may be shared. Usage: ``bench/bench_walk.py [--entries N]
[--watches N] [--repeat N] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envctl_shared.watch.inotify import InotifyWatch  # noqa: E402
from envctl_shared.watch.queue import WorkQueue  # noqa: E402

from bench.common import (  # noqa: E402
    VENV_BIN,
    exit_on_sigterm,
    fresh_ext4,
    write_results,
    writer_account,
)
from bench.envtree import copy_as, count_entries, make_template  # noqa: E402
from tests.daemon_support import Envctld, write_config  # noqa: E402
from tests.watch_support import daemon_status  # noqa: E402

ENVCTL = str(VENV_BIN / "envctl")


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


def _fdinfo_count(ifd: int) -> int:
    """What ``watch_count`` did before: count the kernel's lines."""
    with open(f"/proc/self/fdinfo/{ifd}", encoding="ascii") as fh:
        return sum(1 for line in fh if line.startswith("inotify wd:"))


class _Hooks:
    def on_watch_failed(self, rel: str, err: int) -> None:
        raise SystemExit(f"out of inotify watches at {rel}")

    def on_end(self, reason: str, exc: BaseException | None) -> None:
        pass


def watch_count(work: Path, sizes: tuple[int, ...],
                repeat: int) -> tuple[list[list[str]], dict[str, float]]:
    rows, raw = [], {}
    for n in sizes:
        root = work / f"watched-{n}"
        root.mkdir()
        for i in range(n - 1):  # the root and n - 1 directories: n watches
            os.mkdir(root / f"d{i}")
        watch = InotifyWatch(root, WorkQueue(), _Hooks(), lambda: None)
        watch.start()
        try:
            assert watch.watch_count() == _fdinfo_count(watch._ifd) == n
            loops = 1000  # per sample: a single call is below the clock's resolution
            new, old = alternate(partial(_calls, watch.watch_count, loops),
                                 partial(_calls, partial(_fdinfo_count, watch._ifd), loops),
                                 repeat * 3)
            new, old = new / loops, old / loops
        finally:
            watch.stop()
            shutil.rmtree(root)
        rows += [[f"{n} watches: count from /proc/self/fdinfo (before)", f"{old:.7f}",
                  "1.00×", ""],
                 [f"{n} watches: count kept in the table (now)", f"{new:.7f}", ratio(new, old),
                  "the same at every size" + (f": {ratio(new, raw['table_1000'])} of 1000's"
                                              if n != 1000 else "")]]
        raw |= {f"fdinfo_{n}": old, f"table_{n}": new}
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
    ap.add_argument("--watches", type=int, default=20000,
                    help="the large watch count (160000 needs the machine's watches alone)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small trees, one repeat (CI smoke)")
    ap.add_argument("--only", default="startup,check,watches,writer")
    args = ap.parse_args()
    if args.quick:
        args.entries, args.watches, args.repeat = 2000, 2000, 1
    parts = set(args.only.split(","))
    exit_on_sigterm()
    load0 = os.getloadavg()
    base = Path("/tmp/envctl-bench-walk")
    base.mkdir(mode=0o755, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=base))
    scratch.chmod(0o755)
    rows: list[list[str]] = []
    raw: dict[str, object] = {}
    try:
        if "startup" in parts:
            r, x = startup(args.repeat)
            rows, raw = rows + r, raw | x
        with fresh_ext4(scratch / "fs") as work, writer_account("w") as w:
            template = work / "template"
            make_template(template, args.entries)
            if "check" in parts:
                r, x = check_vs_find(work, template, w, args.repeat)
                rows, raw = rows + r, raw | x
            if "watches" in parts:
                r, x = watch_count(work, (1000, args.watches), args.repeat)
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
