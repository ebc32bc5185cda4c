"""Under the shipped unit, builds run in cgroups of the unit's delegated subtree.

Why a test of its own under a real systemd: the cgroup path depends on three unit lines
working together — ``Delegate=yes``, ``ProtectControlGroups=yes`` and the ``ReadWritePaths=``
that gives the daemon its own subtree back — and only systemd shows whether the sandbox really
lets the daemon create, fill, kill and remove a build's cgroup (without that line the daemon
logs ``mechanism=sweep reason=EROFS``). The build's ``venv_python`` is a wrapper that leaves a
``setsid`` process behind which records its own cgroup, as a package's setup.py could; the
mechanism in use is also what ``envctl status --json`` reports as ``containment``.
"""

from __future__ import annotations

import json

import yaml

from tests.jobs_support import ESCAPING_PYTHON
from tests.test_systemd_daemon import CONFIG, SERVICE, Site, _build_demo, pytestmark, site  # noqa: F401 (marks and fixture)

# An escapee that notes its pid and cgroup (the line is written once the cgroup is read: the
# wrapper waits for it, so that the step cannot end, and take the escapee along, first).
WRAPPER = ESCAPING_PYTHON.format(
    escape="""setsid sh -c 'echo "$$ $(grep ^0:: /proc/self/cgroup)" >> "$HOME/escapees"; """
           """exec sleep 333'""", python="/usr/bin/python3")


def test_build_runs_in_a_cgroup_of_the_delegated_subtree(site: Site) -> None:  # noqa: F811
    site.m.write("/usr/local/bin/escaping-python", WRAPPER, mode=0o755)
    cfg = yaml.safe_load(site.m.path(CONFIG).read_text())
    cfg["requests"]["venv_python"] = "/usr/local/bin/escaping-python"
    site.m.write(CONFIG, yaml.safe_dump(cfg))
    _build_demo(site)
    status = json.loads(site.envctl(site.acc.alice, "status --json").stdout)
    assert status["containment"] == "cgroup", status
    journal = site.m.journal_text(SERVICE)
    assert "jobs-containment mechanism=cgroup cgroup=/sys/fs/cgroup/" in journal, journal
    assert "/system.slice/envctld.service/envctl-" in journal, journal
    (job_dir,) = site.m.path("/var/lib/envctl/jobs").iterdir()
    pid, cgroup = (job_dir / "home" / "escapees").read_text().split()
    assert cgroup.startswith("0::/system.slice/envctld.service/envctl-"), cgroup
    assert cgroup.endswith(f"/job-{job_dir.name}"), cgroup
    assert not site.m.path(f"/proc/{pid}").exists(), "the escapee outlived its step"
    assert "1 build process(es) that had left the build's process group" in \
        (job_dir / "build.log").read_text()
    base = cgroup[3:].rsplit("/", 1)[0]
    assert site.m.run(f"ls /sys/fs/cgroup{base} /sys/fs/cgroup/unified{base} 2>/dev/null "
                      "| grep -c '^job-'", check=False).stdout.strip() == "0"
