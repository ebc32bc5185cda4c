"""The socket server the daemon runs: accept loop, one thread per connection, hard limits.

Why threads and not asyncio: the work behind each op (SQLite reads, waiting on a job) is
blocking, the connection count is bounded, and a thread per connection keeps one slow or
vanished client from ever stalling another. The limits that make an unprivileged peer harmless:

- a request line may be at most ``requests.max_request_bytes``, enforced while reading (the
  buffer never grows past it; the connection is closed because the stream cannot be resynced);
- a whole request line must arrive within ``socket.read_timeout`` seconds (a client that
  trickles bytes or never sends a newline is dropped), and a reply must be taken within the
  same time (a client that stops reading is dropped);
- at most ``socket.max_connections`` connections; one more is told "busy" and closed. Of
  those, ``socket.admin_connections`` are kept for admins (the readiness probe runs as one),
  and one uid that is not an admin holds at most ``socket.max_connections_per_uid``: a user
  who opens (and keeps reopening) hundreds of connections is refused beyond its share and
  named in the log, while everyone else, and above all the admins, are still served. The
  peer's uid comes from ``SO_PEERCRED`` at accept time, before a thread is spent on it;
- anything that is not a valid request gets an error reply and the connection keeps serving.

``heartbeat()`` is the monotonic time of the accept loop's last turn: the daemon feeds the
systemd watchdog only while it advances.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import DaemonUnavailable, EnvctlError, ProtocolError
from . import protocol
from .handlers import Handlers, StatusFn
from .listener import bind_unix
from .peercred import PeerCred, peer_cred

if TYPE_CHECKING:  # the manager is only ever handed to us by the daemon
    from ..jobs.manager import JobManager

log = logging.getLogger(__name__)

TICK = 0.5  # accept-loop period: bounds heartbeat staleness and shutdown latency
# At stop, how long connections get to end by themselves before they are hung up on: a
# follower (``logs -f``) notices the stop within its poll (handlers.FOLLOW_POLL) and tells its
# client the truth ("shutting down", the job to look up) instead of a bare hang-up.
GOODBYE = 0.5
RECV_SIZE = 65536
BUSY_LOG_EVERY = 10.0  # at most one "busy" warning per uid per this many seconds (a flood
                       # must not become a log flood)


class _LineReader:
    """Reads newline-terminated requests with a size cap and a per-line deadline."""

    def __init__(self, conn: socket.socket, max_bytes: int, timeout: float) -> None:
        self.conn = conn
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.buf = bytearray()

    def readline(self) -> bytes | None:
        """The next line without its newline; None at EOF. Raises ProtocolError (too long) or
        TimeoutError (deadline)."""
        deadline = time.monotonic() + self.timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                if nl > self.max_bytes:
                    raise self._too_long()
                line = bytes(self.buf[:nl])
                del self.buf[:nl + 1]
                return line
            if len(self.buf) > self.max_bytes:
                raise self._too_long()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.conn.settimeout(remaining)
            chunk = self.conn.recv(min(RECV_SIZE, self.max_bytes + 1 - len(self.buf)))
            if not chunk:
                return None
            self.buf += chunk

    def _too_long(self) -> ProtocolError:
        return ProtocolError(f"request larger than {self.max_bytes} bytes",
                             hint="requests.max_request_bytes limits one request line; "
                             "shrink the environment file")


class Server:
    """The daemon's request socket; see the module docstring for its guarantees."""

    def __init__(self, config: Config, jobs: JobManager | None, status: StatusFn) -> None:
        self.config = config
        self._stopping = threading.Event()
        self.handlers = Handlers(config, jobs, status, self._stopping)
        self._listen: socket.socket | None = None
        self._owns_path = False
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._held: Counter[int] = Counter()  # open connections of each non-admin uid
        self._lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None
        self._beat = time.monotonic()
        self._refused: Counter[int] = Counter()  # connections turned away as "busy", per uid
        self._busy_logged: dict[int, float] = {}  # uid -> when its last "busy" line was logged

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, listen_sock: socket.socket | None = None) -> None:
        """Serve on ``listen_sock`` (inherited from systemd; never unlinked) or bind
        ``socket.path`` ourselves (see ``listener``)."""
        if listen_sock is None:
            self._listen = bind_unix(self.config.socket)
            self._owns_path = True
        else:
            self._listen = listen_sock
            log.info("api listening inherited_fd=%d", listen_sock.fileno())
        self._listen.settimeout(TICK)
        self._beat = time.monotonic()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="api-accept",
                                               daemon=True)
        self._accept_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, hang up on every client, remove the socket file if we created it."""
        self._stopping.set()
        self.handlers.refusals.close()  # what a flood held back is told now, not lost
        if self._accept_thread is not None:
            self._wake_accept()
            self._accept_thread.join(timeout)
        with self._lock:
            conns = dict(self._conns)
        goodbye = time.monotonic() + GOODBYE
        for thread in conns.values():
            thread.join(max(0.0, goodbye - time.monotonic()))
        for conn, thread in conns.items():
            if not thread.is_alive():
                continue
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._listen is not None:
            if self._owns_path:
                try:
                    self.config.socket.path.unlink()
                except FileNotFoundError:
                    pass
            self._listen.close()
        deadline = time.monotonic() + timeout
        for thread in conns.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _wake_accept(self) -> None:
        """Wake the accept loop now rather than at its next TICK (every stop, restart and
        reload of a test or a service would wait for it): one connection to our own socket,
        which the loop, seeing ``_stopping``, closes. (A ``shutdown`` of the listening socket
        would wake it too, but an inherited socket is systemd's, kept for the next daemon.)"""
        assert self._listen is not None
        try:
            path = self._listen.getsockname()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as poke:
                poke.settimeout(0.2)
                poke.connect(path)
        except OSError:
            pass  # then the loop ends at its next tick

    def reload(self, config: Config, jobs: JobManager | None) -> None:
        """Limits, authorisation lists and the job manager (requests switched on or off) apply
        to the next request; the socket's path, mode and group are fixed until a restart (it
        is already bound and may be inherited)."""
        if config.socket != self.config.socket:
            log.warning("api socket settings changed; they take effect at the next restart")
        self.config = config
        self.handlers.reload(config)
        self.handlers.jobs = jobs

    def heartbeat(self) -> float:
        return self._beat

    # -- accept loop -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listen is not None
        while not self._stopping.is_set():
            self._beat = time.monotonic()
            try:
                conn, _ = self._listen.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("api accept_error=%s", exc)
                time.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            if self._stopping.is_set():  # our own wake-up call, or a client too late
                conn.close()
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        try:
            cred = peer_cred(conn)
        except OSError as exc:  # the peer is already gone
            log.debug("api connection_closed reason=%s", exc.__class__.__name__)
            conn.close()
            return
        admin = self.handlers.auth.is_admin(cred)
        with self._lock:
            limit = self._limit_reached(cred.uid, admin)
            if limit is None:
                thread = threading.Thread(target=self._serve, args=(conn, cred, admin),
                                          daemon=True, name=f"api-conn-{conn.fileno()}")
                self._conns[conn] = thread
                if not admin:
                    self._held[cred.uid] += 1
        if limit is not None:
            self._refuse_busy(conn, cred, limit)
            return
        thread.start()

    def _limit_reached(self, uid: int, admin: bool) -> tuple[str, int] | None:
        """The limit (config key, value) a new connection of ``uid`` would break, or None.
        Called with the lock held."""
        cfg = self.config.socket
        if len(self._conns) >= cfg.max_connections:
            return "max_connections", cfg.max_connections
        if admin:
            return None
        if len(self._conns) >= cfg.max_connections - cfg.admin_connections:
            return "admin_connections", cfg.admin_connections
        if self._held[uid] >= cfg.max_connections_per_uid:
            return "max_connections_per_uid", cfg.max_connections_per_uid
        return None

    def _refuse_busy(self, conn: socket.socket, cred: PeerCred, limit: tuple[str, int]) -> None:
        """Tell the peer why, log who (at most once per uid per BUSY_LOG_EVERY), hang up."""
        self._refused[cred.uid] += 1
        now = time.monotonic()
        if now - self._busy_logged.get(cred.uid, -BUSY_LOG_EVERY) > BUSY_LOG_EVERY:
            if len(self._busy_logged) > 4096:  # forget quiet uids; the maps stay small
                self._busy_logged = {u: t for u, t in self._busy_logged.items()
                                     if now - t <= BUSY_LOG_EVERY}
                self._refused = Counter({u: n for u, n in self._refused.items()
                                         if u in self._busy_logged or u == cred.uid})
            self._busy_logged[cred.uid] = now
            log.warning("api busy uid=%d pid=%d limit=%s max=%d held=%d refused=%d", cred.uid,
                        cred.pid, *limit, self._held[cred.uid], self._refused[cred.uid])
        key, value = limit
        message = (f"too many connections from uid {cred.uid} (socket.{key} is {value})"
                   if key == "max_connections_per_uid" else
                   f"the daemon is serving too many connections (socket.{key} is {value})")
        self._send_quietly(conn, protocol.error(DaemonUnavailable(
            message, hint="retry in a moment; close connections you no longer use")))
        _drain(conn, self.config.requests.max_request_bytes, seconds=0)  # never block here
        conn.close()

    # -- one connection --------------------------------------------------------------------

    def _serve(self, conn: socket.socket, cred: PeerCred, admin: bool) -> None:
        try:
            self._converse(conn, cred)
        except (TimeoutError, OSError) as exc:
            log.debug("api connection_closed reason=%s", exc.__class__.__name__)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
                if not admin:
                    self._held[cred.uid] -= 1
                    if not self._held[cred.uid]:
                        del self._held[cred.uid]
            conn.close()

    def _converse(self, conn: socket.socket, cred: PeerCred) -> None:
        cfg = self.config
        reader = _LineReader(conn, cfg.requests.max_request_bytes, cfg.socket.read_timeout)
        while not self._stopping.is_set():
            try:
                line = reader.readline()
            except ProtocolError as err:
                log.info("api refused reason=oversized uid=%d pid=%d", cred.uid, cred.pid)
                self._send(conn, protocol.error(err))
                _drain(conn, 4 * cfg.requests.max_request_bytes)
                return
            except TimeoutError:
                log.debug("api timeout uid=%d pid=%d partial=%d", cred.uid, cred.pid,
                          len(reader.buf))
                if reader.buf:  # a request was started and never finished: say why we hang up
                    self._send_quietly(conn, protocol.error(ProtocolError(
                        f"request not completed within {cfg.socket.read_timeout:g}s",
                        hint="send the whole request line, ending with a newline")))
                return
            if line is None:
                return
            if not line.strip():
                continue
            for message in self._replies(line, cred, conn):
                self._send(conn, message)

    def _replies(self, line: bytes, cred: PeerCred, conn: socket.socket) -> Iterator[dict]:
        """The messages answering one line; any error becomes the last (error) message."""
        try:
            req = protocol.parse_request(line)
            log.debug("api request op=%s uid=%d pid=%d", req.op.name, cred.uid, cred.pid)
            yield from self.handlers.handle(req, cred, lambda: _hung_up(conn))
        except EnvctlError as err:
            yield protocol.error(err)
        except Exception:  # a bug in a handler must not take the connection's peers down
            log.exception("api internal_error uid=%d", cred.uid)
            yield protocol.error(EnvctlError("internal error in the daemon",
                                             hint="the daemon's log has the details"))

    def _send(self, conn: socket.socket, message: dict) -> None:
        conn.settimeout(self.config.socket.read_timeout)
        conn.sendall(protocol.encode(message))

    @staticmethod
    def _send_quietly(conn: socket.socket, message: dict) -> None:
        try:
            conn.settimeout(0.1)
            conn.sendall(protocol.encode(message))
        except OSError:
            pass


def _hung_up(conn: socket.socket) -> bool:
    """True when the peer has closed its end during a stream (a non-blocking peek sees EOF).

    The socket is switched to non-blocking first: with a timeout set, Python would wait for
    readability before the recv, whatever the flags. ``_send`` restores the timeout.
    """
    try:
        conn.settimeout(0)
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False  # nothing to read: still there
    except OSError:
        return True


def _drain(conn: socket.socket, limit: int, seconds: float = 1.0) -> None:
    """Swallow (a bounded amount of) what the client is still sending before we close.

    Closing with unread input makes the kernel send RST, and the client would see "connection
    reset" instead of our error reply; a bounded drain lets the reply arrive intact.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        while limit > 0:
            conn.settimeout(max(0.0, deadline - time.monotonic()))  # 0: only what is there
            chunk = conn.recv(min(RECV_SIZE, limit))
            if not chunk:
                return
            limit -= len(chunk)
    except OSError:
        pass
