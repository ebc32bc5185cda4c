"""The process that runs py-rattler for one build, as a trusted step (see ``rattler.py``).

Reads the daemon-written ``build.json`` (channels, match specs, platforms), solves (the match
specs parsed leniently, as conda reads them: ``name=version=build`` from ``conda env export``
too; ``spec.py`` validated them alike at submit time), installs
into ``--prefix`` (the prefix baked into files: it runs there), and reports its phase as lines
``ENVCTL-PHASE solving|downloading|linking`` on stdout, which the runner turns into the job's
``phase``. It must not import anything privileged: it is an ordinary, killable child. It runs as
a file (``python -I <this file>``) and imports nothing of envctl: importing the package would
pull in the job manager, 0.2 s of every build spent on imports the child never uses; so the
phase marker every build step may print is defined here.

Packages are the requester's, and this runs as root, filling a cache every build shares. So:
before the install, each package must have its channel's sha256, which a local archive must
match (``check_records``: the cache is keyed by file name and that sha256, unchecked by rattler
for ``file://``); the ``variables`` file is written fresh, never through a package's symlink
(``write_state``); and every package's cache entry is checked after the install
(``check_cache``): its tarball is the requester's, and an entry of it may be a symlink leading
out of the cache (``vt -> /etc``, with ``vt/shadow`` in ``info/paths.json``, or a listed file
that is itself such a link). rattler follows it, as root, and copies or hard-links the host's
file into the version, which the freeze then makes readable to everyone. So a listed path must
be reached without crossing a symlink, and a listed file must be one; the prefix is closed to
everyone (0700) until the check has passed, and a package that fails it fails the build, naming
the package and path.

It ends with ``os._exit``: py-rattler 0.28 leaves native worker threads that, at interpreter
finalisation, crash the process in about 1 run in 10 (measured here: SIGSEGV or SIGABRT with
"PyGILState_Release: thread state ... must be current" *after* a complete install). The work is
done and flushed by then; skipping finalisation keeps a finished build from reporting failure.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

PHASE_MARK = "ENVCTL-PHASE "  # a step prints "ENVCTL-PHASE linking" on its stdout
# beside build.json: the current version's conda packages, when a solve that gives exactly
# them is no change (``rattler.unchanged_if``); the child then writes UNCHANGED_FILE there
# and installs nothing
CURRENT_FILE = "current.json"
UNCHANGED_FILE = "unchanged"


def phase(name: str) -> None:
    print(f"{PHASE_MARK}{name}", flush=True)


class _Reporter:
    """Turns rattler's install callbacks into phase lines (each phase printed once)."""

    def __init__(self) -> None:
        self.current = ""

    def _enter(self, name: str) -> None:
        if self.current != name:
            self.current = name
            phase(name)

    def on_download_start(self, cache_entry: int) -> int:
        self._enter("downloading")
        return 0

    def on_link_start(self, operation: int, package_name: str) -> int:
        self._enter("linking")
        print(f"link {package_name}", flush=True)
        return 0

    def __getattr__(self, name: str) -> Any:  # every other callback: a no-op
        if name.startswith("on_"):
            return lambda *args, **kwargs: 0
        raise AttributeError(name)


def _source(channel: str) -> str:
    """An absolute directory is a local channel: give rattler a file:// URL."""
    return Path(channel).as_uri() if channel.startswith("/") else channel


class HostilePackage(Exception):
    """A cached package that lists a path through a symlink (see the module docstring)."""


def check_records(records: list[Any], private: Path) -> None:
    """Raise HostilePackage unless every record has a sha256 in its channel's index and, for
    a local channel, its archive has that sha256; such an archive is installed from a copy
    in ``private`` (the daemon's), the one that was hashed. The cache is shared by every build
    and keyed by name-version-build: rattler kept what a ``file://`` channel's archive held
    under the sha256 its index claimed, unchecked (the claim copied from another channel's
    package of the same file name, or none at all), and an honest build of that other package
    then installed it; and whoever writes the channel could swap the archive between a check
    and rattler's read. Archives of remote channels are rattler's to check as it downloads."""
    for rec in records:
        what = f"package {rec.name.normalized} {rec.version} ({rec.url})"
        if rec.sha256 is None:
            raise HostilePackage(f"{what} has no sha256 in its channel's index: the shared "
                                 "package cache tells packages of the same file name apart by it")
        if not rec.url.startswith("file://"):
            continue
        private.mkdir(mode=0o700, exist_ok=True)
        copy = private / rec.file_name
        digest = hashlib.sha256()
        with open(url2pathname(urlparse(rec.url).path), "rb") as src, \
                open(copy, "xb", opener=_private) as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.digest() != rec.sha256:
            raise HostilePackage(f"{what}: its archive does not have the sha256 its "
                                 "channel's index gives (refused)")
        rec.url = copy.as_uri()


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def _cache_entry(cache_dir: Path, file_name: str) -> Path:
    """Where rattler extracted the package ``file_name`` (its name minus the extension)."""
    for ext in (".tar.bz2", ".conda"):
        if file_name.endswith(ext):
            return cache_dir / file_name.removesuffix(ext)
    return cache_dir / file_name


def _wrong(pkg: Path, rel: str, kinds: tuple[int, ...], dirs: set[str]) -> str | None:
    """What is wrong with the path ``rel`` of the package extracted at ``pkg``: None when it
    is relative, each of its parents a real directory (``dirs``: those already seen to be,
    added to), and it is of a type in ``kinds``."""
    parts = rel.split("/")
    if rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
        return "is not a plain relative path"
    for n in range(1, len(parts) + 1):
        sub = "/".join(parts[:n])
        last = n == len(parts)
        if not last and sub in dirs:
            continue
        try:
            mode = os.lstat(pkg / sub).st_mode
        except FileNotFoundError:
            return "is missing from its cache entry"
        if last:
            return None if stat.S_IFMT(mode) in kinds else \
                "is a symlink or a special file where a file is listed"
        if not stat.S_ISDIR(mode):
            return f"lies below {sub}, which is a symlink or a file"
        dirs.add(sub)
    return None


_KINDS = {"hardlink": (stat.S_IFREG,), "softlink": (stat.S_IFLNK,),
          "directory": (stat.S_IFDIR,)}


def check_cache(cache_dir: Path, records: list[Any]) -> None:
    """Raise HostilePackage unless every path each record's cache entry lists (its
    ``info/paths.json``, else ``info/files``) lies inside that entry (see the docstring)."""
    for rec in records:
        pkg = _cache_entry(cache_dir, rec.file_name)
        dirs: set[str] = set()
        listed: list[tuple[str, tuple[int, ...]]] = []
        if _wrong(pkg, "info/paths.json", (stat.S_IFREG,), dirs) is None:
            data = json.loads((pkg / "info" / "paths.json").read_text(encoding="utf-8"))
            listed = [(e["_path"], _KINDS.get(e.get("path_type", ""), (stat.S_IFREG,)))
                      for e in data.get("paths", [])]
        elif _wrong(pkg, "info/files", (stat.S_IFREG,), dirs) is None:
            files = (pkg / "info" / "files").read_text(encoding="utf-8").splitlines()
            listed = [(f, (stat.S_IFREG, stat.S_IFLNK)) for f in files if f]
        else:
            listed = [("info/paths.json", (stat.S_IFREG,))]  # reported as what is wrong
        for rel, kinds in listed:
            what = _wrong(pkg, rel, kinds, dirs)
            if what is not None:
                raise HostilePackage(
                    f"package {rec.name.normalized} {rec.version}: {rel} {what}: a package "
                    "never lists a path through a symlink out of its files (refused; nothing "
                    "of it is kept in the environment)")


async def build(args: argparse.Namespace) -> None:
    import rattler  # here: the daemon imports this module for PHASE_MARK alone

    spec = json.loads(Path(args.build).read_text(encoding="utf-8"))
    phase("solving")
    start = time.monotonic()
    specs = [rattler.MatchSpec(s, strict=False) for s in spec["specs"]]
    records = await rattler.solve([_source(c) for c in spec["channels"]], specs,
                                  platforms=spec["platforms"],
                                  timestamp_policy="allow-missing")
    print(f"solved {len(records)} packages in {time.monotonic() - start:.2f}s:", flush=True)
    for rec in records:
        print(f"  {rec.name.normalized} {rec.version} {rec.build} ({rec.channel})", flush=True)
    if _unchanged(Path(args.build).parent, records):
        return
    private = Path(args.build).parent / "pkgs"  # in the job dir: the daemon's
    check_records(records, private)
    phase("downloading")
    os.chmod(args.prefix, 0o700)  # nobody sees what it holds before check_cache passed
    await rattler.install(records, target_prefix=args.prefix, cache_dir=Path(args.cache_dir),
                          show_progress=False, execute_link_scripts=False,  # trusted: no
                          reporter=_Reporter())  # package code runs here
    shutil.rmtree(private, ignore_errors=True)  # the cache holds what they held
    check_cache(Path(args.cache_dir), records)
    os.chmod(args.prefix, 0o755)
    print(f"installed {len(records)} packages in {args.prefix}", flush=True)
    if spec.get("variables"):  # where conda keeps them: 'conda activate' exports them
        write_state(Path(args.prefix), {"env_vars": spec["variables"]})
        print(f"activation variables: {', '.join(spec['variables'])}", flush=True)


def write_state(prefix: Path, state: dict[str, Any]) -> None:
    """``conda-meta/state`` written anew, never through what a package put there: a package
    may ship ``conda-meta/state`` as a symlink to any file, which a write by name would
    overwrite with this step's privileges. A new file (``O_EXCL|O_NOFOLLOW``) renamed over
    the name replaces whatever the name is."""
    meta = os.open(prefix / "conda-meta", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    tmp = f".state.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                     dir_fd=meta)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, "state", src_dir_fd=meta, dst_dir_fd=meta)
    finally:
        os.close(meta)


def _unchanged(job_dir: Path, records: list[Any]) -> bool:
    """True (and UNCHANGED_FILE written) when the solve is exactly the current version's."""
    try:
        current = json.loads((job_dir / CURRENT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    solved = sorted([r.name.normalized, str(r.version), str(r.build), str(r.channel)]
                    for r in records)
    if solved != current["packages"]:
        new = ", ".join(" ".join(p) for p in solved if p not in current["packages"])
        print(f"the solve differs from {current['version']} ({new or 'fewer packages'}): "
              "building a new version", flush=True)
        return False
    (job_dir / UNCHANGED_FILE).write_text(current["version"] + "\n", encoding="utf-8")
    print(f"no change: {current['version']} already has exactly these packages", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--build", required=True, help="build.json written by the daemon")
    p.add_argument("--prefix", required=True, help="where to install")
    p.add_argument("--cache-dir", required=True, help="the package cache (local disk)")
    args = p.parse_args(argv)
    try:
        asyncio.run(build(args))
    except Exception as exc:  # noqa: BLE001 - report any solver/installer failure plainly
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
