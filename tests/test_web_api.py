"""The HTTP API's table against the protocol's, and the web service's refusals before any hub.

The routes must cover every op of the socket protocol with the op's own arguments, and
``docs/http-api.md`` must carry the table as ``routes.reference()`` renders it (regenerate with
``python -m envctl_shared.web.routes``). Every error code has an HTTP status that says what kind
of failure it is. And the service forwards nothing while the daemon would take its uid for a
person: run as root, or as a uid not on ``jupyterhub.shared_uids``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from envctl_shared.api import protocol
from envctl_shared.errors import (
    _BY_CODE,
    ConfigError,
    NotSupported,
    ProtocolError,
    ValidationError,
)
from envctl_shared.web import routes

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import REPO, VENV_BIN


def test_every_op_has_a_route_and_the_docs_carry_the_table() -> None:
    covered = {r.op for r in routes.ROUTES}
    assert set(protocol.OPS) <= covered, set(protocol.OPS) - covered
    assert len({(r.method, r.path) for r in routes.ROUTES}) == len(routes.ROUTES)
    doc = (REPO / "docs" / "http-api.md").read_text()
    assert routes.reference().strip() in doc


def test_every_error_code_has_a_status() -> None:
    assert set(_BY_CODE) <= set(routes.STATUS), set(_BY_CODE) - set(routes.STATUS)
    assert routes.http_status(ValidationError("x")) == 422
    assert routes.http_status(ConfigError("x")) == 503


def test_arguments_come_from_the_path_and_the_query_or_the_body() -> None:
    by = {(r.method, r.path): r for r in routes.ROUTES}
    logs = by["GET", "jobs/{id}/logs"]
    assert routes.arguments(logs, {"id": "abc"}, {"offset": [b"12"], "follow": [b"1"]},
                            b"") == {"id": "abc", "offset": 12}
    jobs = by["GET", "jobs"]
    assert routes.arguments(jobs, {}, {"all": [b"true"], "finished": [b"0"]}, b"") == \
        {"all": True, "finished": False}
    create = by["POST", "jobs"]
    assert routes.arguments(create, {}, {}, b'{"name": "n", "spec": "s", "replace": true}') \
        == {"name": "n", "spec": "s", "replace": True}
    rollback = by["POST", "envs/{name}/rollback"]
    assert routes.arguments(rollback, {"name": "e"}, {}, b'{"name": "other"}') == \
        {"name": "e"}  # the path names the env, whatever the body says
    for bad in (b"[1]", b"{nope", b'{"claimed_user": "alice"}'):
        with pytest.raises(ValidationError):
            routes.arguments(create, {}, {}, bad)
    with pytest.raises(ValidationError, match="offset must be a non-negative integer"):
        routes.arguments(logs, {"id": "a"}, {"offset": [b"-1"]}, b"")
    with pytest.raises(ValidationError, match="all must be true or false"):
        routes.arguments(jobs, {}, {"all": [b"maybe"]}, b"")


def test_an_op_the_daemon_does_not_know_is_not_supported() -> None:
    err = routes.unsupported(ProtocolError("unknown op 'env-diff'", hint="known ops: ..."),
                             "env-diff")
    assert err.code == "not-supported" and routes.http_status(err) == 501
    other = ProtocolError("list: argument 'all' must be bool, not str")
    assert routes.unsupported(other, "list") is other
    with pytest.raises(NotSupported, match="'no-such-op'"):  # a route newer than the table
        routes.arguments(routes.Route("GET", "x", "no-such-op"), {}, {}, b"")


@pytest.fixture(scope="module")
def plain_daemon(accounts: Accounts) -> Iterator[ApiDaemon]:
    """A daemon with no jupyterhub section: nobody's uid is shared."""
    yield from start_api_daemon(accounts)


LINK_SCRIPT = """
import sys
from pathlib import Path
from envctl_shared.errors import EnvctlError
from envctl_shared.web.link import DaemonLink
try:
    DaemonLink(Path(sys.argv[1])).run_sync("0123456789abcdef", lambda s: s.call("env-list"))
except EnvctlError as err:
    print(err.code, err.message, sep="\\n")
"""


def test_the_service_forwards_nothing_for_a_uid_the_daemon_does_not_share(
        plain_daemon: ApiDaemon, accounts: Accounts) -> None:
    res = subprocess.run(["setpriv", f"--reuid={accounts.alice.uid}",
                          f"--regid={accounts.alice.gid}", "--clear-groups",
                          str(VENV_BIN / "python"), "-c", LINK_SCRIPT, str(plain_daemon.sock)],
                         capture_output=True, text=True, timeout=60, cwd="/",
                         env={"PYTHONPATH": str(REPO / "daemon"), "PATH": "/usr/bin:/bin"})
    code, message = res.stdout.splitlines()[:2]
    assert code == "config-invalid", res.stderr
    assert f"uid {accounts.alice.uid} in jupyterhub.shared_uids" in message
    # Root is an admin to the daemon whoever signed in: refused before anything is sent.
    res = subprocess.run([str(VENV_BIN / "python"), "-c", LINK_SCRIPT, str(plain_daemon.sock)],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.startswith("config-invalid\nenvctl web runs as root"), res.stderr
