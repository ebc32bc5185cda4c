"""``envctl web --local``: the dev-only mode without a hub (what ``make run`` starts).

No hub means nobody to tell users apart, so the pages act as the uid that runs them — safe
only for the one who started it: it listens on loopback only, and every request needs the
secret of the URL it prints (kept in a cookie; a write with the cookie also needs the page's
``_xsrf``). Run here as alice against a real daemon: what she builds is hers.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import VENV_BIN, wait_for
from tests.hub_support import free_port

pytest_plugins = ("tests.fixtures_web",)  # browser_factory


@pytest.fixture(scope="module")
def daemon(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)


@pytest.fixture
def local_web(daemon: ApiDaemon, accounts: Accounts) -> Iterator[tuple[str, int]]:
    """``envctl web --local`` run by alice: (the URL it prints, its port)."""
    port = free_port()
    proc = subprocess.Popen(daemon.cli_argv(accounts.alice, "web", "--local", "--port",
                                            str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = ""
        while f"127.0.0.1:{port}/" not in line:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line or proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield line.strip(), port
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def _open(opener: urllib.request.OpenerDirector, url: str, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with opener.open(urllib.request.Request(url, data=data, headers=headers or {}),
                         timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_local_mode_is_for_the_holder_of_the_url_only(daemon: ApiDaemon, accounts: Accounts,
                                                     local_web: tuple[str, int]) -> None:
    refused = subprocess.run(daemon.cli_argv(accounts.alice, "web", "--local", "--ip",
                                             "0.0.0.0"), capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 78 and "loopback only" in refused.stderr, refused.stderr
    url, port = local_web
    base = url  # every URL starts with the secret
    root = f"http://127.0.0.1:{port}/"
    secret = url.removeprefix(root).strip("/")
    assert len(secret) >= 32
    stranger = urllib.request.build_opener()
    for path in ("", "api/envs", "api/envs?token=" + secret, "new", secret):
        status, body = _open(stranger, root + path)
        assert status == 404 and secret not in body.replace(path, ""), (path, status)
    status, body = _open(stranger, base + "api/whoami",
                         headers={"Authorization": f"token {secret}"})
    assert status == 200 and json.loads(body)["uid"] == accounts.alice.uid
    # The browser's way: the printed URL, and the _xsrf cookie of its pages.
    jar = http.cookiejar.CookieJar()
    me = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    status, page = _open(me, url)
    assert status == 200 and "<h1>Environments</h1>" in page
    status, page = _open(me, base + "new")
    assert status == 200
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page)
    assert xsrf is not None
    form: dict[str, Any] = {"name": "local-env", "spec": "dependencies: []",
                            "backend": "venv"}
    no_token = urllib.parse.urlencode(form).encode()
    assert _open(me, base + "new", no_token)[0] == 403  # a cross-site form's POST
    # A spec the daemon refuses: the form again, as it was sent (escaped), the refusal on top.
    bad = {**form, "spec": "dependencies: [</textarea><b>x</b>", "_xsrf": xsrf.group(1)}
    status, page = _open(me, base + "new", urllib.parse.urlencode(bad).encode())
    assert status == 422 and 'id="error"' in page and "hint:" in page, page
    assert "dependencies: [&lt;/textarea&gt;&lt;b&gt;x&lt;/b&gt;</textarea>" in page
    assert 'value="venv"' in page and 'value="local-env"' in page
    with_token = urllib.parse.urlencode({**form, "_xsrf": xsrf.group(1)}).encode()
    status, page = _open(me, base + "new", with_token)
    assert status == 200 and "Job " in page, page
    job_id = re.search(r'data-id="([^"]+)"', page)
    assert job_id is not None
    wait_for(lambda: daemon.job(job_id.group(1))["terminal"], 120, interval=0.2,
             what="the local build")
    job = daemon.job(job_id.group(1))
    assert job["state"] == "succeeded" and job["requester"]["uid"] == accounts.alice.uid


def test_a_port_it_cannot_have_is_said_so() -> None:
    """A port another server holds (a second ``make run``): was 'internal error: OSError'
    (exit 70); a port beyond 65535 was served on that number modulo 65536."""
    envctl = [str(VENV_BIN / "envctl"), "--socket", "/nonexistent.sock", "web", "--local"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = subprocess.run([*envctl, "--port", str(port)], capture_output=True, text=True,
                             timeout=60)
    assert res.returncode == 78, res.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in res.stderr
    assert "--port N" in res.stderr and "internal error" not in res.stderr
    res = subprocess.run([*envctl, "--port", "99999"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 64 and "is not a port" in res.stderr, res.stderr


def test_another_loopback_server_gets_nothing_to_replay(local_web: tuple[str, int],
                                                      browser_factory: Any) -> None:
    """Cookies are per host, not per port: whatever the service keeps in alice's browser is
    also sent to any other server on 127.0.0.1 she opens — bob's, on a machine they share.
    What bob's server receives must not sign him in, and nothing may tell him the secret."""
    from selenium.webdriver.common.by import By
    url, port = local_web
    seen: list[str] = []

    class Bob(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            seen.append(self.headers.get("Cookie", ""))
            body = b"<!DOCTYPE html><title>bob</title><script>fetch('/again')</script>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    bob = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bob)
    threading.Thread(target=bob.serve_forever, daemon=True).start()
    try:
        driver = browser_factory()
        driver.get(url)
        assert driver.find_element(By.CSS_SELECTOR, "h1").text == "Environments"
        driver.get(f"http://127.0.0.1:{bob.server_address[1]}/")
        wait_for(lambda: len(seen) >= 2, 30, interval=0.2, what="bob's page and its fetch")
    finally:
        bob.shutdown()
        bob.server_close()
    secret = url.split(f"127.0.0.1:{port}/", 1)[1].strip("/").removeprefix("?token=")
    assert secret and secret not in "".join(seen)
    stranger = urllib.request.build_opener()
    for cookie in seen:
        for path in ("api/whoami", ""):
            status, body = _open(stranger, f"http://127.0.0.1:{port}/{path}",
                                 headers={"Cookie": cookie} if cookie else {})
            assert status != 200 and secret not in body, (cookie, path, status)


def test_a_closed_log_stream_frees_its_slot_while_the_build_is_quiet(
        local_web: tuple[str, int]) -> None:
    """Follow streams are few (``MAX_STREAMS``): one whose reader went away must give its
    slot back at once, not when the job next writes a line — else anyone opening and
    dropping a handful of follows on a quiet build (a long test) locks everyone out."""
    from envctl_shared.web.app import MAX_STREAMS
    url, port = local_web
    auth = {"Authorization": f"token {url.rstrip('/').rsplit('/', 1)[1]}",
            "Content-Type": "application/json"}
    opener = urllib.request.build_opener()
    status, body = _open(opener, url + "api/jobs", json.dumps({
        "name": "quiet-env", "spec": "dependencies: []", "backend": "venv",
        "tests": ["echo started", "sleep 120"]}).encode(), auth)
    assert status == 200, body
    job = json.loads(body)["id"]
    logs = url + f"api/jobs/{job}/logs"
    wait_for(lambda: "started" in json.loads(_open(opener, logs, headers=auth)[1])["text"],
             120, interval=0.2, what="the quiet test running")
    path = urllib.parse.urlparse(logs).path + "?follow=true"
    try:
        for n in range(MAX_STREAMS + 2):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", path, headers=auth)
            resp = conn.getresponse()
            assert resp.status == 200, (n, resp.read())
            assert b"started" in resp.readline()  # the log so far; then nothing comes
            conn.close()  # the reader goes away
            time.sleep(0.2)
    finally:
        req = urllib.request.Request(url + f"api/jobs/{job}", method="DELETE", headers=auth)
        opener.open(req, timeout=30).close()


def test_a_body_no_request_needs_is_not_read(local_web: tuple[str, int]) -> None:
    """tornado reads a request's whole body into memory before any handler looks at it (100 MB
    by default): a few strangers' uploads, signed in or not, would fill the service's memory.
    Nothing the service forwards is bigger than a spec and its form; more is cut off unread."""
    from envctl_shared.web.app import MAX_BODY_BYTES
    url, port = local_web
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    size = MAX_BODY_BYTES + 1
    try:
        conn.putrequest("POST", urllib.parse.urlparse(url).path + "api/jobs")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        sent = 0
        while sent < size:
            conn.send(b" " * min(65536, size - sent))
            sent += 65536
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException):
        status = None  # cut off: the connection closed under the upload
    finally:
        conn.close()
    assert status in (None, 400, 413), status  # tornado: 400 before reading, or cut off
    # A request of the right size is read and answered (here: no _xsrf, no user).
    status, _ = _open(urllib.request.build_opener(), url + "api/jobs", b"{}",
                      {"Content-Type": "application/json"})
    assert status == 401


def test_an_api_path_that_is_none_answers_the_error_document(local_web: tuple[str, int]) -> None:
    """A script that gets a path wrong (a typo, a name longer than names are, an encoded
    slash) gets the API's JSON error document like any other failure, not an HTML page."""
    url, _ = local_web
    auth = {"Authorization": f"token {url.rstrip('/').rsplit('/', 1)[1]}"}
    opener = urllib.request.build_opener()
    for path in ("api/env", "api/envs/" + "a" * 80, "api/envs/a%2F..%2Fb", "api/jobs/1/x/y"):
        status, body = _open(opener, url + path, headers=auth)
        assert status == 404 and json.loads(body)["error"]["code"] == "not-found", (path, body)


def _rss(pid: int) -> int:
    """A process's resident memory, bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_reader_that_does_not_read_costs_the_service_little_memory(
        local_web: tuple[str, int], daemon: ApiDaemon) -> None:
    """A follow stream read slowly (or not at all) while the build writes a big log: the
    service reads ahead only a little; the rest waits in the daemon's log file."""
    url, port = local_web
    service = int(subprocess.run(["fuser", f"{port}/tcp"], capture_output=True,
                                 text=True).stdout.split()[0])
    auth = {"Authorization": f"token {url.rstrip('/').rsplit('/', 1)[1]}",
            "Content-Type": "application/json"}
    opener = urllib.request.build_opener()
    big = 80 << 20
    status, body = _open(opener, url + "api/jobs", json.dumps({
        "name": "loud-env", "spec": "dependencies: []", "backend": "venv",
        "tests": ["echo started", f"yes {'x' * 99} | head -c {big}"]}
    ).encode(), auth)
    assert status == 200, body
    job = json.loads(body)["id"]
    logs = url + f"api/jobs/{job}/logs"
    wait_for(lambda: "started" in json.loads(_open(opener, logs, headers=auth)[1])["text"],
             120, interval=0.2, what="the loud test running")
    before = _rss(service)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.sock = socket.create_connection(("127.0.0.1", port))
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        conn.request("GET", urllib.parse.urlparse(logs).path + "?follow=true", headers=auth)
        wait_for(lambda: daemon.job(job)["terminal"], 180, interval=0.5, what="the loud build")
        time.sleep(2)  # what the service would read ahead, it has read by now
        grown = _rss(service) - before
        assert grown < 24 << 20, f"the service grew by {grown >> 20} MiB for one reader"
    finally:
        conn.close()
