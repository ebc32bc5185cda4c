"""``envctld``: the foreground process: signals, readiness, reloads, status and the watchdog.

Why a thin loop on the main thread: Python runs signal handlers only there, so the handlers just
set flags and wake the loop, and the loop does the work (reload, shutdown) outside any handler.
The same loop tells the service manager the truth: ``READY=1`` only after every root has been
watched and reconciled, ``WATCHDOG=1`` only while every worker and the server show recent
progress (a wedged worker stops the pings, and systemd restarts us), ``STOPPING=1`` on the way
out. Exit codes: 0 after SIGTERM/SIGINT, 64 for a wrong command line, the error's exit code
(sysexits) when startup fails, 70 (EX_SOFTWARE) when a root fails at run time (its watch cannot
be rebuilt, one of its threads died): running on without real-time healing would be a blind
spot nobody sees, so the daemon says why, stops, and leaves the restart to systemd
(``Restart=on-failure``) or Kubernetes.
Before the start changes anything, ``preflight`` lists every problem that would stop it (all of
them, one ERROR line each) and the daemon exits with the first one's code.

Test hook: ``ENVCTL_TEST_WEDGE_AFTER=<seconds>`` makes one heal worker per root block forever
after that many seconds, so tests can prove the watchdog fires. It is read only from the
environment and does nothing when unset.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import NoReturn

from .. import __version__
from ..config import Config, load
from ..errors import EX_SOFTWARE, EX_USAGE, EnvctlError
from ..watch.service import IDLE_TICK
from . import logsetup, preflight, systemd
from .service import Daemon

log = logging.getLogger(__name__)
STATUS_NOTIFY_EVERY = 5.0  # seconds between STATUS= updates
STALE_DEFAULT = 60.0  # progress older than this is "stuck" when systemd sets no watchdog


class _Signals:
    """Flags set by signal handlers; ``wake`` interrupts the main loop's wait."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop = False
        self.reload = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True
        self.wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload = True
        self.wake.set()


class _Parser(argparse.ArgumentParser):
    """argparse, but a wrong command line exits 64 (EX_USAGE) like the CLI's, not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"envctld: error: {message}\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="envctld", description="Heal shared environment roots in real time and "
                "serve environment requests.")
    p.add_argument("--config", required=True, help="the daemon's YAML configuration")
    p.add_argument("--debug", action="store_true", help="log at DEBUG level")
    p.add_argument("--version", action="version", version=f"envctld {__version__}")
    args = p.parse_args(argv)
    # absolute: status and every message name the file wherever they are read (make run's
    # --config var/dev.yaml said "var/dev.yaml" to a status asked from anywhere)
    args.config = os.path.abspath(args.config)
    return args


def _wedge_after() -> float | None:
    value = os.environ.get("ENVCTL_TEST_WEDGE_AFTER")
    return float(value) if value else None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        config = load(args.config)
    except EnvctlError as exc:
        print(f"envctld: error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""),
              file=sys.stderr)
        return exc.exit_code
    logsetup.setup(config.logging, args.debug)
    # Whatever umask we were started with (a container's 077): the daemon gives every file
    # and directory it makes its mode at creation, and a chmod after creation can race the
    # healer's own (see jobs.layout.make_owned_dir). Builds set their own umask.
    os.umask(0o022)
    listen_sock = systemd.listen_socket()
    found = preflight.problems(config, socket_activated=listen_sock is not None)
    if found:  # every one, and nothing changed yet: no root healed, no state dir made
        for problem in found:
            log.error("startup problem error=%s hint=%s", problem.message, problem.hint or "")
        log.error("startup refused problems=%d changed=nothing", len(found))
        return found[0].exit_code
    signals = _Signals()
    daemon = Daemon(config, wedge_after=_wedge_after(), on_failure=signals.wake.set)
    t0 = time.monotonic()
    try:
        daemon.start(listen_sock)
    except EnvctlError as exc:
        log.error("startup failed error=%s hint=%s", exc.message, exc.hint or "")
        daemon.stop(1.0)
        return exc.exit_code
    except Exception:
        log.exception("startup failed")
        daemon.stop(1.0)
        return EX_SOFTWARE
    if daemon.failure is None:
        log.info("ready roots=%d start=%.3f pid=%d", len(config.roots), time.monotonic() - t0,
                 os.getpid())
        systemd.notify(f"READY=1\nSTATUS={daemon.summary()}")
        _loop(daemon, signals, args)
    if daemon.failure is not None:
        log.error("failed error=%s action=exit hint=the service manager restarts the daemon; "
                  "the lines above say what failed", daemon.failure)
        systemd.notify(f"STATUS=failed: {daemon.failure}\nSTOPPING=1")
        daemon.stop(5.0)
        # Leave without interpreter teardown: a failed daemon's threads may be stuck (that
        # can be why it failed), and out of fds, a thread ending at teardown aborts the process
        # (pthread_exit cannot load libgcc_s) instead of exiting with our code.
        logging.shutdown()
        os._exit(EX_SOFTWARE)
    systemd.notify("STOPPING=1")
    log.info("stopping")
    drained = daemon.stop()
    log.info("stopped drained=%s", drained)
    return 0


def _loop(daemon: Daemon, signals: _Signals, args: argparse.Namespace) -> None:
    """Until SIGTERM/SIGINT or a failed root: reloads, periodic status, STATUS= updates,
    watchdog pings."""
    wd = systemd.watchdog_interval()
    # An idle worker shows it is alive every IDLE_TICK: never call that "no progress".
    stale_after = max(wd, 3 * IDLE_TICK) if wd else STALE_DEFAULT
    now = time.monotonic()
    next_status = now + daemon.config.watch.status_interval
    next_notify = now + STATUS_NOTIFY_EVERY
    next_ping = now
    while not signals.stop and daemon.failure is None:
        now = time.monotonic()
        if signals.reload:
            signals.reload = False
            _reload(daemon, args)
        if wd and now >= next_ping:
            age = now - daemon.heartbeat()
            if age < stale_after:
                systemd.notify("WATCHDOG=1")
            else:
                log.error("no progress for %.1fs: withholding watchdog ping", age)
            next_ping = now + wd / 2
        if now >= next_notify:
            systemd.notify(f"STATUS={daemon.summary()}")
            next_notify = now + STATUS_NOTIFY_EVERY
        if now >= next_status:
            daemon.log_status()
            next_status = now + daemon.config.watch.status_interval
        deadlines = [next_notify, next_status] + ([next_ping] if wd else [])
        signals.wake.wait(max(0.0, min(deadlines) - time.monotonic()))
        signals.wake.clear()


def _reload(daemon: Daemon, args: argparse.Namespace) -> None:
    """SIGHUP: load and apply the config file again; on any error keep the running one."""
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={now_us}")
    try:
        new: Config = load(args.config)
        daemon.reload(new)
    except EnvctlError as exc:
        log.error("reload rejected error=%s hint=%s keeping=%s", exc.message, exc.hint or "",
                  daemon.config.source)
    else:
        logsetup.setup(new.logging, args.debug)
        log.info("reloaded roots=%d", len(new.roots))
    systemd.notify(f"READY=1\nSTATUS={daemon.summary()}")


if __name__ == "__main__":
    sys.exit(main())
