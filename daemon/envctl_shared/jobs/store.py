"""SQLite persistence for jobs: the reason a daemon restart never loses one.

Why stdlib ``sqlite3`` in WAL mode: one local file, crash-safe commits, readers never blocked by
the writer, nothing to deploy. One connection shared by the manager's threads behind a lock
(every statement is short). The schema carries a version (``PRAGMA user_version``) so a later
daemon can upgrade the file in place; a file from a *newer* daemon is refused rather than
misread. A partial unique index makes "one queued or running job per env name" a database
invariant, so two concurrent submits of the same name cannot both be accepted.

Besides the public job fields, each row keeps the private copy of the spec and what recovery
needs after a ``kill -9``: the build's process group id, its leader's start time (to tell our
group from a recycled pid), the build uid and the build's cgroup (schema 2). Schema 3 adds the
verified JupyterHub user (``hub_user``); a hub token itself is never stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import Conflict, NotFound
from .model import Job, State

SCHEMA_VERSION = 4
MIN_PREFIX = 4  # hex digits of a job id that may stand for it when unique (ids have 12)
_HEX = re.compile(r"[0-9a-fA-F]+")
_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT,
    backend TEXT NOT NULL,
    requester_uid INTEGER NOT NULL,
    requester_gid INTEGER NOT NULL,
    requester_groups TEXT NOT NULL,
    requester_name TEXT NOT NULL,
    requester_pid INTEGER NOT NULL,
    claimed_user TEXT,
    replace INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    prefix TEXT NOT NULL,
    exit_detail TEXT,
    log_path TEXT NOT NULL,
    spec TEXT NOT NULL,
    build_uid INTEGER,
    pgid INTEGER,
    pgid_start INTEGER,
    cgroup TEXT,
    hub_user TEXT,
    hub_id TEXT
);
CREATE UNIQUE INDEX jobs_active_name ON jobs(name) WHERE state IN ('queued', 'running');
CREATE INDEX jobs_state ON jobs(state, created_at);
"""
_PUBLIC = ("id, name, state, phase, backend, requester_uid, requester_gid, requester_groups, "
           "requester_name, claimed_user, replace, created_at, started_at, finished_at, prefix, "
           "exit_detail, log_path, hub_user, hub_id")


def _job(row: tuple[Any, ...]) -> Job:
    (jid, name, state, phase, backend, uid, gid, groups, rname, claimed, replace, created,
     started, finished, prefix, detail, log_path, hub_user, hub_id) = row
    return Job(id=jid, name=name, state=State(state), phase=phase, backend=backend,
               requester_uid=uid, requester_gid=gid,
               requester_groups=tuple(json.loads(groups)), requester_name=rname,
               claimed_user=claimed, replace=bool(replace), created_at=created,
               started_at=started, finished_at=finished, prefix=prefix, exit_detail=detail,
               log_path=log_path, hub_user=hub_user, hub_id=hub_id)


class JobStore:
    """The jobs table; every method is one short transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Called with a job's id after each insert and each update that changed it (outside the
        # store's lock): the daemon publishes the job to the other hosts (``cluster``).
        self.on_change: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        # The daemon's alone, 0600 (its -wal and -shm take the same mode from it): specs,
        # requesters and hub users of every job are not for any local user to read (the
        # protocol shows a user their own jobs only). Earlier daemons made it 0644.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(name, 0o600)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._upgrade()

    def _upgrade(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise Conflict(f"{self.path} was written by a newer envctld (schema {version}, "
                               f"this one knows {SCHEMA_VERSION})",
                               hint="run the newer daemon, or move the state directory aside")
            if version == 0:
                self._db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION};"
                                       " COMMIT;")
            elif version < SCHEMA_VERSION:  # cgroup: schema 2, hub_user: 3, hub_id: 4
                added = {1: ("cgroup", "hub_user", "hub_id"), 2: ("hub_user", "hub_id"),
                         3: ("hub_id",)}[version]
                self._db.executescript("BEGIN; " + "".join(
                    f"ALTER TABLE jobs ADD COLUMN {col} TEXT; " for col in added)
                    + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, job: Job, spec_text: str, requester_pid: int) -> None:
        """Persist a new queued job; Conflict if a queued/running job has the same name."""
        d = job
        try:
            with self._lock:
                self._db.execute(
                    f"INSERT INTO jobs ({_PUBLIC}, requester_pid, spec) VALUES "
                    "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (d.id, d.name, d.state.value, d.phase, d.backend, d.requester_uid,
                     d.requester_gid, json.dumps(list(d.requester_groups)), d.requester_name,
                     d.claimed_user, int(d.replace), d.created_at, d.started_at, d.finished_at,
                     d.prefix, d.exit_detail, d.log_path, d.hub_user, d.hub_id, requester_pid,
                     spec_text))
        except sqlite3.IntegrityError:
            raise Conflict(f"a build of {job.name!r} is already queued or running",
                           hint="wait for it to finish (envctl request list), or cancel it"
                           ) from None
        self._changed(job.id)

    def _changed(self, job_id: str) -> None:
        if self.on_change is not None:
            self.on_change(job_id)

    def get(self, job_id: str) -> Job:
        """The job ``job_id`` names: its full id, or (git-style) a unique prefix of at least
        MIN_PREFIX hex digits, which is what people copy from a table."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_PUBLIC} FROM jobs WHERE id=?",
                                    (job_id,)).fetchall()
            if not rows and MIN_PREFIX <= len(job_id) and _HEX.fullmatch(job_id):
                rows = self._db.execute(f"SELECT {_PUBLIC} FROM jobs WHERE substr(id, 1, ?)=?"
                                        " LIMIT 2", (len(job_id), job_id.lower())).fetchall()
        if not rows:
            raise NotFound(f"no job {job_id!r}", hint="list jobs with: envctl request list "
                           "--finished (or --all --finished for everyone's)")
        if len(rows) > 1:
            raise NotFound(f"job id prefix {job_id!r} is ambiguous",
                           hint="give more digits of the id (envctl request list --finished)")
        return _job(rows[0])

    def spec_text(self, job_id: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT spec FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return str(row[0])

    def list(self, uid: int | None = None, include_finished: bool = False,
             states: tuple[State, ...] | None = None, hub_user: str | None = None) -> list[Job]:
        """Jobs oldest first, filtered by state and/or owner: with ``uid``, that uid's jobs of
        ``hub_user`` (None: the jobs no hub user made)."""
        where, args = [], []  # type: list[str], list[Any]
        if uid is not None:
            where.append("requester_uid=? AND hub_user IS ?")
            args.extend((uid, hub_user))
        if states is None and not include_finished:
            states = (State.QUEUED, State.RUNNING)
        if states is not None:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(s.value for s in states)
        sql = f"SELECT {_PUBLIC} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at, id", args).fetchall()
        return [_job(r) for r in rows]

    def update(self, job_id: str, *, expect: tuple[State, ...] | None = None,
               **fields: Any) -> bool:
        """Set columns; with ``expect``, only if the job is still in one of those states.

        Returns whether a row changed: the compare-and-set is what keeps a cancel and a build
        finishing at the same moment from both writing a terminal state.
        """
        cols = []
        vals: list[Any] = []
        for key, value in fields.items():
            cols.append(f"{key}=?")
            vals.append(value.value if isinstance(value, State) else value)
        sql = f"UPDATE jobs SET {', '.join(cols)} WHERE id=?"
        vals.append(job_id)
        if expect:
            sql += f" AND state IN ({','.join('?' * len(expect))})"
            vals.extend(s.value for s in expect)
        with self._lock:
            changed: bool = self._db.execute(sql, vals).rowcount == 1
        if changed:
            self._changed(job_id)
        return changed

    def process(self, job_id: str) -> tuple[int | None, int | None, int | None, str | None]:
        """(build uid, pgid, leader start time, cgroup) recorded for a running job."""
        with self._lock:
            row = self._db.execute("SELECT build_uid, pgid, pgid_start, cgroup FROM jobs "
                                   "WHERE id=?", (job_id,)).fetchone()
        return (None, None, None, None) if row is None else (row[0], row[1], row[2], row[3])

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = {s.value: 0 for s in State}
        out.update({state: n for state, n in rows})
        return out
