"""Names are data, not output: a file name cannot forge a line of ``envctl check``/``heal``.

A group member names a file ``x\\nFORGED LINE: all clean`` (or puts terminal escapes or bytes
that are not UTF-8 in it). Human output escapes them ``ls -b`` style, one entry per line
whatever the name; ``--json`` carries every name exactly (bytes that are not UTF-8 as the lone
surrogates of Python's surrogateescape, which ``os.fsencode`` turns back into the bytes).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import Accounts
from tests.helpers import VENV_BIN, as_user

# name as bytes -> how human output must show it
NAMES = {
    b"x\nFORGED LINE: all clean": "x\\nFORGED LINE: all clean",
    b"cr\rtab\tbs\\": "cr\\rtab\\tbs\\\\",
    b"esc\x1b[2Jclear": "esc\\033[2Jclear",
    b"latin1-\xe9\xff": "latin1-\\351\\377",
    b"rtl-\xe2\x80\xaegnp.exe": "rtl-\\342\\200\\256gnp.exe",  # U+202E, a bidi override
    "caf\u00e9-\u65e5\u672c".encode(): "caf\u00e9-\u65e5\u672c",  # printable: as is
}


def _broken_tree(scratch: Path, accounts: Accounts) -> Path:
    """A directory by alice (umask 077) holding a file under each hostile name."""
    root = scratch / "r"
    root.mkdir()
    os.chown(root, accounts.alice.uid, accounts.alice.gid)
    script = "import os, sys\nfor n in sys.argv[1:]: open(os.fsencode(n), 'w').close()"
    as_user(accounts.alice.uid, accounts.alice.gid,
            ["/usr/bin/python3", "-c", script, *(os.fsdecode(n) for n in NAMES)], cwd=root)
    assert sorted(os.listdir(os.fsencode(root))) == sorted(NAMES)
    return root


def _envctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(VENV_BIN / "envctl"), *args], capture_output=True, timeout=60)


def test_check_and_heal_escape_names_in_human_output(scratch: Path,
                                                     accounts: Accounts) -> None:
    root = _broken_tree(scratch, accounts)
    group = ["--group", accounts.shared_group, str(root)]
    r = _envctl("check", "-v", *group)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.decode().splitlines()  # valid UTF-8: raw bytes never reach the output
    assert len(lines) == len(NAMES) + 2  # one per file, the root, the summary
    assert not any(line.startswith("FORGED") for line in lines)
    assert b"\x1b" not in r.stdout and b"\r" not in r.stdout and b"\xe2\x80\xae" not in r.stdout
    shown = {line.rsplit(": group ", 1)[0] for line in lines[:-1]}
    assert shown == {str(root)} | {f"{root}/{esc}" for esc in NAMES.values()}

    r = _envctl("heal", "-v", *group)
    assert r.returncode == 0, r.stderr
    fixed = [line for line in r.stdout.decode().splitlines() if ": fixed: " in line]
    assert {line.split(": fixed: ")[0] for line in fixed} == \
        {str(root)} | {f"{root}/{esc}" for esc in NAMES.values()}


def test_json_keeps_names_exact(scratch: Path, accounts: Accounts) -> None:
    root = _broken_tree(scratch, accounts)
    r = _envctl("check", "--json", "--group", accounts.shared_group, str(root))
    assert r.returncode == 1, r.stderr
    r.stdout.decode("ascii")  # plain ASCII JSON: escapes, no raw control bytes
    doc = json.loads(r.stdout)
    paths = {os.fsencode(f["path"]) for f in doc["paths"][0]["findings"]}
    assert paths == {os.fsencode(root)} | {os.fsencode(root) + b"/" + n for n in NAMES}
