"""Load and validate envctl's YAML configuration into immutable records (``NamedTuple``: every
CLI command imports this module, see :mod:`envctl_shared.cli.main`).

Why strict: a typo in a daemon's config that is silently ignored (``exlude:``) turns into a
security or data-loss incident months later. Every unknown key, wrong type, relative path,
unknown group name, numeric gid that is not one, root path through a symlink or overlapping
root is a :class:`~envctl_shared.errors.ConfigError` whose message names
the file, the key path (``roots[0].group``) and what is wrong. Nothing here touches the trees;
it only describes them (it looks at a root path's components, never changes them).

Roots are compared by where they really are: two roots that overlap through a symlink would
have two watchers heal the same entries and feed each other's events forever, so a root path
with a symlink in any component is refused (name the real directory) and overlap is judged on
real paths. A bare numeric gid with no entry in the group database is accepted (NFS sites share
gids, not names), but only 0..4294967294: chown(2) reads -1 (4294967295) as "leave the group
alone" and larger numbers wrap around (2**40 is gid 0).
"""

# No ``from __future__ import annotations`` here: a NamedTuple compiles each string annotation
# at import, and every CLI command imports this module (start-up: see cli/main.py).

import grp
import os
import pwd
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple, NoReturn, TypeVar

from .errors import ConfigError

Others = Literal["keep", "none", "read"]
WatchMode = Literal["auto", "inotify", "poll"]
# Every backend a config may name, and the module of ``jobs.backends`` that implements it (the
# conda family shares one, spelled per flavour): the one registry of backends.
BACKENDS: dict[str, str] = {"rattler": "rattler", "venv": "venv", "conda": "conda",
                            "mamba": "conda", "micromamba": "conda"}
DEFAULT_SOCKET = "/run/envctl/envctld.sock"
SOCKET_ENV = "ENVCTL_SOCKET"  # where clients look for the socket before DEFAULT_SOCKET
# The daemon's area in the requests root (``jobs.layout``): frozen versions, their store, the
# locks. Excluded from healing, watching and polling: nothing in it is a member's to fix.
DAEMON_AREA = ".envctl"


class RootConfig(NamedTuple):
    """One shared tree and the policy that makes it correct."""

    path: Path
    group: str
    gid: int
    others: Others = "keep"
    exclude: tuple[str, ...] = ()
    protected_owners: tuple[int, ...] = (0,)
    # The daemon builds requested envs here (requests enabled): the directory itself must be
    # sticky, or any member could rename the daemon's .envctl away (policy.judge).
    holds_requests: bool = False
    # owners: members — only entries of these uids are changed (the group's members from the
    # group database at load or reload, the build user, the daemon); None: any owner (default).
    # Why: a member who moves into the root a tree a non-member wrote (a 0777 drop box, a
    # hard link) would otherwise have the non-member's files shared with the group.
    member_uids: frozenset[int] | None = None


class WatchConfig(NamedTuple):
    """How the daemon notices changes: inotify, polling, or both (auto)."""

    mode: WatchMode = "auto"
    poll_interval: float = 10.0
    full_scan_interval: float = 3600.0
    workers: int = 2
    status_interval: float = 300.0


class WalkConfig(NamedTuple):
    """Concurrency of every tree walk; ``None`` picks a default per filesystem type."""

    concurrency: int | None = None


class SocketConfig(NamedTuple):
    """The request socket; ``group`` None leaves the daemon's primary group."""

    path: Path = Path(DEFAULT_SOCKET)
    mode: int = 0o660
    group: str | None = None
    read_timeout: float = 10.0  # seconds a client has to send a request line / take a reply
    max_connections: int = 256  # concurrent clients; one more is told "busy"
    max_connections_per_uid: int = 64  # concurrent clients of one non-admin uid
    admin_connections: int = 16  # of max_connections, kept for admins (and readiness probes)


class VenvBaseConfig(NamedTuple):
    """The venvs' base Python, built by the daemon with rattler inside the requests root (see
    ``jobs.base_python``): ``dependencies`` are conda match specs (python among them),
    ``channels`` empty means ``requests.default_channels``."""

    dependencies: tuple[str, ...]
    channels: tuple[str, ...] = ()


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_size(n: int) -> str:
    """Bytes as the config writes them: ``4G``, ``512M``, or a plain number."""
    for unit in ("T", "G", "M", "K"):
        if n >= _SIZE_UNITS[unit] and n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


class BuildLimits(NamedTuple):
    """What one build may use (``requests.limits``), enforced by its cgroup (``jobs.cgroup``:
    memory, tasks, cpu_weight) and by the runner's size checks (disk: its version and HOME)."""

    memory: int = 4 << 30  # bytes of RAM (memory.max); no swap beyond it
    tasks: int = 4096  # processes and threads at once (pids.max)
    disk: int = 20 << 30  # bytes the version and the build's HOME may hold
    cpu_weight: int = 100  # its share of CPU against other builds (cpu.weight, 1-10000)

    def named(self, key: str) -> str:
        """``requests.limits.memory = 4G``: how a failed build names the limit it hit."""
        value = getattr(self, key)
        shown = format_size(value) if key in ("memory", "disk") else str(value)
        return f"requests.limits.{key} = {shown}"

    def to_dict(self) -> dict[str, int]:
        return {"memory": self.memory, "tasks": self.tasks, "disk": self.disk,
                "cpu_weight": self.cpu_weight}


class RequestsConfig(NamedTuple):
    """Who may ask for environments, and how the daemon builds them."""

    enabled: bool = True
    root: Path | None = None
    state_dir: Path = Path("/var/lib/envctl")
    backend: str = "rattler"
    allowed_backends: tuple[str, ...] = ("rattler", "venv")
    build_user: str | None = None
    # A pool of build accounts (like Nix's nixbld1..N): one running build per account, so
    # builds cannot reach each other (see jobs.procs). Exclusive with build_user.
    build_users: tuple[str, ...] = ()
    max_concurrent: int = 2
    # Jobs one requester (a verified hub user, else a uid) may have queued or running at once;
    # admins are not limited. Bounds what one user can make the daemon store and run.
    max_queued_per_user: int = 8
    timeout: float = 3600.0
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    admin_users: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()
    allow_hub_groups: tuple[str, ...] = ()  # JupyterHub groups (of verified hub users)
    admin_hub_groups: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    default_channels: tuple[str, ...] = ("conda-forge",)
    platforms: tuple[str, ...] = ()
    conda_exe: str | None = None
    venv_python: str = "/usr/bin/python3"
    venv_base: VenvBaseConfig | None = None  # set: venvs run a Python the daemon keeps in the root
    pip_args: tuple[str, ...] = ()
    # Variables of the daemon's own environment passed to builds (e.g. HTTPS_PROXY,
    # PIP_INDEX_URL); everything else is scrubbed.
    build_env: tuple[str, ...] = ()
    allow_pip_options: bool = False
    allow_pip_urls: bool = False
    max_spec_bytes: int = 65536
    max_packages: int = 200
    max_request_bytes: int = 262144
    keep_logs_days: int = 30
    keep_versions: int = 2  # the newest versions of an env GC keeps (the current one always)
    max_versions: int = 10  # versions of an env on disk at most, even inside gc_grace
    max_log_bytes: int = 1 << 30  # all kept build logs together (oldest finished go first)
    limits: BuildLimits = BuildLimits()
    gc_grace: float = 86400.0  # seconds a version stays after it stopped being current
    gc_interval: float = 3600.0  # how often the daemon runs the env GC


class JupyterHubConfig(NamedTuple):
    """Where hub tokens are checked, and which peer uids must present one.

    ``api_url`` None disables hub identity (every peer is who the kernel says)."""

    api_url: str | None = None
    shared_uids: tuple[int, ...] = ()
    timeout: float = 5.0
    cache_seconds: float = 60.0
    ca_file: Path | None = None
    # A token the hub refused is refused again without asking for this long (by its hash).
    refusal_cache_seconds: float = 30.0
    # Tokens the daemon has not seen accepted, checked with the hub per peer uid: a burst,
    # then this many per second (a flood of invented tokens costs the hub little).
    verify_rate: float = 2.0
    verify_burst: int = 20


class KernelsConfig(NamedTuple):
    """The shared Jupyter kernels directory the daemon keeps one kernelspec per env in;
    ``dir`` None: no kernelspecs."""

    dir: Path | None = None
    display_prefix: str = "envctl"


class LoggingConfig(NamedTuple):
    """``journal`` auto = use journald when JOURNAL_STREAM says stderr goes there."""

    level: str = "INFO"
    journal: Literal["auto", "true", "false"] = "auto"


class Config(NamedTuple):
    """The whole configuration; ``source`` is the file it came from (for messages)."""

    roots: tuple[RootConfig, ...]
    watch: WatchConfig = WatchConfig()
    walk: WalkConfig = WalkConfig()
    socket: SocketConfig = SocketConfig()
    requests: RequestsConfig = RequestsConfig()
    logging: LoggingConfig = LoggingConfig()
    jupyterhub: JupyterHubConfig = JupyterHubConfig()
    kernels: KernelsConfig = KernelsConfig()
    source: str = "<memory>"

    def root_for(self, path: Path) -> RootConfig | None:
        """The configured root that contains ``path`` (lexically), if any."""
        for root in self.roots:
            if path == root.path or root.path in path.parents:
                return root
        return None

    @property
    def requests_root(self) -> RootConfig:
        """The root environment requests are built into (``requests.root`` or the first root)."""
        root = self.root_for(requests_root_path(self.requests, self.roots))
        assert root is not None  # validated at load time
        return root


def requests_root_path(requests: RequestsConfig, roots: tuple[RootConfig, ...]) -> Path:
    """Where environments are built: ``requests.root``, else the first root."""
    return requests.root or roots[0].path


T = TypeVar("T")


class _Reader:
    """Walks one mapping of the YAML document, recording which keys were consumed."""

    def __init__(self, source: str, where: str, data: Any) -> None:
        self.source = source
        self.where = where
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail("", f"must be a mapping, not {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def fail(self, key: str, what: str) -> NoReturn:
        name = f"{self.where}.{key}" if self.where and key else (self.where or key)
        # the document itself (a TOML or XML file, a bare word): say what it must be
        where = f"{name}: " if name else "the file "
        raise ConfigError(f"{self.source}: {where}{what}" + ("" if name else
                          " (roots:, socket:, requests:... as in config/envctld.yaml)"),
                          hint="see config/envctld.yaml for every key with its meaning")

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: Any,
            check: Callable[[Any], str | None] | None = None) -> Any:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"must be {_kind_names(kinds)}, not a boolean")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            self.fail(key, f"must be {_kind_names(kinds)}, not {type(value).__name__}")
        if check is not None:
            problem = check(value)
            if problem:
                self.fail(key, problem)
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        items = self.get(key, list, None)
        if items is None:
            return default
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item:
                self.fail(f"{key}[{i}]", "must be a non-empty string")
        return tuple(items)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            self.fail(unknown[0], f"unknown key (known keys: {', '.join(sorted(self.seen))})")


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a mapping"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than zero"


# The largest gid chown(2) can set: (gid_t)-1 means "leave the group as it is".
MAX_GID = 2**32 - 2


def resolve_group(name: str | int) -> int:
    """Group name or numeric gid (ASCII digits: ``str.isdigit`` would take ``'²'``) → gid.

    ``KeyError`` whose argument says what is wrong: an unknown name, or a number outside
    0..MAX_GID (chown would leave the group alone, or wrap it to another gid). A number with no
    entry in the group database is a gid all the same."""
    if isinstance(name, int) or re.fullmatch(r"[0-9]+", name):
        gid = int(name)
        if not 0 <= gid <= MAX_GID:
            raise KeyError(f"numeric gid {name} is out of range: a gid is 0 to {MAX_GID} "
                           "(-1 means 'no change' to chown, larger numbers wrap around)")
        return gid
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise KeyError(f"no such group {name!r} on this host") from None


def _gid(reader: _Reader, key: str, group: str | int) -> int:
    try:
        return resolve_group(group)
    except KeyError as exc:
        reader.fail(key, str(exc.args[0]))


def _absolute(reader: _Reader, key: str, value: str | None) -> Path | None:
    if value is None:
        return None
    if "\0" in value:
        reader.fail(key, "must not contain a NUL character")
    path = Path(value)
    if not path.is_absolute():
        reader.fail(key, f"must be an absolute path, got {value!r}")
    if ".." in path.parts:
        reader.fail(key, f"must not contain '..', got {value!r}")
    # normpath keeps a leading '//' (POSIX leaves it implementation-defined; Linux: '/')
    return Path("/" + os.path.normpath(path).lstrip("/"))


def _root(source: str, i: int, data: Any) -> RootConfig:
    r = _Reader(source, f"roots[{i}]", data)
    path = _absolute(r, "path", r.get("path", str, None))
    if path is None:
        r.fail("path", "is required")
    assert path is not None
    if path == Path("/"):
        r.fail("path", "must not be '/'")
    from .fsinfo import first_symlink  # here: the filesystem is only asked for roots
    link = first_symlink(path)
    if link is not None:
        r.fail("path", f"{path}: {link} is a symlink (to {os.path.realpath(link)}): name the "
               f"real directory, {os.path.realpath(path)} (through a link a root could overlap "
               "another unseen, and the link's owner would choose where it is)")
    group = r.get("group", (str, int), None)
    if group is None:
        r.fail("group", "is required (a group name or a numeric gid)")
    gid = _gid(r, "group", group)
    others = r.get("others", str, "keep",
                   lambda v: None if v in ("keep", "none", "read") else
                   f"must be keep, none or read, not {v!r}")
    exclude = r.strings("exclude")
    for j, pattern in enumerate(exclude):
        if pattern.startswith("/") or ".." in pattern.split("/"):
            r.fail(f"exclude[{j}]", f"must be a pattern relative to the root, got {pattern!r}")
    owners = r.get("protected_owners", list, [0])
    for j, uid in enumerate(owners):
        if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
            r.fail(f"protected_owners[{j}]", "must be a numeric uid")
    heal_owners = r.get("owners", str, "any",
                        lambda v: None if v in ("any", "members") else
                        f"must be any or members, not {v!r}")
    r.finish()
    return RootConfig(path=path, group=str(group), gid=gid, others=others,
                      exclude=exclude, protected_owners=tuple(owners),
                      member_uids=group_members(gid) if heal_owners == "members" else None)


def group_members(gid: int) -> frozenset[int]:
    """The uids whose primary group is ``gid`` or who are listed in it, and the daemon's own
    (``owners: members``; the build user is added by the requests section). Read once per
    load: a member added later counts after a reload (SIGHUP)."""
    uids = {pw.pw_uid for pw in pwd.getpwall() if pw.pw_gid == gid}
    try:
        names = grp.getgrgid(gid).gr_mem
    except KeyError:
        names = []
    for name in names:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    return frozenset(uids | {os.geteuid()})


def _check_user(name: str) -> str | None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return f"no such user {name!r} on this host"
    return None


def _requests(source: str, data: Any, roots: tuple[RootConfig, ...],
              base: Path) -> RequestsConfig:
    r = _Reader(source, "requests", data)
    d = RequestsConfig()
    root = _absolute(r, "root", r.get("root", str, None))
    if root is not None and not any(root == x.path for x in roots):
        r.fail("root", f"{root} is not one of the configured roots")
    backend = r.get("backend", str, d.backend,
                    lambda v: None if v in BACKENDS else f"unknown backend {v!r} "
                    f"(known: {', '.join(BACKENDS)})")
    allowed = r.strings("allowed_backends", (backend,))
    for j, b in enumerate(allowed):
        if b not in BACKENDS:
            r.fail(f"allowed_backends[{j}]", f"unknown backend {b!r}")
    if backend not in allowed:
        r.fail("backend", f"{backend!r} is not in allowed_backends")
    build_user = r.get("build_user", str, None, _check_user)
    build_users = r.strings("build_users")
    for i, name in enumerate(build_users):
        if (problem := _check_user(name)) is not None:
            r.fail(f"build_users[{i}]", problem)
    if len(set(build_users)) != len(build_users):
        r.fail("build_users", "lists an account twice (one running build per account)")
    if build_user is not None and build_users:
        r.fail("build_users", "set build_user (one account, one build at a time) or "
               "build_users (a pool), not both")
    state_dir = r.get("state_dir", str, None)
    conda_exe = r.get("conda_exe", str, None)
    if any(BACKENDS[b] == "conda" for b in allowed) and not conda_exe:
        r.fail("conda_exe", "is required when a conda-style backend is allowed")
    cfg = RequestsConfig(
        enabled=r.get("enabled", bool, d.enabled),
        root=root,
        state_dir=_absolute(r, "state_dir", _relative_to(base, state_dir)) or d.state_dir,
        backend=backend,
        allowed_backends=allowed,
        build_user=build_user,
        build_users=build_users,
        max_concurrent=r.get("max_concurrent", int, d.max_concurrent, _positive),
        max_queued_per_user=r.get("max_queued_per_user", int, d.max_queued_per_user, _positive),
        timeout=r.get("timeout", float, d.timeout, _positive),
        allow_users=r.strings("allow_users"),
        allow_groups=r.strings("allow_groups"),
        admin_users=r.strings("admin_users"),
        admin_groups=r.strings("admin_groups"),
        allow_hub_groups=r.strings("allow_hub_groups"),
        admin_hub_groups=r.strings("admin_hub_groups"),
        channels=r.strings("channels"),
        default_channels=r.strings("default_channels", d.default_channels),
        platforms=r.strings("platforms"),
        conda_exe=conda_exe,
        venv_python=r.get("venv_python", str, d.venv_python),
        venv_base=_venv_base(source, r),
        pip_args=r.strings("pip_args"),
        build_env=_build_env(r),
        allow_pip_options=r.get("allow_pip_options", bool, d.allow_pip_options),
        allow_pip_urls=r.get("allow_pip_urls", bool, d.allow_pip_urls),
        max_spec_bytes=r.get("max_spec_bytes", int, d.max_spec_bytes, _positive),
        max_packages=r.get("max_packages", int, d.max_packages, _positive),
        max_request_bytes=r.get("max_request_bytes", int, d.max_request_bytes, _positive),
        keep_logs_days=r.get("keep_logs_days", int, d.keep_logs_days, _positive),
        keep_versions=r.get("keep_versions", int, d.keep_versions, _positive),
        max_versions=r.get("max_versions", int, d.max_versions,
                           lambda v: None if v >= 2 else "must be at least 2 (the current "
                           "version and the one being built)"),
        max_log_bytes=_size(r, "max_log_bytes", d.max_log_bytes, 1 << 20),
        limits=_limits(source, r),
        gc_grace=r.get("gc_grace", float, d.gc_grace,
                       lambda v: None if v >= 0 else "must not be negative"),
        gc_interval=r.get("gc_interval", float, d.gc_interval, _positive),
    )
    if cfg.keep_versions >= cfg.max_versions:
        r.fail("keep_versions", f"{cfg.keep_versions} must be less than requests.max_versions "
               f"({cfg.max_versions}), the cap that leaves room for the version being built")
    r.finish()
    return cfg


def _size(r: _Reader, key: str, default: int, least: int) -> int:
    """A size: bytes as an integer, or a string with a unit (``512M``, ``4G``: powers of
    1024); at least ``least`` (a bare ``4`` meant as gigabytes is refused, not obeyed)."""
    value = r.get(key, (int, str), default)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
        if m is None:
            r.fail(key, f"{value!r} is not a size: write bytes or a number with K, M, G or T "
                   "(e.g. 4G, 512M)")
        value = int(m[1]) * _SIZE_UNITS[m[2].upper()]
    if value < least:
        r.fail(key, f"{value} bytes is less than the least allowed, {format_size(least)} "
               "(a number without a unit is bytes: write e.g. 4G)")
    return int(value)


def _limits(source: str, r: _Reader) -> BuildLimits:
    """``requests.limits``: what one build may use (see ``BuildLimits``)."""
    d = BuildLimits()
    lim = _Reader(source, "requests.limits", r.get("limits", dict, None))
    out = BuildLimits(
        memory=_size(lim, "memory", d.memory, 16 << 20),
        tasks=lim.get("tasks", int, d.tasks,
                      lambda v: None if v >= 8 else "must be at least 8 (a build step is a "
                      "few processes before it runs anything)"),
        disk=_size(lim, "disk", d.disk, 1 << 20),
        cpu_weight=lim.get("cpu_weight", int, d.cpu_weight,
                           lambda v: None if 1 <= v <= 10000 else "must be 1 to 10000 (100 is "
                           "an equal share)"),
    )
    lim.finish()
    return out


# Set by the build's scrubbed environment itself (jobs.procs.scrubbed_env): not passed through.
_SCRUB_OWNS = frozenset({"PATH", "HOME", "TMPDIR", "USER", "LOGNAME"})


def _build_env(r: _Reader) -> tuple[str, ...]:
    """``requests.build_env``: names of environment variables, none the scrub sets itself."""
    names = r.strings("build_env")
    for j, name in enumerate(names):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            r.fail(f"build_env[{j}]", f"{name!r} is not an environment variable name")
        if name in _SCRUB_OWNS:
            r.fail(f"build_env[{j}]", f"{name} is set for every build by the daemon itself")
    return names


def _venv_base(source: str, r: _Reader) -> VenvBaseConfig | None:
    """``requests.venv_base``: the Python env venvs are built on, kept by the daemon in the
    root. Exclusive with ``venv_python`` (which interpreter would a venv run?)."""
    data = r.get("venv_base", dict, None)
    if data is None:
        return None
    if r.data.get("venv_python") is not None:
        r.fail("venv_base", "set either venv_base (a Python the daemon builds in the root) or "
               "venv_python (an interpreter you provide), not both")
    b = _Reader(source, "requests.venv_base", data)
    deps = b.strings("dependencies")
    if not any(re.split(r"[\s=<>!~\[]", dep, maxsplit=1)[0] == "python" for dep in deps):
        b.fail("dependencies", "must list python (e.g. [python=3.12]): it is the venvs' "
               "interpreter")
    channels = b.strings("channels")
    b.finish()
    return VenvBaseConfig(dependencies=deps, channels=channels)


def _check_venv_python(source: str, cfg: RequestsConfig, roots: tuple[RootConfig, ...]) -> None:
    """A venv runs its base interpreter for life (``pyvenv.cfg`` ``home``). On a root that other
    hosts and pods mount (a network or FUSE filesystem), a ``venv_python`` outside that root —
    the daemon's own ``/usr/bin/python3`` — is one they may not have, or have in another
    version: every venv built with it would be broken there. Refused here, not at the first
    build. The interpreter's real path counts (a symlink in the root to /usr/bin is outside)."""
    if "venv" not in cfg.allowed_backends or not cfg.enabled or cfg.venv_base is not None:
        return  # venv_base: a Python in the root by construction
    from .fsinfo import mount_of  # here: the filesystem is only asked when venvs are built

    root = requests_root_path(cfg, roots)
    if not os.path.isdir(root) or not mount_of(root).remote:
        return
    python = Path(os.path.normpath(cfg.venv_python))
    for path in (python, Path(os.path.realpath(python))):
        if root not in path.parents:
            _Reader(source, "requests", {}).fail(
                "venv_python", f"{cfg.venv_python} is outside the requests root {root}, which "
                "is on a network filesystem: a venv built with it runs that interpreter "
                f"({path}), which other hosts and user pods mounting {root} may not have. "
                "Let the daemon keep a Python in the root instead (requests.venv_base: "
                "{dependencies: [python=3.12]}, built with rattler), or remove venv from "
                "allowed_backends")


def _jupyterhub(source: str, data: Any, base: Path) -> JupyterHubConfig:
    h = _Reader(source, "jupyterhub", data)
    d = JupyterHubConfig()
    url = h.get("api_url", str, None, _hub_url)
    uids = h.get("shared_uids", list, [])
    for j, uid in enumerate(uids):
        if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
            h.fail(f"shared_uids[{j}]", "must be a numeric uid")
        if uid == 0:
            h.fail(f"shared_uids[{j}]", "must not be 0 (root is always an admin)")
    if uids and url is None:
        h.fail("api_url", "is required when shared_uids is set (where tokens are checked)")
    ca_file = _absolute(h, "ca_file", _relative_to(base, h.get("ca_file", str, None)))
    if ca_file is not None and not ca_file.is_file():
        h.fail("ca_file", f"{ca_file} is not a readable file (the hub's CA certificates, PEM)")
    cfg = JupyterHubConfig(
        api_url=None if url is None else url.rstrip("/"), shared_uids=tuple(uids),
        timeout=h.get("timeout", float, d.timeout, _positive),
        cache_seconds=h.get("cache_seconds", float, d.cache_seconds,
                            lambda v: None if v >= 0 else "must not be negative"),
        ca_file=ca_file,
        refusal_cache_seconds=h.get("refusal_cache_seconds", float, d.refusal_cache_seconds,
                                    lambda v: None if v >= 0 else "must not be negative"),
        verify_rate=h.get("verify_rate", float, d.verify_rate, _positive),
        verify_burst=h.get("verify_burst", int, d.verify_burst,
                           lambda v: None if v >= 1 else "must be at least 1"))
    h.finish()
    return cfg


def _hub_url(value: str) -> str | None:
    """An http(s) URL without credentials, query or fragment: tokens go in a header only."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
    except ValueError as exc:
        return f"is not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL, not {value!r}"
    if parts.username or parts.password or parts.query or parts.fragment:
        return "must not carry credentials, a query or a fragment"
    return None


def _kernels(source: str, data: Any, base: Path,
             roots: tuple[RootConfig, ...]) -> KernelsConfig:
    k = _Reader(source, "kernels", data)
    d = KernelsConfig()
    kdir = _absolute(k, "dir", _relative_to(base, k.get("dir", str, None)))
    if kdir is not None:
        # Inside a root, members may rename and replace entries: kernelspecs there could be
        # swapped for ones that start anything in anyone's Jupyter (resolved: a symlink too).
        real = Path(os.path.realpath(kdir))
        for i, root in enumerate(roots):
            rpath = Path(os.path.realpath(root.path))
            if kdir == root.path or root.path in kdir.parents or real == rpath \
                    or rpath in real.parents:
                raise ConfigError(f"{source}: kernels.dir: {kdir} is inside roots[{i}] "
                                  f"({root.path}), where its members could replace kernelspecs",
                                  hint="put kernels.dir outside every root, e.g. "
                                       "/usr/local/share/jupyter/kernels")
    prefix = k.get("display_prefix", str, d.display_prefix,
                   lambda v: None if 0 < len(v) <= 40 and v.isprintable()
                   else "must be 1-40 printable characters")
    k.finish()
    return KernelsConfig(dir=kdir, display_prefix=prefix)


def _relative_to(base: Path, value: str | None) -> str | None:
    """Paths under ``./`` in a config are relative to the config file (for the dev config)."""
    if value is not None and value.startswith("./"):
        return str(base / value[2:])
    return value


def parse(data: Any, source: str = "<memory>", base: Path | None = None) -> Config:
    """Validate a parsed YAML document; ``base`` anchors ``./`` paths (the config's folder)."""
    base = base or Path.cwd()
    top = _Reader(source, "", data)
    raw_roots = top.get("roots", list, None)
    if not raw_roots:
        top.fail("roots", "at least one root is required")
    for item in raw_roots:
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            item["path"] = _relative_to(base, item["path"])
    roots = tuple(_root(source, i, item) for i, item in enumerate(raw_roots))
    real = [Path(os.path.realpath(r.path)) for r in roots]  # what exists of each, resolved
    for i, a in enumerate(real):
        for j, b in enumerate(real):
            if i < j and (a == b or a in b.parents or b in a.parents):
                really = "" if (a, b) == (roots[i].path, roots[j].path) else \
                    f" (really {b} and {a})"
                top.fail(f"roots[{j}].path",
                         f"{roots[j].path} overlaps roots[{i}] ({roots[i].path}){really}")

    w = _Reader(source, "watch", top.get("watch", dict, None))
    dw = WatchConfig()
    watch = WatchConfig(
        mode=w.get("mode", str, dw.mode, lambda v: None if v in ("auto", "inotify", "poll")
                   else f"must be auto, inotify or poll, not {v!r}"),
        poll_interval=w.get("poll_interval", float, dw.poll_interval, _positive),
        full_scan_interval=w.get("full_scan_interval", float, dw.full_scan_interval, _positive),
        workers=w.get("workers", int, dw.workers, _positive),
        status_interval=w.get("status_interval", float, dw.status_interval, _positive),
    )
    w.finish()

    k = _Reader(source, "walk", top.get("walk", dict, None))
    concurrency = k.get("concurrency", (int, str), "auto",
                        lambda v: None if v == "auto" or (isinstance(v, int) and 1 <= v <= 256)
                        else "must be 'auto' or an integer from 1 to 256")
    k.finish()
    walk = WalkConfig(concurrency=None if concurrency == "auto" else concurrency)

    s = _Reader(source, "socket", top.get("socket", dict, None))
    mode = s.get("mode", (int, str), 0o660)
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            s.fail("mode", f"must be an octal mode like 0660, not {mode!r}")
    if not 0 <= mode <= 0o777:
        s.fail("mode", "must be between 0000 and 0777")
    sock_group = s.get("group", (str, int), None)
    if sock_group is not None:
        _gid(s, "group", sock_group)
    dflt = SocketConfig()
    socket_cfg = SocketConfig(
        path=_absolute(s, "path", _relative_to(base, s.get("path", str, DEFAULT_SOCKET)))
        or Path(DEFAULT_SOCKET),
        mode=mode, group=None if sock_group is None else str(sock_group),
        read_timeout=s.get("read_timeout", float, dflt.read_timeout, _positive),
        max_connections=s.get("max_connections", int, dflt.max_connections, _positive),
        max_connections_per_uid=s.get("max_connections_per_uid", int,
                                      dflt.max_connections_per_uid, _positive),
        admin_connections=s.get("admin_connections", int, dflt.admin_connections,
                                lambda v: None if v >= 0 else "must not be negative"))
    if socket_cfg.admin_connections >= socket_cfg.max_connections:
        s.fail("admin_connections", "must be less than max_connections (the rest is for "
               "everyone else)")
    s.finish()

    requests = _requests(source, top.get("requests", dict, None), roots, base)
    if requests.enabled:
        want = requests_root_path(requests, roots)
        roots = tuple(r._replace(holds_requests=True, exclude=(*r.exclude, DAEMON_AREA))
                      if r.path == want else r for r in roots)
        builders = {pwd.getpwnam(n).pw_uid  # their builds are healed like a member's work
                    for n in (*requests.build_users, *filter(None, [requests.build_user]))}
        if builders:
            roots = tuple(r._replace(member_uids=r.member_uids | builders)
                          if r.holds_requests and r.member_uids is not None else r
                          for r in roots)
    _check_venv_python(source, requests, roots)
    jupyterhub = _jupyterhub(source, top.get("jupyterhub", dict, None), base)
    kernels = _kernels(source, top.get("kernels", dict, None), base, roots)

    lg = _Reader(source, "logging", top.get("logging", dict, None))
    level = lg.get("level", str, "INFO",
                   lambda v: None if v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR")
                   else "must be DEBUG, INFO, WARNING or ERROR")
    journal = lg.get("journal", (str, bool), "auto")
    journal = {True: "true", False: "false"}.get(journal, journal)
    if journal not in ("auto", "true", "false"):
        lg.fail("journal", "must be auto, true or false")
    lg.finish()
    top.finish()
    return Config(roots=roots, watch=watch, walk=walk, socket=socket_cfg, requests=requests,
                  logging=LoggingConfig(level=level.upper(), journal=journal),
                  jupyterhub=jupyterhub, kernels=kernels, source=source)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; every failure is a ConfigError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read configuration: {exc.strerror}",
                          hint="pass --config with a readable file") from None
    import yaml  # here, not at the top: `envctl check --group` never reads YAML

    from .safeyaml import safe_load

    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}",
                          hint="fix the YAML there (indentation, quoting of ':' and '#')"
                          ) from None
    return parse(data, source=str(p), base=p.resolve().parent)


def single_root(path: str | os.PathLike[str], group: str, others: Others = "keep") -> Config:
    """A one-root config built from command-line flags (``envctl heal PATH --group G``).

    Requests are off: a tree named on the command line is not the daemon's requests root, so
    it gets the plain policy (no sticky bit on its top directory)."""
    return parse({"roots": [{"path": os.path.abspath(path), "group": group, "others": others}],
                  "requests": {"enabled": False}},
                 source="<command line>", base=Path("/"))  # no ./ paths: no cwd needed
