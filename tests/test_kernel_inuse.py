"""GC knows what is in use: a version a running kernel started on is never collected.

A real daemon (``keep_versions: 1``, ``gc_grace: 0``: a retired version is collectable at once)
builds a venv env with ipykernel; a real ``jupyter_client`` kernel starts on v1 through the
daemon's kernelspec; a replace makes v2 current. ``env gc`` then keeps v1 while the kernel runs
(the kernel still imports from it), and collects it once the kernel has stopped. Before, GC
knew only time: v1 went at once and the kernel's next import failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from envctl_shared.jobs import usemarks

from tests.api_support import ApiDaemon
from tests.conftest import Accounts, User
from tests.helpers import as_user, wait_for

pytest.importorskip("jupyter_client")
from tests.test_kernels import _build, _kernel, _specs, kernel_daemon  # noqa: E402


@pytest.fixture(scope="module")
def gcapi(accounts: Accounts) -> Iterator[tuple[ApiDaemon, Path]]:
    yield from kernel_daemon(accounts, "envctl-inuse-", keep_versions=1, gc_grace=0)


def _gc(api: ApiDaemon) -> list[str]:
    """``envctl env gc`` as root (an admin): the versions it removed."""
    res = api.cli(User("root", 0, 0), "env", "gc", "--json")
    assert res.returncode == 0, res.stderr
    return [f"{r['name']}/{r['version']}" for r in json.loads(res.stdout)["removed"]]


def test_gc_keeps_a_version_a_kernel_runs_and_collects_it_after(
        gcapi: tuple[ApiDaemon, Path], accounts: Accounts, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    api, kernels = gcapi
    _build(api, accounts, "inuse", "1.0")
    v1 = Path(os.path.realpath(api.root / "inuse"))
    mark = v1.with_name(v1.name + usemarks.SUFFIX)
    st = mark.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)  # the daemon's, readable to all
    ksm = _specs(kernels, monkeypatch)
    with _kernel(ksm, "envctl-inuse", tmp_path) as run:
        assert run("import sys; print(sys.prefix)") == f"{v1}\n"
        _build(api, accounts, "inuse", "2.0", "--replace")
        assert os.path.realpath(api.root / "inuse") != str(v1)
        assert _gc(api) == []  # v1 is retired, past its grace, and in use
        assert v1.is_dir()
        assert run("import kversion; print(kversion.VERSION)") == "1.0\n"  # still works
    # The kernel has stopped: its lock went with it; GC collects v1 (and its mark).
    assert _gc(api) == ["inuse/v1"]
    assert not v1.exists() and not mark.exists()


HOLD = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, 37, struct.pack('hhqqi4x', fcntl.F_RDLCK, 0, 0, 0, 0))
print("held", flush=True)
sys.stdin.read()
"""


def test_grace_counts_from_the_last_use(accounts: Accounts, scratch: Path) -> None:
    """A mark a member holds is in use whatever the grace; once let go, the version stays
    for ``grace`` from that last use, then it is free."""
    env = scratch / "env"
    env.mkdir(mode=0o755)
    fd = os.open(env, os.O_RDONLY | os.O_DIRECTORY)
    try:
        usemarks.create(fd, "v1")
        old = 1_000_000.0
        os.utime(env / "v1.use", (old, old))
        assert not usemarks.in_use(fd, "v1", grace=60)  # last used long ago
        a = accounts.alice
        holder = subprocess.Popen(
            ["setpriv", f"--reuid={a.uid}", f"--regid={a.gid}", "--clear-groups",
             sys.executable, "-c", HOLD, str(env / "v1.use")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            assert usemarks.in_use(fd, "v1", grace=0)  # held: in use, grace or not
        finally:
            holder.communicate("")
        assert usemarks.in_use(fd, "v1", grace=60)  # seen in use just now: within grace
        assert not usemarks.in_use(fd, "v1", grace=0)
        assert wait_for(lambda: not usemarks.in_use(fd, "v1", grace=1.0), 5, 0.1,
                        "the grace from the last use to pass") >= 0
        # A member cannot write the mark: it can only hold it shared, keeping one version.
        res = as_user(a.uid, a.gid, ["sh", "-c", f"echo x >> {env / 'v1.use'}"], check=False)
        assert res.returncode != 0 and "Permission denied" in res.stderr
    finally:
        os.close(fd)
