"""The socket API end to end: a real envctld, real Unix socket, clients as real other users.

What is proven here: identity comes from the kernel (SO_PEERCRED/SO_PEERGROUPS) and the claim a
client makes is recorded but never trusted; allow_groups/admin rules; the socket file gets the
configured mode and group; every kind of bad input gets a clear error and the daemon keeps
serving everyone else (malformed JSON, binary garbage, unknown ops, wrong version, oversized
lines, a client that never finishes its line, a follower that vanishes mid-stream, a flood of
connections); bad requests (traversal names, ``prefix:``, forbidden channels) are refused over
the socket and create nothing.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import yaml
from envctl_shared.api.client import Client
from envctl_shared.errors import EX_DATAERR, EX_NOPERM, EX_UNAVAILABLE

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import wait_for


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)


def _whoami(api: ApiDaemon, user, groups: bool = True) -> dict:  # type: ignore[no-untyped-def]
    code = ("import json,socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
            "s.sendall(b'{\"v\":1,\"op\":\"whoami\"}\\n');print(s.makefile().readline())")
    argv = api.cli_argv(user, groups=groups)[:-1]  # setpriv ... env -i ...  (drop envctl)
    out = subprocess.run([*argv, "/usr/bin/python3", "-c", code, str(api.sock)], text=True,
                         capture_output=True, check=True, timeout=30).stdout
    return json.loads(out)["data"]


def test_socket_gets_configured_mode_and_group(api: ApiDaemon, accounts: Accounts) -> None:
    st = os.lstat(api.sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert st.st_gid == accounts.shared_gid


def test_identity_is_the_kernels(api: ApiDaemon, accounts: Accounts) -> None:
    alice = _whoami(api, accounts.alice)
    assert alice["uid"] == accounts.alice.uid and alice["username"] == accounts.alice.name
    assert accounts.shared_gid in alice["groups"]  # from SO_PEERGROUPS
    assert alice["may_create"] and not alice["is_admin"]
    # The same user without the supplementary group really lacks it: no permission from
    # /etc/group, only from what the connecting process holds.
    bare = _whoami(api, accounts.alice, groups=False)
    assert bare["groups"] == [] and not bare["may_create"]
    mallory = _whoami(api, accounts.mallory)
    assert not mallory["may_create"]
    with Client(api.sock) as client:  # root is an admin
        me = client.call("whoami")
    assert me["uid"] == 0 and me["is_admin"]


def test_unauthorised_users_are_told_so(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec(api.hello_spec())
    for user, groups in ((accounts.mallory, True), (accounts.alice, False)):
        res = api.cli(user, "request", "create", "nope-env", "-f", str(spec), groups=groups)
        assert res.returncode == EX_NOPERM, res.stderr
        assert "may not request environments" in res.stderr
        assert "allow_groups" in res.stderr  # the hint says what to ask for
    assert not (api.root / "nope-env").exists()
    # Anyone who can connect may still ask for the daemon's status (probes).
    res = api.cli(accounts.mallory, "status", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ready"] is True


def test_three_distinct_connection_failures(api: ApiDaemon, accounts: Accounts) -> None:
    # not running
    res = api.cli(accounts.alice, "status", env={"ENVCTL_SOCKET": str(api.base / "none.sock")})
    assert res.returncode == EX_UNAVAILABLE and "not running" in res.stderr
    # permission denied by the kernel on the socket file
    os.chmod(api.sock, 0o660)
    try:
        res = api.cli(accounts.mallory, "status")
        assert res.returncode == EX_NOPERM and "permission denied on the daemon socket" in \
            res.stderr, res.stderr
        group = grp.getgrgid(os.stat(api.sock).st_gid).gr_name  # the hint names it
        assert f"the socket (group {group}, mode 0660)" in res.stderr, res.stderr
    finally:
        os.chmod(api.sock, 0o666)
    # not authorised (the daemon's own refusal) is covered above: a third, different message.
    res = api.cli(accounts.mallory, "request", "list", "--all")
    assert res.returncode == EX_NOPERM and "only requesters and admins" in res.stderr


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x" * 65, "-dash", "sp ace"])
def test_bad_names_refused_over_socket(api: ApiDaemon, accounts: Accounts, name: str) -> None:
    spec = api.write_spec(api.hello_spec())
    before = sorted(os.listdir(api.root))
    res = api.cli(accounts.alice, "request", "create", "-f", str(spec), "--no-wait", "--", name)
    assert res.returncode == EX_DATAERR, res.stderr
    assert "name" in res.stderr.lower()
    assert sorted(os.listdir(api.root)) == before


@pytest.mark.parametrize("spec,words", [
    # (a prefix: is accepted and ignored: conda env export writes one; see test_cli_conda_compat)
    ("dependencies: [hello]\nvariables: {PATH: /tmp/evil}\n", "set by activation"),
    ("channels: [https://evil.example/chan]\ndependencies: [hello]\n", "channel"),
    ("dependencies: [hello]\nsurprise: 1\n", "surprise"),
    ("dependencies:\n  - pip:\n    - --index-url=https://evil.example\n", "pip"),
    ("{{{not yaml", "yaml"),
])
def test_bad_specs_refused_over_socket(api: ApiDaemon, accounts: Accounts, spec: str,
                                       words: str) -> None:
    path = api.write_spec(spec)
    res = api.cli(accounts.alice, "request", "create", "badspec", "-f", str(path), "--no-wait")
    assert res.returncode == EX_DATAERR, res.stderr
    assert words in res.stderr.lower(), res.stderr
    assert not (api.root / "badspec").exists()


# -- protocol abuse: clear errors, the daemon keeps serving -------------------------------------

def _ping(api: ApiDaemon) -> None:
    with Client(api.sock, timeout=5) as client:
        assert client.call("ping")["pong"] is True


def _errors(reply: bytes) -> list[dict]:
    return [json.loads(line)["error"] for line in reply.splitlines() if line.strip()]


def test_garbage_gets_errors_and_connection_keeps_serving(api: ApiDaemon) -> None:
    lines = [b"{bad json", b"\xff\xfe\x00\x01binary", b"[1, 2]", b'{"v": 2, "op": "ping"}',
             b'{"v": 1, "op": "rm-rf"}', b'{"v": 1, "op": "ping", "args": {"x": 1}}',
             b'{"v": 1, "op": "get"}', b'{"v": 1, "op": "logs", "args": {"id": "x", '
             b'"offset": "zero"}}', b'{"v": 1, "op": "ping"}']
    reply = api.raw(b"\n".join(lines) + b"\n", timeout=5, lines=len(lines))
    msgs = [json.loads(line) for line in reply.splitlines()]
    assert len(msgs) == len(lines)
    *bad, last = msgs
    assert all(m["ok"] is False and m["error"]["code"] == "protocol-error" for m in bad)
    words = ["not valid json", "not utf-8", "json object", "version 2", "unknown op",
             "unknown argument", "required", "must be int"]
    for m, w in zip(bad, words):
        assert w in m["error"]["message"].lower(), (w, m)
    assert last == {"ok": True, "data": {"pong": True, "version": last["data"]["version"],
                                         "protocol": 1}}


def test_oversized_line_is_refused_without_buffering(api: ApiDaemon) -> None:
    reply = api.raw(b'{"v":1,"op":"ping","args":{"pad":"' + b"x" * 300_000 + b'"}}\n')
    (err,) = _errors(reply)
    assert err["code"] == "protocol-error" and "larger than 65536 bytes" in err["message"]
    _ping(api)
    # The CLI gets the same clear message for a spec file that is too big.
    with Client(api.sock) as client:
        with pytest.raises(Exception, match="larger than 65536"):
            client.call("create", name="huge", spec="#" * 100_000)


def test_slow_client_is_dropped_and_others_are_served(api: ApiDaemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(str(api.sock))
        t0 = time.monotonic()
        slow.sendall(b'{"v": 1, "op": "pi')  # never finishes the line
        _ping(api)  # meanwhile, others are served
        slow.settimeout(10)
        reply = b""
        while chunk := slow.recv(4096):
            reply += chunk
        took = time.monotonic() - t0
    (err,) = _errors(reply)
    assert "not completed within 2s" in err["message"]
    assert 1.5 < took < 6  # read_timeout 2 s: bounded, not forever


def test_connection_flood_is_bounded(accounts: Accounts) -> None:
    """A daemon with 4 slots: the 5th client is told "busy"; idle holders are dropped after
    read_timeout, so the slots come back by themselves."""
    gen = start_api_daemon(accounts, sock={"max_connections": 4, "admin_connections": 1})
    small = next(gen)
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
    try:
        for s in held:
            s.connect(str(small.sock))
        # Told as soon as it connects (without sending a byte), then hung up on: the read
        # ends at the hang-up, so the timeout only bounds a daemon that would say nothing.
        (err,) = _errors(small.raw(b"", timeout=10))
        assert err["code"] == "daemon-unavailable" and "too many" in err["message"]
        wait_for(lambda: b'"pong":true' in small.raw(b'{"v":1,"op":"ping"}\n', timeout=1), 10,
                 what="slots freed by the read timeout")
    finally:
        for s in held:
            s.close()
        next(gen, None)  # stop the daemon (asserts it exits 0) and remove its files


def test_reload_changes_who_may_create(api: ApiDaemon, accounts: Accounts) -> None:
    """SIGHUP with mallory in allow_users: the next connection is authorised; and back."""
    original = api.config.read_text()
    data = yaml.safe_load(original)
    data["requests"]["allow_users"] = [accounts.mallory.name]
    try:
        api.config.write_text(yaml.safe_dump(data))
        api.daemon.reload()
        assert _whoami(api, accounts.mallory)["may_create"] is True
    finally:
        api.config.write_text(original)
        api.daemon.reload()
    assert _whoami(api, accounts.mallory)["may_create"] is False


@pytest.mark.soak
def test_concurrent_clients_and_abusers(api: ApiDaemon) -> None:
    """Good clients (status, over fresh connections) racing abusers (garbage, oversized lines,
    vanishing mid-request): every good request is answered. Scaled by ENVCTL_SOAK_SCALE
    (default 1: 8 clients for 1.5 s)."""
    scale = float(os.environ.get("ENVCTL_SOAK_SCALE", "1"))
    clients, seconds = max(2, int(8 * scale)), 1.5 * scale
    stop_at = time.monotonic() + seconds
    answered, failures = [0], []
    lock = threading.Lock()

    def good() -> None:
        n = 0
        while time.monotonic() < stop_at:
            try:
                with Client(api.sock, timeout=10) as client:
                    assert client.call("status")["ready"] is True
                n += 1
            except Exception as exc:  # noqa: BLE001 — every failure is collected and reported
                failures.append(repr(exc))
        with lock:
            answered[0] += n

    def bad() -> None:
        payloads = [b"\x00\xff" * 100 + b"\n", b"{" * 70_000, b'{"v":1,"op":"ping"', b"[]\n"]
        i = 0
        while time.monotonic() < stop_at:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(api.sock))
                try:
                    s.sendall(payloads[i % len(payloads)])
                except OSError:
                    pass
            i += 1  # closed at once: vanishes with the request half sent

    threads = [threading.Thread(target=good) for _ in range(clients)]
    threads += [threading.Thread(target=bad) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    assert failures == []
    assert answered[0] > clients
    _ping(api)


@pytest.mark.parametrize("claim", ["bob\nINFO forged log line", "a b", "x" * 129, ""])
def test_claimed_user_must_be_a_plain_name(api: ApiDaemon, claim: str) -> None:
    """The claim is untrusted text bound for logs and the job store: no line forging."""
    line = json.dumps({"v": 1, "op": "create", "args": {
        "name": "claimed", "spec": api.hello_spec(), "claimed_user": claim}}).encode()
    (err,) = _errors(api.raw(line + b"\n", timeout=30, lines=1))  # returns at the answer
    assert err["code"] == "invalid-request" and "claimed_user" in err["message"]
    assert not (api.root / "claimed").exists()
