"""The benchmarks run (in their --quick form) and produce their tables.

Targets are judged by the full benchmarks, not here: this keeps the scripts from rotting and
checks that every row they promise is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.soak


def _run(script: str, *extra: str) -> str:
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_bench_heal_quick() -> None:
    out = _run("bench_heal.py")
    assert "broken tree: chgrp -R && chmod -R" in out and "slowfs compliant" in out
    raw = json.loads((REPO / "bench/results/heal-quick.json").read_text())
    assert raw["writes_heal_compliant"] == 0  # counted by strace
    assert raw["writes_chmod_r_compliant"] > raw["entries_local"]  # the baseline rewrites all


def test_bench_daemon_quick() -> None:
    out = _run("bench_daemon.py")
    assert "inotifywait" in out and "poll pass vs full walk" in out
    raw = json.loads((REPO / "bench/results/daemon-quick.json").read_text())
    assert raw["template_entries"] >= 3000


def test_bench_api_quick() -> None:
    out = _run("bench_api.py", "--builds", "1")
    assert "ping" in out and "100 clients" in out
