"""A requester's build output reaches an admin's terminal raw (found attacking issue 10's fixes).

Whatever a build prints (a ``--test`` command, a package's post-link script or setup.py) is in
its log, and ``envctl request logs ID`` writes that log to the terminal as it is: escape
sequences included. Admins and other requesters read anyone's logs, so a requester can clear
their screen, set the terminal's title, or print a forged "environment ready" line (and, on
terminals that honour them, OSC 52 clipboard writes). Names are escaped in human output; log text
is not. On a terminal, control characters other than newline and tab are now shown escaped
(``\\033``); redirected to a file or a pipe, the log is written exactly as stored.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import VENV_BIN

# printf's own escapes: the command line itself holds no control character (the daemon refuses
# those in --test), its output does.
HOSTILE = r'printf "\033]0;pwned\007\033[2J\nFORGED: environment ready\n"'


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)


def test_build_output_cannot_drive_the_readers_terminal(api: ApiDaemon,
                                                        accounts: Accounts) -> None:
    spec = api.write_spec(api.hello_spec())  # any backend: rattler's is the quick one
    res = api.cli(accounts.alice, "request", "create", "esc-env", "-f", str(spec),
                  "--test", HOSTILE, "--json")
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    # root reads the log on a terminal (script(1) gives the command a pty)
    for follow in ("", " -f"):  # the whole log, and the stream (-f ends with the job)
        envctl = f"{VENV_BIN / 'envctl'} --socket {api.sock} request logs {job['id']}{follow}"
        seen = subprocess.run(["script", "-qec", envctl, "/dev/null"], capture_output=True,
                              timeout=60, env={**os.environ, "TERM": "xterm"})
        assert seen.returncode == 0, seen.stderr
        # the output is shown, its escapes as text...
        assert b"\\033]0;pwned\\a\\033[2J" in seen.stdout, seen.stdout
        assert b"\x1b" not in seen.stdout and b"\x07" not in seen.stdout, \
            "escape sequences from a build reached the reader's terminal"
    # ...while redirected, the log is exact (what the daemon stored).
    exact = api.cli(accounts.alice, "request", "logs", str(job["id"]))
    assert exact.returncode == 0, exact.stderr
    assert "\x1b]0;pwned\x07\x1b[2J" in exact.stdout
