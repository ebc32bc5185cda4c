"""The watcher's parts on their own, on real trees: queue coalescing, poller, inotify filter.

No daemon process here: these pin down the properties the daemon tests rely on (a poll pass on
an unchanged tree lists nothing; the inotify mask delivers chmod but not reads or writes).
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from envctl_shared.config import parse
from envctl_shared.heal import Healer
from envctl_shared.watch import queue
from envctl_shared.watch.inotify import InotifyWatch
from envctl_shared.watch.poll import Poller
from envctl_shared.watch.queue import ROOT, SETTLE, WorkQueue

from tests.conftest import Accounts
from tests.helpers import as_user, find_violations, wait_for
from tests.trees import make_chain
from tests.watch_support import make_root, make_source

Drained = tuple[str, bool, tuple[str, ...]]  # an item as (rel, subtree, names)


def _drain(q: WorkQueue, wait: float = 2 * SETTLE) -> list[Drained]:
    """Every item waiting now (each handed out once it has settled: ``wait`` 0 when all
    have)."""
    out = []
    while (item := q.get(wait)) is not None:
        out.append((q.path(item), item.subtree, item.names))
        q.done()
    return out


def _rels(q: WorkQueue) -> dict[str, bool]:
    """Drained items flattened back to {rel: subtree}."""
    out: dict[str, bool] = {}
    for rel, subtree, names in _drain(q):
        if subtree:
            out[rel] = True
        for name in names:
            out[f"{rel}/{name}" if rel else name] = False
    return out


class _Dir:
    """A directory placed as the watch's nodes are: a parent link and a name."""

    def __init__(self, parent: _Dir | None, name: str) -> None:
        self.parent, self.name = parent, name


class _Tree:
    """Queues entries by path, through one node per directory (as the watch layer does)."""

    def __init__(self, q: WorkQueue) -> None:
        self.q = q
        self.dirs = {"": _Dir(None, "")}

    def dir(self, rel: str) -> _Dir:
        if rel not in self.dirs:
            parent, _, name = rel.rpartition("/")
            self.dirs[rel] = _Dir(self.dir(parent), name)
        return self.dirs[rel]

    def put(self, rel: str, subtree: bool = False, urgent: bool = True) -> bool:
        parent, _, name = rel.rpartition("/")
        return self.q.put(self.dir(parent), name, subtree, urgent)


def test_queue_coalesces_and_subtree_wins() -> None:
    q = WorkQueue()
    t = _Tree(q)
    assert t.put("a/b")
    assert not t.put("a/b")
    assert t.put("a", subtree=True)
    assert not t.put("a/c/d")  # covered by the waiting subtree "a"
    assert t.put("a/b", subtree=True)  # upgrade in place
    assert t.put("ab/x")  # a sibling whose name starts like "a" is not covered
    assert _drain(q) == [("a/b", True, ()), ("a", True, ()), ("ab", False, ("x",))]
    assert q.wait_idle(0)
    q.put(ROOT, subtree=True)  # the service's reconcile: the same item as the watch's root
    assert not t.put("", subtree=True) and not t.put("anything/at/all")
    q.close()
    assert not t.put("late")
    assert _drain(q) == [("", True, ())]


def test_queue_hands_out_siblings_together() -> None:
    q = WorkQueue()
    t = _Tree(q)
    for rel in ("d/x", "e/y", "d/z", "top", "d/sub", ""):
        t.put(rel)
    t.put("d/sub", subtree=True)  # a directory: its own subtree item, not a sibling entry
    assert _drain(q) == [("d", False, ("x", "z")), ("e", False, ("y",)),
                         ("", False, ("top",)), ("d/sub", True, ()), ("", False, ())]
    assert len(q) == 0


def test_queue_paths_are_built_when_taken_and_follow_renames() -> None:
    """Entries wait as (directory node, name), not as path strings (a deep chain's paths made
    the daemon's memory quadratic): the path is the directory's place when a worker takes the
    item. The path kept from the last item (extended along a chain) is dropped on a rename."""
    q = WorkQueue()
    t = _Tree(q)
    t.put("a/b/x")
    assert _drain(q) == [("a/b", False, ("x",))]
    t.put("a/b/c/y")  # the next level of a chain: the kept path, extended
    t.put("a/b/c/z", subtree=True)
    assert _drain(q) == [("a/b/c", False, ("y",)), ("a/b/c/z", True, ())]
    t.put("a/b/c/w")
    t.dirs["a/b"].parent = t.dir("m")  # renamed to m/b while c's entry waits
    q.moved()
    assert _drain(q) == [("m/b/c", False, ("w",))]


def test_queue_puts_attribute_changes_after_new_entries() -> None:
    """Echoes of our own fixes (IN_ATTRIB) must not delay entries still broken."""
    q = WorkQueue()
    t = _Tree(q)
    assert t.put("a/echo1", urgent=False)
    assert t.put("b/echo2", urgent=False)
    assert not t.put("b/echo2", urgent=False)
    assert t.put("c/new")
    assert t.put("b/echo2")  # a creation names a path waiting in the later lane: promoted
    assert t.put("d", subtree=True)
    assert t.put("a/sibling", urgent=False)
    assert len(q) == 5
    assert _drain(q) == [("c", False, ("new",)), ("b", False, ("echo2",)),
                         ("d", True, ()), ("a", False, ("echo1", "sibling"))]
    assert q.wait_idle(0)


def test_queue_put_names_is_put_of_each_name() -> None:
    """The reader queues a batch's names of one directory at once (set operations): the same
    queue, item for item and lane for lane, as a put of each name. With subtree items in the
    mix, the same items: where an entry upgraded in place stands depends on the order of the
    names of its batch, which is a set's."""
    rng = random.Random(7)
    names = [f"n{i}" for i in range(6)]
    for i in range(60):
        one, many = WorkQueue(), WorkQueue()
        t1, tm = _Tree(one), _Tree(many)
        subtrees = i % 2 == 1
        for _ in range(12):
            rel = rng.choice(["", "d", "d/s", "e"])
            if subtrees and rng.random() < 0.2:  # a directory arriving: its subtree item
                sub = f"{rel}/{rng.choice(names)}" if rel else rng.choice(names)
                t1.put(sub, subtree=True)
                tm.put(sub, subtree=True)
                continue
            batch = set(rng.sample(names, rng.randint(1, 4)))
            urgent = rng.random() < 0.5
            for n in sorted(batch):
                t1.put(f"{rel}/{n}" if rel else n, urgent=urgent)
            many.put_names(tm.dir(rel), batch, urgent)
        time.sleep(SETTLE)  # all settled: handed out lane by lane
        got, want = _drain(many, 0), _drain(one, 0)
        assert (sorted(got) == sorted(want)) if subtrees else (got == want)


class _Clock:
    """The queue's monotonic clock, moved by hand: its SETTLE decisions are checked at exact
    instants. On the real clock a loaded 2-core machine preempted the test for more than the
    10 ms it gave a hand-out "at once" (about 1 run in 100 with a CPU hog)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_queue_settles_an_entry_in_a_burst_so_its_siblings_join_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At rest an item is handed out at once (a lone change healed in a millisecond). While a
    burst goes on (something handed out less than SETTLE ago) it is handed out once it has
    waited SETTLE: the entries a writer makes meanwhile in the same directory come with it, in
    one batch (one resolve, one C call)."""
    clock = _Clock()
    monkeypatch.setattr(queue, "time", clock)
    q = WorkQueue()
    t = _Tree(q)
    t.put("d/first")
    item = q.get(0)  # at rest: ready when queued, not a tick later
    assert item is not None and item.names == ("first",)
    q.done()
    clock.now += SETTLE / 2
    queued = clock.now
    t.put("d/a")  # SETTLE / 2 after a hand-out: a burst
    assert q.get(0) is None
    clock.now += SETTLE / 2
    t.put("d/b", urgent=False)
    clock.now = queued + SETTLE * 0.99
    assert q.get(0) is None  # not settled yet
    clock.now = queued + SETTLE
    item = q.get(0)
    assert item is not None and (q.path(item), item.names) == ("d", ("a", "b"))
    q.done()
    clock.now += SETTLE * 1.01  # nothing handed out for SETTLE: at rest again
    t.put("e/lone")
    item = q.get(0)
    assert item is not None and (q.path(item), item.names) == ("e", ("lone",))
    q.done()
    q.close()
    t.put("late")
    assert q.get(0) is None  # closed: nothing waits to settle, nothing more is queued


def test_read_events_keeps_table_events_in_order_and_groups_entries() -> None:
    """The C reduction of a read batch: table events in order, entry names grouped per watch
    and lane (each once), unknown watches and those after their IN_IGNORED dropped, a file
    moved away dropped, a directory's own IN_ATTRIB kept only for the root."""
    from envctl_shared.heal.fsops import read_events
    from envctl_shared.watch.inotify import IN

    def ev(wd: int, mask: int, name: bytes = b"", cookie: int = 0) -> bytes:
        padded = name + b"\0" * (16 - len(name) % 16) if name else b""
        return struct.pack("iIII", wd, mask, cookie, len(padded)) + padded

    data = b"".join([
        ev(1, IN.IN_CREATE, b"f"), ev(1, IN.IN_ATTRIB, b"f"), ev(1, IN.IN_ATTRIB, b"g"),
        ev(2, IN.IN_CREATE | IN.IN_ISDIR, b"d"), ev(2, IN.IN_ATTRIB | IN.IN_ISDIR, b"d"),
        ev(3, IN.IN_ATTRIB | IN.IN_ISDIR), ev(1, IN.IN_ATTRIB), ev(9, IN.IN_CREATE, b"x"),
        ev(2, IN.IN_MOVED_FROM, b"m", 5), ev(2, IN.IN_MOVED_FROM | IN.IN_ISDIR, b"s", 6),
        ev(4, IN.IN_CREATE, b"y"), ev(4, IN.IN_IGNORED), ev(4, IN.IN_CREATE, b"z"),
        ev(2, IN.IN_ATTRIB, b"\xff")])
    got = read_events(data, {1: "root", 2: "d2", 3: "d3", 4: "d4"}, 1)
    assert not got.overflow and got.counted == 12
    assert got.ordered == [(2, IN.IN_CREATE | IN.IN_ISDIR, 0, "d"), (1, IN.IN_ATTRIB, 0, None),
                           (2, IN.IN_MOVED_FROM | IN.IN_ISDIR, 6, "s"),
                           (4, IN.IN_IGNORED, 0, None)]
    assert got.entries == [(1, {"f"}, {"g"}), (2, set(), {"d", os.fsdecode(b"\xff")})]
    over = read_events(data + ev(-1, IN.IN_Q_OVERFLOW) + ev(1, IN.IN_CREATE, b"h"), {1: "r"}, 1)
    assert over.overflow and not over.ordered and not over.entries


def _root_cfg(root: Path, group: str):  # type: ignore[no-untyped-def]
    return parse({"roots": [{"path": str(root), "group": group}]}).roots[0]


@pytest.mark.parametrize("concurrency", [1, 4])  # 1: the stamps are checked in one C call
def test_poller_lists_only_changed_directories(accounts: Accounts, scratch: Path,
                                               concurrency: int) -> None:
    root = make_root(scratch, accounts)
    src = make_source(scratch, 60, 5)
    os.system(f"cp -a {src} {root}/tree && chown -R {accounts.alice.uid} {root}/tree")
    (root / "outside-link").symlink_to(scratch)  # must never be followed
    cfg = _root_cfg(root, accounts.shared_group)
    Healer(cfg).run("")  # a compliant tree: the poller must write nothing on it
    p = Poller(Healer(cfg, concurrency=concurrency))
    first = p.run()
    assert first.heal.writes == 0 and p.directories == first.dirs == first.listed > 60
    again = p.run()
    assert (again.listed, again.heal.writes, again.dirs) == (0, 0, first.dirs)
    assert again.heal.scanned == first.dirs  # only directories were looked at
    a = accounts.alice
    time.sleep(0.01)
    as_user(a.uid, a.gid, f"touch {root}/tree/pkg1/mod25/new && mkdir -p {root}/tree/fresh/sub")
    changed = p.run()
    # mod25 and tree changed; fresh and fresh/sub are new (listed to be recorded). No other.
    assert changed.listed == 4
    assert find_violations(root, accounts.shared_gid) == []
    as_user(a.uid, a.gid, f"chmod g-w {root}/tree/pkg0")  # a dir's own chmod moves its ctime
    fixed = p.run()
    assert fixed.heal.writes == 1 and find_violations(root, accounts.shared_gid) == []
    assert p.run().listed == 0  # the stamp recorded after our own fix: no echo listing
    as_user(a.uid, a.gid, f"chmod g-w {root}/tree/pkg1/mod25/new")  # a file: invisible here...
    assert p.run().heal.writes == 0
    assert p.run(full=True).heal.writes == 1  # ...until the full pass
    gone = {os.stat(d).st_ino for d, _, _ in os.walk(root / "tree" / "pkg2")}
    known = p.directories
    os.system(f"rm -rf {root}/tree/pkg2")
    p.run()  # a concurrent pass forgets what it did not see; the serial one, a full pass
    if concurrency == 1:
        p.run(full=True)
    assert gone and not gone & set(p._stamps) and p.directories == known - len(gone)


def test_poller_table_of_a_deep_chain_grows_linearly(accounts: Accounts, scratch: Path) -> None:
    """The table holds one record per directory whose key does not grow with its depth: keyed
    by path, a chain of 1,500 levels cost ~2.3 MB of keys (d²), here ~40 KB."""
    root = make_root(scratch, accounts)
    levels = 1500
    make_chain(root, levels, accounts.alice.uid, accounts.alice.gid)
    p = Poller(Healer(_root_cfg(root, accounts.shared_group)))
    assert p.run().dirs == levels + 1
    assert p.directories == levels + 1
    keys = sum(sys.getsizeof(k) for k in p._stamps)
    assert keys < 64 * (levels + 1), keys
    assert p.run().listed == 0  # and it still knows every level unchanged
    subprocess.run(["rm", "-rf", str(root / "d")], check=True)
    p.run(full=True)
    assert p.directories == 1


class _Hooks:
    """Records what an InotifyWatch reports to its owner."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_watch_failed(self, rel: str, err: int) -> None:
        self.seen.append("failed")

    def on_end(self, reason: str, exc: BaseException | None) -> None:
        self.seen.append(f"end:{reason}")


def test_inotify_filter_delivers_chmod_not_reads_or_writes(accounts: Accounts,
                                                           scratch: Path) -> None:
    root = make_root(scratch, accounts)
    (root / "d").mkdir()
    (root / "d" / "f").write_text("x")
    q = WorkQueue()
    hooks = _Hooks()
    counted = hooks.seen
    w = InotifyWatch(root, q, hooks, lambda n: counted.extend(["event"] * n))
    w.start()
    try:
        assert w.watch_count() == 2
        (root / "d" / "f").read_text()
        with open(root / "d" / "f", "a") as fh:
            fh.write("more")
        # A chmod after them is the witness: one inotify fd delivers in order, so once its
        # entry is queued, an event of the read or the write would have come before it.
        os.chmod(root / "d" / "f", 0o600)
        witness: dict[str, bool] = {}
        wait_for(lambda: bool(witness.update(_rels(q)) or witness), 5, 0.01, "the chmod's event")
        assert witness == {"d/f": False} and counted == ["event"], (witness, counted)
        counted.clear()
        os.chmod(root / "d" / "f", 0o640)
        os.mkdir(root / "d" / "new")
        (root / "d" / "new" / "g").touch()
        os.rename(root / "d" / "new", root / "d" / "renamed")
        deadline = time.monotonic() + 5
        got: dict[str, bool] = {}
        while time.monotonic() < deadline and "d/renamed" not in got:
            got.update(_rels(q))
            time.sleep(0.05)
        assert got.get("d/f") is False  # chmod → attrib → entry
        # Created dir: a subtree, or (empty when its watch was added) itself, g its own event,
        # named where its directory is when the item is taken (renamed since, maybe).
        g = got.get("d/new/g", got.get("d/renamed/g"))
        assert "d/new" in got and (got["d/new"] or g is False), got
        assert got.get("d/renamed") is True  # moved (in) dir → subtree
        assert "failed" not in counted and not any(c.startswith("end:") for c in counted)
    finally:
        w.stop()


def test_inotify_reads_ahead_while_a_long_walk_runs(scratch: Path) -> None:
    """A tree moved in is walked in one batch; the events a writer makes meanwhile, more than
    the kernel's queue holds, are read ahead (into the next batch) instead of overflowing it:
    no rebuild and reconcile of the root, and every file created is queued."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    files = limit + 5000
    root = scratch / "root"
    (root / "files").mkdir(parents=True)
    tree = scratch / "tree"
    for i in range(3000):
        (tree / f"d{i}").mkdir(parents=True)
    writer: list[subprocess.Popen[bytes]] = []

    def slow_walk() -> None:  # each directory walked takes 1 ms while the writer runs
        if not writer:
            writer.append(subprocess.Popen([
                sys.executable, "-c", "import os, sys\nfor i in range(int(sys.argv[2])):\n"
                "    os.close(os.open(f'{sys.argv[1]}/f{i}', os.O_CREAT | os.O_WRONLY))",
                str(root / "files"), str(files)]))
        if writer[0].poll() is None:
            time.sleep(0.001)

    hooks = _Hooks()
    q = WorkQueue()
    w = InotifyWatch(root, q, hooks, lambda n: None, slow_walk)
    w.start()
    try:
        os.rename(tree, root / "tree")
        wait_for(lambda: bool(writer) and writer[0].poll() is not None, 60, 0.05, "the writer")
        assert writer[0].returncode == 0
        queued: set[str] = set()

        def all_queued() -> bool:
            for rel, _subtree, names in _drain(q):
                if rel == "files":
                    queued.update(names)
            return len(queued) == files
        wait_for(lambda: all_queued() or bool(hooks.seen), 30, 0.05, "every file queued")
        assert hooks.seen == [] and len(queued) == files, hooks.seen  # no end:overflow
        assert w.watch_count() == 3003
    finally:
        w.stop()


def test_run_entries_heals_siblings_not_subtrees(accounts: Accounts, scratch: Path) -> None:
    """The healer's batch entry point the workers use (one resolution of the parent)."""
    root = make_root(scratch, accounts)
    a = accounts.alice
    as_user(a.uid, a.gid, f"mkdir -p {root}/d/sub/deeper {root}/d/skip && "
                          f"touch {root}/d/f1 {root}/d/f2 {root}/d/sub/inner {root}/d/skip/x && "
                          f"ln -s /etc/shadow {root}/d/link")
    cfg = parse({"roots": [{"path": str(root), "group": accounts.shared_group,
                            "exclude": ["d/skip"]}]}).roots[0]
    stats = Healer(cfg).run_entries([("d", ["f1", "f2", "sub", "link", "skip", "gone"])])
    left = {p.removeprefix(f"{root}/") for p in find_violations(root, accounts.shared_gid)}
    assert left == {"d", "d/sub/inner", "d/sub/deeper", "d/skip", "d/skip/x"}
    assert stats.skipped["excluded"] == 1 and stats.skipped["vanished"] == 1
    assert os.stat("/etc/shadow").st_gid != accounts.shared_gid
    again = Healer(cfg).run_entries([("d", ["f1", "f2", "sub", "link"])])
    assert again.violations == 0 and again.writes == 0  # compliant: one stat each, no write


def test_inotify_walk_keeps_few_fds_open_whatever_the_depth(scratch: Path) -> None:
    """A comb (a chain with side directories at every level) deeper than the walk's fd budget:
    every directory is watched, the fds held stay bounded (the C walk's levels past its window
    are reopened through "..", checked against its identity), and an event at the bottom is
    attributed to its real path. Names differ per level, so that whatever order a filesystem
    lists them in, many levels still have a side left to visit when the walk goes down."""
    from envctl_shared.heal.fsops import window
    from envctl_shared.watch import inotify

    depth = 3 * window()
    root = scratch / "comb"
    chain = [f"n{i}" for i in range(depth)]
    fd = os.open(scratch, os.O_RDONLY)
    try:
        os.mkdir("comb", dir_fd=fd)
        for i, name in enumerate(["comb", *chain[:-1]]):
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
            os.mkdir(f"s{i}a", dir_fd=fd)
            os.mkdir(chain[i], dir_fd=fd)
            os.mkdir(f"s{i}z", dir_fd=fd)
    finally:
        os.close(fd)
    base = len(os.listdir("/proc/self/fd"))
    held: list[int] = []
    hooks = _Hooks()
    q = WorkQueue()
    w = inotify.InotifyWatch(root, q, hooks, lambda n: None,
                             lambda: held.append(len(os.listdir("/proc/self/fd")) - base))
    w.start()
    try:
        assert w.watch_count() == 1 + 3 * depth  # the root, then 3 per level
        assert max(held) <= window() + inotify.CACHE_SIZE + 4, max(held)
        side = "/".join(chain[:-1] + [f"s{depth - 1}z"])
        os.close(os.open(root / side / "f", os.O_CREAT | os.O_WRONLY))
        deadline = time.monotonic() + 5
        got: dict[str, bool] = {}
        while time.monotonic() < deadline and f"{side}/f" not in got:
            got.update(_rels(q))
            time.sleep(0.02)
        assert got.get(f"{side}/f") is False and hooks.seen == []
    finally:
        w.stop()
    subprocess.run(["rm", "-rf", str(root)], check=True)
