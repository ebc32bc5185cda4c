"""Validate what a requester sends before anything is created: the env name and environment.yml.

Why here and so strict: the daemon builds with more privilege than the requester has, so every
field of the request is attacker-controlled input. The name becomes a path component in the
shared root (traversal, hidden names); the spec decides which channels and indexes are contacted
(exfiltration, untrusted code) and how much work is done (size and package caps). Only known
keys are accepted, so a typo is an error rather than a silently different environment, and
``prefix:`` is refused because the daemon — not the spec — decides where environments live.
Every refusal is a :class:`~envctl_shared.errors.ValidationError` with a hint saying what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import RequestsConfig
from ..errors import ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KNOWN_KEYS = ("name", "channels", "dependencies")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^git\+|@\s*[A-Za-z][A-Za-z0-9+.-]*://")
_SPEC_HINT = ("an environment.yml has only name:, channels: and dependencies: "
              "(with an optional pip: list)")


@dataclass(frozen=True)
class EnvSpec:
    """A validated request: conda match specs, pip requirements, and the channels to use."""

    conda: tuple[str, ...]
    pip: tuple[str, ...]
    channels: tuple[str, ...]

    @property
    def package_count(self) -> int:
        return len(self.conda) + len(self.pip)


def validate_name(name: object) -> str:
    """The env name, or ValidationError: it becomes ``<root>/<name>``, so no traversal."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        shown = name if isinstance(name, str) else type(name).__name__
        raise ValidationError(
            f"invalid environment name {shown!r}",
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
                 "(no '/', no leading dot)")
    return name


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValidationError(f"spec: {where} must be a list of non-empty strings",
                              hint=_SPEC_HINT)
    return [v.strip() for v in value]


def _check_pip(entries: list[str], cfg: RequestsConfig) -> None:
    for entry in entries:
        if entry.startswith("-") and not cfg.allow_pip_options:
            raise ValidationError(
                f"spec: pip entry {entry!r} is an option, which this daemon does not allow",
                hint="list plain requirements (name, name==1.2); the site sets pip's index "
                     "options (requests.allow_pip_options)")
        if _URL_RE.search(entry) and not cfg.allow_pip_urls:
            raise ValidationError(
                f"spec: pip entry {entry!r} is a URL, which this daemon does not allow",
                hint="name a package from the site's index instead (requests.allow_pip_urls)")
        if not cfg.allow_pip_urls and ("/" in entry or entry.startswith(".")) and \
                not entry.startswith("-"):
            raise ValidationError(
                f"spec: pip entry {entry!r} looks like a local path, which is not allowed",
                hint="name a package from the site's index instead")


def _check_channels(channels: list[str], cfg: RequestsConfig) -> tuple[str, ...]:
    if not channels:
        return cfg.default_channels
    if cfg.channels:
        for ch in channels:
            if ch not in cfg.channels:
                raise ValidationError(
                    f"spec: channel {ch!r} is not allowed on this daemon",
                    hint=f"allowed channels: {', '.join(cfg.channels)} (or leave channels: out "
                         f"to use {', '.join(cfg.default_channels)})")
    return tuple(channels)


def parse_spec(text: str, cfg: RequestsConfig) -> EnvSpec:
    """Parse and validate environment.yml text against the daemon's request policy.

    A ``name:`` in the file is accepted (files exported by conda have one) and ignored: the
    environment is named by the request, which is what was validated as a path component.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > cfg.max_spec_bytes:
        raise ValidationError(f"spec is {size} bytes, more than the limit of {cfg.max_spec_bytes}",
                              hint="trim the environment file (requests.max_spec_bytes)")
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValidationError(f"spec is not valid YAML{where}: {getattr(exc, 'problem', exc)}",
                              hint=_SPEC_HINT) from None
    if not isinstance(data, dict):
        raise ValidationError("spec must be a YAML mapping", hint=_SPEC_HINT)
    if "prefix" in data:
        raise ValidationError(
            "spec: 'prefix:' is not allowed: the daemon decides where environments are built",
            hint="remove the prefix: line; the environment goes to <root>/<name>, where <name> "
                 "is the name given on the command line")
    unknown = sorted(str(k) for k in data if k not in KNOWN_KEYS)
    if unknown:
        raise ValidationError(f"spec: unknown key {unknown[0]!r}", hint=_SPEC_HINT)
    if "name" in data and not isinstance(data["name"], str):
        raise ValidationError("spec: name must be a string", hint=_SPEC_HINT)
    channels = _check_channels(_strings(data.get("channels") or [], "channels"), cfg)
    conda: list[str] = []
    pip: list[str] = []
    deps = data.get("dependencies") or []
    if not isinstance(deps, list):
        raise ValidationError("spec: dependencies must be a list", hint=_SPEC_HINT)
    for dep in deps:
        if isinstance(dep, str) and dep.strip():
            conda.append(dep.strip())
        elif isinstance(dep, dict) and list(dep) == ["pip"]:
            pip.extend(_strings(dep["pip"], "dependencies.pip"))
        else:
            raise ValidationError(f"spec: unsupported dependency {dep!r}",
                                  hint="each dependency is a match spec string, or one "
                                       "mapping {pip: [...]}")
    _check_pip(pip, cfg)
    spec = EnvSpec(tuple(conda), tuple(pip), channels)
    if spec.package_count > cfg.max_packages:
        raise ValidationError(
            f"spec lists {spec.package_count} packages, more than the limit of "
            f"{cfg.max_packages}", hint="split the environment (requests.max_packages)")
    if not spec.package_count:
        raise ValidationError("spec lists no dependencies", hint=_SPEC_HINT)
    return spec
