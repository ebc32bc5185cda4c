"""``envctl web --local``: the dev-only mode without a hub (what ``make run`` starts).

No hub means nobody to tell users apart, so the pages act as the uid that runs them — safe
only for the one who started it: it listens on loopback only, and every request needs the
secret of the URL it prints (kept in a cookie; a write with the cookie also needs the page's
``_xsrf``). Run here as alice against a real daemon: what she builds is hers.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import wait_for
from tests.hub_support import free_port


@pytest.fixture(scope="module")
def daemon(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)


def _open(opener: urllib.request.OpenerDirector, url: str, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with opener.open(urllib.request.Request(url, data=data, headers=headers or {}),
                         timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_local_mode_is_for_the_holder_of_the_url_only(daemon: ApiDaemon,
                                                     accounts: Accounts) -> None:
    refused = subprocess.run(daemon.cli_argv(accounts.alice, "web", "--local", "--ip",
                                             "0.0.0.0"), capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 78 and "loopback only" in refused.stderr, refused.stderr
    port = free_port()
    proc = subprocess.Popen(daemon.cli_argv(accounts.alice, "web", "--local", "--port",
                                            str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = ""
        while "token=" not in line:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line or proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        url = line.strip()
        base = f"http://127.0.0.1:{port}/"
        secret = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["token"][0]
        stranger = urllib.request.build_opener()
        assert _open(stranger, base + "api/envs")[0] == 401
        assert _open(stranger, base + "api/envs?token=wrong")[0] == 401
        status, body = _open(stranger, base + "api/whoami",
                             headers={"Authorization": f"token {secret}"})
        assert status == 200 and json.loads(body)["uid"] == accounts.alice.uid
        # The browser's way: the printed URL once, then the cookie.
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
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
