"""``env add``'s spec edit (``jobs.spec_edit``) against what an owner may send: the edit runs
before the new spec is validated and capped (``parse_spec``), inside one of the daemon's two
spec-parse turns, so its cost must stay linear in what the request carries."""

from __future__ import annotations

import time

import yaml
from envctl_shared.jobs.spec_edit import add_packages

BASE = "name: x\ndependencies:\n  - python\n  - numpy=1.26\n  - pip:\n    - requests==2.31\n"


def test_an_add_replaces_by_name_and_appends_the_rest() -> None:
    doc = yaml.safe_load(add_packages(BASE, ["NumPy>=2", "scipy", "scipy=1.13"],
                                      ["Requests>=2.32", "rich", "not a requirement"]))
    assert doc["dependencies"] == ["python", "NumPy>=2", "scipy=1.13", {"pip": [
        "Requests>=2.32", "rich", "not a requirement"]}]


def test_tens_of_thousands_of_entries_cost_linear_time() -> None:
    """A request line (256 KiB) holds ~30,000 short entries; naming every pair of them took
    minutes of a parse turn (3,000 pip entries: ~27 s), so two such requests kept every other
    create "busy"."""
    many = [f"p{i}" for i in range(3000)]
    start = time.monotonic()
    text = add_packages(BASE, many, many)
    assert time.monotonic() - start < 3.0
    deps = yaml.safe_load(text)["dependencies"]
    assert len(deps) == 3 + 3000 and len(deps[-1]["pip"]) == 1 + 3000
