"""``envctl --version`` starts as fast as the interpreter allows, ``envctl check`` without what
it does not use (issue 21 item 7).

Scripts and installers probe ``--version``; it used to import argparse, its help formatter and
the config module (8× a bare interpreter). ``check`` of a compliant tree is bound by its start-up
(its walk is faster than ``find``'s): the ``dataclasses`` module and the code it generates for
each class were a third of it. The timing rows are ``bench/bench_walk.py``; this pins down why.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

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


CHECK = ("import sys, runpy\n"
         "sys.argv = ['envctl', 'check', '--group', 'root', '-j', '1', sys.argv[1]]\n"
         "try:\n    runpy.run_module('envctl_shared.cli.main', run_name='__main__')\n"
         "except SystemExit as e:\n    print('exit', e.code)\n"
         "print(sorted(m for m in sys.modules if m in ('dataclasses', 'inspect', 'ast', "
         "'envctl_shared.api', 'envctl_shared.jobs', 'envctl_shared.watch', 'yaml')))")


def test_check_imports_no_dataclasses_nor_the_daemons_layers(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir(mode=0o2770)
    tree.chmod(0o2770)
    (tree / "f").touch(mode=0o660)
    res = subprocess.run([str(VENV_BIN / "python"), "-c", CHECK, str(tree)], capture_output=True,
                         text=True, check=True)
    *_, code, imported = res.stdout.splitlines()
    assert code == "exit 0" and imported == "[]", res.stdout


def test_version_and_usage_still_answer() -> None:
    ok = subprocess.run([str(VENV_BIN / "envctl"), "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("envctl ")
    bad = subprocess.run([str(VENV_BIN / "envctl"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 64 and "hint: run 'envctl --help'" in bad.stderr
