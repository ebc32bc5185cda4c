"""Environment requests: validated, persisted, locked, built as an unprivileged user, healed.

The jobs layer sits between the healer and the socket API. It knows nothing about sockets: the API
builds a :class:`~envctl_shared.jobs.model.Requester` from the kernel's peer credentials and calls
:class:`~envctl_shared.jobs.manager.JobManager`. Roles, one module each:

- ``model``: the value types the API serialises (``Job.to_dict`` is the wire format);
- ``spec``: env-name and environment.yml validation (bad input is refused before anything exists);
- ``store``: SQLite persistence, so a daemon restart never loses a job;
- ``layout``: the daemon-owned directories (``<root>/.envctl``, the state dir), created and
  re-opened without following symlinks, refusing anything tampered with;
- ``lock``: one build per env name, also across daemons on other hosts (``fcntl`` locks);
- ``procs``: spawning a build as the build user in its own process group, and killing groups
  (including orphans left by a ``kill -9``-ed daemon);
- ``runner``: one job from lock to healed, renamed prefix; ``backends``: the command lines;
- ``base_python``: the venvs' base Python the daemon keeps in the root (``requests.venv_base``);
- ``manager``: the scheduler and the public API.
"""

from .manager import JobManager
from .model import Job, Requester, State

__all__ = ["Job", "JobManager", "Requester", "State"]
