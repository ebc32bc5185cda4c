"""Every problem that would stop the daemon's start, found before the start changes anything.

Why: the start acts in order — every root watched and healed, the state dir made, the socket
bound — and a problem of a later step used to surface after the earlier ones had acted (a root
healed, a state dir made: by a daemon that then did not run), and one at a time (fix, start
again, meet the next). So each step's question is asked first, nothing is changed by asking,
and every answer is listed: a root that is missing, a socket directory that cannot be made or
is not the daemon's alone, a root daemon with requests on and no build account (the default
``envctl-build`` does not exist on a fresh machine) or one that cannot enter the requests root,
a state dir that is not the daemon's. Only a configuration with none is started.
"""

from __future__ import annotations

import os
import stat

from ..api.listener import parent_problem
from ..config import Config
from ..errors import ConfigError, EnvctlError, FilesystemError


def problems(config: Config, socket_activated: bool) -> list[EnvctlError]:
    """Every start problem of ``config`` (none: the start may begin); ``socket_activated``:
    systemd passed the listening socket, so its directory is systemd's business."""
    found: list[EnvctlError] = [*root_problems(config)]
    if not socket_activated:
        sock = parent_problem(config.socket.path)
        if sock is not None:
            found.append(sock)
    if config.requests.enabled:
        found += _state_dir_problems(config)
        found += _build_account_problems(config)
    return found


def root_problems(config: Config) -> list[ConfigError]:
    """Roots that are not existing directories (a symlink is not one)."""
    return [ConfigError(f"{config.source}: root {root.path} is not an existing directory",
                        hint="create the directory or fix roots[].path")
            for root in config.roots if not root.path.is_dir() or root.path.is_symlink()]


def _state_dir_problems(config: Config) -> list[EnvctlError]:
    """A state dir that exists and is not the daemon's directory (``StateDir.ensure`` would
    refuse it after the roots were healed)."""
    path = config.requests.state_dir
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []  # made at start, parents too
    except OSError as exc:
        return [FilesystemError(f"requests.state_dir {path}: {exc.strerror}")]
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return [FilesystemError(f"requests.state_dir {path} is not a directory of the "
                                f"daemon's uid {os.geteuid()} (owner uid {st.st_uid})",
                                hint="move it away, or set requests.state_dir")]
    return []


def _build_account_problems(config: Config) -> list[EnvctlError]:
    """A root daemon builds as unprivileged accounts only: none configured, or one that cannot
    enter the requests root, and every build would fail."""
    from ..jobs import procs  # the build side: loaded only when requests are on

    try:
        users = procs.build_users(config.requests)
    except ConfigError as exc:
        return [exc]
    root = config.requests_root.path
    if not root.is_dir():
        return []  # said by root_problems
    found: list[EnvctlError] = []
    for user in users:
        try:
            procs.check_reach(user, root)
        except ConfigError as exc:
            found.append(exc)
    return found
