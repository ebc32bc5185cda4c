"""envctld under a real systemd: the shipped units, unchanged except for paths, in nspawn.

Why: the units' promises — socket activation, READY only after the initial reconcile, a sandbox
that still lets the daemon heal and build, reload, a clean stop, a watchdog that restarts a
wedged daemon, structured journal fields — are made to systemd, so only systemd can check them.

Each test boots its own container (``tests/nspawn_support.py``, < 1 s) in which:
- ``envctld.service`` / ``envctld.socket`` are the files in ``systemd/``, bound read-only; the
  only change is one drop-in pointing ExecStart at this checkout's venv (bound read-only at its
  own path, so the venv's absolute paths hold);
- ``envctl.sysusers.conf`` / ``envctl.tmpfiles.conf`` are bound into /etc and applied by the
  container's own boot (systemd-sysusers, systemd-tmpfiles-setup), as on a real host;
- the test's scratch dir is bound at ``/efs/shared``, so the shipped ``ReadWritePaths=`` line is
  the one under test; the config lives in the container's /etc/envctl (its throwaway overlay).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import Accounts, User
from tests.helpers import REPO, VENV_BIN, find_violations, wait_for
from tests.nspawn_support import Bind, Machine, boot, unavailable_reason

pytestmark = [pytest.mark.systemd,
              pytest.mark.skipif(unavailable_reason() is not None,
                                 reason=str(unavailable_reason()))]

UNITS = REPO / "systemd"
EFS = Path("/efs/shared")  # inside the container; covered by the unit's ReadWritePaths=
SOCKET = "/run/envctl/envctld.sock"
CONFIG = "/etc/envctl/envctld.yaml"
SERVICE = "envctld.service"
DROP_IN = "/etc/systemd/system/envctld.service.d/test.conf"
WHEEL_NAME = "envctltestpkg"


def _venv_root() -> Path:
    return VENV_BIN.parent


def _drop_in(extra: str = "") -> str:
    """ExecStart → the checkout's venv; plus whatever a test adds (never a sandbox change,
    except making a checkout that lives under /home, /root or /tmp visible again)."""
    lines = ["[Service]", "ExecStart=",
             f"ExecStart={VENV_BIN / 'envctld'} --config {CONFIG}"]
    hidden = [p for p in {REPO, _venv_root()}
              if any(p == h or h in p.parents for h in (Path("/home"), Path("/root"),
                                                        Path("/run/user"), Path("/tmp")))]
    if hidden:  # ProtectHome=/PrivateTmp= would hide the code itself: bind it back, read-only
        lines.append("ProtectHome=tmpfs")
        lines.append("BindReadOnlyPaths=" + " ".join(str(p) for p in sorted(hidden)))
    return "\n".join(lines) + "\n" + extra


class Site:
    """One booted host with the units installed, a shared root, and three kinds of user."""

    def __init__(self, machine: Machine, efs: Path, accounts: Accounts) -> None:
        self.m = machine
        self.efs = efs  # host side of /efs/shared
        self.acc = accounts
        self.root = EFS / "envs"

    def host(self, inside: Path | str) -> Path:
        """Where a path under /efs/shared inside the container lives on the host."""
        return self.efs / Path(inside).relative_to(EFS)

    def shared_dir(self, inside: Path, owner: User | None = None) -> None:
        """A root directory, the shared group, 2775; owned by root, or by a user who made it
        (then creating a prefix in it takes CAP_DAC_OVERRIDE: the daemon is not in the group)."""
        path = self.host(inside)
        path.mkdir()
        os.chown(path, owner.uid if owner else 0, self.acc.shared_gid)
        os.chmod(path, 0o2775)

    def write_config(self, roots: list[Path] | None = None, level: str = "INFO") -> None:
        """The daemon's config inside the container: the roots, the shipped socket path, and
        venv builds from the local wheel directory only."""
        group = self.acc.shared_group
        req = {"enabled": True, "state_dir": "/var/lib/envctl", "backend": "venv",
               "allowed_backends": ["venv"], "build_user": "envctl-build",
               "allow_groups": [group], "venv_python": "/usr/bin/python3",
               "pip_args": ["--no-index", "--find-links", str(EFS / "wheels")],
               "max_concurrent": 1, "timeout": 120, "root": str(self.root)}
        cfg = {"roots": [{"path": str(r), "group": group} for r in roots or [self.root]],
               "watch": {"mode": "inotify", "status_interval": 60},
               "socket": {"path": SOCKET, "mode": "0660", "group": "users"},
               "requests": req, "logging": {"level": level, "journal": "auto"}}
        self.m.write(CONFIG, yaml.safe_dump(cfg))

    def as_user(self, user: User, cmd: str, *, umask: int = 0o077,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside the container as ``user`` with its login groups."""
        return self.m.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                           "--init-groups", "sh", "-c", f"umask {umask:03o}; {cmd}"],
                          check=check, timeout=120)

    def envctl(self, user: User, args: str,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.as_user(user, f"ENVCTL_SOCKET={SOCKET} {VENV_BIN / 'envctl'} {args}",
                            check=check)


@pytest.fixture
def site(accounts: Accounts, scratch: Path) -> Iterator[Site]:
    binds = [Bind(REPO), Bind(scratch, EFS, readonly=False),
             Bind(UNITS / "envctl.sysusers.conf", Path("/etc/sysusers.d/envctl.conf")),
             Bind(UNITS / "envctl.tmpfiles.conf", Path("/etc/tmpfiles.d/envctl.conf"))]
    if REPO not in _venv_root().parents:
        binds.append(Bind(_venv_root()))
    units = {SERVICE: UNITS / SERVICE, "envctld.socket": UNITS / "envctld.socket"}
    with boot(binds, units) as machine:
        built = machine.run(["id", "-u", "envctl-build"], check=False)
        assert built.returncode == 0, "systemd-sysusers did not create envctl-build at boot"
        assert machine.path("/etc/envctl").is_dir(), "systemd-tmpfiles did not run at boot"
        # The admin's one manual step: clients join the socket's group (SocketGroup=users).
        for user in (accounts.alice, accounts.mallory):
            machine.run(["usermod", "-aG", "users", user.name])
        s = Site(machine, scratch, accounts)
        s.shared_dir(s.root, owner=accounts.alice)
        s.write_config()
        machine.write(DROP_IN, _drop_in())
        machine.systemctl("daemon-reload")
        yield s
        machine.systemctl("stop", SERVICE, "envctld.socket", check=False)


def violations(site: Site, inside: Path) -> list[str]:
    """GNU find's policy violations under a path, minus ``<root>/.envctl``: the daemon's own
    area (locks, staging), root-owned with fixed modes on purpose (a protected owner)."""
    area = str(site.host(site.root / ".envctl"))
    return [p for p in find_violations(site.host(inside), site.acc.shared_gid)
            if p != area and not p.startswith(area + "/")]


def _broken_tree(site: Site, n_dirs: int, n_files: int) -> None:
    """As alice with umask 077: private dirs and files, i.e. every entry violates the policy."""
    site.as_user(site.acc.alice, f"cd {site.root} && for d in $(seq {n_dirs}); do mkdir t$d && "
                 f"(cd t$d && for f in $(seq {n_files}); do : > f$f; done); done")


def test_socket_activation_and_ready_only_after_reconcile(site: Site) -> None:
    """Only the socket is started; the first client connection starts the service, which is
    active (running) only once the broken tree is healed (READY=1 after the reconcile)."""
    _broken_tree(site, 40, 50)
    assert len(violations(site, site.root)) > 2000
    site.m.systemctl("start", "envctld.socket")
    assert site.m.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    sock = site.m.path(SOCKET).lstat()
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o660

    # A client connects: systemd starts envctld, the connection waits in the backlog; until
    # the reconcile is done the daemon answers "not ready" (exit 75).
    first = site.envctl(site.acc.alice, "status --json", check=False)
    assert first.returncode in (0, 75), first.stderr
    assert site.m.show(SERVICE, "ActiveState")["ActiveState"] in ("activating", "active")
    wait_for(lambda: site.envctl(site.acc.alice, "status", check=False).returncode == 0,
             timeout=30, what="envctl status exit 0 (ready)")
    # The daemon answers ready as soon as it is; its READY=1 follows, and PID 1 marks the
    # unit active once it has read it: a moment later, a long one on a loaded machine.
    site.m.wait_for(SERVICE, ActiveState="active", SubState="running")
    state = site.m.show(SERVICE, "ActiveState", "SubState", "StatusText", "Type")
    assert (state["ActiveState"], state["SubState"], state["Type"]) == \
        ("active", "running", "notify")
    assert state["StatusText"].startswith("roots=1 "), state
    # Order, by journal sequence number (the daemon's records and PID 1's arrive on the same
    # journal socket, in order): the reconcile finished, then the daemon said ready, then
    # systemd declared the unit started — with Type=simple "Started" would come first.
    entries = site.m.journal(SERVICE)

    def seq(pred: Callable[[dict[str, object]], bool], what: str) -> int:
        # The cursor's i= field is the entry's sequence number (hex).
        found = [int(dict(kv.split("=", 1) for kv in str(e["__CURSOR"]).split(";"))["i"], 16)
                 for e in entries if pred(e)]
        assert found, f"no journal entry for {what}:\n" + site.m.journal_text(SERVICE)
        return min(found)

    reconciled = seq(lambda e: str(e.get("MESSAGE", "")).startswith("reconcile ")
                     and e.get("ENVCTL_ROOT") == str(site.root), "the reconcile")
    ready = seq(lambda e: str(e.get("MESSAGE", "")).startswith("ready "), "ready")
    started = seq(lambda e: str(e.get("_PID")) == "1" and
                  str(e.get("MESSAGE", "")).startswith("Started envctld.service"), "Started")
    assert reconciled < ready < started
    assert violations(site, site.root) == []


def test_heal_inside_the_sandbox(site: Site) -> None:
    """A file another uid writes with umask 077 is healed: ReadWritePaths= and the capability
    set are enough (group change, chmod of others' files, SGID kept, private dirs walked)."""
    site.m.systemctl("start", SERVICE)
    # chmod 700 clears the SGID bob's directory inherited: restoring it on a directory of a
    # group root is not in takes CAP_FSETID (the kernel silently drops it otherwise).
    site.as_user(site.acc.bob, f"mkdir -p {site.root}/bob/deep && echo x > {site.root}/bob/deep/f"
                 f" && printf '#!/bin/sh\\n' > {site.root}/bob/run && chmod u+x {site.root}/bob/run"
                 f" && chmod 700 {site.root}/bob/deep")
    host = site.host(site.root / "bob")
    wait_for(lambda: violations(site, site.root / "bob") == [], timeout=15,
             what="bob's private tree healed by the sandboxed daemon")
    deep = (host / "deep").stat()
    assert deep.st_gid == site.acc.shared_gid and deep.st_mode & 0o2070 == 0o2070
    assert deep.st_uid == site.acc.bob.uid  # the owner is never changed
    assert stat.S_IMODE((host / "run").stat().st_mode) & 0o070 == 0o070
    assert stat.S_IMODE((host / "deep/f").stat().st_mode) & 0o070 == 0o060
    # alice, in the shared group, can now write where bob's umask had shut her out.
    site.as_user(site.acc.alice, f"echo more >> {site.root}/bob/deep/f")


def _wheel(dest: Path) -> None:
    """A minimal pure-Python wheel, so a build can run with no network at all."""
    files = {f"{WHEEL_NAME}/__init__.py": b"GREETING = 'built by envctld'\n",
             f"{WHEEL_NAME}-1.0.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {WHEEL_NAME}\nVersion: 1.0\n".encode(),
             f"{WHEEL_NAME}-1.0.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: envctl-tests\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n"}
    record = io.StringIO()
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{name},sha256={digest},{len(data)}\n")
    record.write(f"{WHEEL_NAME}-1.0.dist-info/RECORD,,\n")
    dest.mkdir(mode=0o755)
    with zipfile.ZipFile(dest / f"{WHEEL_NAME}-1.0-py3-none-any.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{WHEEL_NAME}-1.0.dist-info/RECORD", record.getvalue())
    os.chmod(dest / f"{WHEEL_NAME}-1.0-py3-none-any.whl", 0o644)


def _build_demo(site: Site) -> Path:
    """alice requests a venv env from the local wheel (the container has no network); returns
    its prefix once ``envctl request create`` reports success."""
    _wheel(site.efs / "wheels")
    site.m.systemctl("start", "envctld.socket")
    site.as_user(site.acc.alice, f"printf '{SPEC}' > /tmp/env.yml")
    out = site.envctl(site.acc.alice, "request create demo -f /tmp/env.yml", check=False)
    assert out.returncode == 0, out.stdout + out.stderr + site.m.journal_text(SERVICE)
    return site.root / "demo"


SPEC = f"name: demo\\ndependencies:\\n  - pip:\\n    - {WHEEL_NAME}\\n"


def test_request_build_runs_as_the_build_user(site: Site) -> None:
    """alice asks over the socket; the daemon builds as envctl-build (offline, from a local
    wheel) inside the sandbox and freezes the result, which bob can then use."""
    prefix = _build_demo(site)
    pkg = next(site.host(prefix).glob(f"lib/python3*/site-packages/{WHEEL_NAME}/__init__.py"))
    # the name is the daemon's symlink to the version, built in .envctl, then frozen: the
    # daemon's, the root's group, no write bit (the build ran as envctl-build: its log says)
    assert (pkg.stat().st_uid, pkg.stat().st_gid) == (0, site.acc.shared_gid)
    assert pkg.stat().st_mode & 0o222 == 0
    assert violations(site, prefix) == []
    greeting = site.as_user(site.acc.bob, f"{prefix}/bin/python -c "
                            f"'import {WHEEL_NAME}; print({WHEEL_NAME}.GREETING)'").stdout
    assert greeting.strip() == "built by envctld"
    # mallory can reach the socket (group users) but is not allowed to build.
    site.as_user(site.acc.mallory, f"printf '{SPEC}' > /tmp/env2.yml")
    refused = site.envctl(site.acc.mallory, "request create nope -f /tmp/env2.yml", check=False)
    assert refused.returncode == 77, refused.stdout + refused.stderr  # EX_NOPERM
    assert not (site.host(site.root) / "nope").exists()


def _reload(site: Site) -> None:
    """``systemctl reload``, then wait until the daemon has logged its outcome. On systemd
    252 (no Type=notify-reload) reload returns once ``kill -HUP`` has: PID 1 waits for the
    daemon's READY=1 only if its RELOADING=1 came before that, which a loaded machine often
    does not give it."""
    done = len([e for e in _daemon_entries(site) if _is_reload(e)])
    site.m.systemctl("reload", SERVICE)
    wait_for(lambda: len([e for e in _daemon_entries(site) if _is_reload(e)]) > done,
             timeout=30, what="the daemon's reload logged")


def _is_reload(entry: dict[str, object]) -> bool:
    return str(entry.get("MESSAGE", "")).startswith(("reloaded ", "reload rejected "))


def test_reload_applies_a_changed_config(site: Site) -> None:
    site.m.systemctl("start", SERVICE)
    pid = site.m.show(SERVICE, "MainPID")["MainPID"]
    second = EFS / "more"
    site.shared_dir(second)
    site.write_config(roots=[site.root, second])
    _reload(site)
    site.as_user(site.acc.bob, f"echo x > {second}/f")
    wait_for(lambda: violations(site, second) == [], timeout=15,
             what="the root added by reload healed")
    # STATUS= comes with the READY=1 that follows the daemon's "reloaded" line
    wait_for(lambda: site.m.show(SERVICE, "StatusText")["StatusText"].startswith("roots=2 "),
             timeout=30, what="the reloaded daemon's STATUS=")
    after = site.m.show(SERVICE, "MainPID", "ActiveState")
    assert after["MainPID"] == pid and after["ActiveState"] == "active", after
    # An invalid config is refused and the running one kept.
    site.m.write(CONFIG, "roots: [{path: /efs/shared/envs, group: no-such-group-here}]\n")
    _reload(site)
    site.m.wait_for(SERVICE, ActiveState="active", SubState="running")
    assert site.m.show(SERVICE, "MainPID")["MainPID"] == pid
    assert "reload rejected" in site.m.journal_text(SERVICE)


def test_stop_is_clean_and_keeps_the_socket(site: Site) -> None:
    site.m.systemctl("start", "envctld.socket", SERVICE)
    t0 = time.monotonic()
    site.m.systemctl("stop", SERVICE)
    assert time.monotonic() - t0 < 10, "stop waited for a timeout"
    gone = site.m.show(SERVICE, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode",
                       "NRestarts")
    assert gone == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0",
                    "ExecMainCode": "1", "NRestarts": "0"}
    # The daemon never unlinks the socket systemd owns: the next client starts it again.
    assert stat.S_ISSOCK(site.m.path(SOCKET).lstat().st_mode)
    wait_for(lambda: site.envctl(site.acc.alice, "status", check=False).returncode == 0,
             timeout=30, what="the daemon started again by a client")
    site.m.wait_for(SERVICE, ActiveState="active")  # its READY=1 read by PID 1 (see above)
    text = site.m.journal_text(SERVICE)
    assert "stopped drained=True" in text
    assert "Killing process" not in text and "left-over process" not in text, text


def test_watchdog_kills_and_restarts_a_wedged_daemon(site: Site) -> None:
    """Test hook: a heal worker blocks after 1 s; WATCHDOG=1 stops, systemd kills the daemon
    (Result=watchdog) and Restart=on-failure brings it back."""
    site.m.write(DROP_IN, _drop_in("Environment=ENVCTL_TEST_WEDGE_AFTER=1\nWatchdogSec=2s\n"
                                   "RestartSec=100ms\n"))
    site.m.systemctl("daemon-reload")
    site.m.systemctl("start", SERVICE)
    first = site.m.show(SERVICE, "MainPID")["MainPID"]
    wait_for(lambda: int(site.m.show(SERVICE, "NRestarts")["NRestarts"]) >= 1, timeout=30,
             what="a watchdog restart")
    site.m.wait_for(SERVICE, timeout=15, ActiveState="active", SubState="running")
    assert site.m.show(SERVICE, "MainPID")["MainPID"] != first
    text = site.m.journal_text(SERVICE)
    assert "Watchdog timeout" in text and "withholding watchdog ping" in text, text


def _daemon_entries(site: Site) -> list[dict[str, object]]:
    return [e for e in site.m.journal(SERVICE) if e.get("SYSLOG_IDENTIFIER") == "envctld"]


def test_journal_has_structured_fields(site: Site) -> None:
    """Logged through systemd-python's JournalHandler (JOURNAL_STREAM is set by systemd):
    fields an admin can filter on (``journalctl ENVCTL_ROOT=/efs/shared/envs``) and the
    level as PRIORITY (``journalctl -p err``)."""
    site.m.systemctl("start", SERVICE)
    site.m.write(CONFIG, "roots: [{path: /efs/shared/envs, group: no-such-group-here}]\n")
    _reload(site)
    site.m.wait_for(SERVICE, ActiveState="active", SubState="running")
    entries = _daemon_entries(site)
    rooted = [e for e in entries if e.get("ENVCTL_ROOT") == str(site.root)]
    assert any(str(e["MESSAGE"]).startswith("watching ") for e in rooted), \
        [e.get("MESSAGE") for e in entries]
    by_message = {str(e["MESSAGE"]).split()[0]: str(e.get("PRIORITY")) for e in entries}
    assert by_message["ready"] == "6"  # INFO
    assert by_message["reload"] == "3", by_message  # ERROR: "reload rejected ..."
    assert "CODE_FILE" in rooted[0], "not the native journal protocol (stderr fallback?)"


def test_journal_names_paths_and_jobs(site: Site) -> None:
    """ENVCTL_JOB on a build's records, ENVCTL_PATH on a healed path's (at DEBUG)."""
    site.write_config(level="DEBUG")
    _build_demo(site)
    site.as_user(site.acc.bob, f"echo x > {site.root}/late")
    wait_for(lambda: violations(site, site.root) == [], timeout=15, what="late file healed")
    # The daemon logs what it fixed once its heal call returns: after find can see the file
    # healed, so a journal read just then may come before the record.
    wait_for(lambda: any(str(e.get("ENVCTL_PATH", "")).endswith("late")
                         for e in _daemon_entries(site)), timeout=15, what="the heal's record")
    entries = _daemon_entries(site)
    messages = [e.get("MESSAGE") for e in entries]
    assert any(e.get("ENVCTL_JOB") for e in entries), messages
    assert any(str(e.get("ENVCTL_PATH", "")).endswith("late") for e in entries), messages
