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

Marked ``xfail(strict=True)``: it fails on the code as it is; remove the mark with the fix
(e.g. the sticky bit on the root, set by the daemon and ``init``, so that members cannot rename
or delete entries they do not own; and status flagging a ``.envctl`` that is not the daemon's).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import SYSTEM_PYTHON


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)


@pytest.mark.xfail(strict=True, reason="the root has no sticky bit: a group member can rename "
                   "the daemon's .envctl away (every managed env dangles, unnoticed)")
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
