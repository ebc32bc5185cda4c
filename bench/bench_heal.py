"""Benchmark the healer against what admins use otherwise: ``chgrp -R && chmod -R`` and ``find``.

Two parts, each compared in the same run and reported as ratios:

- local disk (issue 2): a ≥60k-entry env-shaped tree; heal of a fully broken tree (written by
  another uid under umask 077) vs ``chgrp -R && chmod -R`` and a ``find``-based fix script; a
  check and a heal of the compliant tree vs ``find ROOT ! -group G -o ! -perm -g+rw`` (targets,
  whole processes: check ≤ 1.25× — also a row of bench/bench_walk.py —, heal ≤ 1.5×) with
  metadata writes counted by strace (target 0); and concurrency 16 vs serial on local disk
  (target: never more than 10% slower).
- latencyfs (our FUSE passthrough, ``bench/latencyfs/``) at 1 ms per metadata call (issue 6,
  EFS-like): on a ≥10k-entry tree, ``envctl check`` vs the find filter (target ≥ 5× faster) and
  vs ``chgrp -R && chmod -R`` (≥ 20×), and ``envctl heal`` of a broken tree vs
  ``chgrp -R && chmod -R`` (≥ 10×); and the daemon's incremental poll pass on an unchanged
  ≥60k-entry tree (target ≤ 2 s) vs a full walk.
- latencyfs itself: the calls per second it served while ``envctl check`` ran (its own
  counters) against its capacity, a storm of parallel uncached stats on a mount of its own at
  the same latency (target ≥ 4×: the filesystem that models the server must never be the
  bottleneck it models).

Usage: ``bench/bench_heal.py [--entries N] [--slow-entries N] [--poll-entries N] [--latency MS]
[--storm-files N] [--quick] [--slow-only] [--slow-baselines find,chmod-broken,...]``. At 60k
entries and 1 ms (issue 14) a serial ``chgrp -R && chmod -R`` takes ~7 minutes per tree, so the
latencyfs part can run alone with some baselines at a time (``--slow-only --slow-entries 60000
--slow-baselines find``), envctl always measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envctl_shared.heal.walker import LANES  # noqa: E402

from bench.common import (  # noqa: E402
    VENV_BIN,
    count_syscalls,
    exit_on_sigterm,
    fresh_ext4,
    timed,
    write_results,
    writer_account,
)
from bench.envtree import copy_as, count_entries, make_template  # noqa: E402
from bench.latencyfs import LatencyFs, latencyfs, stat_storm  # noqa: E402

ENVCTL = str(VENV_BIN / "envctl")
WRITES = "chmod,fchmod,fchmodat,chown,fchown,lchown,fchownat"
# latencyfs capacity: stats in flight at once, 8× what envctl's -j16 asks (16 walk threads,
# each with walker.LANES lookups in flight)
STORM_THREADS = 8 * 16 * LANES


def chmod_r(root: Path, group: str) -> list[str]:
    return ["sh", "-c", 'chgrp -R "$1" "$0" && chmod -R g+rwX "$0" && '
            'find "$0" -type d -exec chmod g+s {} +', str(root), group]


def find_fix(root: Path, group: str) -> list[str]:
    """A careful admin's find script: touch only what is wrong, batch with ``{} +``."""
    return ["sh", "-c",
            'find "$0" ! -type l ! -group "$1" -exec chgrp "$1" {} + ; '
            'find "$0" -type d ! -perm -2070 -exec chmod g+rwxs {} + ; '
            'find "$0" -type f ! -perm -0060 -exec chmod g+rw {} + ; '
            'find "$0" -type f -perm -0100 ! -perm -0010 -exec chmod g+x {} +',
            str(root), group]


def find_audit(root: Path, group: str) -> list[str]:
    return ["find", str(root), "!", "-group", group, "-o", "!", "-perm", "-g+rw"]


def envctl(verb: str, root: Path, group: str, *extra: str) -> list[str]:
    return [ENVCTL, verb, "--group", group, *extra, str(root)]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "-"


def local_part(work: Path, template: Path, w: object, repeat: int) -> tuple[list, dict]:
    g = w.group  # type: ignore[attr-defined]
    broken = work / "broken"

    def fresh() -> None:
        shutil.rmtree(broken, ignore_errors=True)
        copy_as(w.uid, w.gid, template, broken)  # type: ignore[attr-defined]

    t_heal = timed(envctl("heal", broken, g, "-j", "1"), repeat, fresh)
    t_chmod = timed(chmod_r(broken, g), repeat, fresh)
    t_findfix = timed(find_fix(broken, g), repeat, fresh)
    # Compliant tree: the last one healed.
    fresh()
    timed(envctl("heal", broken, g), 1)
    t_find = timed(find_audit(broken, g), repeat + 2)
    t_check = timed(envctl("check", broken, g, "-j", "1"), repeat + 2)
    t_check16 = timed(envctl("check", broken, g, "-j", "16"), repeat + 2)
    t_heal_ok = timed(envctl("heal", broken, g, "-j", "1"), repeat + 2)
    t_chmod_ok = timed(chmod_r(broken, g), repeat)
    w_heal = count_syscalls(envctl("heal", broken, g), WRITES)
    w_chmod = count_syscalls(chmod_r(broken, g), WRITES)
    rows = [
        ["broken tree: envctl heal", f"{t_heal:.3f}", "1.00×", ""],
        ["broken tree: chgrp -R && chmod -R", f"{t_chmod:.3f}", ratio(t_chmod, t_heal),
         "heal faster"],
        ["broken tree: find fix script", f"{t_findfix:.3f}", ratio(t_findfix, t_heal), ""],
        ["compliant: find ! -group -o ! -perm", f"{t_find:.3f}", "1.00×", ""],
        ["compliant: envctl check -j1", f"{t_check:.3f}", ratio(t_check, t_find), "≤ 1.25×"],
        ["compliant: envctl heal -j1", f"{t_heal_ok:.3f}", ratio(t_heal_ok, t_find),
         f"≤ 1.5×, writes {w_heal}"],
        ["compliant: envctl check -j16", f"{t_check16:.3f}", ratio(t_check16, t_find),
         f"vs -j1 {ratio(t_check16, t_check)} (≤ 1.10×)"],
        ["compliant: chgrp -R && chmod -R", f"{t_chmod_ok:.3f}", ratio(t_chmod_ok, t_find),
         f"writes {w_chmod}"],
    ]
    raw = {"heal_broken": t_heal, "chmod_r_broken": t_chmod, "find_fix_broken": t_findfix,
           "find_audit": t_find, "check": t_check, "check_j16": t_check16,
           "heal_compliant": t_heal_ok, "chmod_r_compliant": t_chmod_ok,
           "writes_heal_compliant": w_heal, "writes_chmod_r_compliant": w_chmod}
    return rows, raw


def served(fs: LatencyFs, cmd: list[str]) -> tuple[float, int, float, int]:
    """Run ``cmd`` once against ``fs``: its seconds, and the calls the filesystem served for it
    (total, per second, most in flight at once), from the filesystem's own counters.

    The kernel's entry and attribute caches (1 s, libfuse's default) expire first: every call
    the walk needs then reaches the filesystem, the most it can ask of it."""
    os.sync()
    time.sleep(1.1)
    before = fs.counters()
    start = time.perf_counter()
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    took = time.perf_counter() - start
    delta = fs.counters().since(before)
    return took, delta.total, delta.total / took, delta.inflight_max


def capacity(work: Path, latency: float, files: int) -> tuple[float, int]:
    """latencyfs's own throughput at ``latency``: uncached stats from ``STORM_THREADS`` threads
    on a mount of its own (calls/s, and the most it had in flight). Best of three storms, each on
    names never looked up before: a capacity is what it can do, and the two cores are shared
    with whatever else runs."""
    backing = work / "storm-backing"
    backing.mkdir()
    prefixes = ("a", "b", "c")
    for prefix in prefixes:
        for i in range(files):
            (backing / f"{prefix}{i}").touch()
    with latencyfs(backing, work / "storm-mnt", latency) as fs:
        storms = [stat_storm(fs, prefix, files, STORM_THREADS) for prefix in prefixes]
    shutil.rmtree(backing)
    rate, counted = max(storms, key=lambda s: s[0])
    return rate, counted.inflight_max


SLOW_BASELINES = ("find", "chmod-broken", "chmod-compliant", "j1")


def slow_part(work: Path, template: Path, w: object, latency: float, storm_files: int,
              baselines: frozenset[str] = frozenset(SLOW_BASELINES)) -> tuple[list, dict]:
    """envctl check/heal through latencyfs against the ``baselines`` asked for (each serial
    baseline costs ~1 ms per call: ``chgrp -R && chmod -R`` of 60k entries runs ~7 minutes,
    so large trees may take them in separate runs, each with envctl measured beside it)."""
    g = w.group  # type: ignore[attr-defined]
    backing, mnt = work / "backing", work / "mnt"
    backing.mkdir()
    copy_as(w.uid, w.gid, template, backing / "env")  # type: ignore[attr-defined]
    raw: dict = {}
    with latencyfs(backing, mnt, latency) as fs:
        root = mnt / "env"
        raw["slow_heal_broken"] = t_heal = timed(envctl("heal", root, g), 1)  # auto: 16 on FUSE
        if "chmod-broken" in baselines:
            raw["slow_chmod_r_broken"] = timed(
                chmod_r(root, g), 1, lambda: (shutil.rmtree(backing / "env"),
                                              copy_as(w.uid, w.gid,  # type: ignore[attr-defined]
                                                      template, backing / "env")))
        raw["slow_check"] = t_check = timed(envctl("check", root, g), 2)
        _, ops_check, demand, inflight_check = served(fs, envctl("check", root, g))
        if "j1" in baselines:
            raw["slow_check_j1"] = timed(envctl("check", root, g, "-j", "1"), 1)
        if "find" in baselines:
            raw["slow_find"] = timed(find_audit(root, g), 1)
        if "chmod-compliant" in baselines:
            raw["slow_chmod_r_compliant"] = timed(chmod_r(root, g), 1)
    cap, inflight_cap = capacity(work, latency, storm_files)
    rows = [["latencyfs compliant: envctl check (auto = 16)", f"{t_check:.3f}", "1.00×", ""]]
    for key, label, target in (("slow_check_j1", "envctl check -j1", ""),
                               ("slow_find", "find filter", "≥ 15×"),
                               ("slow_chmod_r_compliant", "chgrp -R && chmod -R", "≥ 20×")):
        if key in raw:
            rows.append([f"latencyfs compliant: {label}", f"{raw[key]:.3f}",
                         ratio(raw[key], t_check), target])
    rows.append(["latencyfs broken: envctl heal (auto = 16)", f"{t_heal:.3f}", "1.00×", ""])
    if "slow_chmod_r_broken" in raw:
        rows.append(["latencyfs broken: chgrp -R && chmod -R",
                     f"{raw['slow_chmod_r_broken']:.3f}",
                     ratio(raw["slow_chmod_r_broken"], t_heal), "≥ 20×"])
    rows += [
        ["latencyfs served envctl check (calls/s)", f"{demand:.0f}", "1.00×",
         f"{ops_check} calls, {inflight_check} in flight at most"],
        [f"latencyfs capacity: {STORM_THREADS} parallel stats (calls/s)", f"{cap:.0f}",
         ratio(cap, demand), f"≥ 4×, {inflight_cap} in flight at most"],
    ]
    raw |= {"latencyfs_check_calls": ops_check, "latencyfs_check_calls_per_s": demand,
            "latencyfs_check_inflight_max": inflight_check,
            "latencyfs_capacity_calls_per_s": cap, "latencyfs_capacity_inflight_max": inflight_cap}
    return rows, raw


def poll_part(work: Path, template: Path, w: object, latency: float) -> tuple[list, dict]:
    """The poller's incremental pass through latencyfs: only directories are stat'ed."""
    from envctl_shared.config import single_root
    from envctl_shared.heal import Healer
    from envctl_shared.watch.poll import Poller

    backing, mnt = work / "poll-backing", work / "poll-mnt"
    backing.mkdir()
    copy_as(w.uid, w.gid, template, backing / "env")  # type: ignore[attr-defined]
    Healer(single_root(backing / "env", w.group).roots[0]).run()  # type: ignore[attr-defined]
    with latencyfs(backing, mnt, latency):
        cfg = single_root(mnt / "env", w.group).roots[0]  # type: ignore[attr-defined]
        poller = Poller(Healer(cfg, concurrency=16))
        first = poller.run(full=True)
        os.sync()  # the trees this part wrote: their writeback is not the pass's cost
        incremental = [poller.run() for _ in range(3)]
    best = min(incremental, key=lambda p: p.duration)
    rows = [["latencyfs poll: full pass (records table)", f"{first.duration:.3f}", "1.00×",
             f"{first.dirs} dirs"],
            ["latencyfs poll: incremental, unchanged", f"{best.duration:.3f}",
             ratio(best.duration, first.duration), f"≤ 2 s, listed {best.listed}"]]
    return rows, {"poll_full": first.duration, "poll_incremental": best.duration,
                  "poll_dirs": first.dirs, "poll_listed": best.listed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=60000)
    ap.add_argument("--slow-entries", type=int, default=10000)
    ap.add_argument("--poll-entries", type=int, default=60000)
    ap.add_argument("--latency", type=float, default=1.0, help="latencyfs ms per metadata call")
    ap.add_argument("--storm-files", type=int, default=30000,
                    help="stats in each of latencyfs's three capacity storms")
    ap.add_argument("--quick", action="store_true", help="small trees, one repeat (CI smoke)")
    ap.add_argument("--slow-only", action="store_true", help="only the latencyfs part "
                    "(results: heal-latencyfs-<entries>[-<baselines>])")
    ap.add_argument("--slow-baselines", default=",".join(SLOW_BASELINES),
                    help=f"latencyfs baselines to run, of {','.join(SLOW_BASELINES)} (default all)")
    args = ap.parse_args()
    baselines = frozenset(b for b in args.slow_baselines.split(",") if b)
    if baselines - set(SLOW_BASELINES):
        ap.error(f"unknown baselines: {', '.join(sorted(baselines - set(SLOW_BASELINES)))}")
    exit_on_sigterm()
    if args.quick:
        args.entries, args.slow_entries, args.poll_entries, args.latency = 3000, 1000, 2000, 0.2
        args.storm_files = 2000
    repeat = 1 if args.quick else 3
    base = Path("/tmp/envctl-bench-heal")
    base.mkdir(mode=0o755, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=base))
    scratch.chmod(0o755)
    try:
        with fresh_ext4(scratch / "fs") as work, writer_account("w") as w:
            slow_template = work / "slow-template"
            make_template(slow_template, args.slow_entries)
            n_slow = count_entries(slow_template)
            srows, sraw = slow_part(work, slow_template, w, args.latency, args.storm_files,
                                    baselines)
            if not args.slow_only:
                template = work / "template"
                make_template(template, args.entries)
                n_local = count_entries(template)
                rows, raw = local_part(work, template, w, repeat)
                poll_template = work / "poll-template"
                n_poll = make_template(poll_template, args.poll_entries)
                prows, praw = poll_part(work, poll_template, w, args.latency)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.slow_only:
        name = f"heal-latencyfs-{n_slow}"
        if baselines != set(SLOW_BASELINES):
            name += "-" + "-".join(sorted(baselines))
        write_results(name, f"heal/check through latencyfs: {n_slow} entries at "
                      f"{args.latency} ms", ["pass", "seconds", "ratio", "target / note"], srows,
                      sraw | {"entries_latencyfs": n_slow, "latency_ms": args.latency})
        return 0
    raw |= sraw | praw | {"entries_local": n_local, "entries_latencyfs": n_slow,
                          "entries_poll": n_poll,
                   "latency_ms": args.latency, "quick": args.quick}
    name = "heal-quick" if args.quick else "heal"
    write_results(name, f"heal/check: local {n_local} entries, latencyfs {n_slow} entries "
                  f"(poll: {n_poll}) at {args.latency} ms", ["pass", "seconds", "ratio",
                                                            "target / note"],
                  rows + srows + prows, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
