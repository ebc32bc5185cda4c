"""``envctl --version`` starts as fast as the interpreter allows (issue 21 item 7).

Scripts and installers probe it; it used to import argparse, its help formatter and the config
module (8× a bare interpreter). The timing row is ``bench/bench_walk.py``; this pins down why.
"""

from __future__ import annotations

import subprocess

from .helpers import VENV_BIN

PROBE = ("import sys, runpy\nsys.argv = ['envctl', '--version']\n"
         "try:\n    runpy.run_module('envctl_shared.cli.main', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print(sorted(m for m in sys.modules if m in ('argparse', 'envctl_shared.config', "
         "'envctl_shared.errors', 'shutil', 'textwrap')))")


def test_version_imports_no_parser_and_no_config() -> None:
    res = subprocess.run([str(VENV_BIN / "python"), "-c", PROBE], capture_output=True,
                         text=True, check=True)
    version, imported = res.stdout.splitlines()
    assert version.startswith("envctl ") and imported == "[]", res.stdout


def test_version_and_usage_still_answer() -> None:
    ok = subprocess.run([str(VENV_BIN / "envctl"), "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("envctl ")
    bad = subprocess.run([str(VENV_BIN / "envctl"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 64 and "hint: run 'envctl --help'" in bad.stderr
