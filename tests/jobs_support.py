"""Real, offline package sources for the jobs tests: a local conda channel and a wheelhouse.

Why hand-made: the tests must build environments for real (solve, download from a ``file://``
channel, link, relocate) without a network. A conda ``.tar.bz2`` is just a tarball with
``info/index.json``, ``info/paths.json``, ``info/files`` and the payload; a wheel is a zip with a
``.dist-info``. Both are written here from scratch, then the channel is indexed with py-rattler's
own ``index_fs`` so the solver reads a repodata.json produced by the real tool.

Also the plain helpers the tests import: ``JobsEnv`` (a root, state dir, channel and wheelhouse
with a config factory), ``wait_done`` and ``full_log``. The fixtures live in
``tests.fixtures_jobs``.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envctl_shared.api.auth import Authoriser, EnvTarget
from envctl_shared.api.protocol import OPS
from envctl_shared.config import Config, parse
from envctl_shared.jobs import Job, JobManager, Requester

# conda's convention: a long placeholder path that the installer rewrites to the real prefix.
PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"

# A ``requests.venv_python`` (format ``escape``, a command that appends one whole line to
# ``$HOME/escapees``, and ``python``): leave a process behind, then run the real python.
ESCAPING_PYTHON = """#!/bin/sh
# envctl test wrapper (requests.venv_python): leave a process behind, then run the real python.
# It waits (60 s at most) until the escapee has recorded itself: a step that ended first would
# take it down with its cgroup before the test could see it (seen on a loaded machine).
before=$(cat "$HOME/escapees" 2>/dev/null | wc -l)
{escape} </dev/null >/dev/null 2>&1 &
i=0
while [ "$(cat "$HOME/escapees" 2>/dev/null | wc -l)" -le "$before" ] && [ $i -lt 600 ]; do
  sleep 0.1; i=$((i+1))
done
exec {python} "$@"
"""
# The usual ``escape``: a process in a session of its own (setsid), out of reach of a kill of
# the step's process group, that records its pid.
SETSID = """setsid sh -c 'echo $$ >> "$HOME/escapees"; exec sleep 333'"""


@dataclass
class CondaPackage:
    """One package: ``files`` maps prefix-relative paths to (content, executable), ``links``
    prefix-relative paths to symlink targets. ``subdir`` noarch is a ``noarch: generic``
    package; a platform's (``linux-64``) holds binaries for it."""

    name: str
    version: str = "1.0"
    depends: list[str] = field(default_factory=list)
    files: Mapping[str, tuple[str | bytes, bool]] = field(default_factory=dict)
    links: Mapping[str, str] = field(default_factory=dict)
    subdir: str = "noarch"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-0.tar.bz2"


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _bytes(content: str | bytes) -> bytes:
    return content.encode() if isinstance(content, str) else content


def write_conda_package(pkg: CondaPackage, subdir: Path) -> Path:
    """Write ``pkg`` as a .tar.bz2 into ``subdir``; text files containing PLACEHOLDER are
    declared with a prefix placeholder, so installing relocates them."""
    index: dict[str, object] = {"name": pkg.name, "version": pkg.version, "build": "0",
                                "build_number": 0, "depends": pkg.depends,
                                "subdir": pkg.subdir, "license": "MIT"}
    if pkg.subdir == "noarch":
        index["noarch"] = "generic"
    paths: list[dict[str, object]] = []
    for rel, (content, _exe) in sorted(pkg.files.items()):
        data = _bytes(content)
        entry: dict[str, object] = {"_path": rel, "path_type": "hardlink",
                                    "sha256": hashlib.sha256(data).hexdigest(),
                                    "size_in_bytes": len(data)}
        if PLACEHOLDER.encode() in data:
            entry.update(prefix_placeholder=PLACEHOLDER, file_mode="text")
        paths.append(entry)
    paths += [{"_path": rel, "path_type": "softlink"} for rel in sorted(pkg.links)]
    out = subdir / pkg.filename
    # bzip2's fastest level: a third quicker on the python package (the whole stdlib), which
    # is written once per session; the size of a local channel's files matters to nobody.
    with tarfile.open(out, "w:bz2", compresslevel=1) as tar:
        _add(tar, "info/index.json", json.dumps(index).encode())
        _add(tar, "info/paths.json", json.dumps({"paths": paths, "paths_version": 1}).encode())
        _add(tar, "info/files", "".join(f"{p}\n" for p in sorted([*pkg.files, *pkg.links]))
             .encode())
        for rel, (content, exe) in sorted(pkg.files.items()):
            _add(tar, rel, _bytes(content), 0o755 if exe else 0o644)
        for rel, target in sorted(pkg.links.items()):
            info = tarfile.TarInfo(rel)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return out


HOST_PYTHON = Path("/usr/bin/python3.11")
HOST_STDLIB = Path("/usr/lib/python3.11")
# Left out of the test's python package: tests, the static library, GUI and 2to3 tools,
# bytecode (written on first use) and Debian's pointers back to the host (/etc, pip's refusal).
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "pydoc_data",
                "__pycache__", "EXTERNALLY-MANAGED", "sitecustomize.py"}


def python_package() -> CondaPackage:
    """``python`` 3.11 for linux-64 made of this machine's Debian interpreter, as a conda
    package is: ``bin/python3.11`` (+ ``python3``/``python`` links), the stdlib under
    ``lib/python3.11`` (where the interpreter looks first, from its own path: the ``os.py``
    landmark, so no PYTHONHOME), and pip's and setuptools' wheels under
    ``share/python-wheels`` for ``venv``'s ensurepip — found through sysconfig's
    ``WHEEL_PKG_DIR``, a prefix placeholder that the installer relocates (as conda-forge's
    python bakes its prefix into ``_sysconfigdata``)."""
    files: dict[str, tuple[str | bytes, bool]] = {
        "bin/python3.11": (HOST_PYTHON.read_bytes(), True)}
    links = {"bin/python3": "python3.11", "bin/python": "python3.11"}
    for dirpath, dirnames, filenames in os.walk(HOST_STDLIB):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP
                       and not d.startswith("config-")]
        for name in filenames:
            path = Path(dirpath) / name
            rel = f"lib/python3.11/{path.relative_to(HOST_STDLIB)}"
            if name in _STDLIB_SKIP:
                continue
            if path.is_symlink():  # Debian: one _sysconfigdata under two names
                links[rel] = os.readlink(path)
                continue
            data = path.read_bytes()
            if name.startswith("_sysconfigdata_"):
                data = data.replace(b"'/usr/share/python-wheels/'",
                                    f"'{PLACEHOLDER}/share/python-wheels/'".encode())
            files[rel] = (data, os.access(path, os.X_OK))
    for wheel in Path("/usr/share/python-wheels").glob("*.whl"):
        files[f"share/python-wheels/{wheel.name}"] = (wheel.read_bytes(), False)
    return CondaPackage("python", "3.11.2", files=files, links=links, subdir="linux-64")


def pip_package() -> CondaPackage:
    """``pip`` 23.0.1 as a noarch conda package for the python above: the wheel Debian bundles
    for ensurepip, unpacked into ``lib/python3.11/dist-packages`` (a site directory of Debian's
    interpreter) with INSTALLER ``conda``, as conda-forge's pip is; ``bin/pip`` runs it."""
    wheel = next(Path("/usr/share/python-wheels").glob("pip-*.whl"))
    version = wheel.name.split("-")[1]
    site = "lib/python3.11/dist-packages"
    script = (f"#!{PLACEHOLDER}/bin/python3.11\nimport sys\n"
              "from pip._internal.cli.main import main\nsys.exit(main())\n")
    files: dict[str, tuple[str | bytes, bool]] = {"bin/pip": (script, True)}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not name.endswith("/"):
                files[f"{site}/{name}"] = (zf.read(name), False)
    files[f"{site}/pip-{version}.dist-info/INSTALLER"] = ("conda\n", False)
    return CondaPackage("pip", version, depends=["python"], files=files)


def python_channel(base: Path = Path("/tmp/envctl-tests")) -> Path:
    """A channel with ``python`` and ``pip`` (above), built once and kept under ``base`` by a
    hash of its inputs (this machine's interpreter, stdlib and wheels, and this file), so a
    session, and the next, pay the ~10 s of writing the stdlib into a .tar.bz2 once."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(hashlib.sha256(HOST_PYTHON.read_bytes()).digest())
    for top in (HOST_STDLIB, Path("/usr/share/python-wheels")):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.lstat(os.path.join(dirpath, name))
                digest.update(f"{dirpath}/{name} {st.st_size} {st.st_mtime_ns}\n".encode())
    path = base / f"pychannel-{digest.hexdigest()[:16]}"
    if (path / "linux-64" / "repodata.json").exists():
        return path
    base.mkdir(mode=0o755, exist_ok=True)
    # One builder at a time (xdist workers ask together); the rename publishes it whole.
    with open(base / ".pychannel.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "linux-64" / "repodata.json").exists():
            return path  # built while we waited
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=".pychannel-"))
        build_channel(tmp, [python_package(), pip_package()])
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(path)
        except OSError:  # built meanwhile by a session without this lock: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def app_package(version: str) -> CondaPackage:
    """``app``: every file knows its version, and two hold the prefix (``has_prefix`` text
    replacement), so a test can tell which version — and which prefix — served a read."""
    return CondaPackage("app", version, files={
        "share/app/VERSION": (f"{version}\n", False),
        "share/app/prefix.txt": (f"{PLACEHOLDER}\n", False),
        "bin/app": (f"#!/bin/sh\necho \"app {version} in {PLACEHOLDER}\"\n", True)})


def hello_packages() -> list[CondaPackage]:
    """A dependency chain: ``hello`` (a script with the prefix baked in) → ``libgreet`` →
    ``greet-data``; and ``app`` in two versions (1.0, 2.0: see ``app_package``)."""
    script = f"#!/bin/sh\n# installed in {PLACEHOLDER}\ncat {PLACEHOLDER}/share/greet/message\n"
    return [app_package("1.0"), app_package("2.0"),
        CondaPackage("greet-data", files={"share/greet/message": ("hello from envctl\n", False)}),
        CondaPackage("libgreet", depends=["greet-data"],
                     files={"lib/greet/VERSION": ("1.0\n", False)}),
        CondaPackage("hello", "2.1", depends=["libgreet >=1.0"],
                     files={"bin/hello": (script, True)}),
    ]


def build_channel(root: Path, packages: list[CondaPackage]) -> Path:
    """Write a channel (a ``noarch`` subdir, and the platforms' the packages need) and index
    it with rattler; return its dir."""
    (root / "noarch").mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        (root / pkg.subdir).mkdir(exist_ok=True)
        write_conda_package(pkg, root / pkg.subdir)
    import rattler.index  # the venv has py-rattler (the daemon extra)

    asyncio.run(rattler.index.index_fs(root))
    for dirpath, _dirs, filenames in os.walk(root):  # readable by the build user
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return root


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def write_wheel(wheelhouse: Path, name: str, version: str = "1.0",
                module_source: str = "GREETING = 'hi'\n", requires: tuple[str, ...] = (),
                data: Mapping[str, str] | None = None) -> Path:
    """A pure-Python ``py3-none-any`` wheel with one module ``<name>.py`` (and the
    ``Requires-Dist`` lines ``requires``; ``data``: files pip installs relative to the
    prefix, from the wheel's ``.data/data/``), written by hand."""
    dist = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {req}\n" for req in requires)
    files = {
        **{f"{name}-{version}.data/data/{rel}": text.encode()
           for rel, text in (data or {}).items()},
        f"{name}.py": module_source.encode(),
        f"{dist}/METADATA": metadata.encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: envctl-tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = [_record_line(p, d) for p, d in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    os.chmod(wheelhouse, 0o755)
    out = wheelhouse / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    os.chmod(out, 0o644)
    return out


# -- fixtures shared by the test_jobs_* modules (imported there by name) ------------------------


@dataclass
class JobsEnv:
    """A root, a state dir, a local channel and a wheelhouse, and a config factory for them."""

    root: Path
    state_dir: Path
    channel: Path
    wheelhouse: Path
    accounts: Any

    def raw(self, **requests: Any) -> dict[str, Any]:
        """The configuration as the YAML file would hold it (for a daemon in its own process)."""
        req: dict[str, Any] = {
            "state_dir": str(self.state_dir), "build_user": self.accounts.builder.name,
            "backend": "rattler", "allowed_backends": ["rattler", "venv"],
            "channels": [str(self.channel)], "default_channels": [str(self.channel)],
            "pip_args": ["--no-index", "--find-links", str(self.wheelhouse)],
            "timeout": 120,
        }
        req.update(requests)
        return {"roots": [{"path": str(self.root), "group": self.accounts.shared_group,
                           "others": "read"}], "requests": req}

    def config(self, **requests: Any) -> Config:
        return parse(self.raw(**requests))

    def requester(self, who: str = "alice", admin: bool = False,
                  claimed: str | None = None) -> Requester:
        user = getattr(self.accounts, who)
        groups = (self.accounts.shared_gid,) if who in ("alice", "bob") else ()
        return Requester(uid=user.uid, gid=user.gid, groups=groups, pid=os.getpid(),
                         username=user.name, claimed_user=claimed, is_admin=admin)

    def allow(self, who: Requester, op: str, name: str) -> Callable[[Any], None]:
        """The API's access check of ``op`` on env ``name``, as the jobs layer is handed it
        (members of the root's group are requesters)."""
        cfg = self.config().requests._replace(allow_groups=(self.accounts.shared_group,))
        auth = Authoriser(cfg)
        return lambda owner: auth.check(OPS[op], who, EnvTarget(name, owner))


@dataclass(frozen=True)
class Pool:
    """Three build accounts in the root's group (a pool like Nix's nixbld users), for
    ``requests.build_users``."""

    names: tuple[str, ...]
    uids: tuple[int, ...]
    gids: tuple[int, ...]


def wait_done(mgr: JobManager, job_id: str, timeout: float = 60.0) -> Job:
    """Follow a job with ``wait`` (as ``logs -f`` does) until it is terminal."""
    deadline = time.monotonic() + timeout
    job = mgr.get(job_id)
    while not job.terminal:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"job {job_id} still {job.state.value}/{job.phase} "
                                 f"after {timeout}s")
        job = mgr.wait(job_id, min(left, 5.0))
    return job


def full_log(mgr: JobManager, job_id: str) -> str:
    out, offset = b"", 0
    while True:
        chunk, offset = mgr.read_log(job_id, offset, 4096)
        if not chunk:
            return out.decode("utf-8", "replace")
        out += chunk


# A job manager in a process of its own (to be killed with SIGKILL): argv = config, requester,
# [[name, spec, backend], ...], replace; prints each submitted job's id, then idles.
DAEMON = """
import json, sys, time
from envctl_shared.config import parse
from envctl_shared.jobs import JobManager, Requester
cfg, who, specs = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
mgr = JobManager(parse(cfg))
mgr.start()
for name, text, backend in specs:
    print(mgr.submit(Requester(**who), name, text, backend=backend,
                     replace=sys.argv[4] == "replace").id, flush=True)
time.sleep(600)
"""


def daemon_argv(cfg: dict[str, Any], who: Requester, specs: list[list[str]],
                replace: bool = False) -> list[str]:
    """The command line of a :data:`DAEMON` (run it with ``cwd`` anywhere: the package is
    installed in the venv)."""
    fields = {k: getattr(who, k) for k in ("uid", "gid", "groups", "pid", "username",
                                           "claimed_user", "is_admin")}
    return [sys.executable, "-c", DAEMON, json.dumps(cfg), json.dumps(fields), json.dumps(specs),
            "replace" if replace else "new"]


ENV_HELLO = "name: ignored\nchannels: []\ndependencies:\n  - hello\n"
ENV_VENV = "dependencies:\n  - python\n  - pip:\n    - envctl_demo\n"
# With pip seeded (ensurepip: ~2 s, in a child process): for tests that need a step still running
ENV_VENV_PIP = "dependencies:\n  - python\n  - pip\n  - pip:\n    - envctl_demo\n"
