"""Benchmark the request socket: latency, concurrency, and the daemon's cost on a real build.

Three parts, against a real ``envctld`` started here (requests enabled, venv backend, an
offline wheelhouse):

- ``ping`` round trip, p50/p99, on one kept-open connection and with a new connection per ping
  (what each CLI invocation pays). Target: p99 ≤ 5 ms.
- 100 concurrent clients issuing ``status`` (a new connection each time, like probes) for 10 s
  (``--quick``: 3 s). Target: zero errors.
- a venv build through the daemon (submit → built → healed → reported) vs running
  ``python -m venv`` + ``pip install`` directly as the same unprivileged user with the same pip
  arguments. Target ≤ 1.1×.

Usage: ``bench/bench_api.py [--quick] [--pings N] [--clients N] [--seconds S] [--builds N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envctl_shared.api.client import Client  # noqa: E402
from envctl_shared.errors import EnvctlError  # noqa: E402

from bench.common import requests_daemon, write_results, writer_account  # noqa: E402
from tests.jobs_support import write_wheel  # noqa: E402

PYTHON = "/usr/bin/python3"
SPEC = "dependencies:\n  - pip:\n    - benchlib\n"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_ping(sock: Path, n: int) -> dict[str, float]:
    kept = []
    with Client(sock) as c:
        for _ in range(n):
            t = time.perf_counter()
            c.call("ping")
            kept.append(time.perf_counter() - t)
    fresh = []
    for _ in range(n):
        t = time.perf_counter()
        with Client(sock) as c:
            c.call("ping")
        fresh.append(time.perf_counter() - t)
    return {"kept_p50": pct(kept, .5), "kept_p99": pct(kept, .99),
            "fresh_p50": pct(fresh, .5), "fresh_p99": pct(fresh, .99)}


def bench_status(sock: Path, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)
    stop_at = [0.0]

    def client() -> None:
        mine, bad = [], []
        start.wait()
        while time.monotonic() < stop_at[0]:
            t = time.perf_counter()
            try:
                with Client(sock, timeout=30) as c:
                    c.call("status")
                mine.append(time.perf_counter() - t)
            except EnvctlError as exc:
                bad.append(f"{exc.code}: {exc.message}")
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    stop_at[0] = time.monotonic() + seconds
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": len(latencies), "errors": len(errors), "rate": len(latencies) / seconds,
            "p50": pct(latencies, .5), "p99": pct(latencies, .99),
            "first_error": errors[0] if errors else ""}


def direct_build(base: Path, uid: int, gid: int, i: int) -> float:
    """``python -m venv`` + pip as the build user, same pip arguments, into the same root."""
    prefix = base / "envs" / f"direct-{i}"
    cmd = (f"{PYTHON} -m venv {prefix} && {prefix}/bin/python -m pip install --no-input "
           f"--disable-pip-version-check --no-index --find-links {base / 'wheels'} benchlib")
    t = time.perf_counter()
    subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
                    "sh", "-c", cmd], check=True, capture_output=True)
    took = time.perf_counter() - t
    shutil.rmtree(prefix)
    return took


def daemon_build(sock: Path, i: int) -> float:
    t = time.perf_counter()
    with Client(sock, timeout=None) as c:
        for msg in c.stream("create", name=f"viad-{i}", spec=SPEC, follow=True):
            if msg.get("end"):
                job = msg["data"]
    took = time.perf_counter() - t
    if job["state"] != "succeeded":
        raise SystemExit(f"daemon build failed: {job.get('exit_detail')}")
    return took  # the env (a versioned build behind a symlink) goes with the bench's base dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short CI run")
    ap.add_argument("--pings", type=int, default=None)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--builds", type=int, default=None)
    ap.add_argument("--only", default="ping,status,build",
                    help="comma-separated parts to run (default: all three)")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    pings = args.pings or (500 if args.quick else 5000)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    builds = args.builds or (2 if args.quick else 5)

    base = Path(tempfile.mkdtemp(prefix="envctl-bench-api-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        with writer_account("build") as builder:
            import pwd
            build_name = pwd.getpwuid(builder.uid).pw_name
            write_wheel(base / "wheels", "benchlib")
            with requests_daemon(base, builder.group, build_name, {
                "backend": "venv", "allowed_backends": ["venv"], "venv_python": PYTHON,
                "pip_args": ["--no-index", "--find-links", str(base / "wheels")]}) as sock:
                ping = bench_ping(sock, pings) if "ping" in parts else {}
                status = bench_status(sock, args.clients, seconds) if "status" in parts else {}
                direct: list[float] = []
                via: list[float] = []
                for i in range(builds if "build" in parts else 0):  # interleaved: drift hits both
                    direct.append(direct_build(base, builder.uid, builder.gid, i))
                    via.append(daemon_build(sock, i))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    rows: list[list[str]] = []
    if ping:
        for kind in ("kept", "fresh"):
            p50, p99 = ping[f"{kind}_p50"], ping[f"{kind}_p99"]
            label = "kept connection" if kind == "kept" else "new connection each"
            rows.append([f"ping, {label}: p50 / p99", f"{_ms(p50)} / {_ms(p99)}", "p99 ≤ 5 ms",
                         "ok" if p99 <= 0.005 else "MISSED"])
    if status:
        rows.append([f"{args.clients} clients × status for {seconds:g} s",
                     f"{status['requests']} requests, {status['rate']:.0f}/s, "
                     f"p50 {_ms(status['p50'])}, p99 {_ms(status['p99'])}", "0 errors",
                     "ok" if status["errors"] == 0 else f"{status['errors']} errors"])
    if direct:
        d, v = statistics.median(direct), statistics.median(via)
        rows.append([f"venv build, direct (median of {builds})", f"{d:.2f} s", "", ""])
        rows.append([f"venv build, via daemon (median of {builds})", f"{v:.2f} s ({v / d:.2f}×)",
                     "≤ 1.10×", "ok" if v / d <= 1.10 else "MISSED"])
    rows.append(["load average (1 min) at the end", f"{os.getloadavg()[0]:.2f}", "", ""])
    write_results("api-quick" if args.quick else "api", "request socket API",
                  ["measure", "result", "target", "verdict"], rows,
                  {"ping": ping, "status": status, "direct_build_s": direct,
                   "daemon_build_s": via, "clients": args.clients, "seconds": seconds})


if __name__ == "__main__":
    main()
