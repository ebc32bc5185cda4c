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
])
def test_malformed_requests_are_named(line: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        protocol.parse_request(line)


def test_encoded_lines_are_single_ascii_lines() -> None:
    line = protocol.encode(protocol.event("log", {"text": "caf\u00e9\nline two\u2028"}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")


def test_docs_carry_the_op_table() -> None:
    doc = (REPO / "docs" / "protocol.md").read_text()
    assert protocol.reference().strip() in doc
