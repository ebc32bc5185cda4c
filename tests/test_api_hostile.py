"""An attacker's requests against a real envctld, over its real socket, from real clients.

Each test is one way a peer used to hurt the root daemon, reproduced at the size that hurt it:

- a 325-byte YAML alias bomb (nine levels of nine) in a spec froze the daemon for 114 s at
  9.3 GB: now refused before expansion, while ``ping`` keeps answering within a second and the
  daemon's peak RSS (``VmHWM``) stays put; specs nested 20,000 deep (flow and block style) are
  validation errors, not a ``RecursionError``;
- JSON nested 100,000 deep, a 5,000-digit id, a lone surrogate as id and a ``logs`` offset
  ≥ 2⁶³ each reached an internal error: now each is a ``protocol-error`` naming the problem;
- a seeded random fuzz of every field of every op: no reply is ever "internal", the daemon
  logs no internal error and stays up;
- one unauthorised uid holding 300 connections (and reopening them as fast as it can) kept
  ``envctl status`` refused: now an admin's status answers every time, another user is still
  served, and the log names the flooding uid.
"""

from __future__ import annotations

import json
import os
import random
import socket
import string
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envctl_shared.api import protocol
from envctl_shared.api.client import Client
from envctl_shared.config import load
from envctl_shared.errors import ConfigError, ValidationError
from envctl_shared.names import ENV_NAME_RE

from tests.api_support import ENVCTL, ApiDaemon, start_api_daemon
from tests.conftest import Accounts, User
from tests.helpers import SYSTEM_PYTHON, wait_for

EXISTING = "hostile-existing"  # an env that exists: a fuzzed create that validates ends in
                               # Conflict, never in a build


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    # The default request size (256 KiB): the 100,000-deep JSON of the report must fit.
    for daemon in start_api_daemon(accounts, max_request_bytes=262144):
        (daemon.root / EXISTING).mkdir()
        yield daemon
        assert "internal_error" not in daemon.daemon.log_text()


def _vmhwm_kib(pid: int) -> int:
    """Peak resident set size of a process so far (kernel's VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The spec that froze the daemon: ``width ** levels`` leaves behind one dependency."""
    names = string.ascii_lowercase
    parts = ["&a [" + ",".join(["lol"] * width) + "]"]
    parts += [f"&{names[i]} [" + ",".join([f"*{names[i - 1]}"] * width) + "]"
              for i in range(1, levels)]
    return "dependencies:\n  - [" + ", ".join(parts) + "]\n"


class _PingProbe:
    """Pings the daemon on fresh connections in a thread; records every round trip."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.times: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                with Client(self.sock, timeout=5) as client:
                    assert client.call("ping")["pong"] is True
            except Exception as exc:  # noqa: BLE001 — collected and asserted on
                self.failures.append(repr(exc))
            self.times.append(time.monotonic() - t0)
            self._stop.wait(0.02)

    def __enter__(self) -> _PingProbe:
        self._thread.start()
        wait_for(lambda: len(self.times) >= 3, 10, what="the first pings")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# -- item 2: YAML that costs unbounded CPU and memory ---------------------------------------

def test_alias_bomb_is_refused_while_the_daemon_keeps_answering(api: ApiDaemon) -> None:
    bomb = _alias_bomb()
    assert len(bomb) < 380
    pid = api.daemon.proc.pid  # type: ignore[union-attr]
    before = _vmhwm_kib(pid)
    with _PingProbe(api.sock) as probe:
        pings_before = len(probe.times)
        t0 = time.monotonic()
        with Client(api.sock, timeout=60) as client:
            with pytest.raises(ValidationError, match="expands to more than") as err:
                client.call("create", name="bomb", spec=bomb)
        took = time.monotonic() - t0
        wait_for(lambda: len(probe.times) >= pings_before + 3, 10, what="pings after the bomb")
    assert err.value.code == "invalid-request" and "line 2" in err.value.message
    assert len(err.value.message) < 300
    assert took < 1.0, took
    assert probe.failures == [] and max(probe.times) < 1.0, max(probe.times)
    grown_mib = (_vmhwm_kib(pid) - before) / 1024
    assert grown_mib < 32, f"peak RSS grew by {grown_mib:.0f} MiB"
    assert not (api.root / "bomb").exists()


@pytest.mark.parametrize("style,spec", [
    ("flow", "dependencies: " + "[" * 20_000 + "x" + "]" * 20_000 + "\n"),
    ("block", "dependencies:\n  " + "- " * 20_000 + "x\n"),
])
def test_deep_nesting_is_a_validation_error(api: ApiDaemon, style: str, spec: str) -> None:
    with Client(api.sock, timeout=30) as client:
        with pytest.raises(ValidationError, match="nested more than 64 levels"):
            client.call("create", name=f"deep-{style}", spec=spec)
        assert client.call("ping")["pong"] is True  # the same connection keeps serving


def test_config_file_is_read_by_the_same_bounded_loader(scratch: Path) -> None:
    """The daemon's own configuration goes through the same loader (an admin's file, but a
    bomb there must not take the daemon down at reload either)."""
    path = scratch / "bomb.yaml"
    path.write_text(_alias_bomb().replace("dependencies", "roots"))
    with pytest.raises(ConfigError, match="bomb.yaml: not valid YAML at line 2: the document "
                                          "expands to more than"):
        load(path)


# -- item 3: input that reached an internal error -------------------------------------------

def _replies(api: ApiDaemon, *lines: bytes) -> list[dict[str, Any]]:
    out = api.raw(b"".join(line + b"\n" for line in lines), timeout=10, lines=len(lines))
    return [json.loads(line) for line in out.splitlines()]


def _a_job(api: ApiDaemon) -> str:
    """A real job root may read: the lookups below must get past "no such job"."""
    with Client(api.sock) as client:
        job = client.call("create", name="hostile-logs", spec=api.hello_spec())
        return str(job["id"])


def _wait_terminal(api: ApiDaemon, job_id: str) -> None:
    def ended() -> bool:
        with Client(api.sock) as client:
            return bool(client.call("get", id=job_id)["terminal"])
    wait_for(ended, 120, interval=0.2, what=f"job {job_id} to end")


def test_hostile_values_are_named_protocol_errors(api: ApiDaemon) -> None:
    job_id = _a_job(api)
    try:
        cases = [
            (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
            (b'{"v":1,"op":"get","args":{"id":' + b"7" * 5000 + b"}}", "more than 20 digits"),
            (b'{"v":1,"op":"get","args":{"id":"\\ud800"}}', "lone surrogate"),
            (b'{"v":1,"op":"logs","args":{"id":"%s","offset":%d}}' % (job_id.encode(), 2**63),
             "'offset' must be between 0 and"),
            (b'{"v":1,"op":"logs","args":{"id":"%s","offset":-1}}' % job_id.encode(),
             "'offset' must be between 0 and"),
            (b'{"v":NaN,"op":"ping"}', "NaN is not a JSON value"),
            (b'{"v":1,"op":"cancel","args":{"id":"' + b"x" * 5000 + b'"}}', "'id' must be 1-64"),
            (b'{"v":1,"op":"create","args":{"name":"a","spec":"x","backend":"' + b"b" * 5000 +
             b'"}}', "'backend' must be 1-64"),
        ]
        replies = _replies(api, *(line for line, _ in cases), b'{"v":1,"op":"ping"}')
        assert len(replies) == len(cases) + 1
        for (line, words), reply in zip(cases, replies):
            assert reply["ok"] is False, line[:80]
            assert reply["error"]["code"] == "protocol-error", (line[:80], reply)
            assert words in reply["error"]["message"], (line[:80], reply)
            assert len(reply["error"]["message"]) < 300
        assert replies[-1]["data"]["pong"] is True  # the connection kept serving
        # The same job, asked properly, is fine: the refusals were about the values only.
        with Client(api.sock) as client:
            assert client.call("logs", id=job_id, offset=2**53 - 1)["text"] == ""
    finally:
        with Client(api.sock) as client:
            try:
                client.call("cancel", id=job_id)
            except Exception:  # noqa: BLE001 — it may have finished already
                pass
        _wait_terminal(api, job_id)
    assert "internal_error" not in api.daemon.log_text()


_ATOMS: list[Any] = [
    None, True, False, 0, 1, -1, 2**31, 2**53, 2**63, -2**63, 10**19, 0.5, -1e308, 1e-300,
    "", " ", "x", "ping", "status", "../etc", "a/b", "\ud800", "\udfff", "\x00", "\n", "é",
    "\u2028", "\U0001f600", "-e .", "--index-url=http://x", "x" * 5000, "9" * 30, EXISTING,
    "rattler", "venv", "conda", "dependencies: [x]", "dependencies: [{pip: [x]}]",
]


def _text(rng: random.Random) -> str:
    alphabet = rng.choice([string.printable, "\ud800\udc00\x00\x7f\u2028é",
                           string.ascii_letters + "-._/@ "])
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: mostly nasty atoms and random text, sometimes containers."""
    roll = rng.random()
    if roll < 0.45 or depth > 3:
        return rng.choice(_ATOMS)
    if roll < 0.65:
        return _text(rng)
    if roll < 0.75:
        return rng.randrange(-2**70, 2**70)
    if roll < 0.85:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if roll < 0.95:
        return {str(_value(rng, depth + 1))[:20]: _value(rng, depth + 1)
                for _ in range(rng.randrange(0, 4))}
    return _spec(rng)


def _spec(rng: random.Random) -> str:
    """Random environment.yml text: random structures as YAML, or a valid spec mutated."""
    if rng.random() < 0.5:
        doc = {rng.choice(["dependencies", "channels", "name", "prefix", "x"]): _value(rng, 2)
               for _ in range(rng.randrange(1, 4))}
        return json.dumps(doc, default=str)  # JSON is YAML
    text = list("channels: [conda-forge]\ndependencies:\n  - hello\n  - pip:\n    - x==1\n")
    for _ in range(rng.randrange(1, 6)):
        text.insert(rng.randrange(len(text) + 1),
                    rng.choice(["&a ", "*a", "[", "{", "- ", ":", "!!int ", "!!binary ",
                                "\t", "%", "\ud800", "'", '"', "? ", "<<: ", "1" * 5000, "#"]))
    return "".join(text)


def _request(rng: random.Random) -> bytes:
    """One request line: mostly well-formed envelopes with random argument values."""
    name = rng.choice([*protocol.OPS, "create", "create", "create", "daemon-status",
                       rng.choice(_ATOMS)])  # create weighs more: the spec is the big input
    op = protocol.OPS.get(name) if isinstance(name, str) else None
    args: dict[str, Any] = {}
    for key, arg in (op.args.items() if op else ()):
        if rng.random() < 0.2:
            continue
        kind = rng.choice(arg.types)  # mostly the right type, to get past the type check
        if rng.random() < 0.15:
            args[key] = _value(rng)
        elif key == "spec":
            args[key] = _spec(rng)
        elif key == "backend":
            args[key] = rng.choice(["rattler", "venv", "conda", _text(rng)])
        elif kind is bool:
            args[key] = rng.random() < 0.5
        elif kind is int:
            args[key] = rng.choice([0, 1, -1, 2**53 - 1, 2**53, 2**63, rng.randrange(2**66)])
        else:
            args[key] = rng.choice([_text(rng), rng.choice(_ATOMS)])
    if rng.random() < 0.1:
        args[str(_value(rng))[:30]] = _value(rng)
    if name == "create":  # a valid request must never start a build: the name is invalid,
        if ENV_NAME_RE.fullmatch(str(args.get("name"))) or rng.random() < 0.5:  # or exists and is
            args["name"] = EXISTING                                       # never replaced
        args.pop("replace", None)
    if name in ("create", "logs"):  # one reply per request
        args["follow"] = False
    msg: Any = {"v": 1, "op": name, "args": args}
    roll = rng.random()
    if roll < 0.05:
        msg["v"] = _value(rng)
    elif roll < 0.1:
        msg[str(_value(rng))[:10]] = _value(rng)
    elif roll < 0.15:
        msg = _value(rng)
    line = json.dumps(msg, ensure_ascii=rng.random() < 0.5, default=str)
    if rng.random() < 0.05:  # damage the line itself
        cut = rng.randrange(len(line) + 1)
        line = line[:cut] + rng.choice(["", "\x00", "}", "\\u", "[" * 3000]) + line[cut:]
    return line.encode("utf-8", "surrogatepass")


def test_protocol_fuzz_never_reaches_an_internal_error(api: ApiDaemon) -> None:
    """Seeded (``ENVCTL_FUZZ_SEED``), bounded in count and time (``ENVCTL_SOAK_SCALE``)."""
    seed = int(os.environ.get("ENVCTL_FUZZ_SEED", "20261129"))
    scale = float(os.environ.get("ENVCTL_SOAK_SCALE", "1"))
    count, budget = int(10_000 * scale), 40.0 * scale
    rng = random.Random(seed)
    with Client(api.sock) as client:
        jobs_before = len(client.call("list", all=True, finished=True))
    sent, codes = 0, {}  # type: int, dict[str, int]
    deadline = time.monotonic() + budget
    conn: socket.socket | None = None
    reader: Any = None
    try:
        while sent < count and time.monotonic() < deadline:
            line = _request(rng)
            if conn is None:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.settimeout(30)
                conn.connect(str(api.sock))
                reader = conn.makefile("rb")
            try:
                conn.sendall(line.replace(b"\n", b" ") + b"\n")
                reply_line = reader.readline()
            except OSError:
                reply_line = b""
            sent += 1
            if not reply_line:  # the daemon hung up (it may, for an oversized line): reconnect
                reader.close()
                conn.close()
                conn = None
                continue
            reply = json.loads(reply_line)
            code = "ok" if reply["ok"] else reply["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
            assert code != "error", (seed, line[:300], reply)
            assert len(reply_line) < 1000 or reply["ok"], (seed, line[:300], reply)
            assert "event" not in reply and not reply.get("end"), (seed, line[:300], reply)
    finally:
        if conn is not None:
            reader.close()
            conn.close()
    assert sent >= min(count, 200), (sent, codes)
    assert codes.get("protocol-error", 0) and codes.get("invalid-request", 0), codes
    assert api.daemon.alive
    with Client(api.sock) as client:
        assert client.call("ping")["pong"] is True
        assert len(client.call("list", all=True, finished=True)) == jobs_before  # built nothing
    assert "internal_error" not in api.daemon.log_text()


# -- item 4: one uid holding every connection -----------------------------------------------

_FLOOD = r"""
import selectors, socket, sys, time
path, want = sys.argv[1], int(sys.argv[2])
sel = selectors.DefaultSelector()
sel.register(sys.stdin, selectors.EVENT_READ)  # EOF on stdin: the test is done
opened = 0

def open_one():
    global opened
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return
    opened += 1
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)

for _ in range(want):
    open_one()
print("holding", flush=True)
stop = time.monotonic() + 120  # a safety net; the test ends it long before
while time.monotonic() < stop:
    events = sel.select(0.05)
    if any(key.fileobj is sys.stdin for key, _ in events):
        break
    for key, _ in events:
        try:
            key.fileobj.recv(65536)
        except OSError:
            pass
        sel.unregister(key.fileobj)  # busy, or dropped after read_timeout: reopen at once
        key.fileobj.close()
    while len(sel.get_map()) <= want:
        open_one()
print("opened", opened, flush=True)
"""


class _Flood:
    """A child process running as ``user`` that holds ``count`` connections and reopens each
    one the daemon refuses or drops, until the test closes its stdin."""

    def __init__(self, api: ApiDaemon, user: User, count: int) -> None:
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
             SYSTEM_PYTHON, "-c", _FLOOD, str(api.sock), str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.opened = 0

    def __enter__(self) -> _Flood:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "holding"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.close()
            out = self.proc.stdout.read()
            assert self.proc.wait(30) == 0
            self.opened = int(out.split()[-1])
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(30)


def _status_probes(api: ApiDaemon, rounds: int, others: tuple[User, ...] = ()) -> list[str]:
    """Root's `envctl status` ``rounds`` times (and each of ``others`` every 4th round); the
    failures, as text."""
    root_env = {"PATH": "/usr/bin:/bin", "ENVCTL_SOCKET": str(api.sock), "LANG": "C.UTF-8"}
    failures = []
    for i in range(rounds):
        res = subprocess.run([ENVCTL, "status", "--json"], env=root_env, text=True,
                             capture_output=True, timeout=30)
        if res.returncode:
            failures.append(f"root: {res.returncode} {res.stderr.strip()[-200:]}")
        for user in others if i % 4 == 0 else ():
            res = api.cli(user, "status", "--json", timeout=30)
            if res.returncode:
                failures.append(f"{user.name}: {res.returncode} {res.stderr.strip()[-200:]}")
        time.sleep(0.3)
    return failures


def test_one_uid_cannot_lock_out_admins(api: ApiDaemon, accounts: Accounts) -> None:
    """mallory (not in allow_groups) holds 300 connections and reopens every one that is
    refused or dropped; meanwhile root's `envctl status` answers 10 times out of 10 and
    alice (another user) is served too. (Ten are plenty: without the limits mallory's 300
    would hold all 256 slots, reopening tens of thousands of connections a second, and every
    probe would be refused.)"""
    with _Flood(api, accounts.mallory, 300) as flood:
        failures = _status_probes(api, 10, others=(accounts.alice,))
    assert failures == []
    assert flood.opened > 1000, f"the flood reopened only {flood.opened - 300} connections"
    log = api.daemon.log_text()
    assert f"api busy uid={accounts.mallory.uid} " in log, log[-2000:]
    assert "limit=max_connections_per_uid max=64 " in log


def test_admins_keep_their_share_when_every_user_floods(accounts: Accounts) -> None:
    """Three users each within their own limit fill every slot but the admins' share: root's
    status still answers every time, and the log says which limit refused whom. (Five times
    are plenty: without the share the 36 connections wanted would hold all 24 slots, and every
    probe would be refused.)"""
    gen = start_api_daemon(accounts, sock={"max_connections": 24, "max_connections_per_uid": 10,
                                           "admin_connections": 4})
    small = next(gen)
    try:
        users = (accounts.alice, accounts.bob, accounts.mallory)
        with _Flood(small, users[0], 12), _Flood(small, users[1], 12), \
                _Flood(small, users[2], 12):
            failures = _status_probes(small, 5)
        assert failures == []
        log = small.daemon.log_text()
        assert "limit=admin_connections max=4 " in log, log[-2000:]
        assert all(f"api busy uid={u.uid} " in log for u in users), log[-2000:]
    finally:
        next(gen, None)  # stop the daemon (asserts it exits 0) and remove its files
