"""Fast, boot-free checks of the shipped systemd files: lint, and agreement with the config.

Why: ``systemd-analyze verify`` exits 0 even for ``Type=notifyy`` or an unknown key (those are
only warnings on stderr), so the lint fails on ANY stderr output. The other checks catch the
mistakes that only show in production: a socket path that differs from the one clients use, a
root missing from ReadWritePaths= (read-only under ProtectSystem=strict, healing fails with
EROFS), a hardening line nobody can explain.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from envctl_shared import config as envctl_config

from tests.helpers import REPO

UNITS = REPO / "systemd"
PROD_CONFIG = REPO / "config" / "envctld.yaml"
INSTALLED_ENVCTLD = "/opt/envctl/bin/envctld"
INSTALLED_CONFIG = "/etc/envctl/envctld.yaml"


def parse_unit(text: str) -> dict[str, list[tuple[str, str, int]]]:
    """Sections → [(key, value, line number)], in file order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str, int]]] = {}
    current = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip(), n))
    return sections


def values(unit: dict[str, list[tuple[str, str, int]]], section: str, key: str) -> list[str]:
    return [v for k, v, _ in unit.get(section, []) if k == key]


def verify(unit_dir: Path, *names: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` the named units of ``unit_dir`` (its drop-ins included)."""
    return subprocess.run(["systemd-analyze", "verify", *(str(unit_dir / n) for n in names)],
                          capture_output=True, text=True, cwd=unit_dir, timeout=60)


def lint_copy(tmp_path: Path) -> Path:
    """The shipped units plus one drop-in pointing ExecStart at the checkout's envctld.

    The units name /opt/envctl/bin/envctld, which exists only after `make install`; verify
    complains about a missing executable, so the lint points ExecStart at the venv's script.
    """
    lint = tmp_path / "units"
    lint.mkdir()
    for name in ("envctld.service", "envctld.socket"):
        shutil.copy(UNITS / name, lint / name)
    (lint / "envctld.service.d").mkdir()
    (lint / "envctld.service.d" / "lint.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={REPO / '.venv/bin/envctld'} --config "
        f"{INSTALLED_CONFIG}\n")
    return lint


@pytest.fixture(scope="module")
def service() -> dict[str, list[tuple[str, str, int]]]:
    return parse_unit((UNITS / "envctld.service").read_text())


@pytest.fixture(scope="module")
def socket_unit() -> dict[str, list[tuple[str, str, int]]]:
    return parse_unit((UNITS / "envctld.socket").read_text())


def prod_data() -> dict:
    return yaml.safe_load(PROD_CONFIG.read_text())


@pytest.fixture(scope="module")
def prod() -> envctl_config.Config:
    """The production example config, parsed the way the daemon parses it.

    Without ``build_user``: the parser insists the account exists, and on a test host it exists
    only after sysusers ran (checked against the raw file in the sysusers test).
    """
    data = prod_data()
    data["requests"].pop("build_user")
    return envctl_config.parse(data, source=str(PROD_CONFIG), base=PROD_CONFIG.parent)


def test_verify_is_silent(tmp_path: Path) -> None:
    lint = lint_copy(tmp_path)
    done = verify(lint, "envctld.service", "envctld.socket")
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr


@pytest.mark.parametrize("bad", ["Type=notify\nType=notifyy", "WatchdogSec=30s\nWatchdogSec=abc",
                                 "PrivateTmp=yes\nPrivateTmpp=yes"])
def test_lint_catches_what_verify_only_warns_about(tmp_path: Path, bad: str) -> None:
    """The lint must be able to fail: these are exit 0 for verify, but warnings on stderr."""
    lint = lint_copy(tmp_path)
    good = bad.split("\n")[0]
    text = (lint / "envctld.service").read_text()
    assert good in text
    (lint / "envctld.service").write_text(text.replace(good, bad, 1))
    done = verify(lint, "envctld.service", "envctld.socket")
    assert done.stderr.strip(), f"verify said nothing about {bad!r}"


def test_sysusers_creates_the_build_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    done = subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                           str(UNITS / "envctl.sysusers.conf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ignoring" not in done.stderr.lower() and "fail" not in done.stderr.lower()
    users = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc/passwd").read_text().splitlines()}
    build_user = prod_data()["requests"]["build_user"]
    assert build_user in users
    entry = users[build_user]
    assert entry[6] == "/usr/sbin/nologin"
    assert int(entry[2]) < 1000, "the build user is a system account"
    assert entry[5] == "/", "no home of its own: each build gets one in its job directory"


def test_tmpfiles_apply_cleanly(tmp_path: Path) -> None:
    done = subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                           str(UNITS / "envctl.tmpfiles.conf")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    conf = (tmp_path / "etc/envctl").stat()
    assert conf.st_uid == 0 and stat.S_IMODE(conf.st_mode) == 0o755


def test_socket_matches_the_config_clients_use(socket_unit: dict, prod: envctl_config.Config,
                                               service: dict) -> None:
    assert values(socket_unit, "Socket", "ListenStream") == [str(prod.socket.path)]
    assert values(socket_unit, "Socket", "FileDescriptorName") == ["envctl-api"]
    assert int(values(socket_unit, "Socket", "SocketMode")[0], 8) == prod.socket.mode
    assert values(socket_unit, "Socket", "SocketGroup") == [prod.socket.group]
    # /run/envctl is the service's RuntimeDirectory and must survive its restarts.
    assert Path("/run") / values(service, "Service", "RuntimeDirectory")[0] == \
        prod.socket.path.parent
    assert values(service, "Service", "RuntimeDirectoryPreserve") == ["yes"]


def test_sandbox_lets_the_configured_daemon_work(service: dict,
                                                 prod: envctl_config.Config) -> None:
    """Every root is writable, the state dir is the StateDirectory, ExecStart runs the config."""
    writable = [Path(p.lstrip("-")) for v in values(service, "Service", "ReadWritePaths")
                for p in v.split()]
    for root in prod.roots:
        assert any(root.path == w or w in root.path.parents for w in writable), root.path
    state = Path("/var/lib") / values(service, "Service", "StateDirectory")[0]
    assert prod.requests.state_dir == state
    assert values(service, "Service", "ExecStart") == \
        [f"{INSTALLED_ENVCTLD} --config {INSTALLED_CONFIG}"]
    assert values(service, "Service", "Type") == ["notify"]
    assert values(service, "Service", "NotifyAccess") == ["main"]
    assert values(service, "Service", "ProtectSystem") == ["strict"]
    caps = set(values(service, "Service", "CapabilityBoundingSet")[0].split())
    assert {"CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_READ_SEARCH", "CAP_FSETID"} <= caps
    assert not caps & {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_NET_ADMIN", "CAP_SYS_MODULE"}
    # RestrictSUIDSGID=yes would forbid setting SGID on directories: the heart of the policy.
    assert values(service, "Service", "RestrictSUIDSGID") in ([], ["no"])


@pytest.mark.parametrize("name", ["envctld.service", "envctld.socket"])
def test_every_directive_is_explained(name: str) -> None:
    """A directive must sit in a block that a comment opens: nobody ships a line they can't
    justify, and nobody "cleans up" a line whose reason they can't see."""
    lines = (UNITS / name).read_text().splitlines()
    unexplained = []
    for n, line in enumerate(lines):
        if not line or line.startswith(("#", "[", "Description=", "Documentation=")):
            continue
        k = n - 1
        while k >= 0 and lines[k] and not lines[k].startswith(("#", "[")):
            k -= 1
        if k < 0 or not lines[k].startswith("#"):
            unexplained.append(line)
    assert unexplained == []
