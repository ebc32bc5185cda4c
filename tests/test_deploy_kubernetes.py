"""The Kubernetes example must line up: daemon, user pods, config and image agree on every path.

Why: nothing here can run a cluster, and a manifest that parses can still be useless — a socket
mounted at one path in the daemon and another in user pods, an EFS claim mounted at different
paths (conda prefixes embed their path), a probe calling a binary the image does not have, or
capabilities that differ from what the systemd unit proved sufficient. Each check below is one
such mismatch. The ConfigMap's config goes through the daemon's own parser.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from envctl_shared import config as envctl_config

from tests.conftest import Accounts
from tests.helpers import REPO

K8S = REPO / "deploy" / "kubernetes"
CONFIG_MOUNT = "/etc/envctl"


def load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert len(docs) == 1, name
    return docs[0]


@pytest.fixture(scope="module")
def daemonset() -> dict[str, Any]:
    return load("daemonset.yaml")


@pytest.fixture(scope="module")
def pod(daemonset: dict[str, Any]) -> dict[str, Any]:
    return daemonset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def envctld(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "envctld")


@pytest.fixture(scope="module")
def singleuser() -> dict[str, Any]:
    return load("z2jh-values.yaml")["singleuser"]


@pytest.fixture(scope="module")
def raw_config() -> dict[str, Any]:
    cm = load("configmap.yaml")
    return yaml.safe_load(cm["data"]["envctld.yaml"])


@pytest.fixture(scope="module")
def cfg(raw_config: dict[str, Any], accounts: Accounts) -> envctl_config.Config:
    """Parsed by envctl's strict parser. The build user exists only in the image, so this host's
    throwaway build account stands in for it (its name is checked against the image apart)."""
    data = yaml.safe_load(yaml.safe_dump(raw_config))
    data["requests"]["build_user"] = accounts.builder.name
    return envctl_config.parse(data, source="deploy/kubernetes/configmap.yaml",
                               base=Path(CONFIG_MOUNT))


def mounts_of(container: dict[str, Any], volumes: list[dict[str, Any]]) -> dict[str, tuple]:
    """mountPath → (volume source kind, its spec, readOnly) for one container."""
    by_name = {v["name"]: v for v in volumes}
    out = {}
    for m in container.get("volumeMounts", []):
        vol = by_name[m["name"]]  # KeyError = a mount of an undeclared volume
        kind = next(k for k in vol if k != "name")
        out[m["mountPath"]] = (kind, vol[kind], bool(m.get("readOnly", False)))
    return out


def covering(mounts: dict[str, tuple], path: str) -> tuple[str, tuple]:
    """The mount a path lives on (longest mountPath prefix)."""
    p = PurePosixPath(path)
    best = max((m for m in mounts if p == PurePosixPath(m) or PurePosixPath(m) in p.parents),
               key=len)
    return best, mounts[best]


def test_kustomization_lists_every_manifest() -> None:
    kust = load("kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml",
                                                         "z2jh-values.yaml"}
    assert set(kust["resources"]) == manifests
    for name in manifests:
        assert load(name)["metadata"]["namespace"] == kust["namespace"]


def test_configmap_is_a_valid_daemon_config(cfg: envctl_config.Config,
                                            raw_config: dict[str, Any]) -> None:
    assert raw_config["requests"]["build_user"] == "envctl-build"
    useradd = re.search(r"useradd\b[^\n]*?--uid (\d+)[^\n]*?(envctl-build)",
                        (REPO / "Containerfile").read_text().replace("\\\n", " "))
    assert useradd, "the image must create the configured build user"
    assert int(useradd.group(1)) != 1000, "the build user must not be jovyan's uid"
    assert cfg.logging.journal == "false"  # no journald in a pod
    assert cfg.socket.group == "users"  # jovyan's primary group (gid 100) in docker-stacks


def test_config_is_mounted_where_the_image_reads_it(pod: dict, envctld: dict) -> None:
    mounts = mounts_of(envctld, pod["volumes"])
    kind, spec, readonly = mounts[CONFIG_MOUNT]
    assert kind == "configMap" and spec["name"] == load("configmap.yaml")["metadata"]["name"]
    assert readonly
    cmd = re.search(r'^CMD (\[.*\])$', (REPO / "Containerfile").read_text(), re.M)
    assert cmd and yaml.safe_load(cmd.group(1)) == envctld["args"]
    assert envctld["args"] == ["--config", f"{CONFIG_MOUNT}/envctld.yaml"]


def test_socket_is_shared_with_user_pods(pod: dict, envctld: dict, singleuser: dict,
                                         cfg: envctl_config.Config) -> None:
    sock_dir = str(cfg.socket.path.parent)
    d_mount, (d_kind, d_spec, d_ro) = covering(mounts_of(envctld, pod["volumes"]), sock_dir)
    assert d_kind == "hostPath" and not d_ro, "the daemon creates the socket there"
    user_mounts = mounts_of({"volumeMounts": singleuser["storage"]["extraVolumeMounts"]},
                            singleuser["storage"]["extraVolumes"])
    u_mount, (u_kind, u_spec, _) = covering(user_mounts, singleuser["extraEnv"]["ENVCTL_SOCKET"])
    assert u_kind == "hostPath" and u_spec["path"] == d_spec["path"], "same node directory"
    # The user pods see the socket at the path the daemon binds (relative to the mount).
    assert PurePosixPath(singleuser["extraEnv"]["ENVCTL_SOCKET"]).relative_to(u_mount) == \
        PurePosixPath(cfg.socket.path).relative_to(d_mount)


def test_shared_volume_is_the_same_claim_at_the_same_path(pod: dict, envctld: dict,
                                                          singleuser: dict,
                                                          cfg: envctl_config.Config) -> None:
    daemon_mounts = mounts_of(envctld, pod["volumes"])
    user_mounts = mounts_of({"volumeMounts": singleuser["storage"]["extraVolumeMounts"]},
                            singleuser["storage"]["extraVolumes"])
    for root in cfg.roots:
        d_at, (d_kind, d_spec, d_ro) = covering(daemon_mounts, str(root.path))
        u_at, (u_kind, u_spec, _) = covering(user_mounts, str(root.path))
        assert d_at == u_at == "/efs/shared", "prefixes embed their path: same mount path"
        assert d_kind == u_kind == "persistentVolumeClaim"
        assert d_spec["claimName"] == u_spec["claimName"]
        assert not d_ro
    envs_dirs = singleuser["extraEnv"]["CONDA_ENVS_DIRS"]
    assert envs_dirs == str(cfg.requests.root or cfg.roots[0].path)


def test_state_and_writable_paths_exist_under_a_readonly_root(pod: dict, envctld: dict,
                                                              cfg: envctl_config.Config) -> None:
    """readOnlyRootFilesystem: every path the daemon or a build writes must be a volume."""
    assert envctld["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = mounts_of(envctld, pod["volumes"])
    for path in (str(cfg.requests.state_dir), "/tmp", str(cfg.socket.path.parent)):
        at, (_, _, readonly) = covering(mounts, path)
        assert at != "/" and not readonly, path


def test_probes_run_envctl_status_from_the_image(envctld: dict) -> None:
    containerfile = (REPO / "Containerfile").read_text()
    venv = re.search(r"python3 -m venv (\S+)", containerfile)
    assert venv
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = envctld[probe]["exec"]["command"]
        assert command[0] == f"{venv.group(1)}/bin/envctl" and command[1] == "status", probe
        # The CLI's own timeout must end before the kubelet's, or a hang reads as a kill.
        timeout = float(command[command.index("--timeout") + 1])
        assert timeout < envctld[probe]["timeoutSeconds"]
    startup = envctld["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, \
        "the first reconcile on EFS takes minutes: liveness must not kill it"


def test_capabilities_match_the_systemd_unit(envctld: dict, pod: dict) -> None:
    unit = (REPO / "systemd" / "envctld.service").read_text()
    bounding = re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M)
    assert bounding
    want = {c.removeprefix("CAP_") for c in bounding.group(1).split()}
    sc = envctld["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == want
    assert sc["allowPrivilegeEscalation"] is False and sc["runAsUser"] == 0
    # fsGroup would make kubelet chgrp the whole shared tree.
    assert "fsGroup" not in pod.get("securityContext", {})
    assert pod["automountServiceAccountToken"] is False


def test_user_pods_can_connect_through_a_readonly_mount(tmp_path: Path) -> None:
    """The values snippet mounts the socket directory read-only in user pods; prove connect()
    works through a read-only bind mount (a private mount namespace, gone with the process)."""
    src, ro = tmp_path / "run", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(src / "envctld.sock"))
    server.listen()
    try:
        probe = (f"mount --bind {src} {ro} && "
                 f"mount -o remount,bind,ro {ro} && "
                 f"touch {ro}/x 2>/dev/null && exit 3; "
                 f"/usr/bin/python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); "
                 f"s.connect('{ro}/envctld.sock')\"")
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", probe],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (done.returncode, done.stderr)
        conn, _ = server.accept()
        conn.close()
    finally:
        server.close()
    assert not os.path.ismount(ro)


def test_the_guides_root_and_the_one_default_kernels_dir(cfg: envctl_config.Config,
                                                         singleuser: dict[str, Any]) -> None:
    """The root is the guide's and the README's ``/efs/shared/.conda/envs``; the kernels dir is
    what ``envctl init`` picks for that root by default, users' JUPYTER_PATH its parent, their
    conda's envs_dirs the root — and the example config names the same kernels dir."""
    from envctl_shared.cli.init_cmd import default_kernels_dir

    root = Path("/efs/shared/.conda/envs")
    assert cfg.roots[0].path == root and cfg.requests_root.path == root
    assert cfg.kernels.dir == default_kernels_dir(root)
    env = singleuser["extraEnv"]
    assert Path(env["JUPYTER_PATH"]) == default_kernels_dir(root).parent
    assert env["CONDA_ENVS_DIRS"] == str(root)
    example = (REPO / "config" / "envctld.yaml").read_text()
    assert f"# example: {default_kernels_dir(root)}" in example
    assert "/efs/shared/envs" not in "".join(p.read_text() for p in K8S.iterdir())
