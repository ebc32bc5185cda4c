"""A group member can break every managed environment with one ``mv`` (found attacking issue 10).

The shared root is group-writable without the sticky bit (``init`` makes it 2770/2775, and the
daemon leaves the sticky bit alone), so any member may rename any entry of the root, including
the daemon's root-owned ``<root>/.envctl`` (a rename within one directory needs write access to
the directory only, not to the entry). Every ``<root>/NAME`` is the relative symlink
``.envctl/envs/NAME/vN``: after ``mv .envctl .x`` every managed environment is gone for every
user and kernel, the daemon recreates an empty ``.envctl`` at the next build, ``env list`` no
longer lists them at all (not even as broken) and ``envctl status`` says "ready". A member who
makes her own ``.envctl/envs/NAME/vN`` instead has ``env list`` refuse ("tampered") while
``<root>/NAME`` runs her files (env contents are group-writable by design anyway, so this adds
no new write access, but the daemon's records and its view of the envs are lost silently).

Fixed: the requests root's own directory is sticky by policy (``policy.judge``; the healer
sets the bit again when it is cleared, ``envctl init`` creates the root with it), so members
still create their own entries but cannot rename or delete entries they do not own.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator

import pytest

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import SYSTEM_PYTHON, wait_for


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)


def test_group_member_cannot_rename_the_daemons_area(api: ApiDaemon,
                                                     accounts: Accounts) -> None:
    area = api.root / ".envctl"
    assert area.is_dir() and area.stat().st_uid == 0
    a = accounts.alice
    moved = subprocess.run(
        ["setpriv", f"--reuid={a.uid}", f"--regid={a.gid}", f"--groups={accounts.shared_gid}",
         SYSTEM_PYTHON, "-c", "import os, sys; os.rename(sys.argv[1], sys.argv[1] + '-x')",
         str(area)], capture_output=True, text=True)
    if moved.returncode == 0:  # put it back for the module's daemon
        (api.root / ".envctl-x").rename(area)
    assert moved.returncode != 0 and "PermissionError" in moved.stderr, \
        "a group member renamed the daemon's .envctl"


def test_the_daemon_keeps_the_requests_root_sticky(api: ApiDaemon) -> None:
    """The sticky bit is policy for the requests root's own directory: cleared (by its owner,
    or a careless chmod), the healer sets it again like any other wrong bit."""
    assert api.root.stat().st_mode & stat.S_ISVTX
    os.chmod(api.root, stat.S_IMODE(api.root.stat().st_mode) & ~stat.S_ISVTX)
    wait_for(lambda: api.root.stat().st_mode & stat.S_ISVTX, 30, 0.2,
             "the daemon setting the sticky bit again")


def test_a_managed_env_whose_area_is_gone_is_listed_broken(api: ApiDaemon,
                                                           accounts: Accounts) -> None:
    """Should ``.envctl`` still go away (root's own mistake, or a root without the bit), a
    managed ``<root>/NAME`` whose versions are gone is listed ``broken``, not silently dropped.
    (Any backend will do: rattler builds in under a second, a venv in seconds.)"""
    spec = api.write_spec(api.hello_spec())
    res = api.cli(accounts.alice, "request", "create", "kept-env", "-f", str(spec), "--json")
    assert res.returncode == 0, res.stderr
    area = api.root / ".envctl"
    area.rename(api.root / ".envctl-x")  # root may: the sticky bit does not bind the owner
    try:
        listed = api.cli(accounts.alice, "env", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        found = {e["name"]: e for e in json.loads(listed.stdout)}
        assert found.get("kept-env", {}).get("status") == "broken", found
    finally:
        if area.exists():  # recreated, empty, by the daemon
            shutil.rmtree(area)
        (api.root / ".envctl-x").rename(area)
