"""Validation of env names and environment.yml: every bad input is a clear ValidationError with
a hint, and a refused submit leaves nothing behind (no job row, no job dir, nothing in the root).
"""

from __future__ import annotations

import os

import pytest
from envctl_shared.config import parse
from envctl_shared.errors import Conflict, ValidationError
from envctl_shared.jobs.spec import parse_spec, validate_name

from tests.jobs_support import ENV_HELLO, JobsEnv

pytest_plugins = ("tests.fixtures_jobs",)  # the jobs fixtures


def _cfg(**requests: object):
    return parse({"roots": [{"path": "/srv/envs", "group": 0}],
                  "requests": {"channels": ["conda-forge", "/srv/chan"], **requests}}).requests


@pytest.mark.parametrize("name", ["ok", "A1", "py3.11-sci_x", "a" * 64])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "..", ".", "../etc", "a/b", "/abs", ".hidden", "-x",
                                  "a" * 65, "sp ace", "nul\x00", "é", "a\n", 5, None])
def test_bad_names(name: object) -> None:
    with pytest.raises(ValidationError, match="invalid environment name") as err:
        validate_name(name)
    assert err.value.hint and "letters" in err.value.hint


def test_spec_parsed() -> None:
    spec = parse_spec("name: x\nchannels: [conda-forge]\ndependencies:\n  - numpy >=1.26\n"
                      "  - pip:\n    - requests==2.31\n", _cfg())
    assert spec.conda == ("numpy >=1.26",) and spec.pip == ("requests==2.31",)
    assert spec.channels == ("conda-forge",)


def test_default_channels_when_none_given() -> None:
    spec = parse_spec("dependencies: [numpy]\n", _cfg(default_channels=["/srv/chan"]))
    assert spec.channels == ("/srv/chan",)


@pytest.mark.parametrize("text,message", [
    ("prefix: /etc\ndependencies: [x]\n", "'prefix:' is not allowed"),
    ("channels: [https://evil.example/chan]\ndependencies: [x]\n", "is not allowed on this"),
    ("dependencies: [x]\nvariables: {A: b}\n", "unknown key 'variables'"),
    ("dependencies: [x]\n  bad: [\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("dependencies: {x: 1}\n", "dependencies must be a list"),
    ("dependencies: [{conda: [x]}]\n", "unsupported dependency"),
    ("dependencies: [{pip: [--index-url=https://evil/simple, x]}]\n", "is an option"),
    ("dependencies: [{pip: [-e, .]}]\n", "is an option"),
    ("dependencies: [{pip: ['x @ https://evil/x.whl']}]\n", "is a URL"),
    ("dependencies: [{pip: ['git+https://evil/x.git']}]\n", "is a URL"),
    ("dependencies: [{pip: [/tmp/x.whl]}]\n", "local path"),
    ("dependencies: []\n", "no dependencies"),
    ("name: [1]\ndependencies: [x]\n", "name must be a string"),
    ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as err:
        parse_spec(text, _cfg())
    assert err.value.hint


def test_pip_options_and_urls_when_allowed() -> None:
    spec = parse_spec("dependencies: [{pip: [--pre, 'x @ https://h/x.whl']}]\n",
                      _cfg(allow_pip_options=True, allow_pip_urls=True))
    assert spec.pip == ("--pre", "x @ https://h/x.whl")


def test_size_and_count_caps() -> None:
    with pytest.raises(ValidationError, match="more than the limit of 100"):
        parse_spec("dependencies: [x]\n" + "#" * 200 + "\n", _cfg(max_spec_bytes=100))
    many = "dependencies:\n" + "".join(f"  - p{i}\n" for i in range(6))
    with pytest.raises(ValidationError, match="lists 6 packages, more than the limit of 5"):
        parse_spec(many, _cfg(max_packages=5))


def test_refused_submits_create_nothing(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory()
    req = jobs_env.requester()
    before = sorted(os.listdir(jobs_env.root))
    cases = [("../escape", ENV_HELLO, None), ("ok", "prefix: /etc\n", None),
             ("ok", "channels: [elsewhere]\ndependencies: [x]\n", None),
             ("ok", ENV_HELLO, "conda"),  # not in allowed_backends
             ("ok", "dependencies: [hello, {pip: [x]}]\n", "rattler"),  # rattler: no pip
             ("ok", "dependencies: [numpy, {pip: [x]}]\n", "venv")]  # venv: no conda pkgs
    for name, text, backend in cases:
        with pytest.raises(ValidationError):
            mgr.submit(req, name, text, backend=backend)
    assert mgr.list(include_finished=True) == []
    assert os.listdir(jobs_env.state_dir / "jobs") == []
    assert sorted(os.listdir(jobs_env.root)) == before


def test_existing_name_needs_replace(jobs_env: JobsEnv, manager_factory) -> None:
    mgr = manager_factory()
    (jobs_env.root / "taken").mkdir()
    with pytest.raises(Conflict, match="already exists") as err:
        mgr.submit(jobs_env.requester(), "taken", ENV_HELLO)
    assert "--replace" in (err.value.hint or "")
    assert mgr.list(include_finished=True) == []
