"""Specs as conda users have them, built for real: ``conda env export`` output (prefix ignored
with a note in the job log, a different name warned about), ``variables:`` as the env's
activation variables, an empty venv, and ``requests.build_env`` passing the site's proxy
variables (and nothing else of the daemon's environment) to builds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts

PROXY = "http://proxy.example.internal:3128"


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    """A request-serving daemon whose own environment has a proxy and a secret; only the proxy
    is named in requests.build_env."""
    yield from start_api_daemon(accounts, env={"HTTPS_PROXY": PROXY,
                                               "ENVCTL_TEST_SECRET": "do-not-leak"},
                                build_env=["HTTPS_PROXY", "NO_PROXY"])


def test_conda_env_export_output_builds(api: ApiDaemon, accounts: Accounts) -> None:
    exported = (f"name: hello-laptop\nchannels:\n  - {api.channel.as_uri()}\n"
                "dependencies:\n  - hello\n"
                "variables:\n  OMP_NUM_THREADS: 4\n  GREETING: hello world\n"
                "prefix: /home/alice/miniconda3/envs/hello-laptop\n")
    spec = api.write_spec(exported)
    res = api.cli(accounts.alice, "request", "create", "hello-shared", "-f", str(spec))
    assert res.returncode == 0, res.stderr + res.stdout
    assert "prefix: '/home/alice/miniconda3/envs/hello-laptop' is ignored" in res.stdout
    assert "warning: the spec says name: 'hello-laptop'" in res.stdout
    state = json.loads((api.root / "hello-shared" / "conda-meta" / "state").read_text())
    assert state == {"env_vars": {"OMP_NUM_THREADS": "4", "GREETING": "hello world"}}
    # the log keeps the notes too
    job_id = res.stdout.splitlines()[0]
    log = api.cli(accounts.alice, "request", "logs", job_id)
    assert "is ignored" in log.stdout and "warning: the spec says name" in log.stdout


def test_an_empty_venv(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec("dependencies: []\n")
    res = api.cli(accounts.alice, "request", "create", "empty-venv", "-f", str(spec),
                  "--backend", "venv")
    assert res.returncode == 0, res.stderr + res.stdout
    assert (api.root / "empty-venv" / "bin" / "python").exists()
    assert (api.root / "empty-venv" / "pyvenv.cfg").exists()
    # a conda-family backend cannot make an empty env: refused up front, with the way out
    res = api.cli(accounts.alice, "request", "create", "empty-conda", "-f", str(spec))
    assert res.returncode == 65 and "--backend venv" in res.stderr


def test_variables_are_refused_for_a_venv(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec("dependencies: [{pip: [greetlib]}]\nvariables: {A: b}\n")
    res = api.cli(accounts.alice, "request", "create", "vars-venv", "-f", str(spec),
                  "--backend", "venv")
    assert res.returncode == 65 and "activation variables" in res.stderr


def test_build_env_passes_the_proxy_and_nothing_else(api: ApiDaemon,
                                                     accounts: Accounts) -> None:
    """The test venv python prints the whole environment a build sees (``envdump``)."""
    spec = api.write_spec("dependencies: [{pip: [greetlib]}]\n")
    res = api.cli(accounts.alice, "request", "create", "envdump-proxy", "-f", str(spec),
                  "--backend", "venv")
    assert res.returncode == 0, res.stderr + res.stdout
    assert f"HTTPS_PROXY={PROXY}" in res.stdout
    assert "NO_PROXY" not in res.stdout  # named, but the daemon has none: nothing invented
    assert "do-not-leak" not in res.stdout and "ENVCTL_TEST_SECRET" not in res.stdout


@pytest.mark.parametrize("names,message", [(["HTTPS_PROXY", "PATH"], "set for every build"),
                                           (["HTTPS-PROXY"], "not an environment variable")])
def test_build_env_names_are_checked(names: list[str], message: str) -> None:
    from envctl_shared import config as cfgmod
    from envctl_shared.errors import ConfigError

    data = {"roots": [{"path": "/tmp", "group": "root"}],
            "requests": {"enabled": False, "build_env": names}}
    with pytest.raises(ConfigError, match=message):
        cfgmod.parse(data, source="t.yaml")
    assert cfgmod.parse({**data, "requests": {"enabled": False, "build_env": ["NO_PROXY"]}},
                        source="t.yaml").requests.build_env == ("NO_PROXY",)


def test_doctor_on_a_built_env(api: ApiDaemon, accounts: Accounts) -> None:
    """``doctor NAME`` with a daemon: the daemon's record (status, version, builder), the tree
    audited as the user, the python run, the kernel question."""
    spec = api.write_spec("dependencies: []\n")
    res = api.cli(accounts.bob, "request", "create", "doctor-venv", "-f", str(spec),
                  "--backend", "venv")
    assert res.returncode == 0, res.stderr
    res = api.cli(accounts.alice, "doctor", "doctor-venv", "--json")
    checks = {c["check"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["env"]["ok"] and "ready; version v1 built by" in checks["env"]["summary"]
    assert accounts.bob.name in checks["env"]["summary"]
    assert checks["env tree"]["ok"], checks["env tree"]
    assert checks["python"]["ok"] and checks["kernel"]["ok"]
    assert checks["daemon"]["ok"]
    assert " on 20" in checks["env"]["summary"]  # when it was built, in the user's zone
    res = api.cli(accounts.alice, "env", "show", "doctor-venv", env={"TZ": "Asia/Tokyo"})
    assert res.returncode == 0 and " JST by " in res.stdout, res.stdout
    res = api.cli(accounts.alice, "doctor", "no-such-env", "--json")
    checks = {c["check"]: c for c in json.loads(res.stdout)["checks"]}
    assert res.returncode == 1 and not checks["env"]["ok"]
    assert "envctl env list" in checks["env"]["fix"]


def test_conda_backend_hands_variables_to_conda_env_create() -> None:
    """The conda-family backends write the environment.yml that ``conda env create`` reads:
    ``variables:`` go in it, and conda writes them to conda-meta/state itself."""
    from envctl_shared.config import RequestsConfig
    from envctl_shared.jobs.backends.conda import SPEC_FILE, CondaBackend
    from envctl_shared.jobs.spec import parse_spec

    cfg = RequestsConfig(conda_exe="/opt/conda/bin/conda")
    spec = parse_spec("dependencies: [numpy]\nvariables: {OMP_NUM_THREADS: 4}\n", cfg)
    doc = yaml.safe_load(CondaBackend("conda").files(spec, cfg)[SPEC_FILE])
    assert doc["variables"] == {"OMP_NUM_THREADS": "4"} and doc["dependencies"] == ["numpy"]
    plain = parse_spec("dependencies: [numpy]\n", cfg)
    assert "variables" not in yaml.safe_load(CondaBackend("conda").files(plain, cfg)[SPEC_FILE])
