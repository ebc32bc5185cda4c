"""The jobs layer's value types: who asked (``Requester``), and what became of it (``Job``).

Why frozen dataclasses: a ``Job`` is a snapshot read from SQLite and handed to the API thread;
nobody may mutate it behind the store's back. ``Job.to_dict()`` is the protocol's job object,
with these stable keys (times are Unix seconds, or null when not reached yet)::

    id, name, state, phase, backend, requester: {uid, gid, groups, name}, hub_user,
    claimed_user, replace, created_at, started_at, finished_at, prefix, exit_detail, log_path,
    terminal

``state`` is one of queued, running, succeeded, failed, cancelled, interrupted; ``phase`` is the
running build's current step (``preparing``, ``solving``, ``downloading``, ``linking``,
``creating``, ``installing``, ``building``, ``freezing``, ``testing``, ``finalizing``,
``cleanup``) or
null. ``claimed_user`` is what the
client *said* it acts for (JUPYTERHUB_USER): recorded for audit, never used to authorise.
``hub_user`` is the JupyterHub user the hub itself named as the owner of the client's token
(peers on ``jupyterhub.shared_uids``), or null. Its stable identity (``hub_id``: the hub's
``created`` time of the user, which survives a rename) is kept in the store and the env records,
not in the job object.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


@dataclass(frozen=True)
class Requester:
    """The kernel-verified identity of a client (SO_PEERCRED), built by the API layer."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    pid: int
    username: str  # pwd name of uid (or str(uid))
    claimed_user: str | None  # unverified claim (JUPYTERHUB_USER), recorded only
    is_admin: bool
    hub_user: str | None = None  # verified by the hub (peers on jupyterhub.shared_uids)
    hub_groups: tuple[str, ...] = ()
    hub_id: str | None = None  # the hub's stable identity of hub_user (None: not told)

    def matches(self, uid: object, hub_user: object, hub_id: object) -> bool:
        """The one ownership rule (jobs and environments): the same uid and the same hub user
        (None on both sides off the hub) — on a shared uid the uid alone would make every hub
        user the owner of everything. A recorded ``hub_id`` decides who that hub user is: a
        renamed user still matches, a new user given the old name does not, and a requester
        whose token does not show the hub_id cannot prove it is the same. Without a recorded
        ``hub_id`` (records older than it, or made with a token that does not show it), the
        name decides."""
        if uid != self.uid or (hub_user is None) != (self.hub_user is None):
            return False
        if hub_user is None:
            return True
        return self.hub_id == hub_id if hub_id is not None else hub_user == self.hub_user

    def owns(self, job: Job) -> bool:
        return self.matches(job.requester_uid, job.hub_user, job.hub_id)

    @property
    def who(self) -> str:
        """How records and messages name this requester."""
        if self.hub_user is not None:
            return f"hub user {self.hub_user} (uid {self.uid})"
        return f"{self.username} (uid {self.uid})"

    @property
    def subject(self) -> str:
        """How a refusal addresses this requester: the hub user when verified (the uid is
        every hub user's), else the Unix user."""
        if self.hub_user is not None:
            return f"hub user {self.hub_user}"
        return f"user {self.username} (uid {self.uid})"


class State(str, Enum):
    """A job's lifecycle: queued → running → one of the four terminal states."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the daemon went away (stop or crash) while it was running

    @property
    def terminal(self) -> bool:
        return self not in (State.QUEUED, State.RUNNING)


@dataclass(frozen=True)
class Job:
    """One environment request as persisted; see the module docstring for ``to_dict``."""

    id: str
    name: str
    state: State
    phase: str | None
    backend: str
    requester_uid: int
    requester_gid: int
    requester_groups: tuple[int, ...]
    requester_name: str
    claimed_user: str | None
    replace: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    prefix: str
    exit_detail: str | None
    log_path: str
    hub_user: str | None = None
    hub_id: str | None = None  # the hub user's stable identity (not in ``to_dict``)
    # Another host's job, read from its record in the root (``cluster``): that host, and
    # whether its daemon is alive (None: cannot tell). None for this daemon's own jobs.
    host: str | None = None
    host_alive: bool | None = None

    @property
    def terminal(self) -> bool:
        """True once the job can change no more (succeeded, failed, cancelled, interrupted)."""
        return self.state.terminal

    @property
    def owner(self) -> str:
        """Who the job belongs to, as messages name them."""
        return f"hub user {self.hub_user}" if self.hub_user else self.requester_name

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "phase": self.phase,
            "backend": self.backend,
            "requester": {"uid": self.requester_uid, "gid": self.requester_gid,
                          "groups": list(self.requester_groups), "name": self.requester_name},
            "hub_user": self.hub_user,
            "claimed_user": self.claimed_user,
            "replace": self.replace,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "prefix": self.prefix,
            "exit_detail": self.exit_detail,
            "log_path": self.log_path,
            "terminal": self.terminal,
            "host": self.host,
            "host_alive": self.host_alive,
        }
