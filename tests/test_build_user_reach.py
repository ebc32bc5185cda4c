"""The build user and a ``2770`` requests root: refused at start with the fix, or built with the
build user's supplementary groups once the admin adds it to the root's group.

Before: builds dropped every supplementary group, so adding the build user to the root's group
(what an admin does for a ``2770`` root) did not help, and nothing said so until each build
failed on "Permission denied" deep in rattler's output.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.api_support import ENVCTL, api_config, new_base
from tests.conftest import Accounts
from tests.daemon_support import Envctld

EX_CONFIG = 78


def test_build_user_must_reach_the_root_and_its_groups_count(accounts: Accounts) -> None:
    base = new_base()
    builder, group = accounts.builder.name, accounts.shared_group
    daemon: Envctld | None = None
    try:
        config = api_config(base, accounts)
        root = base / "envs"
        os.chmod(root, 0o2770)  # members only; the build user is not one
        daemon = Envctld(config, base)
        assert daemon.start_failing() == EX_CONFIG
        text = daemon.log_text()
        assert f"the build user {builder} cannot enter the requests root {root}" in text
        assert f"usermod -aG {group} {builder}" in text

        subprocess.run(["usermod", "-aG", group, builder], check=True)
        daemon = Envctld(config, base).start()
        spec = base / "hello.yml"
        spec.write_text(f"channels: [{(base / 'channel').as_uri()}]\n"
                        "dependencies:\n  - hello\n")
        res = subprocess.run([ENVCTL, "request", "create", "hello", "-f", str(spec), "--socket",
                              str(base / "run/envctld.sock")], capture_output=True, text=True,
                             timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        assert (root / "hello" / "bin" / "hello").exists()
        daemon.stop()
    finally:
        subprocess.run(["gpasswd", "-d", builder, group], capture_output=True)
        if daemon is not None:
            daemon.cleanup()
        shutil.rmtree(base, ignore_errors=True)
