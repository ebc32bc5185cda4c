"""The HTTP API's table against the protocol's, and the web service's refusals before any hub.

The routes must cover every op of the socket protocol with the op's own arguments, and
``docs/http-api.md`` must carry the table as ``routes.reference()`` renders it (regenerate with
``python -m envctl_shared.web.routes``). Every error code has an HTTP status that says what kind
of failure it is. And the service forwards nothing while the daemon would take its uid for a
person: run as root, or as a uid not on ``jupyterhub.shared_uids``.
"""

from __future__ import annotations

import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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
from tests.helpers import REPO, VENV_BIN, wait_for
from tests.hub_support import free_port


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


HUB_ENV = {"JUPYTERHUB_API_TOKEN": "0123456789abcdef", "JUPYTERHUB_API_URL":
           "http://127.0.0.1:9/hub/api", "JUPYTERHUB_CLIENT_ID": "service-envctl",
           "JUPYTERHUB_SERVICE_PREFIX": "/services/envctl/",
           "JUPYTERHUB_SERVICE_NAME": "envctl"}


def _web(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "envctl"), "web"], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin",
                                           "PYTHONPATH": str(REPO / "daemon"), **env})


def test_the_service_refuses_to_start_where_it_cannot_work() -> None:
    """Not run by a hub (nothing to sign people in with); an https service URL (the hub's
    internal_ssl) without the certificate the hub would hand it: refusing plain HTTP there;
    no name to know who may use the service by."""
    res = _web({})
    assert res.returncode == 78 and "is a JupyterHub service" in res.stderr, res.stderr
    assert "JUPYTERHUB_API_TOKEN" in res.stderr and "are not set" in res.stderr
    assert "hint:" in res.stderr and "'envctl web --local'" in res.stderr  # the way to try it
    res = _web({**HUB_ENV, "JUPYTERHUB_SERVICE_URL": "https://127.0.0.1:10101"})
    assert res.returncode == 78 and "refusing to serve without TLS" in res.stderr, res.stderr
    # An external service given no name (nor access scopes): HubOAuth would let in any hub
    # token, whatever the hub's roles say about who may use the service.
    res = _web({k: v for k, v in HUB_ENV.items() if k != "JUPYTERHUB_SERVICE_NAME"})
    assert res.returncode == 78 and "JUPYTERHUB_SERVICE_NAME" in res.stderr, res.stderr


def test_with_the_hubs_certificate_it_serves_tls(tmp_path: Path) -> None:
    """internal_ssl: the hub hands the service a certificate and the CA of its clients (the
    proxy and the hub present theirs: mutual TLS, as for a single-user server). One
    self-signed certificate plays every part here."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    port = free_port()
    env = {**HUB_ENV, "JUPYTERHUB_SERVICE_URL": f"https://127.0.0.1:{port}",
           "JUPYTERHUB_SSL_CERTFILE": str(tmp_path / "cert.pem"),
           "JUPYTERHUB_SSL_KEYFILE": str(tmp_path / "key.pem"),
           "JUPYTERHUB_SSL_CLIENT_CA": str(tmp_path / "cert.pem"),
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "daemon")}
    proc = subprocess.Popen([str(VENV_BIN / "envctl"), "web"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
        url = f"https://127.0.0.1:{port}/services/envctl/api/ping"

        def answers() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                urllib.request.urlopen(url, context=context, timeout=5)
            except urllib.error.HTTPError as exc:
                exc.close()
                return exc.code == 401  # over TLS, and no user
            except OSError:
                return False
            return False
        wait_for(answers, 30, interval=0.1, what="envctl web over TLS")
        with pytest.raises(OSError):  # plain HTTP is not served there
            urllib.request.urlopen(url.replace("https", "http"), timeout=5)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
