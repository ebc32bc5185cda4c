"""``make install`` on a booted host, then the installed units run the installed daemon.

Why: the installer is what admins run; a wrong path in it (a unit naming a binary that is not
where the venv puts it, sysusers not applied, a config overwritten on upgrade) only shows on a
real system. The container's root is a throwaway overlay of this host, so the install writes
/opt, /etc and /usr/local for real without touching the host. This is the one systemd test with
network: pip fetches envctl's dependencies (through this machine's pip configuration), as
``make install`` does for an admin; it takes about a minute.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Accounts
from tests.helpers import REPO
from tests.nspawn_support import Bind, boot, unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.systemd, pytest.mark.timeout(600),
              pytest.mark.skipif(unavailable_reason() is not None,
                                 reason=str(unavailable_reason()))]

PREFIX = Path("/opt/envctl")


def test_make_install_then_the_installed_units_run(accounts: Accounts, scratch: Path) -> None:
    root = scratch / "envs"
    root.mkdir()
    os.chown(root, 0, accounts.shared_gid)
    os.chmod(root, 0o2775)
    with boot([Bind(REPO), Bind(scratch, Path("/srv/site"), readonly=False)],
              network=True) as m:
        refused = m.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         "sh", f"{REPO}/scripts/install.sh"], check=False)
        assert refused.returncode == 77, refused.stderr

        done = m.run(["make", "-C", str(REPO), "install"], timeout=540)
        assert "install: done" in done.stdout

        # The venv is Debian's python (every uid can run it) and has both entry points.
        assert "home = /usr/bin" in m.path(PREFIX / "pyvenv.cfg").read_text()
        for tool in ("envctl", "envctld"):
            script = m.path(PREFIX / "bin" / tool)
            assert script.read_text().startswith(f"#!{PREFIX}/bin/python")
        assert os.readlink(m.path("/usr/local/bin/envctl")) == f"{PREFIX}/bin/envctl"
        # Units exactly as shipped; installed, loaded, not enabled behind the admin's back.
        for unit in ("envctld.service", "envctld.socket"):
            assert m.path(f"/etc/systemd/system/{unit}").read_bytes() == \
                (REPO / "systemd" / unit).read_bytes()
        verify = m.run(["systemd-analyze", "verify", "envctld.service", "envctld.socket"])
        assert verify.stderr == "" and verify.stdout == ""
        assert m.systemctl("is-enabled", "envctld.service", check=False).stdout.strip() == \
            "disabled"
        assert m.run(["id", "-u", "envctl-build"]).returncode == 0  # sysusers applied
        assert m.path("/etc/envctl").is_dir()  # tmpfiles applied
        assert m.path("/etc/envctl/envctld.yaml").read_bytes() == \
            (REPO / "config/envctld.yaml").read_bytes()

        # The admin's steps from the installer's "Next:", with a root of this test.
        m.write("/etc/envctl/envctld.yaml",
                f"roots: [{{path: /srv/site/envs, group: {accounts.shared_group}}}]\n"
                "socket: {path: /run/envctl/envctld.sock, group: users}\n"
                "requests: {backend: venv, allowed_backends: [venv], build_user: envctl-build}\n")
        m.write("/etc/systemd/system/envctld.service.d/roots.conf",
                "[Service]\nReadWritePaths=/srv/site\n")
        m.systemctl("daemon-reload")
        m.systemctl("enable", "--now", "envctld.socket", "envctld.service")
        m.wait_for("envctld.service", ActiveState="active", SubState="running")
        assert m.run(["envctl", "status"]).returncode == 0

        # A re-install (an upgrade) keeps the admin's config and leaves the service running.
        m.run(["make", "-C", str(REPO), "install"], timeout=540)
        assert "/srv/site/envs" in m.path("/etc/envctl/envctld.yaml").read_text()
        assert m.systemctl("is-active", "envctld.service", check=False).stdout.strip() == \
            "active"
