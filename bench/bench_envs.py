"""Benchmark updating a shared environment while it is read: the stable path's unavailability
during an update of a 60k-file env, and the time to roll back.

Against a real ``envctld`` started here (rattler backend, an offline local channel with two
versions of ``big``, a package of ~60k files, ``--quick``: 3k):

- a reader, as another user in its own process, opens ``<root>/big/share/big/VERSION`` in a
  tight loop (1 ms apart) during the whole ``--replace`` update (build, heal, inventory, switch)
  and sums the time its reads failed or came back empty. Target: 0 ms. The baseline is what
  the build-in-place path (venv/conda backends before versions) left the name missing or
  half-built for: the whole build, i.e. the update's own duration, measured here;
- ``env-rollback`` round trips through the socket (and the ``envctl env rollback`` command as a
  user runs it), alternating back and forward. Target: < 1 s.

Usage: ``bench/bench_envs.py [--quick] [--files N] [--rollbacks N]``.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envctl_shared.api.client import Client  # noqa: E402

from bench.common import VENV_BIN, requests_daemon, write_results, writer_account  # noqa: E402
from tests.jobs_support import CondaPackage, build_channel  # noqa: E402

ENVCTL = str(VENV_BIN / "envctl")
SPEC = "channels: [{channel}]\ndependencies:\n  - big={version}\n"

# The reader: one open+read every ~1 ms until the stop file exists; prints reads, failed time
# (s), distinct contents in order.
READER = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
reads, failed_s, since, seen = 0, 0.0, None, []
while not os.path.exists(stop):
    t = time.perf_counter()
    try:
        with open(path) as f:
            got = f.read().strip()
    except OSError:
        got = ""
    reads += 1
    if got:
        if since is not None:
            failed_s += t - since
            since = None
        if not seen or seen[-1] != got:
            seen.append(got)
    elif since is None:
        since = t
    time.sleep(0.001)
if since is not None:
    failed_s += time.perf_counter() - since
print(reads, failed_s, " ".join(seen))
"""


def big_package(version: str, files: int) -> CondaPackage:
    """~``files`` tiny files in 100-file directories, like a large env's site-packages."""
    body = {f"lib/big/d{i // 100:04d}/f{i % 100:02d}.py": (f"# {version} {i}\n", False)
            for i in range(files)}
    body["share/big/VERSION"] = (f"{version}\n", False)
    return CondaPackage("big", version, files=body)


def build(sock: Path, spec: str, replace: bool) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    job: dict[str, Any] = {}
    with Client(sock, timeout=None) as c:
        for msg in c.stream("create", name="big", spec=spec, replace=replace, follow=True):
            if msg.get("end"):
                job = msg["data"]
    took = time.perf_counter() - t
    if job.get("state") != "succeeded":
        raise SystemExit(f"build failed: {job.get('exit_detail')}")
    return took, job


def update_under_reader(base: Path, sock: Path, root: Path, spec: str,
                        uid: int, gid: int) -> dict[str, Any]:
    stop = base / "stop-reader"
    reader = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
                               sys.executable, "-c", READER, str(root / "big/share/big/VERSION"),
                               str(stop)], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    took, job = build(sock, spec, replace=True)
    time.sleep(0.5)
    stop.touch()
    out, _ = reader.communicate(timeout=60)
    reads, failed, *seen = out.split()
    return {"update_s": took, "reads": int(reads), "unavailable_s": float(failed),
            "seen": seen, "detail": job.get("exit_detail")}


def rollbacks(sock: Path, n: int) -> dict[str, Any]:
    via_socket, via_cli = [], []
    with Client(sock) as c:
        for i in range(n):
            t = time.perf_counter()
            c.call("env-rollback", name="big", to="v1" if i % 2 == 0 else "v2")
            via_socket.append(time.perf_counter() - t)
    for i in range(max(2, n // 5)):
        t = time.perf_counter()
        subprocess.run([ENVCTL, "env", "rollback", "big", "--to", "v1" if i % 2 == 0 else "v2",
                        "--socket", str(sock)], check=True, capture_output=True)
        via_cli.append(time.perf_counter() - t)
    return {"socket_s": via_socket, "cli_s": via_cli}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short CI run (3k files)")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--rollbacks", type=int, default=None)
    args = ap.parse_args()
    files = args.files or (3000 if args.quick else 60000)
    n_rollbacks = args.rollbacks or (10 if args.quick else 50)

    base = Path(tempfile.mkdtemp(prefix="envctl-bench-envs-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        with writer_account("build") as builder:
            reader = pwd.getpwnam("nobody")  # another user, reading what others may read
            t = time.perf_counter()
            channel = build_channel(base / "channel", [big_package("1.0", files),
                                                       big_package("2.0", files)])
            channel_s = time.perf_counter() - t
            build_name = pwd.getpwuid(builder.uid).pw_name
            with requests_daemon(base, builder.group, build_name, {
                "backend": "rattler", "allowed_backends": ["rattler"], "timeout": 3600,
                "channels": [channel.as_uri()], "default_channels": [channel.as_uri()]}) as sock:
                root = base / "envs"
                first_s, _ = build(sock, SPEC.format(channel=channel.as_uri(), version="1.0"),
                                   replace=False)
                entries = sum(len(d) + len(f) for _, d, f in os.walk(root / "big/"))
                update = update_under_reader(base, sock, root,
                                             SPEC.format(channel=channel.as_uri(), version="2.0"),
                                             reader.pw_uid, reader.pw_gid)
                rb = rollbacks(sock, n_rollbacks)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    unavailable_ms = update["unavailable_s"] * 1000
    sock_p50, sock_max = statistics.median(rb["socket_s"]), max(rb["socket_s"])
    cli_p50 = statistics.median(rb["cli_s"])
    rows = [
        [f"update of a {entries}-entry env (rattler, --replace): stable path unavailable",
         f"{unavailable_ms:.0f} ms over {update['reads']} reads ({' → '.join(update['seen'])})",
         f"build in place: the whole update, {update['update_s']:.1f} s", "0 ms",
         "ok" if unavailable_ms == 0 and update["seen"] == ["1.0", "2.0"] else "MISSED"],
        [f"rollback, socket op (p50 / max of {len(rb['socket_s'])})",
         f"{sock_p50 * 1000:.1f} ms / {sock_max * 1000:.1f} ms", "", "< 1 s",
         "ok" if sock_max < 1.0 else "MISSED"],
        [f"rollback, `envctl env rollback` (p50 of {len(rb['cli_s'])}, with Python start-up)",
         f"{cli_p50 * 1000:.0f} ms", "", "< 1 s", "ok" if cli_p50 < 1.0 else "MISSED"],
        ["first build / update (build, heal, inventory, switch)",
         f"{first_s:.1f} s / {update['update_s']:.1f} s", "", "", ""],
        ["load average (1 min) at the end", f"{os.getloadavg()[0]:.2f}", "", "", ""],
    ]
    write_results("envs-quick" if args.quick else "envs", "environment updates and rollback",
                  ["measure", "envctl", "baseline", "target", "verdict"], rows,
                  {"files": files, "entries": entries, "channel_s": channel_s,
                   "first_build_s": first_s, **{f"update_{k}": v for k, v in update.items()},
                   "rollback_socket_s": rb["socket_s"], "rollback_cli_s": rb["cli_s"]})


if __name__ == "__main__":
    main()
