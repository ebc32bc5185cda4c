"""Validation of env names and environment.yml: every bad input is a clear ValidationError with
a hint, and a refused submit leaves nothing behind (no job row, no job dir, nothing in the root).
Hostile YAML (alias bombs, deep nesting, absurd scalars) is refused at a bounded cost, and pip:
entries are judged as the requirements-file lines pip reads them as.
"""

from __future__ import annotations

import os
import random
import string
import time

import pytest
from envctl_shared.config import parse
from envctl_shared.errors import Conflict, ValidationError
from envctl_shared.jobs.backends import backend_named
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
    ("channels: [https://evil.example/chan]\ndependencies: [x]\n", "is not allowed on this"),
    ("dependencies: [x]\nvaraibles: {A: b}\n", "unknown key 'varaibles'"),
    ("dependencies: [x]\nvariables: [A, b]\n", "variables must be a mapping"),
    ("dependencies: [x]\nvariables: {1A: b}\n", "not a valid environment variable name"),
    ("dependencies: [x]\nvariables: {PATH: /evil}\n", "set by activation itself"),
    ("dependencies: [x]\nvariables: {A: [1]}\n", "must be a string or a number"),
    ("dependencies: [x]\nvariables: {A: \"x\\ny\"}\n", "one line"),
    ("dependencies: [x]\n  bad: [\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("dependencies: {x: 1}\n", "dependencies must be a list"),
    ("dependencies: [{conda: [x]}]\n", "unsupported dependency"),
    ("dependencies: [{pip: [--index-url=https://evil/simple, x]}]\n", "is an option"),
    ("dependencies: [{pip: [-e, .]}]\n", "is an option"),
    ("dependencies: [{pip: ['x @ https://evil/x.whl']}]\n", "is a URL"),
    ("dependencies: [{pip: ['git+https://evil/x.git']}]\n", "is a URL"),
    ("dependencies: [{pip: [/tmp/x.whl]}]\n", "local path"),
    # per-requirement options hide behind a requirement: pip still obeys them
    ("dependencies: [{pip: ['x --hash=sha256:00']}]\n", "has the option '--hash'"),
    ("dependencies: [{pip: ['x==1 --global-option=--evil']}]\n",
     "has the option '--global-option'"),
    ("dependencies: [{pip: ['x --config-settings k=v']}]\n", "has the option '--config-settings'"),
    ("dependencies: [{pip: ['x --index-url http://evil/simple']}]\n",
     "has the option '--index-url'"),
    ("dependencies: [{pip: ['-r /etc/shadow']}]\n", "is an option, '-r'"),
    # one entry is one line: no second line smuggled in, no continuation joining the next
    ("dependencies: [{pip: [\"x\\n--index-url=http://evil\"]}]\n", "one line"),
    ("dependencies: [{pip: ['x \\', '--pre']}]\n", "one line"),
    ("dependencies: [{pip: ['# nothing']}]\n", "only a comment"),
    # direct references, whatever their spelling
    ("dependencies: [{pip: ['x @ file:///tmp/x']}]\n", "is a local path"),
    ("dependencies: [{pip: ['x@git+https://evil/x']}]\n", "is a URL"),
    ("dependencies: [{pip: ['https://evil/x-1.0-py3-none-any.whl']}]\n", "is a URL"),
    ("dependencies: [{pip: ['file:/tmp/x']}]\n", "is a URL"),
    ("dependencies: [{pip: [./pkg]}]\n", "is a local path"),
    ("dependencies: [{pip: [x-1.0-py3-none-any.whl]}]\n", "is a local path"),
    ("dependencies: [{pip: ['${HOME}']}]\n", "which pip would expand"),
    ("dependencies: [{pip: ['x==']}]\n", "not a valid requirement"),
    ("dependencies: [" + "x" * 1001 + "]\n", "longer than 1000 characters"),
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


def test_plain_requirements_markers_and_comments_pass() -> None:
    entries = ["requests==2.31", "numpy >=1.26", "pkg[a,b]>=1,<2", "name.with-dots_x",
               "pkg; python_version < '3.12'", "pkg  # pinned by the team"]
    text = "dependencies:\n  - pip:\n" + "".join(f"    - \"{e}\"\n" for e in entries)
    assert parse_spec(text, _cfg()).pip == tuple(entries)


def test_options_and_urls_are_separate_permissions() -> None:
    """allow_pip_options alone does not open direct references: a per-requirement option is
    then fine, a URL requirement or an editable install (always a path or URL) is not."""
    options = _cfg(allow_pip_options=True)
    assert parse_spec("dependencies: [{pip: ['x --hash=sha256:00', --pre]}]\n", options).pip
    for entry in ("x @ https://h/x.whl --hash=sha256:00", "-e git+https://h/x", "--editable=.",
                  "-e."):
        with pytest.raises(ValidationError, match="is a URL|editable install"):
            parse_spec(f"dependencies: [{{pip: ['{entry}']}}]\n", options)
    urls = _cfg(allow_pip_urls=True)
    assert parse_spec("dependencies: [{pip: ['x @ https://h/x.whl', ./pkg]}]\n", urls).pip
    with pytest.raises(ValidationError, match="has the option '--hash'"):
        parse_spec("dependencies: [{pip: ['x @ https://h/x.whl --hash=sha256:00']}]\n", urls)


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The classic "billion laughs" in an environment.yml: ``width ** levels`` leaves in ~350
    bytes, where the old validator's error message repr-ed all of them (9.3 GB, 114 s)."""
    names = string.ascii_lowercase
    parts = ["&a [" + ",".join(["lol"] * width) + "]"]
    parts += [f"&{names[i]} [" + ",".join([f"*{names[i - 1]}"] * width) + "]"
              for i in range(1, levels)]
    return "dependencies:\n  - [" + ", ".join(parts) + "]\n"


@pytest.mark.parametrize("text,message", [
    (_alias_bomb(), "spec is refused at line 2: the document expands to more than"),
    ("dependencies: [&a [*a]]\n", "cycle"),
    ("dependencies: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested more than 64 levels"),
    ("dependencies:\n  " + "- " * 20_000 + "x\n", "nested more than 64 levels"),
    ("dependencies:\n" + "".join(f"{'  ' * i}- \n" for i in range(1, 200)), "nested more"),
    # plain scalars are read as text (see test_plain_scalars_are_the_text_written): tagged
    ("dependencies: [!!int " + "1" * 5000 + "]\n", "4300 digits"),
    ("dependencies: [!!int 0x]\n", "cannot read the value"),
    ("dependencies: [!!timestamp 2020-13-45]\n", "month must be in 1..12"),
    ("dependencies: [!!timestamp x]\n", "cannot read the value"),
])
def test_hostile_yaml_is_refused_cheaply(text: str, message: str) -> None:
    """Refused with a validation error (never RecursionError/ValueError), in bounded time."""
    t0 = time.monotonic()
    with pytest.raises(ValidationError, match=message):
        parse_spec(text, _cfg(max_spec_bytes=100_000))
    assert time.monotonic() - t0 < 2.0


def test_ordinary_aliases_still_work() -> None:
    spec = parse_spec("channels: &c [conda-forge]\ndependencies: [numpy, {pip: [x]}]\n"
                      "name: env\n", _cfg())
    assert spec.channels == ("conda-forge",)


def test_messages_quote_user_data_briefly() -> None:
    """Whatever was sent, the message that quotes it stays short (it goes to the log and back
    over the socket)."""
    cases = ["dependencies: [[" + ", ".join(["x" * 1000] * 50) + "]]\n",
             "dependencies: [*" + "a" * 5000 + "]\n",  # PyYAML quotes the alias it lacks
             "dependencies: [x]\n" + "k" * 5000 + ": 1\n",
             "channels: [" + "c" * 5000 + "]\ndependencies: [x]\n",
             "dependencies: [{pip: [" + "p" * 5000 + " --hash=x]}]\n"]
    for text in cases:
        with pytest.raises(ValidationError) as err:
            parse_spec(text, _cfg())
        assert len(err.value.message) < 400, err.value.message
    with pytest.raises(ValidationError) as err:
        validate_name("n" * 100_000)
    assert len(err.value.message) < 200


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


_TOKENS = ["&a ", "*a", "&b [*a, *a]", "[", "]", "{", "}", "- ", ": ", "!!int ", "!!float ",
           "!!binary ", "!!timestamp ", "!!set ", "!!omap ", "!!python/name:os.system ", "\t",
           "\n", "\n  ", "%YAML 1.1\n", "---\n", "...\n", "'", '"', "\\", "? ", "<<: ", "#",
           "1" * 5000, "0x", "2020-13-45", "1e999", ".nan", "~", "\ud800", "\x00", "\u2028",
           "pip", "dependencies", "channels", "prefix", "--hash=x", " @ file:///x", "git+",
           "x" * 1200]


def test_spec_fuzz_only_validation_errors() -> None:
    """Random mutations of a valid spec: the parser answers ValidationError or a spec, never
    anything else, and quickly (seeded; ENVCTL_FUZZ_SEED to explore)."""
    rng = random.Random(int(os.environ.get("ENVCTL_FUZZ_SEED", "7")))
    base = "name: e\nchannels: [conda-forge]\ndependencies:\n  - numpy\n  - pip:\n    - x==1\n"
    t0 = time.monotonic()
    for _ in range(3000):
        text = list(base)
        for _ in range(rng.randrange(1, 8)):
            text.insert(rng.randrange(len(text) + 1), rng.choice(_TOKENS))
        spec = "".join(text)
        try:
            parse_spec(spec, _cfg(allow_pip_urls=rng.random() < 0.5,
                                  allow_pip_options=rng.random() < 0.5))
        except ValidationError as err:
            assert len(err.message) < 500, (spec, err.message)
    assert time.monotonic() - t0 < 60


def test_conda_env_export_output_is_accepted() -> None:
    """What ``conda env export`` writes (name, channels, dependencies, variables, prefix): the
    prefix is ignored and a different name noted, both for the job's log."""
    text = ("name: analysis-old\nchannels:\n  - conda-forge\ndependencies:\n  - numpy=1.26.4\n"
            "variables:\n  OMP_NUM_THREADS: 4\n  DEBUG: true\n  GREETING: hello world\n"
            "prefix: /home/alice/miniconda3/envs/analysis-old\n")
    spec = parse_spec(text, _cfg(), "analysis")
    assert spec.conda == ("numpy=1.26.4",)
    assert spec.variables == (("OMP_NUM_THREADS", "4"), ("DEBUG", "true"),
                              ("GREETING", "hello world"))
    assert len(spec.notes) == 2
    assert "name: 'analysis-old'" in spec.notes[0] and "'analysis'" in spec.notes[0]
    assert "prefix: '/home/alice/miniconda3/envs/analysis-old' is ignored" in spec.notes[1]
    # the same name, no prefix: nothing to say
    assert parse_spec("name: analysis\ndependencies: [x]\n", _cfg(), "analysis").notes == ()


def test_plain_scalars_are_the_text_written() -> None:
    """YAML 1.1 read ``UMASK: 0022`` as the octal 18, ``FLAG: no`` as False ("false"),
    ``CUDA_VERSION: 11.10`` as 11.1 and ``START: 8:30`` as 510: a variable silently took
    another value than the one written (conda, reading YAML 1.2, keeps most as written)."""
    spec = parse_spec("dependencies: [x]\nvariables: {UMASK: 0022, FLAG: no, CUDA_VERSION: "
                      "11.10, START: 8:30, N: 4, DEBUG: true, BIG: 1_000}\n", _cfg())
    assert dict(spec.variables) == {"UMASK": "0022", "FLAG": "no", "CUDA_VERSION": "11.10",
                                    "START": "8:30", "N": "4", "DEBUG": "true", "BIG": "1_000"}


def test_an_empty_spec_is_valid_here() -> None:
    """An empty venv may be requested; conda-family backends refuse an empty list themselves."""
    assert parse_spec("dependencies: []\n", _cfg()).package_count == 0
    assert parse_spec("{}\n", _cfg()).package_count == 0


@pytest.mark.parametrize("dep", ["https://evil.example/conda-forge::numpy",
                                 "numpy[channel='https://evil.example/conda-forge']",
                                 "file:///home/mallory/srv/chan::numpy"])
def test_a_channel_is_judged_by_where_it_points_not_by_its_name(dep: str) -> None:
    """``https://evil.example/conda-forge`` is called ``conda-forge`` too: a ``channel::``
    that only shares an allowed channel's name is refused (conda fetches what a match spec's
    channel names), while every spelling of an allowed channel passes."""
    with pytest.raises(ValidationError, match="not among the spec's channels"):
        parse_spec(f"channels: [conda-forge, /srv/chan]\ndependencies: [\"{dep}\"]\n", _cfg())
    for ok in ("conda-forge::numpy", "https://conda.anaconda.org/conda-forge/::numpy",
               "/srv/chan::numpy", "file:///srv/chan::numpy"):
        parse_spec(f"channels: [conda-forge, /srv/chan]\ndependencies: ['{ok}']\n", _cfg())


@pytest.mark.parametrize("channel", ["/root/private-chan", "file:///root/private-chan",
                                     "./chan", "FILE:///srv/other"])
def test_a_local_channel_needs_the_admin_when_any_channel_is_allowed(channel: str) -> None:
    """``requests.channels: []`` allows any channel, but the trusted step reads local ones as
    the daemon: a requester naming a directory only root may read got its packages. A local
    channel must be one the admin named; a remote one stays open."""
    cfg = _cfg(channels=[], default_channels=["/srv/chan"])
    with pytest.raises(ValidationError, match="is not allowed on this daemon") as err:
        parse_spec(f"channels: [{channel}]\ndependencies: [x]\n", cfg)
    assert "named by the admin" in (err.value.hint or "")
    assert parse_spec("channels: [/srv/chan, conda-forge]\ndependencies: [x]\n",
                      cfg).channels == ("/srv/chan", "conda-forge")


@pytest.mark.parametrize("allowed,venv_hint", [(["rattler", "venv"], True), (["rattler"], False)])
def test_no_conda_packages_hints_at_venv_only_where_it_is_allowed(allowed: list[str],
                                                                  venv_hint: bool) -> None:
    """The hint offers an empty environment (``--backend venv``) only on a daemon that builds
    venvs: ``init``'s config allows rattler alone, where the offer would be refused next."""
    cfg = _cfg(allowed_backends=allowed)
    with pytest.raises(ValidationError, match="no conda packages") as err:
        backend_named("rattler").check(parse_spec("dependencies: []\n", cfg), cfg)
    assert err.value.hint is not None and ("--backend venv" in err.value.hint) is venv_hint
