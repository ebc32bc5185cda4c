"""The benchmarks run (in their --quick form) and produce their tables.

Targets are judged by the full benchmarks, not here: this keeps the scripts from rotting and
checks that every row they promise is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.soak, pytest.mark.slow]


def _run(script: str, results: Path, *extra: str) -> str:
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", *extra],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "ENVCTL_BENCH_RESULTS": str(results)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_bench_heal_quick(tmp_path: Path) -> None:
    out = _run("bench_heal.py", tmp_path)
    assert "broken tree: chgrp -R && chmod -R" in out and "latencyfs compliant" in out
    assert (tmp_path / "heal-quick.md").read_text().startswith("## ")
    raw = json.loads((tmp_path / "heal-quick.json").read_text())
    assert raw["writes_heal_compliant"] == 0  # counted by strace
    assert raw["writes_chmod_r_compliant"] > raw["entries_local"]  # the baseline rewrites all
    # latencyfs counted what envctl asked of it, and measured its own capacity beside it.
    assert raw["latencyfs_check_calls"] >= raw["entries_latencyfs"]  # a LOOKUP per entry at least
    assert raw["latencyfs_capacity_calls_per_s"] > raw["latencyfs_check_calls_per_s"] > 0


def test_bench_daemon_quick(tmp_path: Path) -> None:
    out = _run("bench_daemon.py", tmp_path, "--idle", "1")  # a row, not a measurement
    assert "inotifywait" in out and "poll pass vs full walk" in out
    raw = json.loads((tmp_path / "daemon-quick.json").read_text())
    assert raw["template_entries"] >= 3000


def test_bench_api_quick(tmp_path: Path) -> None:
    out = _run("bench_api.py", tmp_path, "--builds", "1", "--seconds", "1")
    assert "ping" in out and "100 clients × status for 1 s" in out


def test_bench_envs_quick(tmp_path: Path) -> None:
    out = _run("bench_envs.py", tmp_path, "--rollbacks", "4")
    assert "stable path unavailable" in out and "rollback, socket op" in out
    raw = json.loads((tmp_path / "envs-quick.json").read_text())
    assert raw["update_unavailable_s"] == 0 and raw["update_seen"] == ["1.0", "2.0"]
    assert raw["update_reads"] > 100 and max(raw["rollback_socket_s"]) < 1.0


def test_bench_builds_quick(tmp_path: Path) -> None:
    out = _run("bench_builds.py", tmp_path)
    assert "envctl rattler vs bare py-rattler" in out and "unchanged --replace" in out
    raw = json.loads((tmp_path / "builds-quick.json").read_text())
    assert all(len(v) == 1 and v[0] > 0 for v in raw["times"].values())
    assert set(raw["disk"]) == {"rattler", "venv"}
    assert set(raw["replace_s"]) == {"pinned", "loose", "venv"}


def test_bench_freeze_quick(tmp_path: Path) -> None:
    out = _run("bench_freeze.py", tmp_path)
    assert "freeze + digest, empty store" in out and "sha256sum via find" in out
    assert "hard-linked from the cache" in out
    raw = json.loads((tmp_path / "freeze-quick.json").read_text())
    assert raw["linked2"] > 0 and raw["du_two_kib"] <= 1.2 * raw["du_one_kib"]


def test_bench_walk_quick(tmp_path: Path) -> None:
    limit = Path("/proc/sys/fs/inotify/max_user_watches")
    before = limit.read_text()
    out = _run("bench_walk.py", tmp_path)
    assert "envctl --version" in out and "envctl check -j1" in out and "writer (" in out
    assert "envctl status, 3000 watches" in out and "status op (socket, one call)" in out
    assert "envctld CPU per status op, 3000 watches" in out
    raw = json.loads((tmp_path / "walk-quick.json").read_text())
    assert all(raw[f"{k}_{n}"] > 0 for k in ("status_cli", "status_op", "status_cpu", "fdinfo")
               for n in (1000, 3000))
    assert limit.read_text() == before  # --quick never touches the sysctl
