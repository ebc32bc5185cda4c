"""Benchmark the freeze of a version (issue 17): its cost against the build, and verify's.

On a ~60k-entry tree with real contents (a full CPython install with site-packages, see
``envtree.source_tree``; ``--quick``: this interpreter's standard library):

- the build stand-in: ``cp -a`` of the tree into a version directory (a rattler install of 60k
  files from a local channel costs more: bench_envs.py measured 25 s for its first build, so
  ``cp -a`` is the harder baseline for the ratio); then the tree is chowned to another uid,
  as a build leaves it;
- freeze + digest (``jobs.freeze.freeze``: the fd-based walk, chown/chmod, every file hashed,
  the store's links) of that version with an empty store, as the daemon runs it (no sync of
  its own). Target: ≤ 10 % of the build;
- the same for a second, identical version (every file found in the store: replaced by a
  link, the copy's inode freed), against ``rm -rf`` of a third copy (what freeing those
  copies costs this filesystem anyway), and what ``du`` says the two take against one;
- the same for a version hard-linked to the first (``cp -al``: what rattler's links from the
  shared conda cache give, whose inodes the first freeze made the store's): its files are
  found in the store's index by inode, neither opened nor hashed;
- ``verify`` of the frozen version, against ``find DIR -type f -exec sha256sum {} +`` of the
  same files as the baseline (both with a warm page cache: the freeze just read them).

Usage: ``bench/bench_freeze.py [--quick] [--source DIR]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envctl_shared.jobs import freeze

from bench.common import write_results
from bench.envtree import count_entries, source_tree


def _du(*paths: Path) -> int:
    """KiB ``du`` counts for all of ``paths`` at once (a hard-linked inode once)."""
    out = subprocess.run(["du", "-skc", *map(str, paths)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.splitlines()[-1].split()[0])


def _build(src: Path, dest: Path) -> float:
    """The stand-in for the install: ``cp -a``, synced (a build's output is on disk)."""
    os.sync()
    start = time.perf_counter()
    subprocess.run(["cp", "-a", str(src), str(dest)], check=True)
    os.sync()
    took = time.perf_counter() - start
    subprocess.run(["chown", "-R", "65534:65534", str(dest)], check=True)  # the build's uid
    return took


def _freeze(env: Path, name: str, store: freeze.Store, target: freeze.Target
            ) -> tuple[float, freeze.Frozen]:
    fd = os.open(env, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.sync()  # the chown's writeback is the build's, not the freeze's
        start = time.perf_counter()
        frozen = freeze.freeze(fd, name, target, str(env / name), store)
        return time.perf_counter() - start, frozen
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="this Python's stdlib, not 60k")
    ap.add_argument("--source", type=Path, help="the tree to copy (default: envtree's)")
    args = ap.parse_args()
    src = args.source or (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}."
                          f"{sys.version_info.minor}" if args.quick else source_tree())
    base = Path(tempfile.mkdtemp(prefix="envctl-bench-freeze-", dir="/var/tmp"))
    try:
        env = base / "envs"
        env.mkdir()
        target = freeze.Target(os.geteuid(), 0, "read")
        store_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        store = freeze.Store(store_fd, str(base / "store"), target)
        try:
            build = _build(src, env / "v1")
            entries = count_entries(env / "v1")
            one = _du(env / "v1")
            cost, frozen = _freeze(env, "v1", store, target)
            build2 = _build(src, env / "v2")
            cost2, frozen2 = _freeze(env, "v2", store, target)
            two = _du(env / "v1", env / "v2", base / "store")
            subprocess.run(["cp", "-al", str(env / "v1"), str(env / "v4")], check=True)
            cost4, frozen4 = _freeze(env, "v4", store, target)
            _build(src, base / "v3")
            os.sync()
            start = time.perf_counter()
            subprocess.run(["rm", "-rf", str(base / "v3")], check=True)
            remove = time.perf_counter() - start
            fd = os.open(env, os.O_RDONLY | os.O_DIRECTORY)
            try:
                start = time.perf_counter()
                _, diffs = freeze.verify(fd, "v1", target, frozen.digest, str(env / "v1"), store)
                verify = time.perf_counter() - start
            finally:
                os.close(fd)
            start = time.perf_counter()
            subprocess.run(f"find {env / 'v1'} -type f -exec sha256sum {{}} + >/dev/null",
                           shell=True, check=True)
            sha = time.perf_counter() - start
        finally:
            store.close()
            os.close(store_fd)
        assert not diffs and frozen.digest == frozen2.digest == frozen4.digest
        ratio = cost / build
        rows = [
            [f"build stand-in: cp -a of {entries} entries ({one // 1024} MiB), synced",
             f"{build:.2f} s", "", "", ""],
            ["freeze + digest, empty store (walk, chown/chmod, hash, store links)",
             f"{cost:.2f} s", f"{ratio:.1%} of the build", "≤ 10 %",
             "ok" if ratio <= 0.10 else "over"],
            ["freeze + digest, identical 2nd version (all linked to the store)",
             f"{cost2:.2f} s", f"rm -rf of a copy: {remove:.2f} s ({cost2 / remove:.2f}×)",
             "", ""],
            ["freeze + digest, a version hard-linked from the cache (cp -al of the 1st)",
             f"{cost4:.2f} s", f"{cost4 / build:.1%} of the build", "≤ 10 %",
             "ok" if cost4 <= 0.10 * build else "over"],
            ["disk: 2 frozen versions + store vs 1 version (du, KiB)", f"{two} / {one}",
             f"{two / one:.2f}×", "≤ 1.2×", "ok" if two <= 1.2 * one else "over"],
            [f"verify of the frozen version ({frozen.entries} entries)", f"{verify:.2f} s",
             f"sha256sum via find: {sha:.2f} s ({verify / sha:.2f}×)", "", ""],
        ]
        write_results("freeze-quick" if args.quick else "freeze",
                      "freezing a version: cost against its build, verify",
                      ["measure", "envctl", "baseline / ratio", "target", "verdict"], rows,
                      {"entries": entries, "build_s": build, "freeze_s": cost,
                       "freeze_ratio": ratio, "build2_s": build2, "freeze2_s": cost2,
                       "linked2": frozen2.linked, "freeze_linked_s": cost4,
                       "rm_copy_s": remove, "du_one_kib": one,
                       "du_two_kib": two,
                       "verify_s": verify, "sha256sum_s": sha, "source": str(src),
                       "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]})
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
