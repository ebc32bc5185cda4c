"""The environment files people really write, built for real and offline: conda packages from a
local channel carrying this machine's python (relocated) and pip, a ``pip:`` section from local
wheels (uv, into the same prefix), ``conda env export`` pins (``name=version=build``),
``variables:`` and a ``prefix:``; then what users do with it: import the pip package as another
member, ``--test`` commands that see the variables, ``env show``/``env export`` with both kinds
of pins and the variables, and a rebuild from the export that gives the same packages. And what
must be refused at submit time, naming the entry: a ``pip:`` section with no python to run it,
match specs conda would not read, a ``channel::`` or ``[url=...]`` that reaches past the
channel policy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from envctl_shared.errors import ValidationError
from envctl_shared.jobs import JobManager, State

from tests.helpers import as_user
from tests.jobs_support import JobsEnv, app_package, build_channel, full_log, wait_done, write_wheel

pytest_plugins = ("tests.fixtures_jobs",)
Factory = Callable[..., JobManager]

MIXED = """\
name: analysis
channels:
  - {py}
  - {hello}
dependencies:
  - python=3.11.2=0
  - pip
  - hello 2.1.*
  - pip:
    - mixdemo==1.0
variables:
  OMP_NUM_THREADS: 4
  ANALYSIS_MODE: offline run
prefix: /home/alice/miniconda3/envs/analysis
"""


@pytest.fixture
def mixed(jobs_env: JobsEnv, py_channel: Path, manager_factory: Factory) -> tuple[JobManager,
                                                                                 str]:
    """A manager allowed both channels, with two wheels (mixdemo needs mixdep) in the
    wheelhouse; and the mixed spec."""
    write_wheel(jobs_env.wheelhouse, "mixdep", "2.0", "VALUE = 42\n")
    write_wheel(jobs_env.wheelhouse, "mixdemo", "1.0",
                "import mixdep\nANSWER = mixdep.VALUE\n", requires=("mixdep>=2",))
    channels = [str(py_channel), str(jobs_env.channel)]
    mgr = manager_factory(jobs_env.config(channels=channels, default_channels=channels))
    return mgr, MIXED.format(py=py_channel, hello=jobs_env.channel)


def _build(mgr: JobManager, jobs_env: JobsEnv, name: str, text: str,
           tests: tuple[str, ...] = ()) -> str:
    job = mgr.submit(jobs_env.requester(), name, text, tests=tests)
    done = wait_done(mgr, job.id, timeout=120)
    log = full_log(mgr, job.id)
    assert done.state is State.SUCCEEDED, log
    # the installer's cache was the build's own and is gone with it (no wheel kept in HOME)
    assert not list((jobs_env.state_dir / "jobs" / job.id / "home").rglob("mixdep*")), log
    return log


def _packages(mgr: JobManager, name: str) -> set[tuple[str, str, str]]:
    current = next(v for v in mgr.environments.show(name)["versions"] if v["current"])
    return {(p["manager"], p["name"], p["version"]) for p in current["packages"]}


def test_conda_and_pip_in_one_env_with_variables(mixed: tuple[JobManager, str],
                                                 jobs_env: JobsEnv) -> None:
    mgr, text = mixed
    log = _build(mgr, jobs_env, "analysis", text, tests=(
        'test "$OMP_NUM_THREADS" = 4 && test "$ANALYSIS_MODE" = "offline run"',
        'python -c "import mixdemo; assert mixdemo.ANSWER == 42"'))
    assert "uv" in log and "is ignored" in log  # uv installed the pip: entries; prefix: noted
    env = jobs_env.root / "analysis"
    # bob, another member, imports the pip package with the env's python
    res = as_user(jobs_env.accounts.bob.uid, jobs_env.accounts.bob.gid,
                  [str(env / "bin/python"), "-c",
                   "import mixdemo, sys; print(mixdemo.ANSWER, sys.prefix)"])
    assert res.stdout.split()[0] == "42"
    # byte-compiled at build time: nothing needs to write into the version later
    site = env / "local/lib/python3.11/dist-packages"
    assert list((site / "__pycache__").glob("mixdemo.cpython-311.pyc")), sorted(site.iterdir())
    assert json.loads((env / "conda-meta/state").read_text()) == {
        "env_vars": {"OMP_NUM_THREADS": "4", "ANALYSIS_MODE": "offline run"}}
    # the record: conda and pip packages with exact versions, and the variables
    packages = _packages(mgr, "analysis")
    assert {("conda", "python", "3.11.2"), ("conda", "pip", "23.0.1"), ("conda", "hello", "2.1"),
            ("pip", "mixdemo", "1.0"), ("pip", "mixdep", "2.0")} <= packages, packages
    shown = next(v for v in mgr.environments.show("analysis")["versions"] if v["current"])
    assert shown["variables"] == {"OMP_NUM_THREADS": "4", "ANALYSIS_MODE": "offline run"}
    # the export: conda pins, a pip: list, the variables; it builds the same packages back
    exported = mgr.environments.export("analysis")["text"]
    doc = yaml.safe_load(exported)
    assert "python ==3.11.2 0" in doc["dependencies"]
    assert {"pip": ["mixdemo==1.0", "mixdep==2.0"]} in doc["dependencies"]
    assert doc["variables"] == {"OMP_NUM_THREADS": "4", "ANALYSIS_MODE": "offline run"}
    _build(mgr, jobs_env, "analysis-copy", exported)
    assert _packages(mgr, "analysis-copy") == packages
    state = json.loads((jobs_env.root / "analysis-copy/conda-meta/state").read_text())
    assert state["env_vars"] == {"OMP_NUM_THREADS": "4", "ANALYSIS_MODE": "offline run"}


def test_an_unchanged_replace_keeps_the_current_version(mixed: tuple[JobManager, str],
                                                        jobs_env: JobsEnv) -> None:
    """A --replace whose solve gives exactly the current version's packages (same spec text,
    every pip entry an exact pin of what the version holds) makes no new version, as
    ``conda update`` says so; once the channel has a newer package, the same text builds."""
    mgr, text = mixed
    text = text.replace("    - mixdemo==1.0\n", "    - mixdemo==1.0\n    - mixdep==2.0\n")
    text = text.replace("  - hello 2.1.*\n", "  - hello 2.1.*\n  - app\n")
    _build(mgr, jobs_env, "analysis", text)
    versions = jobs_env.root / ".envctl/envs/analysis"
    job = mgr.submit(jobs_env.requester(), "analysis", text, replace=True)
    done = wait_done(mgr, job.id, timeout=120)
    log = full_log(mgr, job.id)
    assert done.state is State.SUCCEEDED, log
    assert done.exit_detail == "no change: v1 already has exactly these packages", log
    assert "no change: v1" in log and "compileall" not in log
    assert not (versions / "v2").exists() and (jobs_env.root / "analysis").resolve().name == "v1"
    assert ("conda", "app", "2.0") in _packages(mgr, "analysis")
    # a package published since: the same text solves to something new, a new version
    build_channel(jobs_env.channel, [app_package("3.0")])
    job = mgr.submit(jobs_env.requester(), "analysis", text, replace=True)
    done = wait_done(mgr, job.id, timeout=120)
    log = full_log(mgr, job.id)
    assert done.state is State.SUCCEEDED and "the solve differs from v1" in log, log
    assert (jobs_env.root / "analysis").resolve().name == "v2"
    assert ("conda", "app", "3.0") in _packages(mgr, "analysis")
    # the .pyc of a file linked from the conda cache is one copy (the store's) in both
    site = "lib/python3.11/dist-packages/pip/__pycache__/__init__.cpython-311.pyc"
    assert (versions / "v1" / site).stat().st_ino == (versions / "v2" / site).stat().st_ino
    # a pip entry that is not an exact pin may resolve anew: built, not short-circuited
    loose = text.replace("mixdep==2.0", "mixdep>=2")
    _build(mgr, jobs_env, "analysis-loose", loose)
    job = mgr.submit(jobs_env.requester(), "analysis-loose", loose, replace=True)
    assert wait_done(mgr, job.id, timeout=120).state is State.SUCCEEDED
    assert (jobs_env.root / "analysis-loose").resolve().name == "v2"


def test_a_pip_section_needs_a_python(mixed: tuple[JobManager, str], jobs_env: JobsEnv) -> None:
    mgr, _ = mixed
    with pytest.raises(ValidationError, match="pip: section needs a python") as exc:
        mgr.submit(jobs_env.requester(), "nopython",
                   "dependencies:\n  - hello\n  - pip:\n    - mixdemo\n")
    assert "add python to dependencies" in (exc.value.hint or "")
    assert mgr.list(include_finished=True) == []


def test_without_uv_a_pip_section_needs_pip(jobs_env: JobsEnv, py_channel: Path,
                                            manager_factory: Factory) -> None:
    """pip installs when the site's options are pip's own: a spec without pip is refused at
    submit time, not at the end of a solve."""
    channels = [str(py_channel)]
    mgr = manager_factory(jobs_env.config(channels=channels, default_channels=channels,
                                          pip_args=["--progress-bar", "off"]))
    with pytest.raises(ValidationError, match="needs pip in the environment"):
        mgr.submit(jobs_env.requester(), "nopip", "dependencies: [python, {pip: [mixdep]}]\n")


@pytest.mark.parametrize("dep,message", [
    ("numpy>>1", "dependency 2 ('numpy>>1') is not a match spec"),
    ("nu$mpy", "dependency 2 ('nu$mpy') is not a match spec: invalid package name"),
    ("conda-forge::hello", "names channel 'conda-forge', which is not among"),
    ("hello[url=https://evil.example/hello-9-0.tar.bz2]", "names a package URL"),
    ("hello>q{!3!''\"^H", "is not a match spec: scalar"),  # YAML '' is one '
    ("hello\t1.0", "is not one line of printable text"),
])
def test_match_specs_conda_would_not_read_are_named(mixed: tuple[JobManager, str],
                                                    jobs_env: JobsEnv, dep: str,
                                                    message: str) -> None:
    mgr, _ = mixed
    with pytest.raises(ValidationError) as exc:
        mgr.submit(jobs_env.requester(), "badspec", f"dependencies:\n  - python\n  - '{dep}'\n")
    assert message in exc.value.message
    assert mgr.list(include_finished=True) == []


def test_pip_does_the_installing_when_the_site_options_are_pips_own(
        jobs_env: JobsEnv, py_channel: Path, manager_factory: Factory) -> None:
    """``--progress-bar off`` means nothing to uv: the env's own pip installs instead, and its
    dists (INSTALLER pip) are inventoried the same."""
    write_wheel(jobs_env.wheelhouse, "mixdep", "2.0", "VALUE = 42\n")
    channels = [str(py_channel)]
    mgr = manager_factory(jobs_env.config(
        channels=channels, default_channels=channels,
        pip_args=["--no-index", "--find-links", str(jobs_env.wheelhouse), "--progress-bar",
                  "off"]))
    log = _build(mgr, jobs_env, "bypip", "dependencies: [python, pip, {pip: [mixdep]}]\n",
                 tests=('python -c "import mixdep"',))
    assert "/bin/python -m pip install" in log and "uv pip" not in log
    assert ("pip", "mixdep", "2.0") in _packages(mgr, "bypip")


def test_a_venv_on_uv_has_pip_only_when_asked(mixed: tuple[JobManager, str],
                                              jobs_env: JobsEnv) -> None:
    mgr, _ = mixed
    job = mgr.submit(jobs_env.requester(), "lean", "dependencies: [{pip: [mixdemo]}]\n",
                     backend="venv", tests=('python -c "import mixdemo"',))
    assert wait_done(mgr, job.id).state is State.SUCCEEDED, full_log(mgr, job.id)
    env = jobs_env.root / "lean"
    assert _packages(mgr, "lean") == {("pip", "mixdemo", "1.0"), ("pip", "mixdep", "2.0")}
    site = next(env.glob("lib/python3.*/site-packages"))
    assert not (site / "pip").exists() and list((site / "__pycache__").glob("mixdemo.*.pyc"))
    res = as_user(jobs_env.accounts.bob.uid, jobs_env.accounts.bob.gid,
                  [str(env / "bin/python"), "-c", "import mixdemo; print(mixdemo.ANSWER)"])
    assert res.stdout.strip() == "42"
    # asked for: pip is there (seeded from the base python's own wheel, offline)
    job = mgr.submit(jobs_env.requester(), "withpip",
                     "dependencies: [pip, {pip: [mixdemo]}]\n", backend="venv",
                     tests=('python -m pip --version',))
    assert wait_done(mgr, job.id).state is State.SUCCEEDED, full_log(mgr, job.id)


def test_the_steps_of_a_mixed_build(mixed: tuple[JobManager, str], jobs_env: JobsEnv,
                                    py_channel: Path) -> None:
    """Only the rattler child is trusted (it runs no package code); uv runs for the env's
    python; the compile step comes last. The child imports nothing of envctl (0.2 s a build)."""
    from envctl_shared.jobs.backends import BuildContext, get_backend, rattler_child
    from envctl_shared.jobs.spec import parse_spec

    _, text = mixed
    channels = [str(py_channel), str(jobs_env.channel)]
    cfg = jobs_env.config(channels=channels, default_channels=channels).requests
    spec = parse_spec(text, cfg)
    ctx = BuildContext(spec, cfg, Path("/state/jobs/j1"), Path("/state/jobs/j1/home"),
                       Path("/root/.envctl/envs/analysis/v1"), Path("/state/cache"))
    steps = get_backend("rattler", cfg).steps(ctx)
    assert [(s.phase, s.trusted) for s in steps] == [
        ("solving", True), ("installing", False), ("compiling", False)]
    uv = steps[1].argv
    assert "--python" in uv and uv[uv.index("--python") + 1] == f"{ctx.prefix}/bin/python"
    assert uv[-2:] == ("-r", "/state/jobs/j1/requirements.txt") and "--no-index" in uv
    res = subprocess.run([sys.executable, "-I", "-X", "importtime", rattler_child.__file__,
                          "--help"], capture_output=True, text=True, check=True)
    assert "envctl_shared" not in res.stderr and "usage:" in res.stdout
