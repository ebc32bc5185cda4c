"""Every environment as a Jupyter kernel: one kernelspec per env in ``kernels.dir``.

Why the daemon writes them: ipykernel's own kernelspec inside an env is named ``python3`` with
``argv: ["python", ...]`` — it collides with the default kernel and runs whatever ``python`` is
first on PATH. Users of a shared root want "the env called X" in the launcher. So after a build
or a rollback (``runner``, ``manager``), and for every env in the root on ``envctl kernels
sync``, the daemon:

- decides whether the env can be a kernel **without running any of it**: an env's interpreter
  and its ``.pth`` files are its members' code, and running them as root or as a build uid
  (outside any build's cgroup) hands them the daemon's privileges. A managed env's current
  version answers from its record (the ``packages`` the daemon inventoried at build time); a
  hand-made env, or a record without packages, from its files: a site directory holding
  ``ipykernel_launcher.py`` (what the kernelspec runs), found fd-based, no symlink followed.
  So a sync reads a few directory entries per env, and one overall time limit
  (``SYNC_LIMIT``) bounds it even on a hung network filesystem;
- names it ``envctl-`` + the env name escaped one-to-one into the lower case alphabet Jupyter
  uses (``_`` + the letter for a capital, ``__`` for an underscore: ``Foo`` is ``envctl-_foo``,
  ``foo`` is ``envctl-foo``), so two envs never share a kernelspec — the hash suffix this
  replaces let env ``foo-1cbec737`` overwrite env ``Foo``'s kernel;
- records which env owns each kernelspec (``metadata.envctl.env`` in its ``kernel.json``):
  a write over another env's kernelspec is refused, removal and ``sync`` touch only kernelspecs
  they own, and an env's kernelspec under an older name is removed when it is written anew;
- makes ``argv`` a small ``sh`` launcher that resolves the env's stable path ``<root>/<name>``
  when the kernel starts and runs that version's ``bin/python`` with what activation would set:
  ``PATH`` first, ``CONDA_PREFIX`` or ``VIRTUAL_ENV``, then the version's ``variables:`` — read
  at start from the version it resolved (its record ``vN.json`` beside it, else conda's
  ``conda-meta/state``), by that version's python in isolated mode without ``site``, which then
  execs the kernel. Not a static ``env`` in ``kernel.json``: a switch or rollback would leave a
  window where a new kernel starts one version with another's variables, and hand-made envs
  (``conda env config vars set``) would not get theirs. A replaced env is picked up at the next
  kernel start, and a running kernel keeps the version it started on: the launcher holds a
  shared lock on that version's mark for the kernel's lifetime, and GC never removes a version
  whose mark is held (``usemarks``; a mark the launcher cannot take does not stop the kernel);
- writes atomically (a temporary file renamed over ``kernel.json``) through directory fds
  opened ``O_NOFOLLOW``; files are the daemon's, 0644 in 0755 directories: every user can read
  them, no user can point another user's kernel elsewhere. ``kernels.dir`` inside a root is
  refused at load (``config``): members could rename and replace kernelspecs there;
- removes the kernelspec when the env has none to offer (no ipykernel any more, or gone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import Conflict, EnvctlError, FilesystemError
from ..heal.fsops import DIR_FLAGS
from . import envs, layout
from .layout import remove_tree

log = logging.getLogger(__name__)

PREFIX = "envctl-"
SYNC_LIMIT = 60.0  # seconds for one whole sync; envs left when it is over keep their kernelspec
MAX_SPEC = 1 << 20  # a kernel.json larger than this is not one of ours
_KERNEL_NAME = re.compile(r"[a-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")  # hand-made names with "_" too
_NAME_MAX = 255  # bytes of one directory name (Linux): a kernelspec is a directory
_LAUNCHER_MODULE = "ipykernel_launcher.py"


@dataclass(frozen=True)
class SyncResult:
    """What ``sync`` did, for the ``kernels-sync`` reply."""

    written: tuple[str, ...]
    removed: tuple[str, ...]
    skipped: tuple[str, ...]  # being built, a name no kernel can have, or past the time limit


def kernel_name(env: str) -> str | None:
    """``envctl-`` + ``env`` escaped one-to-one into lower case (see the module docstring);
    None for a name that cannot be escaped (a hand-made env with spaces, say) or whose escape
    is longer than a directory name may be (a hand-made env of 125 capitals)."""
    if not _ENV_NAME.fullmatch(env):
        return None
    name = PREFIX + "".join("__" if c == "_" else "_" + c.lower() if c.isupper() else c
                          for c in env)
    return name if len(name) <= _NAME_MAX else None


# -- whether an env can be a kernel, from what is on disk ---------------------------------------


def has_ipykernel(fds: dict[str, int], env: str) -> bool:
    """Whether ``env`` in the root (``fds`` of ``layout.RootArea.open``) has ipykernel: its
    current version's record says, else its files do. Nothing of the env runs."""
    cur = envs.current(fds[""], env)
    if cur.kind == "managed":
        assert cur.version is not None
        with envs.env_dir(fds, env, create=False) as env_fd:
            if env_fd is None:
                return False
            rec = envs.ready(env_fd, cur.version)
            if rec is None:
                return False
            packages = rec.get("packages")
            if isinstance(packages, list) and packages:
                return any(isinstance(p, dict) and str(p.get("name", "")).lower() == "ipykernel"
                           for p in packages)
            return launcher_in(env_fd, cur.version)
    return cur.kind == "unmanaged" and launcher_in(fds[""], env)


def _open_dir(parent: int | None, name: str) -> int | None:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError:
        return None


def launcher_in(parent: int | None, name: str) -> bool:
    """A site directory of the prefix ``name`` (in ``parent``, or a path) holds
    ``ipykernel_launcher.py`` (a regular file: no symlink followed from the prefix on)."""
    prefix = _open_dir(parent, name)
    if prefix is None:
        return False
    try:
        return any(_site_has_launcher(site) for site in envs.site_dirs(prefix))
    finally:
        os.close(prefix)


def _site_has_launcher(site: int) -> bool:
    try:
        st = os.stat(_LAUNCHER_MODULE, dir_fd=site, follow_symlinks=False)
    except OSError:
        return False
    finally:
        os.close(site)
    return stat.S_ISREG(st.st_mode)


# -- the kernelspec -----------------------------------------------------------------------------

# The kernel's launcher: resolve the stable path once, at start, and run the version it names.
# A running kernel so stays on the version it started with (its imports, its subprocesses'
# PATH) while ``<root>/<name>`` switches under it; the next start takes the new one. POSIX sh,
# no braces: jupyter_client substitutes ``{name}`` patterns in every argv element.
_LAUNCH = ('if ! p=$(cd -P -- "$1" 2>/dev/null && pwd); then '
           'echo "envctl: environment $1 is gone" >&2; exit 1; fi\n'
           'export PATH="$p/bin:$PATH"\n'
           'if [ -f "$p/pyvenv.cfg" ]; then export VIRTUAL_ENV="$p"; '
           'else export CONDA_PREFIX="$p" CONDA_DEFAULT_ENV="$3"; fi\n'
           'exec "$p/bin/python" -I -S -c "$4" "$p" "$2"\n')
# Then, in that version's python (isolated, no site: nothing of the env is imported), its
# variables: from its record when it is a managed version (``.envctl/envs/<name>/vN`` with
# ``vN.json`` beside it, the daemon's), else from conda's ``conda-meta/state``; then the kernel.
_VARIABLES = """\
import json, os, sys
p, conn = sys.argv[1], sys.argv[2]
def load(path, key):
    try:
        with open(path, 'rb') as fh:
            doc = json.load(fh)
    except (OSError, ValueError, RecursionError):
        return None
    found = doc.get(key) if isinstance(doc, dict) else None
    return found if isinstance(found, dict) else None
area = os.path.dirname(os.path.dirname(p))
found = None
if os.path.basename(area) == 'envs' and os.path.basename(os.path.dirname(area)) == '.envctl':
    found = load(p + '.json', 'variables')
    try:
        import fcntl, struct
        mark = os.open(p + '.use', os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        fcntl.fcntl(mark, getattr(fcntl, 'F_OFD_SETLK', 37),
                    struct.pack('hhqqi4x', fcntl.F_RDLCK, 0, 0, 0, 0))
        os.read(mark, 1)
        os.set_inheritable(mark, True)
    except Exception:
        pass
if found is None:
    found = load(os.path.join(p, 'conda-meta', 'state'), 'env_vars') or dict()
for key, value in found.items():
    if isinstance(key, str) and isinstance(value, str) and key and '=' not in key:
        os.environ[key] = value
python = os.path.join(p, 'bin', 'python')
os.execv(python, [python, '-m', 'ipykernel_launcher', '-f', conn])
"""


DISPLAY_MAX = 80  # characters of a kernel's display name (a launcher tile, a menu entry)
_UNSAFE = dict.fromkeys(map(ord, "<>&\"'`"))  # markup in whatever renders the name: dropped


def display_name(config: Config, env: str, description: str | None = None) -> str:
    """``<display_prefix>: <env>``, then `` — `` and as much of the env's description as
    fits in ``DISPLAY_MAX`` (cut with ``…``). The description is its owner's text, shown in
    everyone's launcher: printable characters only, markup characters dropped."""
    name = f"{config.kernels.display_prefix}: {env}"
    text = " ".join("".join(c for c in description or "" if c.isprintable())
                    .translate(_UNSAFE).split())
    room = DISPLAY_MAX - len(name) - 3
    if not text or room < 8:
        return name
    return f"{name} — " + (text if len(text) <= room else text[:room - 1].rstrip() + "…")


def spec_for(config: Config, env: str, description: str | None = None) -> dict[str, object]:
    """The kernelspec of the env called ``env``: through its stable path, resolved at start;
    ``metadata.envctl.env`` says which env owns it."""
    prefix = config.requests_root.path / env
    return {"argv": ["/bin/sh", "-c", _LAUNCH, "envctl-kernel", str(prefix),
                     "{connection_file}", env, _VARIABLES],
            "display_name": display_name(config, env, description),
            "language": "python",
            "metadata": {"envctl": {"env": env, "prefix": str(prefix)},
                         "debugger": True}}


def refresh(config: Config, env: str) -> str | None:
    """After a switch (build, rollback; the name's lock held): make the env's kernelspec match
    the version now current; a line for the log, None without ``kernels.dir``. A failure is
    logged and said, never raised: the switch stands, ``kernels sync`` repairs the rest."""
    if config.kernels.dir is None:
        return None
    try:
        with layout.RootArea(config.requests_root.path).open() as fds:
            present = has_ipykernel(fds, env)
            description = envs.description_of(fds, env)
        return publish(config, env, present, description)
    except (OSError, EnvctlError) as exc:
        log.warning("kernelspec-failed name=%s error=%s", env, exc)
        return f"kernelspec not written: {exc}"


def publish(config: Config, env: str, has_kernel: bool, description: str | None = None) -> str:
    """Write (``has_kernel``) or remove the env's kernelspec; a line for the build log."""
    assert config.kernels.dir is not None
    name = kernel_name(env)
    if name is None:
        return f"no kernelspec: {env!r} cannot be a kernel name"
    with _KernelsDir(config.kernels.dir) as kdir:
        if has_kernel:
            kdir.write(name, env, spec_for(config, env, description))
            old = [n for n, owner in kdir.ours().items() if owner == env and n != name]
            for stale in old:
                kdir.remove(stale, env)
            return f"kernelspec {name} written in {config.kernels.dir}" + (
                f" (replacing {', '.join(old)})" if old else "")
        gone = [n for n, owner in kdir.ours().items() if owner == env and kdir.remove(n, env)]
    if gone:
        return f"kernelspec {', '.join(gone)} removed (the environment has no ipykernel)"
    return "no kernelspec: the environment has no ipykernel"


def sync(config: Config, busy: set[str], limit: float = SYNC_LIMIT) -> SyncResult:
    """Make ``kernels.dir`` hold exactly one kernelspec per env of the root that has ipykernel
    (hand-made envs included), without running any env. Names in ``busy`` (being built) are
    left to their build; envs not reached within ``limit`` seconds keep what they have."""
    assert config.kernels.dir is not None
    deadline = time.monotonic() + limit
    wanted: dict[str, str] = {}
    descriptions: dict[str, str | None] = {}
    skipped: list[str] = []
    keep: set[str] = set(busy)  # envs whose kernelspecs this sync must not remove
    with layout.RootArea(config.requests_root.path).open() as fds:
        names = envs.scan_names(fds[""], fds["envs"])
        for i, env in enumerate(names):
            if time.monotonic() >= deadline:
                log.warning("kernels-sync-limit limit=%g left=%d", limit, len(names) - i)
                skipped.extend(names[i:])
                keep.update(names[i:])
                break
            name = kernel_name(env)
            if env in busy or name is None:
                skipped.append(env)
                continue
            if has_ipykernel(fds, env):
                wanted[name] = env
                descriptions[env] = envs.description_of(fds, env)
    written, removed = [], []
    with _KernelsDir(config.kernels.dir) as kdir:
        # First what no env wants any more under its owner (gone, no ipykernel, an old name
        # now another env's), then the writes: a name is free when it is written.
        for name, owner in sorted(kdir.ours().items()):
            if wanted.get(name) != owner and owner not in keep and kdir.remove(name, owner):
                removed.append(name)
        for name, env in wanted.items():
            try:
                kdir.write(name, env, spec_for(config, env, descriptions[env]))
            except Conflict as exc:  # held by an env being built: its build decides
                log.warning("kernels-sync-conflict name=%s env=%s problem=%s", name, env,
                            exc.message)
                skipped.append(env)
                continue
            written.append(name)
    log.info("kernels-sync written=%d removed=%d skipped=%d", len(written), len(removed),
             len(skipped))
    return SyncResult(tuple(written), tuple(removed), tuple(skipped))


class _KernelsDir:
    """``kernels.dir`` opened once; every change relative to its fd, never via a symlink."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _KernelsDir:
        os.makedirs(self.path, mode=0o755, exist_ok=True)
        try:
            self.fd = os.open(self.path, DIR_FLAGS)
        except OSError as exc:
            raise FilesystemError(f"kernels.dir {self.path} cannot be opened as a directory: "
                                  f"{exc.strerror}", hint="check kernels.dir") from None
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def _own_dir(self, name: str, create: bool) -> int | None:
        """An fd on ``name`` if it is a directory the daemon owns (made when ``create``);
        None when absent; FilesystemError when something else sits there."""
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=self.fd)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FilesystemError(f"{self.path / name} is not a directory ({exc.strerror}): "
                                  "left alone", hint="remove it; the daemon recreates it "
                                  "(envctl kernels sync)") from None
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            os.close(fd)
            raise FilesystemError(f"{self.path / name} is owned by uid {st.st_uid}, not by the "
                                  "daemon: left alone", hint="remove it; the daemon recreates "
                                  "it (envctl kernels sync)")
        if stat.S_IMODE(st.st_mode) != 0o755:
            os.fchmod(fd, 0o755)
        return fd

    @staticmethod
    def _owner(fd: int) -> str | None:
        """The env a kernelspec directory's ``kernel.json`` says owns it (None: not ours)."""
        try:
            spec_fd = os.open("kernel.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                              | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            return None
        try:
            st = os.fstat(spec_fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or \
                    st.st_size > MAX_SPEC:
                return None
            doc = json.loads(os.read(spec_fd, MAX_SPEC))
        except (OSError, ValueError, RecursionError):
            return None
        finally:
            os.close(spec_fd)
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        owner = (meta.get("envctl") or {}) if isinstance(meta, dict) else {}
        env = owner.get("env") if isinstance(owner, dict) else None
        return env if isinstance(env, str) else None

    def write(self, name: str, env: str, spec: dict[str, object]) -> None:
        """Write ``env``'s kernelspec ``name``; Conflict when another env owns that name."""
        assert _KERNEL_NAME.fullmatch(name)
        fd = self._own_dir(name, create=True)
        assert fd is not None
        tmp = f".kernel.json.{secrets.token_hex(4)}"
        try:
            owner = self._owner(fd)
            if owner is not None and owner != env:
                raise Conflict(f"kernelspec {self.path / name} belongs to environment "
                               f"{owner!r}, not {env!r}: left alone",
                               hint="remove it if that environment is gone; then run "
                                    "'envctl kernels sync'")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o644, dir_fd=fd)
            with os.fdopen(out, "w", encoding="utf-8") as fh:
                json.dump(spec, fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fchmod(fh.fileno(), 0o644)
                os.fsync(fh.fileno())
            os.replace(tmp, "kernel.json", src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
            raise
        finally:
            os.close(fd)

    def remove(self, name: str, env: str) -> bool:
        """Remove the kernelspec ``name`` if it is the daemon's and ``env``'s; True if so."""
        try:
            fd = self._own_dir(name, create=False)
        except FilesystemError as exc:
            log.warning("kernels-remove-refused name=%s problem=%s", name, exc.message)
            return False
        if fd is None:
            return False
        try:
            owner = self._owner(fd)
        finally:
            os.close(fd)
        if owner != env:
            log.warning("kernels-remove-refused name=%s env=%s owner=%s", name, env, owner)
            return False
        return remove_tree(self.fd, name)

    def ours(self) -> dict[str, str]:
        """``envctl-*`` kernelspec directories the daemon owns, with the env owning each."""
        out = {}
        for entry in os.scandir(self.fd):
            if entry.name.startswith(PREFIX) and _KERNEL_NAME.fullmatch(entry.name):
                fd = _open_dir(self.fd, entry.name)
                if fd is None:
                    continue
                try:
                    owner = self._owner(fd) if os.fstat(fd).st_uid == os.geteuid() else None
                finally:
                    os.close(fd)
                if owner is not None:
                    out[entry.name] = owner
        return out
