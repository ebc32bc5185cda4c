"""A real envctld heals bursts written by another uid with umask 077, missing nothing.

Every check is the independent ``find`` audit (tests.helpers.find_violations) with a deadline,
never the daemon's own counters. Each writer finishes before the clock starts: the deadline is
time from the writer's end to a fully compliant tree. The ``soak`` tests scale their trees with
ENVCTL_SOAK_SCALE (default 1: a few thousand entries).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.daemon_support import Envctld, write_config
from tests.helpers import VENV_BIN, as_user, find_violations, wait_for
from tests.watch_support import alice_tmp, make_root, make_source, scaled, wait_quiet

pytest_plugins = ("tests.fixtures_daemon",)  # the envctld fixture

DEADLINE = 10.0  # generous for a shared 2-core CI machine; the benchmark measures the real figure


def _start(scratch: Path, accounts: Accounts,
           envctld: Callable[..., Envctld]) -> tuple[Path, Envctld]:
    root = make_root(scratch, accounts)
    cfg = write_config(scratch, [(root, accounts.shared_group)])
    return root, envctld(cfg)


def _healed(root: Path, gid: int, what: str) -> float:
    return wait_for(lambda: not find_violations(root, gid), DEADLINE, 0.05, what)


@pytest.mark.soak
def test_cp_r_and_tar_x_burst_fully_healed(accounts: Accounts, scratch: Path, envctld) -> None:
    src = make_source(scratch, scaled(150), 12)
    root, d = _start(scratch, accounts, envctld)
    a = accounts.alice
    control = alice_tmp(scratch, accounts)  # the same write, unwatched: proves it breaks things
    as_user(a.uid, a.gid, ["cp", "-r", str(src), str(control / "copy")])
    assert len(find_violations(control, accounts.shared_gid)) > scaled(150) * 12
    as_user(a.uid, a.gid, ["cp", "-r", str(src), str(root / "copy")])
    _healed(root, accounts.shared_gid, "cp -r burst healed")
    tarball = scratch / "src.tar"
    os.system(f"tar cf {tarball} -C {scratch} src")
    os.chmod(tarball, 0o644)
    (root / "untar").mkdir()
    os.chown(root / "untar", a.uid, a.gid)
    as_user(a.uid, a.gid, ["tar", "xf", str(tarball), "-C", str(root / "untar")])
    _healed(root, accounts.shared_gid, "tar x burst healed")
    n = sum(len(f) + len(ds) for _, ds, f in os.walk(root))
    assert n > 2 * scaled(150) * 12
    d.stop()
    # watchdog's "Callback ... already exists" RuntimeWarning flood stays out of the log.
    assert "Warning" not in d.log_text()


@pytest.mark.soak
def test_deep_mkdir_chains_with_files_at_speed(accounts: Accounts, scratch: Path,
                                               envctld) -> None:
    root, d = _start(scratch, accounts, envctld)
    a = accounts.alice
    script = (
        "import os, sys\n"
        "root = sys.argv[1]\n"
        "for i in range(int(sys.argv[2])):\n"
        "    p = os.path.join(root, f'chain{i}', *[f'd{j}' for j in range(12)])\n"
        "    os.makedirs(p)\n"
        "    for j in range(5):\n"
        "        open(os.path.join(p, f'f{j}'), 'w').close()\n"
        "        q = os.path.dirname(p)\n"
        "        open(os.path.join(q, f'g{j}'), 'w').close()\n"
    )
    as_user(a.uid, a.gid, ["/usr/bin/python3", "-c", script, str(root), str(scaled(60))])
    _healed(root, accounts.shared_gid, "deep chains healed")
    d.stop()


def test_subtree_renamed_into_root_and_within(accounts: Accounts, scratch: Path,
                                              envctld) -> None:
    root, d = _start(scratch, accounts, envctld)
    a = accounts.alice
    outside = alice_tmp(scratch, accounts)
    as_user(a.uid, a.gid, f"mkdir -p {outside}/tree/x/y/z && for i in $(seq 50); do "
                          f"echo > {outside}/tree/x/y/z/f$i; echo > {outside}/tree/x/f$i; done")
    as_user(a.uid, a.gid, ["mv", str(outside / "tree"), str(root / "moved")])
    _healed(root, accounts.shared_gid, "moved-in subtree healed")
    # A move inside the root of a subtree that another writer has just broken.
    as_user(a.uid, a.gid, f"chmod -R g-rwx {root}/moved/x && mv {root}/moved/x {root}/x2")
    _healed(root, accounts.shared_gid, "subtree moved within the root healed")
    assert (root / "x2" / "y" / "z" / "f1").exists()
    d.stop()


def test_chmod_g_minus_w_after_healing_is_reverted(accounts: Accounts, scratch: Path,
                                                   envctld) -> None:
    root = make_root(scratch, accounts)
    d = envctld(write_config(scratch, [(root, accounts.shared_group)]), args=("--debug",))
    a = accounts.alice
    as_user(a.uid, a.gid, f"mkdir -p {root}/env/bin && echo hi > {root}/env/bin/tool")
    _healed(root, accounts.shared_gid, "initial heal")
    healed_ctime = os.lstat(root / "env/bin/tool").st_ctime_ns
    # The daemon may win the race against any audit here, so the proof that the chmod happened
    # and was undone is in the ctime: two more metadata changes (alice's, then ours).
    as_user(a.uid, a.gid, f"chmod g-w {root}/env/bin/tool {root}/env/bin && "
                          f"stat -c %a {root}/env/bin/tool")
    _healed(root, accounts.shared_gid, "chmod g-w reverted")
    assert os.lstat(root / "env/bin/tool").st_ctime_ns > healed_ctime
    # Our own chmod/chgrp events must settle: no write loop (the file's ctime stops moving).
    wait_quiet(scratch / "envctld.sock", "the echoes of our own chmods handled")
    before = os.lstat(root / "env/bin/tool").st_ctime_ns
    time.sleep(1.0)
    assert os.lstat(root / "env/bin/tool").st_ctime_ns == before, "daemon keeps rewriting"
    # At DEBUG every fix is one line naming the path (ENVCTL_PATH in the journal).
    assert f"fixed root={root} path=env/bin/tool kind=file" in d.log_text()
    d.stop()


def test_symlink_planted_in_root_never_followed(accounts: Accounts, scratch: Path,
                                                envctld) -> None:
    secret = scratch / "secret"
    secret.write_text("root only")
    os.chmod(secret, 0o600)
    root, d = _start(scratch, accounts, envctld)
    a = accounts.alice
    as_user(a.uid, a.gid, f"ln -s {secret} {root}/evil && mkdir {root}/dir && "
                          f"ln -s {scratch} {root}/dir/up && touch {root}/dir/f")
    _healed(root, accounts.shared_gid, "links healed")
    st = os.stat(secret)
    assert (st.st_mode & 0o777, st.st_gid) == (0o600, 0), "the link's target was changed"
    assert os.lstat(root / "evil").st_gid == accounts.shared_gid
    d.stop()


RATTLER_INSTALL = r"""
import asyncio, os, sys
from pathlib import Path
import rattler
channel, prefix, cache, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
async def main():
    recs = await rattler.solve([Path(channel).as_uri()], [f"pkg{i}" for i in range(n)],
                               platforms=["noarch"], timestamp_policy="allow-missing")
    await rattler.install(recs, target_prefix=prefix, cache_dir=Path(cache),
                          show_progress=False)
asyncio.run(main())
print("installed", flush=True)
os._exit(0)  # skip interpreter teardown (py-rattler can abort there, after the install)
"""


def test_rattler_install_from_local_channel_healed(accounts: Accounts, scratch: Path,
                                                   envctld) -> None:
    from tests.jobs_support import CondaPackage, build_channel

    n = scaled(20)
    pkgs = [CondaPackage(f"pkg{i}", files={
        **{f"lib/pkg{i}/m{j}.py": ("x = 1\n", False) for j in range(25)},
        f"bin/tool{i}": ("#!/bin/sh\necho hi\n", True)}) for i in range(n)]
    channel = build_channel(scratch / "channel", pkgs)
    root, d = _start(scratch, accounts, envctld)
    a = accounts.alice
    cache = alice_tmp(scratch, accounts, "cache")
    control = alice_tmp(scratch, accounts, "control")  # unwatched: proves the install breaks
    as_user(a.uid, a.gid, [str(VENV_BIN / "python"), "-c", RATTLER_INSTALL, str(channel),
                           str(control / "env"), str(cache), str(n)])
    assert find_violations(control, accounts.shared_gid)
    out = as_user(a.uid, a.gid, [str(VENV_BIN / "python"), "-c", RATTLER_INSTALL, str(channel),
                                 str(root / "env"), str(cache), str(n)])
    assert "installed" in out.stdout
    assert (root / "env" / "bin" / f"tool{n - 1}").exists()
    _healed(root, accounts.shared_gid, "rattler install healed")
    assert os.stat(root / "env" / "bin" / "tool0").st_mode & 0o070 == 0o070  # x mirrors user x
    d.stop()
