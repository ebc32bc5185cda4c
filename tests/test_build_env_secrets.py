"""``requests.build_env`` reaches the package managers, never the requester.

Found by an attack: with the site's index URL (credentials in it) in ``build_env``, a pip entry
``numpy===${PIP_INDEX_URL}`` made pip expand it and print it into the requester's own log, and
a ``--test 'env'`` command printed it outright. Both are closed here against a real daemon
whose environment holds such a URL.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts

SECRET = "S3CRET-TOKEN"
INDEX = f"https://svc-user:{SECRET}@pypi.internal/simple"
EX_DATAERR = 65


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts, env={"PIP_INDEX_URL": INDEX},
                                build_env=["PIP_INDEX_URL"])


@pytest.mark.parametrize("entry", ["greetlib===${PIP_INDEX_URL}",
                                   'greetlib; python_version == "${PIP_INDEX_URL}"'])
def test_pip_entries_cannot_expand_variables(api: ApiDaemon, accounts: Accounts,
                                             entry: str) -> None:
    spec = api.write_spec(f"dependencies:\n  - pip:\n    - '{entry}'\n")
    res = api.cli(accounts.alice, "request", "create", "leak", "-f", str(spec), "--backend",
                  "venv")
    assert res.returncode == EX_DATAERR, res.stdout + res.stderr
    assert "which pip would expand" in res.stderr
    assert SECRET not in res.stdout + res.stderr


def test_test_commands_do_not_see_build_env(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec("dependencies: []\n")
    res = api.cli(accounts.alice, "request", "create", "tested", "-f", str(spec), "--backend",
                  "venv", "--test", "env; echo index=${PIP_INDEX_URL:-none}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "index=none" in res.stdout and "VIRTUAL_ENV=" in res.stdout  # the test ran, activated
    assert SECRET not in res.stdout + res.stderr
