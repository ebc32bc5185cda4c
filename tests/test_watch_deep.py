"""Directories deeper than PATH_MAX are watched and healed in real time like any other.

alice builds a chain of ``DEPTH`` directories (``mkdir`` + ``chdir``, so no path string of hers
is ever long), 3 bytes a level: the bottom is ~9,000 bytes deep, over twice ``PATH_MAX``. The
old watch added watches by path string and silently stopped watching below ~1,365 levels; here
every watch is added through ``/proc/self/fd/N`` of a directory fd. The checks walk the chain
by fds too (``find`` and path-based tools have limits of their own at that depth).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import Accounts
from tests.daemon_support import write_config
from tests.helpers import SYSTEM_PYTHON, as_user, wait_for
from tests.watch_support import REALTIME, chain_wrong, make_root

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture

DEPTH = 3000
NAME = "dd"
# Run as alice: go down the chain with relative chdirs, then run the given statements there.
AT_BOTTOM = ("import os, sys\nos.chdir(sys.argv[1])\n"
             "for _ in range(int(sys.argv[2])):\n"
             "    os.chdir('" + NAME + "') if os.path.isdir('" + NAME + "') else "
             "(os.mkdir('" + NAME + "'), os.chdir('" + NAME + "'))\n"
             "exec(sys.argv[3])\n")


def test_chain_deeper_than_path_max_is_healed_in_real_time(accounts: Accounts, scratch: Path,
                                                           envctld) -> None:
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]))
    a, gid = accounts.alice, accounts.shared_gid
    try:
        as_user(a.uid, a.gid, [SYSTEM_PYTHON, "-c", AT_BOTTOM, str(root), str(DEPTH), ""])
        took = wait_for(lambda: chain_wrong(root, gid, DEPTH, NAME) == 0, 120, 0.2,
                        "the chain built in real time healed")
        print(f"{DEPTH}-level chain healed {took:.1f}s after its writer ended")
        # At the bottom, ~9,000 bytes below the root: a file, and a new directory with a file.
        as_user(a.uid, a.gid, [SYSTEM_PYTHON, "-c", AT_BOTTOM, str(root), str(DEPTH),
                               "open('leaf', 'w').close(); os.mkdir('sub'); "
                               "open('sub/f', 'w').close()"])
        leaf = ("leaf", "sub", "sub/f")
        took = wait_for(lambda: chain_wrong(root, gid, DEPTH, NAME, leaf) == 0, REALTIME, 0.05,
                        "new entries below PATH_MAX healed in real time")
        print(f"entries at depth {DEPTH} healed {took:.3f}s after the writer's end")
        d.stop()
    finally:  # shutil.rmtree (the scratch fixture's) recurses per level
        subprocess.run(["rm", "-rf", str(root / NAME)], check=True)
