"""Benchmark building environments: envctl's whole request, as a user runs it, against the bare
installers it drives, on the same inputs, interleaved, cold and warm.

Inputs (offline): the test channel with a real python and pip (``jobs_support.python_channel``:
this machine's interpreter and stdlib, relocated) and 7 hand-made wheels (one depends on
another). envctl runs as a real ``envctld`` started here; every envctl number is the wall time
of ``envctl request create`` as a member of the group (CLI start, socket, queue, parse, build,
compile, heal, switch, the end of the log stream). Rows (median of the rounds, each round runs
every variant once, in turn, so drift hits all alike):

- conda (rattler): envctl vs a bare py-rattler solve+install script, cold (empty package
  cache) and warm; warm also vs the script followed by ``compileall`` (envctl byte-compiles
  every env so that a frozen, read-only version never needs to write: conda does the same);
- conda + pip: envctl (rattler, then uv) vs the same script followed by ``uv pip install
  --compile-bytecode``;
- venv: envctl (venv backend: ``python -m venv --without-pip`` + uv) vs ``uv venv && uv pip
  install --compile-bytecode`` (cold: empty uv cache; warm: reused; envctl's uv cache is
  private to each build, so envctl is always cold) and vs ``python -m venv && pip install``;
- an unchanged ``--replace`` vs the first build (warm): with every pip entry an exact pin (as
  ``env export`` writes them) the solve is compared with the current version and no new version
  is made; with loose pip entries (they may resolve anew) a new version is built;
- disk: 3 versions of an unchanged env vs 1 (``du``, hard links counted once), both backends
  (the loose spec for rattler: the pinned one makes 1 version).

Targets (issue 18): within 1.3× + 0.3 s of the bare installer; unchanged ``--replace`` ≤ 20 %
of the first build; 3 versions ≤ 1.2× the disk of one.

Usage: ``bench/bench_builds.py [--quick] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envctl_shared.jobs.backends import uv_bin  # noqa: E402

from bench.common import (  # noqa: E402
    VENV_BIN,
    exit_on_sigterm,
    requests_daemon,
    write_results,
    writer_account,
)
from tests.jobs_support import python_channel, write_wheel  # noqa: E402

ENVCTL = str(VENV_BIN / "envctl")
BASE_PYTHON = "/usr/bin/python3"
WHEELS = ["benchdep", "bench1", "bench2", "bench3", "bench4", "bench5", "bench6"]
CONDA = "channels: [{channel}]\ndependencies:\n  - python=3.11.2=0\n  - pip\n"
MIXED = CONDA + "  - pip:\n" + "".join(f"    - {w}\n" for w in WHEELS)
PINNED = CONDA + "  - pip:\n" + "".join(f"    - {w}==1.0\n" for w in WHEELS)  # as exported
VENV = "dependencies:\n  - pip:\n" + "".join(f"    - {w}\n" for w in WHEELS)

# The bare installer: what envctl's rattler child does, nothing else (same solve, same install,
# same lenient match specs), with Python start-up and imports counted as envctl's are.
BARE_RATTLER = """
import asyncio, os, sys
from pathlib import Path
import rattler
channel, prefix, cache = sys.argv[1:4]
async def main():
    specs = [rattler.MatchSpec(s, strict=False) for s in sys.argv[4:]]
    records = await rattler.solve([Path(channel).as_uri()], specs,
                                  platforms=["linux-64", "noarch"],
                                  timestamp_policy="allow-missing")
    await rattler.install(records, target_prefix=prefix, cache_dir=Path(cache),
                          show_progress=False)
asyncio.run(main())
sys.stdout.flush()
os._exit(0)
"""


class Bench:
    """The daemon, the inputs and a scratch area; each method builds once and returns seconds."""

    def __init__(self, base: Path, sock: Path, channel: Path, uid: int, gid: int) -> None:
        self.base, self.sock, self.channel, self.uid, self.gid = base, sock, channel, uid, gid
        self.uv = uv_bin() or "uv"
        self.wheels = base / "wheels"
        self.scratch = base / "bare"
        self.scratch.mkdir(mode=0o755)
        os.chown(self.scratch, uid, gid)
        self.n = 0

    def _user(self, cmd: str) -> float:
        """``cmd`` (sh) as the member, timed."""
        t = time.perf_counter()
        res = subprocess.run(["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                              "--init-groups", "env", "-i", "PATH=/usr/bin:/bin",
                              f"HOME={self.scratch}", "LANG=C.UTF-8", "sh", "-c", cmd],
                             capture_output=True, text=True, cwd="/", check=False)
        took = time.perf_counter() - t
        if res.returncode != 0:
            raise SystemExit(f"{cmd}\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
        return took

    def _fresh(self, what: str) -> str:
        self.n += 1
        return f"{what}{self.n}"

    def _spec(self, text: str) -> Path:
        path = self.base / "specs" / f"{self._fresh('spec')}.yml"
        path.parent.mkdir(mode=0o755, exist_ok=True)
        path.write_text(text.format(channel=self.channel.as_uri()))
        os.chmod(path, 0o644)
        return path

    def envctl(self, text: str, name: str | None = None, backend: str = "rattler",
               replace: bool = False) -> float:
        spec = self._spec(text)
        extra = " --replace" if replace else ""
        return self._user(f"ENVCTL_SOCKET={self.sock} {ENVCTL} request create "
                          f"{name or self._fresh('env')} -f {spec} --backend {backend}{extra}")

    def cold_envctl_cache(self) -> None:
        """Empty the daemon's conda package cache, wherever this version keeps it."""
        for path in [*glob.glob(str(self.base / "state" / "cache-*")),
                     *glob.glob(str(self.base / "envs" / ".envctl" / "cache"))]:
            shutil.rmtree(path, ignore_errors=True)

    def bare_rattler(self, cache: str, pip: bool = False, compiled: bool = False) -> float:
        prefix = self.scratch / self._fresh("rattler")
        cmd = (f"{sys.executable} -c '{BARE_RATTLER}' {self.channel} {prefix} "
               f"{self.scratch}/{cache} python=3.11.2=0 pip")
        if compiled:
            cmd += (f" && {prefix}/bin/python -I -m compileall -q -j 0 "
                    f"{prefix}/lib/python3.11/dist-packages")  # the site dir, as envctl
        if pip:
            cmd += f" && {self._uv_install(prefix, 'rattler-uv-cache-' + str(self.n))}"
        return self._user(cmd)

    def _uv_install(self, prefix: Path, cache: str) -> str:
        return (f"UV_CACHE_DIR={self.scratch}/{cache} {self.uv} pip install -q "
                f"--python {prefix}/bin/python --compile-bytecode --no-index "
                f"--find-links {self.wheels} {' '.join(WHEELS)}")

    def bare_uv_venv(self, cache: str) -> float:
        prefix = self.scratch / self._fresh("uvvenv")
        return self._user(f"UV_CACHE_DIR={self.scratch}/{cache} {self.uv} venv -q {prefix} "
                          f"--python {BASE_PYTHON} && {self._uv_install(prefix, cache)}")

    def bare_pip_venv(self) -> float:
        prefix = self.scratch / self._fresh("pipvenv")
        return self._user(f"{BASE_PYTHON} -m venv {prefix} && {prefix}/bin/python -m pip "
                          "install -q --no-input --disable-pip-version-check --no-index "
                          f"--find-links {self.wheels} {' '.join(WHEELS)}")

    def du(self, path: Path) -> int:
        """Bytes on disk under ``path``, each hard-linked file counted once."""
        out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True,
                             text=True, check=True).stdout
        return int(out.split()[0])


def rounds(n: int, variants: dict[str, Callable[[], float]],
           before: dict[str, Callable[[], None]]) -> dict[str, list[float]]:
    """Each round runs every variant once, in turn (``before[k]`` untimed, first)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(n):
        for key, run in variants.items():
            if key in before:
                before[key]()
            os.sync()
            times[key].append(run())
    return times


def verdict(ours: float, bare: float) -> str:
    return "ok" if ours <= 1.3 * bare + 0.3 else f"MISSED by {ours - (1.3 * bare + 0.3):.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round (CI smoke run)")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    n = args.rounds or (1 if args.quick else 3)
    exit_on_sigterm()
    t = time.perf_counter()
    channel = python_channel()
    channel_s = time.perf_counter() - t
    base = Path(tempfile.mkdtemp(prefix="envctl-bench-builds-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        with writer_account("build") as member:
            for i, name in enumerate(WHEELS):
                write_wheel(base / "wheels", name, "1.0", f"VALUE = {i}\n" + "X = 1\n" * 200,
                            requires=() if name == "benchdep" else ("benchdep",))
            build_name = pwd.getpwuid(member.uid).pw_name
            with requests_daemon(base, member.group, build_name, {
                "backend": "rattler", "allowed_backends": ["rattler", "venv"], "timeout": 600,
                "channels": [channel.as_uri()], "default_channels": [channel.as_uri()],
                "venv_python": BASE_PYTHON, "keep_versions": 10, "max_versions": 20,
                "gc_grace": 86400,
                "pip_args": ["--no-index", "--find-links", str(base / "wheels")]}) as sock:
                b = Bench(base, sock, channel, member.uid, member.gid)
                b.envctl(CONDA)  # one untimed build: the daemon's first-build work (imports)
                b.bare_rattler("warm-cache")  # and the warm caches
                b.bare_uv_venv("warm-uv")
                times = rounds(n, {
                    "envctl_rattler_cold": lambda: b.envctl(CONDA),
                    "bare_rattler_cold": lambda: b.bare_rattler(b._fresh("cold-cache")),
                    "envctl_rattler_warm": lambda: b.envctl(CONDA),
                    "bare_rattler_warm": lambda: b.bare_rattler("warm-cache"),
                    "bare_compiled_warm": lambda: b.bare_rattler("warm-cache", compiled=True),
                    "envctl_mixed_warm": lambda: b.envctl(MIXED),
                    "bare_mixed_warm": lambda: b.bare_rattler("warm-cache", pip=True),
                    "envctl_venv": lambda: b.envctl(VENV, backend="venv"),
                    "uv_venv_cold": lambda: b.bare_uv_venv(b._fresh("cold-uv")),
                    "uv_venv_warm": lambda: b.bare_uv_venv("warm-uv"),
                    "pip_venv": b.bare_pip_venv,
                }, before={"envctl_rattler_cold": b.cold_envctl_cache})
                # --replace of an unchanged spec vs its first build; then the versions vs 1 on disk
                again = 1 if args.quick else 2  # --replace builds after the first
                disk: dict[str, list[int]] = {}
                replace: dict[str, list[float]] = {}  # first build, then each --replace
                for backend, text, key in (("rattler", PINNED, "pinned"),
                                           ("rattler", MIXED, "loose"), ("venv", VENV, "venv")):
                    name = f"same-{key}"
                    first = b.envctl(text, name, backend)
                    one = b.du(base / "envs" / ".envctl" / "envs" / name)
                    replace[key] = [first, *(b.envctl(text, name, backend, replace=True)
                                             for _ in range(again))]
                    if key != "pinned":
                        disk[backend] = [one, b.du(base / "envs" / ".envctl" / "envs" / name)]
    finally:
        shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}

    def replace_row(what: str, key: str) -> list[str]:
        first_s, again_s = replace[key][0], statistics.median(replace[key][1:])
        return [f"unchanged --replace vs first build ({what})", f"{again_s:.2f} s",
                f"{first_s:.2f} s", f"{again_s / first_s:.0%}",
                "ok" if again_s <= 0.2 * first_s else "MISSED (target ≤ 20 %)"]

    def row(what: str, ours: str, bare: str) -> list[str]:
        o, b_ = med[ours], med[bare]
        return [what, f"{o:.2f} s", f"{b_:.2f} s", f"{o / b_:.1f}×", verdict(o, b_)]

    rows = [
        row("conda, cold: envctl rattler vs bare py-rattler", "envctl_rattler_cold",
            "bare_rattler_cold"),
        row("conda, warm: envctl rattler vs bare py-rattler", "envctl_rattler_warm",
            "bare_rattler_warm"),
        row("conda, warm: envctl rattler vs bare py-rattler + compileall (read-only ready)",
            "envctl_rattler_warm", "bare_compiled_warm"),
        row(f"conda + {len(WHEELS)} wheels, warm: envctl vs py-rattler + uv --compile-bytecode",
            "envctl_mixed_warm", "bare_mixed_warm"),
        row(f"venv + {len(WHEELS)} wheels: envctl vs uv venv + uv pip --compile-bytecode, cold",
            "envctl_venv", "uv_venv_cold"),
        row(f"venv + {len(WHEELS)} wheels: envctl vs uv venv + uv pip --compile-bytecode, warm",
            "envctl_venv", "uv_venv_warm"),
        row(f"venv + {len(WHEELS)} wheels: envctl vs python -m venv + pip install",
            "envctl_venv", "pip_venv"),
        replace_row("conda + pip pins as exported: no new version", "pinned"),
        replace_row("conda + loose pip entries: a new version", "loose"),
        replace_row("venv + loose pip entries: a new version", "venv"),
        *[[f"disk: {1 + again} versions vs 1 ({backend}; du, hard links once)",
           f"{d[1] / 2**20:.1f} MiB", f"{d[0] / 2**20:.1f} MiB", f"{d[1] / d[0]:.2f}×",
           "ok" if d[1] <= 1.2 * d[0] else "MISSED (target ≤ 1.2×)"]
          for backend, d in disk.items()],
    ]
    raw: dict[str, Any] = {"rounds": n, "channel_s": channel_s, "times": times,
                           "replace_s": replace,
                           "disk": disk, "load_1min": os.getloadavg()[0]}
    write_results("builds-quick" if args.quick else "builds",
                  f"environment builds: envctl vs the bare installers (median of {n})",
                  ["measure", "envctl", "bare", "ratio", "target: ≤ 1.3× + 0.3 s"], rows, raw)


if __name__ == "__main__":
    main()
