"""The protocol's own rules, without a daemon: argument checking and the published reference.

The server tests prove bad lines get errors over a real socket; these pin the details a client
author relies on (a boolean is not an integer, defaults are filled in, aliases resolve) and keep
``docs/protocol.md`` identical to the op table it documents.
"""

from __future__ import annotations

import json

import pytest
from envctl_shared.api import protocol
from envctl_shared.errors import ProtocolError

from tests.helpers import REPO


def _req(op: str, **args: object) -> bytes:
    return json.dumps({"v": 1, "op": op, "args": args}).encode()


def test_defaults_are_filled_and_aliases_resolve() -> None:
    req = protocol.parse_request(_req("logs", id="abc"))
    assert req.op.name == "logs" and req.args == {"id": "abc", "offset": 0, "follow": False}
    assert protocol.parse_request(_req("daemon-status")).op.name == "status"


@pytest.mark.parametrize("line,words", [
    (_req("logs", id="a", offset=True), "must be int"),  # JSON true is not an offset
    (_req("create", name="a", spec="s", replace="yes"), "must be bool"),
    (_req("create", name="a"), "'spec' is required"),
    (b'{"v": true, "op": "ping"}', "version"),  # true == 1 in Python; not a version
    (b'{"v": 1, "op": "ping", "extra": 1}', "unknown request field"),
    (b'{"v": 1, "op": "ping", "args": []}', "args must be a JSON object"),
    (b'{"v": 1, "op": 7}', "unknown op"),
    # hostile values: named, never an internal error (see test_api_hostile for the daemon)
    (b"[" * 100_000, "nested too deeply"),
    (b'{"v": 1, "op": "get", "args": {"id": ' + b"1" * 5000 + b"}}", "more than 20 digits"),
    (b'{"v": 1, "op": "get", "args": {"id": "\\ud800"}}', "lone surrogate"),
    (_req("logs", id="a", offset=2**63), "'offset' must be between 0 and 9007199254740991"),
    (_req("logs", id="a", offset=-1), "'offset' must be between 0 and"),
    (_req("get", id=-5), "'id' must not be negative"),
    (_req("get", id="../x"), "'id' must be 1-64 letters"),
    (_req("create", name="a", spec="s", backend="b" * 100), "'backend' must be 1-64"),
    (b'{"v": Infinity, "op": "ping"}', "Infinity is not a JSON value"),
    (b'{"v": ' + b"[" * 900 + b"]" * 900 + b', "op": "ping"}', "unsupported protocol version"),
])
def test_malformed_requests_are_named(line: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        protocol.parse_request(line)


def test_quoted_values_are_brief() -> None:
    """A message quotes at most a few dozen characters of what the peer sent."""
    for line in (_req("x" * 100_000), _req("get", id="y" * 100_000),
                 json.dumps({"v": "z" * 100_000}).encode(),
                 json.dumps({"v": 1, "op": "ping", "args": {"k" * 100_000: 1}}).encode()):
        with pytest.raises(ProtocolError) as err:
            protocol.parse_request(line)
        assert len(err.value.message) < 300


def test_encoded_lines_are_single_ascii_lines() -> None:
    line = protocol.encode(protocol.event("log", {"text": "caf\u00e9\nline two\u2028"}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")


def test_docs_carry_the_op_table() -> None:
    doc = (REPO / "docs" / "protocol.md").read_text()
    assert protocol.reference().strip() in doc


def test_docs_carry_the_status_objects() -> None:
    """The status section is generated from the dataclasses the daemon fills: every key, its
    type and its meaning, in the docs as in the code."""
    from envctl_shared import status

    doc = (REPO / "docs" / "protocol.md").read_text()
    assert status.reference().strip() in doc
    assert "| `roots` | `list[RootStatus]` |" in doc and "| `watches_needed` |" in doc
