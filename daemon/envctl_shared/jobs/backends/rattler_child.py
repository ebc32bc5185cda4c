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

It ends with ``os._exit``: py-rattler 0.28 leaves native worker threads that, at interpreter
finalisation, crash the process in about 1 run in 10 (measured here: SIGSEGV or SIGABRT with
"PyGILState_Release: thread state ... must be current" *after* a complete install). The work is
done and flushed by then; skipping finalisation keeps a finished build from reporting failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

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
    phase("downloading")
    await rattler.install(records, target_prefix=args.prefix, cache_dir=Path(args.cache_dir),
                          show_progress=False, execute_link_scripts=False,  # trusted: no
                          reporter=_Reporter())  # package code runs here
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
