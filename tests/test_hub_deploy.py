"""The Kubernetes example's JupyterHub wiring lines up: hub URL, network policy, kernels path.

Why: nothing here runs a cluster, and each of these is a mismatch that would only show on a real
one — the daemon's ``jupyterhub.api_url`` on a port the NetworkPolicy does not open, envctld
pods without the label z2jh's hub policy admits, the kernels directory outside the volume user
pods mount, or ``JUPYTER_PATH`` pointing somewhere else than where the daemon writes.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from envctl_shared import config as envctl_config

from tests.helpers import REPO

K8S = REPO / "deploy" / "kubernetes"


def load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert len(docs) == 1, name
    return docs[0]


def daemon_config() -> envctl_config.Config:
    data = yaml.safe_load(load("configmap.yaml")["data"]["envctld.yaml"])
    data["requests"]["build_user"] = "root"  # exists here; the image has envctl-build
    return envctl_config.parse(data, source="deploy/kubernetes/configmap.yaml")


def test_the_daemon_asks_the_hub_service_on_a_port_the_policy_opens() -> None:
    hub = daemon_config().jupyterhub
    assert hub.shared_uids == (1000,)  # jovyan
    url = urlsplit(hub.api_url or "")
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "hub", 8081, "/hub/api")
    policy = load("networkpolicy.yaml")
    pod_labels = load("daemonset.yaml")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert all(pod_labels.get(k) == v for k, v in selector.items())
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == []
    to_hub = [rule for rule in policy["spec"]["egress"]
              if any(peer.get("podSelector", {}).get("matchLabels", {}).get("component") == "hub"
                     for peer in rule["to"])]
    assert [p["port"] for rule in to_hub for p in rule["ports"]] == [url.port]
    dns = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert dns.count(53) == 2  # UDP and TCP
    # z2jh's own policy on the hub pod admits only pods with this label.
    assert pod_labels["hub.jupyter.org/network-access-hub"] == "true"
    assert "networkpolicy.yaml" in load("kustomization.yaml")["resources"]


def test_user_servers_find_the_kernels_the_daemon_writes() -> None:
    kernels = daemon_config().kernels.dir
    assert kernels is not None and kernels.name == "kernels"
    singleuser = load("z2jh-values.yaml")["singleuser"]
    assert PurePosixPath(singleuser["extraEnv"]["JUPYTER_PATH"]) == PurePosixPath(kernels.parent)
    shared = {m["mountPath"] for m in singleuser["storage"]["extraVolumeMounts"]
              if m["name"] == "efs-shared"}
    assert any(PurePosixPath(m) in PurePosixPath(kernels).parents for m in shared)
