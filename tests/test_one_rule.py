"""One rule each, asked by every layer: the env-name rule (protocol, job layer, inventory), the
requests root (``config.requests_root_path``) and the backend registry (``config.BACKENDS``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from envctl_shared import config as cfgmod
from envctl_shared.api import protocol
from envctl_shared.errors import ProtocolError, ValidationError
from envctl_shared.jobs.backends import backend_named
from envctl_shared.jobs.spec import validate_name
from envctl_shared.names import is_env_name

NAMES = ["a", "A.b_c-1", "x" * 64, "x" * 65, "", ".", "..", ".envctl", "-a", "_a", "a/b",
         "../x", "a b", "a\n", "é", "a" * 10_000]


def _protocol_accepts(op: str, name: str) -> bool:
    args = {k: "x" for k, a in protocol.OPS[op].args.items() if a.required} | {"name": name}
    line = json.dumps({"v": 1, "op": op, "args": args}).encode()
    try:
        protocol.parse_request(line)
    except ProtocolError:
        return False
    return True


@pytest.mark.parametrize("name", NAMES)
def test_every_layer_asks_one_name_rule(name: str) -> None:
    try:
        valid = validate_name(name) == name
    except ValidationError:
        valid = False
    assert is_env_name(name) is valid
    # every env-* op refuses at the socket what the job layer would (create leaves it to the
    # job layer, whose refusal carries the rule as its hint: exit 65, not a protocol error)
    ops = [o for o, spec in protocol.OPS.items() if o.startswith("env-") and "name" in spec.args]
    assert "env-show" in ops
    for op in ops:
        assert _protocol_accepts(op, name) is valid, (op, name)


def test_one_requests_root(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    roots = [{"path": str(a), "group": 0}, {"path": str(b), "group": 0}]
    first = cfgmod.parse({"roots": roots, "requests": {}})
    second = cfgmod.parse({"roots": roots, "requests": {"root": str(b)}})
    assert cfgmod.requests_root_path(first.requests, first.roots) == a
    assert first.requests_root.path == a and second.requests_root.path == b
    # the root that holds requests (sticky, .envctl excluded) is that one, and only it
    assert [r.holds_requests for r in second.roots] == [False, True]
    assert ".envctl" in second.roots[1].exclude and ".envctl" not in second.roots[0].exclude


@pytest.mark.parametrize("name", sorted(cfgmod.BACKENDS))
def test_every_registered_backend_is_implemented(name: str) -> None:
    assert backend_named(name).name == name
    extra = {"conda_exe": "/usr/bin/true"} if cfgmod.BACKENDS[name] == "conda" else {}
    cfg = cfgmod.parse({"roots": [{"path": "/srv/envs", "group": 0}],
                        "requests": {"backend": name, **extra}})
    assert cfg.requests.backend == name


def test_an_unregistered_backend_is_refused_by_both() -> None:
    with pytest.raises(ValidationError):
        backend_named("pip")
    with pytest.raises(cfgmod.ConfigError, match="unknown backend 'pip'"):
        cfgmod.parse({"roots": [{"path": "/srv/envs", "group": 0}],
                      "requests": {"backend": "pip"}})
