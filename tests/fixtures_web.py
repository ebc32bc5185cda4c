"""The web tests' fixtures (``pytest_plugins = ("tests.fixtures_web",)``): ``web``, a real hub
running ``envctl web`` next to a real daemon, and ``browser_factory``, headless Chromium.

A module of its own, like ``fixtures_daemon``: a plugin module must not be imported by the test
modules before pytest loads it (its asserts would not be rewritten); the helpers are in
``web_support``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import live_processes, wait_for
from tests.hub_support import free_port
from tests.jobs_support import write_wheel
from tests.test_hub_identity import Hub
from tests.web_support import CHROMIUM_FLAGS, WebWorld, start_web_hub, stop_hub


@pytest.fixture(scope="module")
def web(accounts: Accounts) -> Iterator[WebWorld]:
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="envctl-web-"))
    ports = {"public_port": free_port(), "hub_port": free_port(),
             "proxy_api_port": free_port(), "web_port": free_port()}
    api_url = f"http://127.0.0.1:{ports['hub_port']}/hub/api"
    web_user = "nobody"
    extra = {"jupyterhub": {"api_url": api_url, "shared_uids": [pwd.getpwnam(web_user).pw_uid],
                            "timeout": 5, "cache_seconds": 30},
             "kernels": {"dir": str(base / "kernels")}}
    hub: Hub | None = None
    api: ApiDaemon | None = None
    try:
        for api in start_api_daemon(accounts, extra=extra, allow_groups=[],
                                    allow_hub_groups=["builders"]):
            # A wheel named ipykernel: the env it is in gets a kernelspec (nothing runs it).
            # (The hub makes alice and bob: its allowed_users.)
            write_wheel(api.base / "wheelhouse", "ipykernel")
            write_wheel(api.base / "wheelhouse", "colorlib")  # what a second version adds
            hub = start_web_hub(base, api, web_user, ports)
            hub.call("POST", "/groups/builders", {"users": ["alice", "bob"]})
            world = WebWorld(hub, api, f"http://127.0.0.1:{ports['public_port']}", accounts)

            wait_for(lambda w=world: w.http("GET", "api/ping")[0] == 401, 60, interval=0.2,
                     what="envctl web behind the proxy (answering: sign in)")
            yield world
    finally:
        if hub is not None:
            stop_hub(hub)
        if api is not None:  # a service the hub left behind: ours names our daemon's socket
            for pid, what in live_processes({pwd.getpwnam(web_user).pw_uid}).items():
                if str(api.sock) in what:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def browser_factory() -> Iterator[Any]:
    """``new()`` gives a fresh headless Chromium (its own profile); all quit at the end."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
        pytest.skip("chromium and chromium-driver are not installed (make deps installs them)")
    drivers = []
    profiles = []

    def new() -> Any:
        profile = tempfile.mkdtemp(prefix="envctl-chromium-")
        profiles.append(profile)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_page_load_timeout(60)
        drivers.append(driver)
        return driver

    yield new
    for driver in drivers:
        driver.quit()
    for profile in profiles:
        shutil.rmtree(profile, ignore_errors=True)
