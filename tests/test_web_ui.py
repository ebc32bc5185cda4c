"""envctl as a JupyterHub service, used the way people use it: in a browser, through the hub.

A real JupyterHub starts ``envctl web`` (see ``web_support``); hub users alice and bob sign in
through the hub's own login form in headless Chromium, and every request the service forwards
reaches the daemon from one uid with the user's own hub token. The story of issue 20:

- alice sees the list, requests an environment from the form, watches its log to "ready" on
  the job page (no reload), sees its kernel named on the env page, rolls back;
- bob sees alice's env without rollback/remove buttons; his forged POST (his own valid
  ``_xsrf``, alice's env) is refused by the daemon, 403, nothing changed; a POST without the
  ``_xsrf`` token (what a cross-site form sends) is refused before any daemon call;
- the HTTP API answers with a hub token and refuses without one (401);
- with the daemon stopped, pages say it is unavailable (503), and come back by themselves.

Screenshots of the env list, an env and a job page are taken on every run; ``make screenshots``
saves them to docs/img/ (shown in the README), a plain run to its scratch directory (a test run
leaves the checkout as it found it).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.api_support import VENV_SPEC
from tests.helpers import REPO, VENV_BIN, wait_for
from tests.hub_support import answer, ask_hub, free_port
from tests.web_support import PASSWORD, WebWorld

pytest_plugins = ("tests.fixtures_web",)  # web, browser_factory
pytestmark = pytest.mark.timeout(600)
SPEC = VENV_SPEC.replace("- greetlib", "- greetlib\n    - ipykernel")
ENV = "web-demo"
# A test command is the requester's free text, shown to everyone on the env page and in the log.
DESCRIPTION = "Demo of <the web UI> & its tests"
XSS = "echo '<img src=x onerror=document.title=1> </pre><b>bold</b>'"


def sign_in(driver: Any, w: WebWorld, user: str) -> None:
    """Open the service: the hub's login form, then OAuth straight back to the service."""
    from selenium.webdriver.common.by import By
    driver.get(w.service)
    wait_for(lambda: driver.find_elements(By.ID, "username_input"), 60, interval=0.2,
             what="the hub's login form")
    driver.find_element(By.ID, "username_input").send_keys(user)
    driver.find_element(By.ID, "password_input").send_keys(PASSWORD)
    driver.find_element(By.ID, "login_submit").click()
    wait_page(w, driver, lambda: driver.current_url.startswith(w.service) and
              driver.find_elements(By.CSS_SELECTOR, "nav.navbar"), 60,
              f"{user} back on the service after signing in")
    assert driver.find_element(By.ID, "me").text.startswith(user)


def wait_page(w: WebWorld, driver: Any, pred: Any, timeout: float, what: str) -> None:
    """wait_for, and on failure say where the browser is, what it shows, and the hub's log
    (the service's output is in it)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    def settled() -> bool:
        try:
            return bool(pred())
        except WebDriverException:  # the page changed under the look (stale, detached nodes):
            return False  # look again; a page that never settles times out with what it shows
    try:
        wait_for(settled, timeout, interval=0.2, what=what)
    except AssertionError as exc:
        body = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{exc}: at {driver.current_url}: {body[:3000]}\n"
                             f"{w.web_log()[-3000:]}") from None


def env_state(w: WebWorld) -> dict[str, Any]:
    from envctl_shared.api.client import Client
    with Client(w.api.sock) as client:  # as root: the truth, not the page
        return dict(client.call("env-show", name=ENV))


def cookie_header(driver: Any) -> str:
    return "; ".join(f"{c['name']}={c['value']}" for c in driver.get_cookies())


def post_form(w: WebWorld, driver: Any, path: str, fields: dict[str, str]) -> int:
    """A POST with the browser's cookies, as a form from anywhere would send it."""
    data = "&".join(f"{k}={urllib.request.quote(v)}" for k, v in fields.items()).encode()
    req = urllib.request.Request(w.service + path, data=data, method="POST", headers={
        "Cookie": cookie_header(driver), "Content-Type": "application/x-www-form-urlencoded",
        "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "cross-site"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def test_the_story_in_a_browser(web: WebWorld, browser_factory: Any, scratch: Path) -> None:
    from selenium.webdriver.common.by import By
    img = Path(os.environ.get("ENVCTL_SCREENSHOTS") or scratch)
    w = web
    alice = browser_factory()
    sign_in(alice, w, "alice")
    assert alice.find_elements(By.ID, "no-envs") or alice.find_elements(By.ID, "envs")

    # The request form, then the job page following the build to "ready" without a reload.
    alice.get(w.service + "new")
    alice.find_element(By.ID, "name").send_keys(ENV)
    spec = alice.find_element(By.ID, "spec")
    alice.execute_script("arguments[0].value = arguments[1]", spec, SPEC)
    alice.find_element(By.ID, "tests").send_keys("python -c 'import greetlib'\n" + XSS)
    alice.find_element(By.ID, "backend").send_keys("venv")
    described = alice.find_elements(By.ID, "description")  # where the protocol has it
    if described:
        described[0].send_keys(DESCRIPTION)
    alice.find_element(By.ID, "submit").click()
    wait_page(w, alice, lambda: "/jobs/" in alice.current_url, 30, "the job page")
    job_url = alice.current_url
    outcome = alice.find_element(By.ID, "outcome")
    wait_page(w, alice, outcome.is_displayed, 240, "the build's outcome")
    assert outcome.text == f"Environment {ENV} is ready.", alice.find_element(By.ID, "log").text
    assert alice.current_url == job_url  # no reload, no navigation
    assert alice.find_element(By.ID, "state").text == "succeeded"
    assert "<img src=x" in alice.find_element(By.ID, "log").text  # the log streamed in, as text
    assert not alice.find_elements(By.CSS_SELECTOR, "#log *")
    badge = alice.find_element(By.ID, "jobs-badge")
    wait_page(w, alice, lambda: badge.text == f"{ENV} ready", 30, "the jobs badge")
    img.mkdir(exist_ok=True)
    alice.save_screenshot(str(img / "web-job.png"))

    # A second version (replace), so there is something to roll back to.
    alice.get(w.service + "new")
    alice.find_element(By.ID, "name").send_keys(ENV)
    alice.execute_script("arguments[0].value = arguments[1]", alice.find_element(By.ID, "spec"),
                         SPEC.replace("- greetlib\n", "- greetlib==1.0\n    - colorlib\n"))
    alice.find_element(By.ID, "backend").send_keys("venv")
    if described:
        alice.find_element(By.ID, "description").send_keys(DESCRIPTION)
    alice.find_element(By.ID, "replace").click()
    alice.find_element(By.ID, "submit").click()
    wait_page(w, alice, lambda: "/jobs/" in alice.current_url and alice.current_url != job_url,
              30, "the second job page")
    outcome = alice.find_element(By.ID, "outcome")
    wait_page(w, alice, outcome.is_displayed, 240, "the second build")
    assert "is ready" in outcome.text
    assert env_state(w)["current"] == "v2"

    # The list, and the env page with its kernel, versions and buttons.
    alice.get(w.service)
    row = alice.find_element(By.CSS_SELECTOR, f"tr[data-env='{ENV}']")
    assert "ready" in row.text and "alice" in row.text
    alice.save_screenshot(str(img / "web-envs.png"))
    alice.get(w.service + f"envs/{ENV}")
    kernel = env_state(w)["kernel"]
    assert kernel and alice.find_element(By.ID, "kernel").text == kernel
    assert alice.find_element(By.ID, "current").text == "v2"
    if described:  # shown as the owner typed it, as text
        assert alice.find_element(By.ID, "description").text == DESCRIPTION
    v2 = alice.find_element(By.ID, "version-v2")
    if "changes" in env_state(w)["versions"][-1]:  # what changed from v1, where the daemon says
        assert "+ colorlib 1.0" in v2.find_element(By.CSS_SELECTOR, ".changes").text
    alice.save_screenshot(str(img / "web-env.png"))
    v1 = alice.find_element(By.ID, "version-v1")
    assert XSS in v1.text  # shown as text ...
    assert not alice.find_elements(By.CSS_SELECTOR, "main img, main b")  # ... never as markup
    assert alice.find_elements(By.ID, "remove")
    alice.find_element(By.ID, "remove").click()  # asks first; dismissed: nothing happens
    alice.switch_to.alert.dismiss()
    assert env_state(w)["status"] == "ready"
    edit = alice.find_elements(By.CSS_SELECTOR, "form.describe input[name=description]")
    if edit:  # the owner edits the description, where the daemon keeps one
        edit[0].clear()
        edit[0].send_keys("edited <by> alice")
        alice.find_element(By.CSS_SELECTOR, "form.describe button").click()
        wait_page(w, alice, lambda: [e.text for e in alice.find_elements(By.ID, "description")]
                  == ["edited <by> alice"], 30, "the edited description")
    alice.find_element(By.CSS_SELECTOR, "#version-v1 .rollback").click()
    wait_page(w, alice, lambda: alice.find_elements(By.ID, "current") and
              alice.find_element(By.ID, "current").text == "v1", 30, "the page showing v1")
    assert env_state(w)["current"] == "v1"

    # bob: same uid at the daemon, another hub user. He sees the env, without the buttons.
    bob = browser_factory()
    sign_in(bob, w, "bob")
    bob.get(w.service + f"envs/{ENV}")
    assert bob.find_element(By.ID, "owner").text.startswith("alice")
    assert not bob.find_elements(By.ID, "remove")
    assert not bob.find_elements(By.CSS_SELECTOR, ".rollback, form.describe")
    # His jobs are none; everyone's (he may build, so he may see them) are alice's two.
    bob.get(w.service + "jobs")
    assert not bob.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
    bob.find_element(By.LINK_TEXT, "Everyone's").click()
    rows = bob.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
    assert len(rows) == 2 and all(ENV in r.text and "alice" in r.text for r in rows)
    # His forged POST carries his own valid _xsrf (from a page of his): the daemon refuses.
    bob.get(w.service + "new")
    xsrf = bob.find_element(By.CSS_SELECTOR, "input[name=_xsrf]").get_attribute("value")
    bob.execute_script("""
        const f = document.createElement('form'); f.method = 'post';
        f.action = arguments[0];
        for (const [k, v] of [['_xsrf', arguments[1]], ['to', 'v2']]) {
          const i = document.createElement('input'); i.name = k; i.value = v; f.append(i); }
        document.body.append(f); f.submit();""", w.service + f"envs/{ENV}/rollback", xsrf)
    wait_page(w, bob, lambda: bob.find_elements(By.ID, "error"), 30, "bob's refusal")
    error = bob.find_element(By.ID, "error")
    assert error.get_attribute("data-status") == "403"
    assert "belongs to hub user alice" in error.text and "hint:" in error.text
    assert env_state(w)["current"] == "v1"
    # The same POST without _xsrf, as a cross-site form sends it, with bob's cookies: no user.
    assert post_form(w, bob, f"envs/{ENV}/remove", {}) == 403
    assert post_form(w, alice, f"envs/{ENV}/remove", {}) == 403  # even alice's own
    # The API with the cookie and no _xsrf (what another site's script would send): no user.
    status, body = w.http("POST", f"api/envs/{ENV}/rollback", body={"to": "v2"},
                          headers={"Cookie": cookie_header(alice), "Sec-Fetch-Mode": "cors",
                                   "Sec-Fetch-Site": "cross-site"})
    assert status == 401 and body["error"]["code"] == "not-signed-in"
    status, _ = w.http("DELETE", f"api/envs/{ENV}", headers={"Cookie": cookie_header(alice)})
    assert status == 401
    assert env_state(w)["current"] == "v1"
    assert env_state(w)["status"] == "ready"
    assert "web-demo" in json.dumps(w.http("GET", "api/envs", token=w.hub.token("bob"))[1])
    # What changed between two versions: where the daemon knows the op; else 501, not an error
    # of the request (the pages then show nothing of it).
    status, diff = w.http("GET", f"api/envs/{ENV}/diff?from=v1&to=v2", token=w.hub.token("bob"))
    if status == 501:
        assert diff["error"]["code"] == "not-supported" and "env-diff" in diff["error"]["message"]
    else:
        assert status == 200 and [p["name"] for p in diff["added"]] == ["colorlib"], diff


def test_the_http_api_needs_a_token_and_maps_errors(web: WebWorld) -> None:
    token = web.hub.token("bob")
    assert web.http("GET", "api/envs")[0] == 401
    status, body = web.http("GET", "api/whoami")
    assert status == 401 and body["ok"] is False and body["error"]["code"] == "not-signed-in"
    status, me = web.http("GET", "api/whoami", token=token)
    assert status == 200 and me["hub_user"] == "bob" and me["hub_verified"] is True
    status, body = web.http("GET", "api/envs/no-such-env", token=token)
    assert status == 404 and body["error"]["code"] == "not-found" and body["error"]["hint"]
    assert body["exit_code"] == 65  # the CLI's --json error document, exit code included
    status, body = web.http("POST", "api/jobs", token=token, body={"name": "x", "spec": "[:"})
    assert status == 422, body
    status, body = web.http("GET", "api/envs", token=token, headers={"X-Ignored": "1"})
    assert status == 200 and isinstance(body, list)
    status, body = web.http("POST", "api/gc", token=token, body={"dry_run": True})
    assert status == 403 and body["error"]["code"] == "not-authorised"
    # A token the hub never issued: 401 at the service, before the daemon is asked.
    assert web.http("GET", "api/envs", token="0" * 32)[0] == 401
    # A path of no route: the error document too (after the sign-in check, which says no more).
    status, body = web.http("GET", "api/env", token=token)
    assert status == 404 and body["error"]["code"] == "not-found", body
    assert web.http("GET", "api/env")[0] == 401
    # A build from the API, its log streamed as JSON lines to the end, then a conflict.
    status, job = web.http("POST", "api/jobs", token=token, body={
        "name": "api-env", "spec": VENV_SPEC, "backend": "venv"})
    assert status == 200 and job["hub_user"] == "bob", job
    req = urllib.request.Request(web.service + f"api/jobs/{job['id']}/logs?follow=true",
                                 headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in resp]
    assert lines[-1]["end"] is True and lines[-1]["ok"] is True
    assert "greetlib" in "".join(m["data"].get("text", "") for m in lines if m.get("event"))
    status, done = web.http("GET", f"api/jobs/{job['id']}", token=token)
    assert status == 200 and done["state"] == "succeeded"
    status, body = web.http("DELETE", f"api/jobs/{job['id']}", token=token)
    assert status == 409 and body["error"]["code"] == "conflict"


def test_pages_survive_a_daemon_restart(web: WebWorld, browser_factory: Any) -> None:
    from selenium.webdriver.common.by import By
    token = web.hub.token("alice")
    driver = browser_factory()
    sign_in(driver, web, "alice")
    web.api.daemon.stop()
    try:
        status, body = web.http("GET", "api/envs", token=token)
        assert status == 503 and body["error"]["code"] == "daemon-unavailable"
        driver.get(web.service)
        error = driver.find_element(By.ID, "error")
        assert error.get_attribute("data-status") == "503"
        assert "daemon is unavailable" in error.text.lower() and "hint:" in error.text
    finally:
        web.api.daemon.restart()
    wait_page(web, driver, lambda: driver.find_elements(By.CSS_SELECTOR, "h1") and
              driver.find_element(By.CSS_SELECTOR, "h1").text == "Environments", 30,
              "the page recovering by itself")
    assert web.http("GET", "api/envs", token=token)[0] == 200


def test_on_the_pages_alice_owns_what_she_built_from_her_server(
        web: WebWorld, browser_factory: Any) -> None:
    """Ownership on a shared uid goes by the hub's stable identity (``hub_id``, the user's
    creation time) where a record has it: an env alice requested with her own API token
    records it. The pages forward the OAuth token the service got for her, which must show
    the same identity — else the env is not hers on the pages (and an env built there would
    record none, and go by a name the hub may give someone else)."""
    from selenium.webdriver.common.by import By
    token = web.hub.token("alice")
    status, job = web.http("POST", "api/jobs", token=token, body={
        "name": "from-her-server", "spec": "dependencies: []", "backend": "venv"})
    assert status == 200, job
    wait_for(lambda: web.http("GET", f"api/jobs/{job['id']}", token=token)[1]["terminal"],
             120, interval=0.5, what="alice's build")
    from envctl_shared.api.client import Client
    with Client(web.api.sock) as client:
        owner = client.call("env-show", name="from-her-server")["owner"]
    assert owner["hub_user"] == "alice" and owner["hub_id"], owner
    driver = browser_factory()
    sign_in(driver, web, "alice")
    me = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.body.dataset.api + 'whoami', {headers: {'X-XSRFToken':
              document.body.dataset.xsrf}}).then(r => r.json()).then(done);""")
    assert me["hub_user"] == "alice" and me["hub_id"] == owner["hub_id"], me
    driver.get(web.service + "envs/from-her-server")
    assert driver.find_elements(By.ID, "remove")


def test_a_slow_hub_answer_for_one_holds_up_no_one_else(web: WebWorld) -> None:
    """The service asks the hub who a token is; while it waits for one answer (a hub under
    load, or a stranger's flood of invented tokens, each one question), the requests of users
    it knows already are answered. An ``envctl web`` run as an external service here, whose
    hub API is a door that answers the token ``slow-...`` only after SLOW seconds."""
    slow, port = 3.0, free_port()
    asked = threading.Event()  # the stranger's question has reached the hub

    class Door(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            auth = self.headers.get("Authorization", "")
            if "slow-" in auth:
                asked.set()
                time.sleep(slow)
                status, body = 403, b'{"status": 403}'
            else:
                status, body = ask_hub(web.hub, self.path, auth)
            answer(self, status, body)

        def log_message(self, *args: object) -> None:
            pass

    door = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Door)
    door.daemon_threads = True
    threading.Thread(target=door.serve_forever, daemon=True).start()
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "PYTHONPATH": str(REPO / "daemon"),
           "HOME": "/", "LANG": "C.UTF-8", "JUPYTERHUB_API_TOKEN": "unused-for-user-tokens",
           "JUPYTERHUB_API_URL": f"http://127.0.0.1:{door.server_address[1]}/hub/api",
           "JUPYTERHUB_CLIENT_ID": "service-envctl", "JUPYTERHUB_SERVICE_NAME": "envctl",
           "JUPYTERHUB_SERVICE_PREFIX": "/services/envctl/",
           "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}"}
    proc = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                             "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                             str(VENV_BIN / "envctl"), "--socket", str(web.api.sock), "web"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}/services/envctl/api/"

    def whoami(token: str) -> int:
        req = urllib.request.Request(base + "whoami",
                                     headers={"Authorization": f"token {token}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)
        except OSError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return 0
    try:
        alice = web.hub.token("alice")
        wait_for(lambda: whoami(alice) == 200, 60, interval=0.2, what="the external service")
        stranger = threading.Thread(target=whoami, args=("slow-" + "0" * 32,))
        stranger.start()
        assert asked.wait(30), "the stranger's question never reached the hub"
        started = time.monotonic()
        assert whoami(alice) == 200
        took = time.monotonic() - started
        stranger.join()
        assert took < slow / 2, f"alice waited {took:.1f}s for the stranger's hub answer"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        door.shutdown()
        door.server_close()
