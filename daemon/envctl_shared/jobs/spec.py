"""Validate what a requester sends before anything is created: the env name and environment.yml.

Why here and so strict: the daemon builds with more privilege than the requester has, so every
field of the request is attacker-controlled input. The name becomes a path component in the
shared root (traversal, hidden names); the spec decides which channels and indexes are contacted
(exfiltration, untrusted code) and how much work is done (size and package caps). Only known
keys are accepted, so a typo is an error rather than a silently different environment. What
``conda env export`` writes is accepted as it is: its ``prefix:`` is ignored (the daemon, not
the spec, decides where environments live) and a ``name:`` that differs from the requested name
is built under the requested one, each with a note for the job's log; ``variables:`` become the
env's activation variables (conda's ``env_vars``), names and values bounded, none that would
make its users' programs load code from outside the version (``LD_PRELOAD``, ``PYTHONPATH``...)
and no value that conda's activation script would run as shell code (a quote, ``$``...).
The file is read with text scalars: a value is the text written, not YAML 1.1's reading of it.
The YAML is read by :mod:`~envctl_shared.safeyaml` (depth and alias expansion bounded before
anything is built) and values are quoted in messages through :func:`~envctl_shared.untrusted.brief`
(bounded length), so no spec costs the daemon more than a bounded amount of CPU and memory.
Conda dependencies are match specs read as conda reads them (py-rattler's lenient parser: the
``name=version=build`` pins of ``conda env export``, ``name==version``, ``name version build``,
``channel::name``, version globs), and the solver reads them the same way; a ``channel::`` must be
one of the spec's (allowed) channels and a ``[url=...]`` is refused, so a match spec cannot reach
past the channel policy.
``pip:`` entries are lines of a pip requirements file: each is parsed the way pip splits it
(requirement, then per-requirement options) and the requirement by ``packaging``, so options
and direct references (URLs, VCS links, local paths) are refused wherever they hide in a line.
Every refusal is a :class:`~envctl_shared.errors.ValidationError` with a hint saying what to change.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from .. import safeyaml
from ..config import RequestsConfig
from ..errors import ValidationError

# The name rule lives in ``names``; the jobs layer's callers import it from here.
from ..names import validate_name as validate_name
from ..untrusted import brief

KNOWN_KEYS = ("name", "channels", "dependencies", "prefix", "variables")
MAX_VARIABLES = 64
_VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Set by activation itself: a spec that set them would break activating the env.
RESERVED_VARIABLES = frozenset({"PATH", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "CONDA_SHLVL",
                                "CONDA_PROMPT_MODIFIER", "CONDA_EXE", "VIRTUAL_ENV"})
# Tell the programs every user of the env runs where to load code from, or are code themselves:
# the dynamic loader (LD_*), interpreters' search and start-up paths, shells' start-up files and
# prompts, HOME and the config dirs whose files Jupyter and IPython run at start, where the
# users' own installers fetch packages (pip, uv, conda and its shell functions), the commands
# programs start for them (pagers, editors, browsers, git's ssh) and the certificates their
# HTTPS trusts (a requester's CA file would let her read everyone's traffic). A shared env
# runs what was built from the site's channels and index; with these, it would run whatever a
# requester's files outside it say, long after the build, unseen by any check of the version.
CODE_VARIABLE_PREFIXES = ("LD_", "PIP_", "UV_", "CONDA_")
CODE_VARIABLES = frozenset({
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONPYCACHEPREFIX",
    "PYTHONPLATLIBDIR", "PYTHONEXECUTABLE", "BASH_ENV", "ENV", "PROMPT_COMMAND", "PS1", "PS2",
    "PS4", "SHELLOPTS", "BASHOPTS", "HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "IPYTHONDIR",
    "JUPYTER_CONFIG_DIR", "JUPYTER_CONFIG_PATH", "JUPYTER_PATH", "JUPYTER_DATA_DIR",
    "PERL5LIB", "PERLLIB", "PERL5OPT", "RUBYLIB", "RUBYOPT", "NODE_OPTIONS", "NODE_PATH",
    "R_LIBS", "R_LIBS_USER", "R_LIBS_SITE", "R_PROFILE", "R_PROFILE_USER", "R_ENVIRON",
    "R_ENVIRON_USER", "JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS", "GCONV_PATH",
    "CONDARC", "_CE_M", "_CE_CONDA", "PAGER", "MANPAGER", "EDITOR", "VISUAL", "BROWSER",
    "LESSOPEN", "LESSCLOSE", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_EXEC_PATH", "GIT_ASKPASS",
    "SSH_ASKPASS", "GIT_CONFIG_GLOBAL", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"})
# conda activation writes ``export NAME='value'`` (sh, bash, zsh) and ``setenv NAME "value"``
# (csh) with the value pasted in unescaped: a quote ends the string and what follows runs, as
# does a backquote (csh), in the shell of every user who activates the env.
SHELL_SYNTAX = "'\"`$\\"
MAX_ENTRY_CHARS = 1000  # one channel URL, match spec or requirement line; bounds every message
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, git+ssh:, file: ...
_COMMENT_RE = re.compile(r"(^|\s+)#.*$")  # pip's own rule for comments in requirement files
# Names pip installs as a local archive file rather than looking up on the index.
_ARCHIVES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz",
             ".tar.lz", ".tlz", ".tar.lzma")
_OPTIONS_HINT = ("list plain requirements (name, name==1.2, name[extra]; markers are fine); "
                 "the site sets pip's options (requests.allow_pip_options)")
_DIRECT_HINT = "name a package from the site's index instead (requests.allow_pip_urls)"
_SPEC_HINT = ("an environment.yml has name:, channels:, dependencies: (with an optional pip: "
              "list) and variables:; prefix: is ignored")


@dataclass(frozen=True)
class EnvSpec:
    """A validated request: conda match specs, pip requirements, the channels to use, the
    activation variables (name, value), and notes for the job's log (what was ignored)."""

    conda: tuple[str, ...]
    pip: tuple[str, ...]
    channels: tuple[str, ...]
    variables: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def package_count(self) -> int:
        return len(self.conda) + len(self.pip)


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValidationError(f"spec: {where} must be a list of non-empty strings",
                              hint=_SPEC_HINT)
    return [_entry(v, where) for v in value]


def _entry(text: str, where: str) -> str:
    """One channel, match spec or requirement: stripped, and short enough to quote."""
    if len(text) > MAX_ENTRY_CHARS:
        raise ValidationError(f"spec: an entry of {where} is longer than {MAX_ENTRY_CHARS} "
                              f"characters: {brief(text)}", hint=_SPEC_HINT)
    return text.strip()


def _check_pip(entry: str, cfg: RequestsConfig) -> None:
    """One ``pip:`` entry, judged as the requirements-file line pip will read it as.

    pip splits a line at the first token starting with ``-``: what comes before is the
    requirement, what follows are per-requirement options (``--hash``, ``--global-option``,
    ``--config-settings``); a line that starts with ``-`` is an option line (``--index-url``,
    ``-e``, ``-r``). A line break or a trailing backslash would let one entry become, or join,
    another line, so an entry must be one line of printable text. pip also expands
    ``${NAME}`` from its environment anywhere in such a line: with ``requests.build_env``
    holding a proxy or index URL with credentials, ``numpy===${PIP_INDEX_URL}`` printed them
    into the requester's log ("no matching distribution for numpy===https://user:token@...").
    """
    if not entry.isprintable() or entry.endswith("\\"):
        raise ValidationError(f"spec: pip entry {brief(entry)} is not one line of printable "
                              "text", hint="each pip: entry is one requirement, e.g. name==1.2")
    if "${" in entry:
        raise ValidationError(f"spec: pip entry {brief(entry)} contains '${{', which pip would "
                              "expand from the build's environment",
                              hint="write the value itself; builds do not take variables from "
                                   "requests")
    line = _COMMENT_RE.sub("", entry).strip()
    if not line:
        raise ValidationError(f"spec: pip entry {brief(entry)} is only a comment",
                              hint="each pip: entry is one requirement, e.g. name==1.2")
    tokens = line.split()
    first_option = next((i for i, tok in enumerate(tokens) if tok.startswith("-")), None)
    if first_option is not None:
        option = tokens[first_option].split("=", 1)[0]
        if not cfg.allow_pip_options:
            what = "has the option" if first_option else "is an option,"
            raise ValidationError(f"spec: pip entry {brief(entry)} {what} {brief(option)}, "
                                  "which this daemon does not allow", hint=_OPTIONS_HINT)
        if first_option == 0:
            if option == "--editable" or option.startswith("-e"):  # -e X, -eX: a path or URL
                _direct(entry, "an editable install (a path or URL)", cfg)
            return
    _check_requirement(entry, " ".join(tokens[:first_option]), cfg)


def _check_requirement(entry: str, text: str, cfg: RequestsConfig) -> None:
    """A PEP 508 requirement from the index; a direct reference only if the site allows it."""
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        if _SCHEME_RE.match(text):
            return _direct(entry, "a URL", cfg)
        if "/" in text or text.startswith((".", "~")):
            return _direct(entry, "a local path", cfg)
        reason = str(exc).splitlines()[0][:120]
        raise ValidationError(f"spec: pip entry {brief(entry)} is not a valid requirement: "
                              f"{reason}", hint="write name, name==1.2 or name[extra]>=1; "
                              "see PEP 508") from None
    if req.url is not None:
        _direct(entry, "a local path" if req.url.lower().startswith("file:") else "a URL", cfg)
    elif req.name.lower().endswith(_ARCHIVES):
        _direct(entry, "a local path", cfg)


def _direct(entry: str, what: str, cfg: RequestsConfig) -> None:
    """Install from somewhere other than the site's index: only where the site allows it."""
    if not cfg.allow_pip_urls:
        raise ValidationError(f"spec: pip entry {brief(entry)} is {what}, which this daemon "
                              "does not allow", hint=_DIRECT_HINT)


def _match_spec(entry: str) -> Any:
    """``entry`` parsed as conda reads it (rattler is a daemon dependency: imported here, where
    only the daemon parses specs)."""
    from rattler import MatchSpec

    return MatchSpec(entry, strict=False)


def _check_conda(entry: str, position: int, channels: tuple[str, ...]) -> None:
    """One conda dependency (``position`` counts from 1 in ``dependencies:``)."""
    from rattler.exceptions import CanonicalMatchSpecError, InvalidMatchSpecError

    where = f"spec: dependency {position} ({brief(entry)})"
    if not entry.isprintable():
        raise ValidationError(f"{where} is not one line of printable text",
                              hint="write name, name=1.2 or name=1.2=build_0")
    try:
        spec = _match_spec(entry)
        canonical = spec.to_canonical_string()
    except (InvalidMatchSpecError, CanonicalMatchSpecError) as exc:
        reason = str(exc).splitlines()[0][:120]
        raise ValidationError(f"{where} is not a match spec: {reason}",
                              hint="write name, name=1.2, name=1.2=build_0, 'name >=1.2' or "
                                   "channel::name") from None
    if 'url="' in canonical:
        raise ValidationError(f"{where} names a package URL", hint="name the package; it "
                              "comes from the spec's channels")
    if spec.channel is not None and spec.channel.base_url not in _channel_urls(channels):
        raise ValidationError(f"{where} names channel {brief(spec.channel.name or '')}, "
                              "which is not among the spec's channels (it is "
                              f"{brief(spec.channel.base_url)})", hint="list that channel under "
                              "channels: (if the site allows it), or leave the channel:: out")


def _channel_urls(channels: tuple[str, ...]) -> set[str]:
    """Where the spec's channels are, as rattler resolves a name, a path or a URL. A
    ``channel::`` is judged by where it points, never by its name: the name of
    ``https://elsewhere/conda-forge`` is ``conda-forge`` too, and conda fetches what a match
    spec's channel names (one rattler cannot read matches nothing)."""
    from rattler import Channel
    from rattler.exceptions import InvalidChannelError

    urls = set()
    for channel in channels:
        with contextlib.suppress(InvalidChannelError):
            urls.add(Channel(channel).base_url)
    return urls


def conda_names(spec: EnvSpec) -> set[str]:
    """The package names of the spec's conda dependencies (validated: they parse)."""
    return {_match_spec(entry).name.normalized for entry in spec.conda}


def _check_channels(channels: list[str], cfg: RequestsConfig) -> tuple[str, ...]:
    """The spec's channels, each one the site allows: any (``requests.channels`` empty) but a
    local one — a path or ``file:`` URL is read by the trusted step, as the daemon, so only a
    local channel the admin named (in ``channels`` or ``default_channels``) may be used: a
    requester could otherwise pull packages out of a directory only root may read."""
    if not channels:
        return cfg.default_channels
    for ch in channels:
        allowed = ch in cfg.channels if cfg.channels else (
            not _is_local(ch) or ch in cfg.default_channels)
        if not allowed:
            raise ValidationError(
                f"spec: channel {brief(ch)} is not allowed on this daemon",
                hint=(f"allowed channels: {', '.join(cfg.channels)}" if cfg.channels else
                      "a local channel must be named by the admin (requests.channels)") +
                     f" (or leave channels: out to use {', '.join(cfg.default_channels)})")
    return tuple(channels)


def _is_local(channel: str) -> bool:
    """A channel on this host's filesystem: an absolute or relative path, or a file: URL."""
    return channel.startswith(("/", ".", "~")) or channel.lower().startswith("file:")


def _variables(value: object) -> tuple[tuple[str, str], ...]:
    """``variables:``: a mapping of environment variable names to scalar values, each the
    text written (the spec is read with text scalars: ``UMASK: 0022`` is ``0022``, not
    YAML 1.1's 18; a value tagged ``!!int`` or ``!!bool`` becomes its text)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValidationError("spec: variables must be a mapping of NAME: value",
                              hint="e.g. variables: {OMP_NUM_THREADS: 4}")
    if len(value) > MAX_VARIABLES:
        raise ValidationError(f"spec: {len(value)} variables, more than the limit of "
                              f"{MAX_VARIABLES}", hint="set fewer activation variables")
    out = []
    for key, val in value.items():
        if not isinstance(key, str) or not _VAR_NAME_RE.fullmatch(key):
            raise ValidationError(f"spec: variable name {brief(key)} is not a valid environment "
                                  "variable name", hint="letters, digits and _, not starting "
                                  "with a digit")
        if key in RESERVED_VARIABLES:
            raise ValidationError(f"spec: variable {key} is set by activation itself",
                                  hint="leave it out; activation sets it")
        if key in CODE_VARIABLES or key.startswith(CODE_VARIABLE_PREFIXES):
            raise ValidationError(f"spec: variable {key} would make every user of the "
                                  "environment load code from outside it",
                                  hint="install what it points to as a package of the "
                                       "environment (from the site's channels or index)")
        if isinstance(val, bool):
            text = "true" if val else "false"
        elif isinstance(val, (str, int, float)):
            text = str(val)
        else:
            raise ValidationError(f"spec: variable {key} must be a string or a number",
                                  hint="quote it: NAME: \"value\"")
        if len(text) > MAX_ENTRY_CHARS or not text.isprintable():
            raise ValidationError(f"spec: the value of {key} must be one line of at most "
                                  f"{MAX_ENTRY_CHARS} printable characters", hint=_SPEC_HINT)
        quote = next((c for c in text if c in SHELL_SYNTAX), None)
        if quote is not None:
            raise ValidationError(f"spec: the value of {key} contains {quote!r}, which conda "
                                  "activation would run as shell code", hint="conda pastes "
                                  "values into its activation script unescaped (export NAME="
                                  f"'value'; setenv NAME \"value\"): leave out {SHELL_SYNTAX}")
        out.append((key, text))
    return tuple(out)


def parse_spec(text: str, cfg: RequestsConfig, name: str | None = None) -> EnvSpec:
    """Parse and validate environment.yml text against the daemon's request policy.

    The environment is named by the request (``name``, validated as a path component): a
    ``name:`` in the file is not used, and noted when it differs; a ``prefix:`` (``conda env
    export`` writes one) is ignored with a note. An empty spec is valid here (an empty venv);
    backends that cannot build one refuse it in their ``check``.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > cfg.max_spec_bytes:
        raise ValidationError(f"spec is {size} bytes, more than the limit of {cfg.max_spec_bytes}",
                              hint="trim the environment file (requests.max_spec_bytes)")
    try:
        data: Any = safeyaml.safe_load(text, text_scalars=True)
    except safeyaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        what = "is refused" if isinstance(exc, safeyaml.LimitExceeded) else "is not valid YAML"
        raise ValidationError(f"spec {what}{where}: {getattr(exc, 'problem', exc)}",
                              hint=_SPEC_HINT) from None
    if not isinstance(data, dict):
        raise ValidationError("spec must be a YAML mapping", hint=_SPEC_HINT)
    unknown = sorted(brief(k) for k in data if k not in KNOWN_KEYS)
    if unknown:
        raise ValidationError(f"spec: unknown key {unknown[0]}", hint=_SPEC_HINT)
    notes = []
    if "name" in data and not isinstance(data["name"], str):
        raise ValidationError("spec: name must be a string", hint=_SPEC_HINT)
    if name is not None and data.get("name") not in (None, name):
        notes.append(f"warning: the spec says name: {brief(data['name'])}; this environment "
                     f"is {name!r}, the name it was requested under")
    if data.get("prefix") is not None:
        notes.append(f"note: the spec's prefix: {brief(data['prefix'])} is ignored; the daemon "
                     "builds every environment in its shared root")
    variables = _variables(data.get("variables"))
    channels = _check_channels(_strings(data.get("channels") or [], "channels"), cfg)
    conda: list[str] = []
    pip: list[str] = []
    deps = data.get("dependencies") or []
    if not isinstance(deps, list):
        raise ValidationError("spec: dependencies must be a list", hint=_SPEC_HINT)
    conda_positions: list[tuple[int, str]] = []
    for position, dep in enumerate(deps, 1):
        if isinstance(dep, str) and dep.strip():
            conda.append(_entry(dep, "dependencies"))
            conda_positions.append((position, conda[-1]))
        elif isinstance(dep, dict) and list(dep) == ["pip"]:
            pip.extend(_strings(dep["pip"], "dependencies.pip"))
        else:
            raise ValidationError(f"spec: unsupported dependency {brief(dep)}",
                                  hint="each dependency is a match spec string, or one "
                                       "mapping {pip: [...]}")
    spec = EnvSpec(tuple(conda), tuple(pip), channels, variables, tuple(notes))
    if spec.package_count > cfg.max_packages:  # first: each entry's check costs a parse
        raise ValidationError(
            f"spec lists {spec.package_count} packages, more than the limit of "
            f"{cfg.max_packages}", hint="split the environment (requests.max_packages)")
    for position, entry in conda_positions:
        _check_conda(entry, position, channels)
    for entry in pip:
        _check_pip(entry, cfg)
    return spec


MAX_TESTS = 16


def validate_tests(tests: object) -> tuple[str, ...]:
    """``--test`` commands: a list of at most MAX_TESTS shell command lines, each printable
    text of at most MAX_ENTRY_CHARS (they run as the build user inside the new version, where
    a build already runs the packages' own code; bounded so the log and messages stay sane)."""
    if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
        raise ValidationError("tests must be a list of command lines",
                              hint="give each command with --test CMD")
    if len(tests) > MAX_TESTS:
        raise ValidationError(f"{len(tests)} test commands, more than the limit of {MAX_TESTS}",
                              hint="put the checks in one script and run that")
    for cmd in tests:
        if not cmd.strip() or len(cmd) > MAX_ENTRY_CHARS or \
                not all(c.isprintable() or c in "\t\n" for c in cmd):
            raise ValidationError(f"test command {brief(cmd)} must be 1-{MAX_ENTRY_CHARS} "
                                  "characters of printable text",
                                  hint="e.g. --test 'python -c \"import numpy\"'")
    return tuple(tests)
