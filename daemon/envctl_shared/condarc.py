"""conda's ``envs_dirs`` as conda itself computes it, and adding a root to a ``.condarc``.

Why: a shared root only helps a user whose ``conda env list`` shows it, and the usual way it is
missing is a ``.condarc`` that conda never reads (a typo in the name, ``$CONDARC`` pointing
elsewhere) or one that was never written. ``envctl doctor`` therefore reads the same files in
the same order as conda (its documented search path, ``conda.base.constants.SEARCH_PATH``),
plus ``$CONDA_ENVS_DIRS``, and says where each entry came from; ``envctl init`` writes the
entry the way ``conda config --append envs_dirs`` would, without duplicating it.

Files are parsed with :mod:`~envctl_shared.safeyaml` (bounded): a ``.condarc`` is user input.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import safeyaml

# conda's search path, lowest precedence first; a trailing "/" is a condarc.d directory.
SEARCH_PATH = (
    "/etc/conda/.condarc", "/etc/conda/condarc", "/etc/conda/condarc.d/",
    "/var/lib/conda/.condarc", "/var/lib/conda/condarc", "/var/lib/conda/condarc.d/",
    "$CONDA_ROOT/.condarc", "$CONDA_ROOT/condarc", "$CONDA_ROOT/condarc.d/",
    "$XDG_CONFIG_HOME/conda/.condarc", "$XDG_CONFIG_HOME/conda/condarc",
    "$XDG_CONFIG_HOME/conda/condarc.d/",
    "~/.config/conda/.condarc", "~/.config/conda/condarc", "~/.config/conda/condarc.d/",
    "~/.conda/.condarc", "~/.conda/condarc", "~/.conda/condarc.d/",
    "~/.condarc",
    "$CONDA_PREFIX/.condarc", "$CONDA_PREFIX/condarc", "$CONDA_PREFIX/condarc.d/",
    "$CONDARC",
)
SYSTEM_CONDARC = Path("/etc/conda/.condarc")  # read by every conda on the host
ENV_VARS = ("CONDA_ENVS_DIRS", "CONDA_ENVS_PATH")  # the latter is the old name
_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


@dataclass
class EnvsDirs:
    """``envs_dirs`` highest precedence first, each with the file (or variable) it came from;
    files conda would fail to read, with why."""

    dirs: list[tuple[str, str]] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)

    def source_of(self, path: str | os.PathLike[str]) -> str | None:
        """Where ``path`` is listed (symlinks and ``..`` resolved on both sides), or None."""
        want = _same(str(path))
        return next((src for d, src in self.dirs if _same(d) == want), None)


def _same(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _expand(text: str, env: Mapping[str, str], home: str) -> str | None:
    """``~`` and ``$VAR`` as conda expands them; None when a variable is unset (conda would
    look for a literal ``$VAR`` path, which does not exist)."""
    missing = False

    def sub(m: re.Match[str]) -> str:
        nonlocal missing
        value = env.get(m.group(1) or m.group(2))
        missing = missing or not value
        return value or ""

    out = _VAR.sub(sub, text)
    if missing:
        return None
    return home + out[1:] if out == "~" or out.startswith("~/") else out


def conda_root(env: Mapping[str, str]) -> str | None:
    """The base install: ``$CONDA_ROOT``, else the one ``$CONDA_EXE`` belongs to."""
    if env.get("CONDA_ROOT"):
        return env["CONDA_ROOT"]
    exe = env.get("CONDA_EXE")
    return str(Path(exe).parent.parent) if exe else None


def search_files(env: Mapping[str, str], home: str) -> list[Path]:
    """The files conda reads, lowest precedence first (those that exist). A place this user
    cannot look into (another user's HOME after ``su``, a 0700 directory) holds none, as for
    conda (``os.path.isfile``, ``glob``: no error)."""
    env = {**env, **({"CONDA_ROOT": root} if (root := conda_root(env)) else {})}
    out: list[Path] = []
    for entry in SEARCH_PATH:
        text = _expand(entry, env, home)
        if text is None:
            continue
        path = Path(text)
        if entry.endswith("/"):
            try:
                out += sorted(p for p in path.iterdir() if p.suffix in (".yml", ".yaml"))
            except OSError:  # none there, not a directory, or not ours to list
                continue
        elif os.path.isfile(path) and path not in out:
            out.append(path)
    return out


def read(path: Path) -> dict[str, Any]:
    """One condarc as a mapping (empty file: empty mapping); OSError or YAMLError/ValueError."""
    data = safeyaml.safe_load(path.read_text(encoding="utf-8"))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("not a mapping of settings")
    return data


def envs_dirs(env: Mapping[str, str] | None = None, home: str | None = None) -> EnvsDirs:
    """``envs_dirs`` as conda would compute it for this user (defaults it adds excluded)."""
    env = dict(os.environ if env is None else env)
    home = home or os.path.expanduser("~")
    out = EnvsDirs()
    for var in ENV_VARS:  # highest precedence
        for item in (env.get(var) or "").split(os.pathsep):
            if item:
                out.dirs.append((_expand(item, env, home) or item, f"${var}"))
    for path in reversed(search_files(env, home)):
        try:
            data = read(path)
        except (OSError, UnicodeDecodeError) as exc:
            out.broken.append((str(path), getattr(exc, "strerror", None) or str(exc)))
            continue
        except (safeyaml.YAMLError, ValueError) as exc:
            out.broken.append((str(path), f"not valid: {getattr(exc, 'problem', exc)}"))
            continue
        value = data.get("envs_dirs") or []
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and (text := _expand(item, env, home)):
                out.dirs.append((text, str(path)))
    return out


def add_envs_dir(condarc: Path, root: Path, dry_run: bool = False) -> bool:
    """Append ``root`` to ``envs_dirs`` in ``condarc`` (created if missing) unless it is there
    already; True when the file changed (or would). An existing file keeps its other settings;
    when it has no ``envs_dirs`` the entry is appended as text, so its comments survive too."""
    try:
        data = read(condarc)
        text = condarc.read_text(encoding="utf-8")
    except FileNotFoundError:
        data, text = {}, ""
    current = data.get("envs_dirs") or []
    if not isinstance(current, list):
        current = [current]
    if any(isinstance(d, str) and _same(os.path.expanduser(d)) == _same(str(root))
           for d in current):
        return False
    if dry_run:
        return True
    import yaml  # here: doctor only reads

    if "envs_dirs" in data:
        new = yaml.safe_dump({**data, "envs_dirs": [*current, str(root)]},
                             default_flow_style=False, sort_keys=False)
    else:
        sep = "" if not text or text.endswith("\n") else "\n"
        item = yaml.safe_dump([str(root)], default_flow_style=False)  # quoted if need be
        new = f"{text}{sep}envs_dirs:\n  {item}"
    _write(condarc, new)
    return True


def _write(path: Path, text: str) -> None:
    """Atomically, keeping the file's mode (a new one is 0644: every user's conda reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".condarc.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
