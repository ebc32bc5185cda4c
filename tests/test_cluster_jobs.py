"""One cluster: any node's daemon answers logs and cancel for any job on the shared root.

Two real ``envctld`` processes, each in a UTS namespace of its own (hosts ``hostA`` and
``hostC``), each with its own state directory and socket, on one root. A job runs on A; C
prints its log (also ``-f``, live) and cancels it (relayed through the root to A within a poll
interval); A restarted under a new host name (a pod restarted under a new name, same state
directory) is the same daemon: no job is listed twice, and C shows the new name. Before, C
answered "run the command on hostA" for both, and the restarted daemon listed every old job
again as another host's (``hostA (gone)``).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import VENV_BIN, wait_for
from tests.jobs_support import JobsEnv

pytest_plugins = ("tests.fixtures_daemon", "tests.fixtures_jobs")  # envctld, jobs_env


def _cli(sock: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "envctl"), *args, "--socket", str(sock)],
                          capture_output=True, text=True, timeout=timeout)


def _json(sock: Path, *args: str) -> Any:
    """The JSON a command prints (``status`` of a job that failed or was cancelled exits 1)."""
    r = _cli(sock, *args, "--json")
    assert r.returncode in (0, 1) and r.stdout, r.stderr
    return json.loads(r.stdout)


def _config(jobs_env: JobsEnv, scratch: Path, host: str) -> tuple[Path, Path]:
    conf = scratch / f"conf-{host}"
    conf.mkdir()
    raw = jobs_env.raw(state_dir=str(scratch / f"state-{host}"), allowed_backends=["rattler"])
    raw["socket"] = {"path": str(conf / "envctld.sock")}
    raw["watch"] = {"poll_interval": 1}
    (conf / "envctld.yaml").write_text(yaml.safe_dump(raw))
    return conf / "envctld.yaml", conf / "envctld.sock"


def test_logs_and_cancel_from_another_node_and_a_restart_under_a_new_name(
        jobs_env: JobsEnv, scratch: Path, envctld) -> None:
    cfg_a, sock_a = _config(jobs_env, scratch, "hostA")
    cfg_c, sock_c = _config(jobs_env, scratch, "hostC")
    first = envctld(cfg_a, host="hostA")
    envctld(cfg_c, host="hostC")
    spec = scratch / "hello.yml"
    spec.write_text(f"channels: [{jobs_env.channel}]\ndependencies: [hello]\n")

    # A finished job of A: its whole log, from C.
    done = _json(sock_a, "request", "create", "quick", "-f", str(spec))
    assert done["state"] == "succeeded", done
    logs = _cli(sock_c, "request", "logs", done["id"])
    assert logs.returncode == 0, logs.stderr
    assert f"job {done['id']}: building 'quick'" in logs.stdout and "on hostA" in logs.stdout
    assert "succeeded" in logs.stdout

    # A running job of A: followed live from C, and cancelled from C.
    r = _cli(sock_a, "request", "create", "slow", "-f", str(spec), "--test", "sleep 120",
             "--no-wait")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    wait_for(lambda: _json(sock_c, "request", "status", job_id)["phase"] == "testing", 90, 0.2,
             "hostA's job testing, seen from hostC")
    follow = subprocess.Popen([str(VENV_BIN / "envctl"), "request", "logs", "-f", job_id,
                               "--socket", str(sock_c)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert _json(sock_c, "request", "cancel", job_id)["state"] == "cancelled"
        out, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    job = _json(sock_a, "request", "status", job_id)  # A itself says so
    assert job["state"] == "cancelled" and "via hostC" in job["exit_detail"], job
    assert "building 'slow'" in out and "cancelled by" in out, (out, err)

    # A restarted under a new host name, same state directory: the same daemon.
    first.stop()
    envctld(cfg_a, host="hostA2")
    for sock in (sock_a, sock_c):
        jobs = _json(sock, "request", "list", "--all", "--finished")
        ids = Counter(j["id"] for j in jobs)
        assert ids[done["id"]] == 1 and ids[job_id] == 1, jobs
    ident = (scratch / "state-hostA" / "daemon-id").read_text().strip()
    assert _json(sock_a, "status")["cluster"] == {"daemon_id": ident, "host": "hostA2"}
    seen = {j["id"]: j for j in _json(sock_c, "request", "list", "--all", "--finished")}
    assert (seen[job_id]["host"], seen[job_id]["host_alive"]) == ("hostA2", True), seen
    assert _cli(sock_c, "request", "logs", done["id"]).stdout == logs.stdout


def test_a_cloned_state_directory_gets_an_identity_of_its_own(
        jobs_env: JobsEnv, scratch: Path, envctld) -> None:
    """Attack (or a golden image): hostB's state directory carries hostA's ``daemon-id``. Both
    daemons then took one directory in the root: each skipped the other's jobs as its own
    (hostB and every node asking it never saw hostA's), pruned the other's published logs,
    and took cancels meant for it. The second daemon finds the identity's liveness lock held
    by a daemon that is not itself and takes a new identity: hostA's job is seen from hostB."""
    cfg_a, sock_a = _config(jobs_env, scratch, "hostA")
    cfg_b, sock_b = _config(jobs_env, scratch, "hostB")
    envctld(cfg_a, host="hostA")
    ident = (scratch / "state-hostA" / "daemon-id").read_text()
    clone = scratch / "state-hostB"
    clone.mkdir(mode=0o711)
    (clone / "daemon-id").write_text(ident)
    (clone / "daemon-id").chmod(0o600)
    spec = scratch / "hello.yml"
    spec.write_text(f"channels: [{jobs_env.channel}]\ndependencies: [hello]\n")
    done = _json(sock_a, "request", "create", "quick", "-f", str(spec))
    assert done["state"] == "succeeded", done
    envctld(cfg_b, host="hostB")
    own = _json(sock_b, "status")["cluster"]["daemon_id"]
    assert own != ident.strip() and (clone / "daemon-id").read_text().strip() == own
    seen = {j["id"]: j for j in _json(sock_b, "request", "list", "--all", "--finished")}
    assert done["id"] in seen and seen[done["id"]]["host"] == "hostA", seen
    logs = _cli(sock_b, "request", "logs", done["id"])
    assert logs.returncode == 0 and "succeeded" in logs.stdout, logs.stderr
    assert _json(sock_a, "status")["cluster"]["daemon_id"] == ident.strip()
