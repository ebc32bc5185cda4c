"""The ``envctld`` fixture: start real daemons in a test, always stopped afterwards.

A separate module (loaded with ``pytest_plugins = ("tests.fixtures_daemon",)``) so that
``tests.daemon_support`` stays a plain helper module other suites and benchmarks import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon_support import Envctld


@pytest.fixture
def envctld(scratch: Path) -> Iterator[Callable[..., Envctld]]:
    """Factory: ``envctld(config, env=None, args=(), wait_ready=True, host=None)`` → a started
    daemon (``host``: in a UTS namespace of its own with that host name)."""
    started: list[Envctld] = []

    def make(config: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
             wait_ready: bool = True, timeout: float = 60.0, host: str | None = None) -> Envctld:
        d = Envctld(config, scratch, env, args, host)
        started.append(d)
        return d.start(timeout, wait_ready)

    yield make
    for d in started:
        d.cleanup()
