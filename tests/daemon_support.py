"""Start a real ``envctld`` from a test, know when it is ready, stop it cleanly.

Readiness is the real signal systemd would get: each daemon gets its own ``NOTIFY_SOCKET`` (a
datagram socket the test binds) and :meth:`Envctld.start` returns when ``READY=1`` arrives, so
no test sleeps and hopes. Every sd_notify message is kept (``messages``) for tests of STATUS=,
RELOADING=1, WATCHDOG=1 and STOPPING=1. stderr goes to a file (``log_text()``) so tests can
assert on key=value log lines. The ``envctld`` fixture (``tests.fixtures_daemon``) stops
whatever was started, whatever happened in the test: a daemon left running would keep healing
the next test's tree.

Usage::

    pytest_plugins = ("tests.fixtures_daemon",)

    def test_x(envctld, scratch):
        cfg = write_config(scratch, roots=[(root, group)])
        d = envctld(cfg)              # started, READY=1 received
        ...
        d.stop()                      # SIGTERM, asserts exit code 0
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import VENV_BIN

ENVCTLD = str(VENV_BIN / "envctld")


def write_config(directory: Path, roots: list[tuple[Path, str]], *, name: str = "envctld.yaml",
                 others: str = "keep", watch: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """A daemon config in ``directory`` watching ``roots`` [(path, group)], requests off,
    its socket (status only) in ``directory``."""
    data: dict[str, Any] = {
        "roots": [{"path": str(p), "group": g, "others": others} for p, g in roots],
        "watch": {"poll_interval": 1, "status_interval": 60, **(watch or {})},
        "requests": {"enabled": False},
        "socket": {"path": str(directory / "envctld.sock")},
        "logging": {"level": "INFO"},
    }
    data.update(extra or {})
    path = directory / name
    path.write_text(yaml.safe_dump(data))
    return path


class Envctld:
    """One daemon process with its own notify socket."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), host: str | None = None) -> None:
        """``host``: run in a UTS namespace of its own with this host name (a simulated host
        of a cluster sharing one root; the pid is still the daemon's)."""
        self.config = config
        self.host = host
        self.workdir = workdir
        self.extra_env = env or {}
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self.log_path = workdir / f"envctld-{id(self)}.log"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0, wait_ready: bool = True) -> Envctld:
        notify_path = self.workdir / f"notify-{id(self)}.sock"
        notify_path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(notify_path))
        self._sock.settimeout(0.2)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **self.extra_env}
        env.pop("JOURNAL_STREAM", None)
        with open(self.log_path, "ab") as log:
            wrap = ([] if self.host is None else
                    ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.host])
            self.proc = subprocess.Popen([*wrap, ENVCTLD, "--config", str(self.config),
                                          *self.args],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, start_new_session=True)
        if wait_ready:
            self.wait_message(lambda m: "READY=1" in m, timeout, "READY=1")
        return self

    def restart(self, timeout: float = 60.0) -> Envctld:
        """Start again with the same config (after :meth:`kill9` or :meth:`stop`)."""
        self._close_socket()
        with self._cond:
            self.messages.clear()
        return self.start(timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, and assert the daemon exited 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._close_socket()
        assert rc == 0, f"envctld exited {rc}\n{self.log_text()[-4000:]}"
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def reload(self, timeout: float = 60.0) -> str:
        """SIGHUP, wait for RELOADING=1 then READY=1; returns the READY message."""
        n = len(self.messages)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.wait_message(lambda m: "RELOADING=1" in m, timeout, "RELOADING=1", after=n)
        return self.wait_message(lambda m: "READY=1" in m, timeout, "READY=1 after reload",
                                 after=n)

    def start_failing(self, timeout: float = 60.0) -> int:
        """Start a daemon that must refuse to start; its exit code (cleaned up either way)."""
        try:
            self.start(wait_ready=False)
            assert self.proc is not None
            return self.proc.wait(timeout)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_socket()

    # -- observing ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_message(self, pred: Callable[[str], bool], timeout: float, what: str,
                     after: int = 0) -> str:
        """The first notify message (from index ``after``) matching ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages[after:]:
                    if pred(m):
                        return m
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"envctld exited {self.proc.returncode} before {what}"
                                         f"\n{self.log_text()[-4000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout}s\n"
                                         f"{self.log_text()[-4000:]}")
                self._cond.wait(min(left, 0.2))

    def _read(self) -> None:
        sock = self._sock
        while sock is not None and self._sock is sock:  # until _close_socket takes it
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self._received(data)

    def _received(self, data: bytes) -> None:
        with self._cond:
            self.messages.append(data.decode(errors="replace"))
            self._cond.notify_all()

    def _close_socket(self) -> None:
        """Stop reading notify messages — after the last ones sent: a daemon that has exited
        may have left its STOPPING=1 queued on the socket, unread by a reader thread a loaded
        machine had not scheduled yet, and closing the socket would drop it."""
        if self._sock is not None:
            sock, self._sock = self._sock, None
            if self._reader is not None:
                self._reader.join(2)  # it sees the socket taken within its 0.2 s timeout
            sock.setblocking(False)
            try:
                while True:
                    self._received(sock.recv(65536))
            except OSError:
                pass  # BlockingIOError: nothing left
            sock.close()
