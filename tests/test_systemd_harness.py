"""The nspawn harness leaves nothing behind, even when the test inside it fails.

Why: every systemd test boots a container; one leaked cgroup, mount or process per test would
pile up across a CI day and break later runs (nspawn refuses a busy directory, cgroup rmdir
fails with EBUSY). So the teardown is checked from the outside, against the kernel's view.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import nspawn_support
from tests.nspawn_support import Bind, boot, unavailable_reason

pytestmark = [pytest.mark.systemd,
              pytest.mark.skipif(unavailable_reason() is not None,
                                 reason=str(unavailable_reason()))]


def _our_cgroups() -> list[Path]:
    prefix = f"envctl-nspawn-{os.getpid()}-"
    return [p for h in nspawn_support.CGROUP_HIERARCHIES if h.exists()
            for p in h.iterdir() if p.name.startswith(prefix)]


def test_teardown_after_a_failing_body_removes_everything(scratch: Path) -> None:
    (scratch / "marker").write_text("from the host\n")
    seen: dict[str, object] = {}
    with pytest.raises(RuntimeError, match="the test body failed"):
        with boot([Bind(scratch, Path("/srv/bound"))]) as m:
            assert m.run(["systemctl", "is-system-running"], check=False).stdout.strip() in \
                ("running", "degraded")
            assert m.run(["cat", "/srv/bound/marker"]).stdout == "from the host\n"
            # The container's root is a throwaway overlay: writes never reach the host.
            m.write("/etc/envctl-harness-probe", "x")
            assert not Path("/etc/envctl-harness-probe").exists()
            # A process outside any unit's control, as a misbehaving test would leave.
            m.run(["systemd-run", "--unit=stray", "sleep", "600"])
            stray = int(m.systemctl("show", "-p", "MainPID", "--value", "stray").stdout)
            seen["leader"] = m.leader
            seen["workdir"] = m.console_log.parent
            # In this container's PID namespace: another worker's container may run a sleep
            # under the same small pid, and it may outlive this one's teardown.
            ours = os.readlink(f"/proc/{m.leader}/ns/pid")
            seen["stray_host_pids"] = [
                int(p.parent.name) for p in Path("/proc").glob("[0-9]*/comm")
                if p.exists() and _read(p) == "sleep" and _ns_pid(int(p.parent.name)) == stray
                and _pid_ns(int(p.parent.name)) == ours]
            assert seen["stray_host_pids"], "the stray sleep is not visible from the host"
            seen["cgroups"] = _our_cgroups()
            assert seen["cgroups"], "the container was not put in its own cgroup"
            raise RuntimeError("the test body failed")
    assert not Path(f"/proc/{seen['leader']}").exists(), "container init still running"
    for pid in seen["stray_host_pids"]:  # type: ignore[attr-defined]
        assert not Path(f"/proc/{pid}").exists(), "a process in the container survived"
    assert _our_cgroups() == []
    # The mounts lived in a private mount namespace, which died with its last process (checked
    # above); the bind target of / is gone too (rmdir would have failed while it was mounted).
    assert not Path(str(seen["workdir"])).exists()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ns_pid(host_pid: int) -> int | None:
    """The pid a host process has in its innermost PID namespace (NSpid in /proc status)."""
    for line in _read(Path(f"/proc/{host_pid}/status")).splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None


def _pid_ns(host_pid: int) -> str | None:
    """The PID namespace of a host process (None once it is gone)."""
    try:
        return os.readlink(f"/proc/{host_pid}/ns/pid")
    except OSError:
        return None
