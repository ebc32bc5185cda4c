"""A hostile requester's spec against a real build: what a package of an allowed channel can
plant in the version the build then writes into, and which ``variables:`` a shared env may set.
Each case was an attack on the merged conda+pip build before it was refused here."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from envctl_shared.config import parse
from envctl_shared.errors import ValidationError
from envctl_shared.jobs import JobManager, State
from envctl_shared.jobs.spec import parse_spec

from tests.jobs_support import (
    CondaPackage,
    JobsEnv,
    build_channel,
    full_log,
    wait_done,
)

pytest_plugins = ("tests.fixtures_jobs",)
Factory = Callable[..., JobManager]


def test_a_packaged_state_symlink_does_not_redirect_the_variables(
        jobs_env: JobsEnv, scratch: Path, manager_factory: Factory) -> None:
    """A package shipping ``conda-meta/state`` as a symlink made the rattler step write the
    spec's variables through it: over any file that step may write (the build user's today,
    every file once that step runs as the daemon). The link is replaced, its target kept."""
    victim = scratch / "victim"
    victim.write_text("precious\n")
    os.chown(victim, jobs_env.accounts.builder.uid, jobs_env.accounts.builder.gid)
    channel = build_channel(scratch / "statechan", [
        CondaPackage("stateln", links={"conda-meta/state": str(victim)})])
    mgr = manager_factory(jobs_env.config(channels=[str(channel)],
                                          default_channels=[str(channel)]))
    job = mgr.submit(jobs_env.requester(), "statevars",
                     "dependencies: [stateln]\nvariables: {MODE: offline}\n")
    assert wait_done(mgr, job.id).state is State.SUCCEEDED, full_log(mgr, job.id)
    assert victim.read_text() == "precious\n"
    state = jobs_env.root / "statevars" / "conda-meta" / "state"
    assert not state.is_symlink()
    assert json.loads(state.read_text()) == {"env_vars": {"MODE": "offline"}}


@pytest.mark.parametrize("name,value", [
    ("LD_PRELOAD", "/home/mallory/.cache/x.so"), ("LD_LIBRARY_PATH", "/home/mallory/lib"),
    ("PYTHONPATH", "/home/mallory/site"), ("PYTHONSTARTUP", "/home/mallory/s.py"),
    ("PYTHONUSERBASE", "/home/mallory/.local"), ("BASH_ENV", "/home/mallory/.b"),
    ("PROMPT_COMMAND", "sh /home/mallory/x"), ("PS1", "$(sh /home/mallory/x)"),
    ("HOME", "/home/mallory"), ("IPYTHONDIR", "/home/mallory/.ipython"),
    ("JUPYTER_CONFIG_DIR", "/home/mallory/.jupyter"), ("R_PROFILE_USER", "/home/mallory/.Rp"),
    ("PIP_INDEX_URL", "https://mallory.example/simple"), ("UV_INDEX_URL", "https://m.example"),
    ("CONDA_CHANNELS", "https://mallory.example/chan"), ("CONDARC", "/home/mallory/condarc"),
    # commands the programs every user runs in the env start (help() and git's pager, IPython's
    # %edit, webbrowser, less's preprocessor, git's ssh), and the certificates they trust: a
    # requester's own file, changed at will, trusted by everyone's HTTPS from the env
    ("PAGER", "/home/mallory/p"), ("EDITOR", "/home/mallory/e"), ("VISUAL", "/home/mallory/e"),
    ("BROWSER", "/home/mallory/b"), ("LESSOPEN", "|/home/mallory/l %s"),
    ("GIT_SSH_COMMAND", "/home/mallory/s"), ("GIT_EXEC_PATH", "/home/mallory/git"),
    ("SSL_CERT_FILE", "/home/mallory/ca.pem"), ("REQUESTS_CA_BUNDLE", "/home/mallory/ca.pem"),
    ("CURL_CA_BUNDLE", "/home/mallory/ca.pem"),
])
def test_variables_that_load_code_from_outside_the_version_are_refused(
        jobs_env: JobsEnv, manager_factory: Factory, name: str, value: str) -> None:
    """Every user of a shared env runs it with its variables (``conda activate``, its kernel):
    ``LD_PRELOAD`` or ``PYTHONPATH`` pointing into a requester's home ran her files, changed at
    will after the build, in every user's process — past the site's channel policy and any
    check of the version. Refused at submit, nothing created."""
    mgr = manager_factory()
    with pytest.raises(ValidationError, match=f"variable {name} would make every user"):
        mgr.submit(jobs_env.requester(), "codevars",
                   f"dependencies: [hello]\nvariables: {{{name}: '{value}'}}\n")
    assert mgr.list(include_finished=True) == []


def test_ordinary_variables_pass() -> None:
    cfg = parse({"roots": [{"path": "/srv/envs", "group": 0}], "requests": {}}).requests
    ordinary = {"OMP_NUM_THREADS": "4", "PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0",
                "CUDA_VISIBLE_DEVICES": "0", "MPLBACKEND": "Agg", "LDFLAGS_EXTRA": "x"}
    spec = parse_spec(f"dependencies: [x]\nvariables: {json.dumps(ordinary)}\n", cfg)
    assert dict(spec.variables) == ordinary


def test_the_package_cap_comes_before_each_entry_is_parsed() -> None:
    """A 64 KiB spec holds 32,000 entries: each parsed as a match spec or requirement before
    the count was checked took half a second of one of the daemon's two parse turns per
    request. The count is judged first; the entries' own checks follow within it."""
    cfg = parse({"roots": [{"path": "/srv/envs", "group": 0}], "requests": {}}).requests
    with pytest.raises(ValidationError, match="spec lists 32000 packages"):
        parse_spec("dependencies: [nu$mpy" + ",a" * 31999 + "]\n", cfg)


def test_package_names_from_a_build_are_printable_text(
        jobs_env: JobsEnv, scratch: Path, manager_factory: Factory) -> None:
    """The version's inventory is read from the tree the build wrote: a package (or an sdist's
    setup.py) can leave a ``.dist-info`` whose METADATA names a "package" with terminal
    escapes, which ``env show`` printed to every user who looked at the env (retitling their
    terminal, rewriting lines above). The record keeps printable text only."""
    esc = "evil\x1b]0;owned\x07\x1b[2K"
    site = "lib/python3.11/site-packages/fake-9.dist-info"
    channel = build_channel(scratch / "escchan", [CondaPackage("carrier", files={
        f"{site}/METADATA": (f"Metadata-Version: 2.1\nName: {esc}\nVersion: 9\n", False),
        f"{site}/INSTALLER": ("uv\n", False)})])
    mgr = manager_factory(jobs_env.config(channels=[str(channel)],
                                          default_channels=[str(channel)]))
    job = mgr.submit(jobs_env.requester(), "escapes", "dependencies: [carrier]\n")
    assert wait_done(mgr, job.id).state is State.SUCCEEDED, full_log(mgr, job.id)
    current = next(v for v in mgr.environments.show("escapes")["versions"] if v["current"])
    names = [p["name"] for p in current["packages"]]
    assert "carrier" in names and any(n.startswith("evil") for n in names), names
    assert all(n.isprintable() for n in names), names


# conda's own activation templates (conda/activate.py: PosixActivator, CshActivator): the value
# is pasted in as it is.
CONDA_SH = "export %s='%s'"


@pytest.mark.parametrize("value", ["x'; touch {mark}; : '", "`touch {mark}`",
                                   "$(touch {mark})", 'say "hi"', "C:\\temp"])
def test_variable_values_conda_activation_would_run_are_refused(
        scratch: Path, value: str) -> None:
    """``conda activate`` turns each variable into ``export NAME='value'`` without escaping:
    a quote in a value ended the string and the rest ran in the shell of every user who
    activated the env (any variable name will do). Shown with conda's template in a real
    sh, then refused at submit."""
    cfg = parse({"roots": [{"path": "/srv/envs", "group": 0}], "requests": {}}).requests
    mark = scratch / "ran"
    text = value.format(mark=mark)
    if "'" in text:
        subprocess.run(["sh", "-c", CONDA_SH % ("GREETING", text)], check=False)
        assert mark.exists()  # what conda activation does with it
    with pytest.raises(ValidationError, match="conda activation would run as shell code"):
        parse_spec(f"dependencies: [x]\nvariables: {{GREETING: {json.dumps(text)}}}\n", cfg)


def test_accepted_variable_values_are_inert_in_condas_activation() -> None:
    cfg = parse({"roots": [{"path": "/srv/envs", "group": 0}], "requests": {}}).requests
    values = {"A": "offline run", "B": "a=b,c=d; e", "C": "/opt/x:/opt/y", "D": "#1 & (2) | <3>",
              "E": "ünïcode * ? [x] ~ !", "F": "https://h.example/p?q=1&r=2"}
    spec = parse_spec(f"dependencies: [x]\nvariables: {json.dumps(values)}\n", cfg)
    for key, value in spec.variables:
        out = subprocess.run(["sh", "-c", CONDA_SH % (key, value) + f'; printf %s "${key}"'],
                             capture_output=True, text=True, check=True).stdout
        assert out == values[key]
