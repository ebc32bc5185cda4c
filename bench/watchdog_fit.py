"""Does watchdog's inotify observer, through its public API, do what our watch tests demand?

Run: ``.venv/bin/pip install watchdog; .venv/bin/python -m bench.watchdog_fit`` (watchdog is
no dependency of envctl any more: this script is why; a scratch dir under /tmp).
Each scenario is one of our watch tests' stories (tests/test_watch_*.py), told to
``watchdog.observers.inotify.InotifyObserver`` with a recording handler; the table says what it
reported and whether that is what the daemon needs. The decision it fed is in
docs/field-facts.md ("watchdog").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from watchdog.events import EventsLostEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from .common import RESULTS

SETTLE = 1.0  # seconds for events to reach the handler


class _Record(FileSystemEventHandler):
    def __init__(self) -> None:
        self.events: list[FileSystemEvent] = []

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.events.append(event)

    def paths(self, kind: str | None = None) -> set[str]:
        return {os.fsdecode(e.src_path) for e in self.events
                if kind is None or e.event_type == kind}


def _observe(root: Path) -> tuple[InotifyObserver, _Record]:
    rec = _Record()
    obs = InotifyObserver()
    obs.schedule(rec, str(root), recursive=True)
    obs.start()
    time.sleep(0.3)
    return obs, rec


def _stop(obs: InotifyObserver) -> bool:
    """Stop the observer; False when its emitter thread had died on its own."""
    alive = all(e.is_alive() for e in obs.emitters)
    obs.stop()
    obs.join(5)
    return alive


def deep_chain(root: Path) -> tuple[bool, str]:
    """test_watch_deep: a chain deeper than PATH_MAX, a file created at its bottom."""
    name = "d" * 200
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(40):  # 40 x 201 bytes: ~8,000, twice PATH_MAX
        os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    try:
        obs, rec = _observe(root)
    except OSError as exc:
        os.close(fd)
        return False, f"schedule failed: {exc!r}"
    os.close(os.open("bottom", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)
    time.sleep(SETTLE)
    alive = _stop(obs)
    seen = any(p.endswith("/bottom") for p in rec.paths("created"))
    return seen and alive, f"bottom file seen={seen}, emitter alive={alive}"


def rename_away_and_back(root: Path) -> tuple[bool, str]:
    """test_watch_renames: a directory renamed out of the root and back, then renamed inside;
    a file created in it must be reported at its current path."""
    outside = root.parent / "outside"
    outside.mkdir()
    (root / "a").mkdir()
    obs, rec = _observe(root)
    os.rename(root / "a", outside / "a")
    time.sleep(0.2)
    os.rename(outside / "a", root / "a")
    time.sleep(0.2)
    os.rename(root / "a", root / "b")
    time.sleep(0.2)
    (root / "b" / "f").touch()
    time.sleep(SETTLE)
    alive = _stop(obs)
    got = sorted(p for p in rec.paths("created") if p.endswith("/f"))
    ok = got == [str(root / "b" / "f")] and alive
    return ok, f"created f reported at {[os.path.relpath(p, root) for p in got]}, alive={alive}"


def moved_in_subtree(root: Path) -> tuple[bool, str]:
    """test_watch_renames/bursts: a tree moved in from outside; an entry created in it later."""
    src = root.parent / "src"
    (src / "x" / "y").mkdir(parents=True)
    obs, rec = _observe(root)
    os.rename(src, root / "moved")
    time.sleep(0.3)
    (root / "moved" / "x" / "y" / "late").touch()
    time.sleep(SETTLE)
    alive = _stop(obs)
    late = str(root / "moved" / "x" / "y" / "late") in rec.paths("created")
    return late and alive, f"entry created in the moved-in tree seen={late}, alive={alive}"


def overflow(root: Path) -> tuple[bool, str]:
    """test_watch_recover: a queue overflow must reach the handler (the daemon then rebuilds
    and reconciles). The observer runs in a child stopped while 20,000 events queue up."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: observe, report what it heard on the pipe
        os.close(r)
        obs, rec = _observe(root)
        os.write(w, b"r")
        os.read(go_r, 1)  # the burst is over and this process runs again
        time.sleep(3)
        lost = any(isinstance(e, EventsLostEvent) for e in rec.events)
        alive = _stop(obs)
        os.write(w, json.dumps({"lost": lost, "alive": alive, "n": len(rec.events)}).encode())
        os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.kill(pid, signal.SIGSTOP)
    for i in range(10000):  # 2 events each (create, attrib): more than max_queued_events
        p = root / f"f{i}"
        p.touch()
        os.chmod(p, 0o600)
    os.kill(pid, signal.SIGCONT)
    os.write(go_w, b"g")
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.waitpid(pid, 0)
    out = json.loads(data)
    return out["lost"] and out["alive"], f"EventsLostEvent={out['lost']}, alive={out['alive']}, " \
                                         f"events={out['n']}"


SCENARIOS: dict[str, Callable[[Path], tuple[bool, str]]] = {
    "deep chain (> PATH_MAX)": deep_chain,
    "rename away and back, then inside": rename_away_and_back,
    "subtree moved in, entry created later": moved_in_subtree,
    "queue overflow reaches the handler": overflow,
}


def main() -> int:
    rows = []
    for title, fn in SCENARIOS.items():
        base = Path(tempfile.mkdtemp(prefix="wdfit-"))
        root = base / "root"
        root.mkdir()
        try:
            ok, note = fn(root)
        except Exception as exc:  # a scenario that crashes is a failed one, reported
            ok, note = False, f"raised {exc!r}"
        finally:
            shutil.rmtree(base, ignore_errors=True)
        rows.append({"scenario": title, "passes": ok, "observed": note})
    ver = version("watchdog")
    lines = [f"# watchdog {ver} InotifyObserver (public API) vs our watch scenarios", "",
             "| scenario | passes | observed |", "|---|---|---|"]
    lines += [f"| {r['scenario']} | {'yes' if r['passes'] else 'NO'} | {r['observed']} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "watchdog-fit.md").write_text(text)
    (RESULTS / "watchdog-fit.json").write_text(json.dumps({"watchdog": ver, "rows": rows},
                                                          indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
