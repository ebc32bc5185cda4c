"""Communicating changes (issue 20 item 4): an env's description and what each version changed,
end to end — a real daemon, real builds from a local channel, the CLI run as real other users.

- ``request create --description`` sets what the env is for: ``env list``, ``env show`` and the
  kernel's display name show it (the kernel's name bounded and without markup characters: it is
  the owner's text in everyone's launcher); ``env describe`` changes it, for the owner and
  admins only; a line break, a control character or 501 characters are refused, nothing queued;
- ``env diff`` compares two versions' packages (added, removed, changed up or down by conda's
  and pip's version orderings) with who built the newer one, when and why; ``env show`` carries
  each version's ``changes`` from the one before, and its ``why``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envctl_shared.jobs import envs

from tests.api_support import ApiDaemon, new_base, start_api_daemon
from tests.conftest import Accounts, User
from tests.jobs_support import CondaPackage, build_channel, hello_packages

EX_DATAERR, EX_NOPERM = 65, 77
ROOT = User("root", 0, 0)


def fake_ipykernel() -> CondaPackage:
    """A package named ipykernel: a version whose record lists it gets a kernelspec (the daemon
    decides from the record, never by running the env)."""
    return CondaPackage("ipykernel", "6.0", files={
        "lib/python3.11/site-packages/ipykernel_launcher.py": ("# not run here\n", False)})


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    base = new_base()
    try:
        channel = build_channel(base / "channel", [*hello_packages(), fake_ipykernel()])
        kernels = base / "kernels"
        kernels.mkdir(mode=0o755)
        yield from start_api_daemon(accounts, extra={"kernels": {"dir": str(kernels)}},
                                    channels=[channel.as_uri()],
                                    default_channels=[channel.as_uri()])
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _spec(api: ApiDaemon, *deps: str) -> str:
    """A spec file of ``deps`` (the daemon's default channel is the module's)."""
    return str(api.write_spec("dependencies:\n" + "".join(f"  - {d}\n" for d in deps)))


def _json(res: subprocess.CompletedProcess[str]) -> Any:
    assert res.returncode == 0, (res.stdout, res.stderr)
    return json.loads(res.stdout)


def _kernel(api: ApiDaemon, env: str) -> dict[str, Any]:
    """The kernelspec the daemon wrote for ``env``."""
    kernels = Path(yaml.safe_load(api.config.read_text())["kernels"]["dir"])
    return dict(json.loads((kernels / f"envctl-{env}" / "kernel.json").read_text()))


def test_description_in_list_show_and_kernel_and_who_may_change_it(
        api: ApiDaemon, accounts: Accounts) -> None:
    a = accounts
    text = "Course env for STAT101: <b>pandas</b> & friends, see 'README' — ask alice"
    res = api.cli(a.alice, "request", "create", "desc-env", "-f",
                  _spec(api, "app=1.0", "ipykernel"), "--description", text)
    assert res.returncode == 0, res.stderr
    listed = {e["name"]: e for e in _json(api.cli(a.mallory, "env", "list", "--json"))}
    assert listed["desc-env"]["description"] == text
    assert listed["desc-env"]["failure"] is None
    assert "Course env for STAT101" in api.cli(a.bob, "env", "list").stdout
    shown = _json(api.cli(a.bob, "env", "show", "desc-env", "--json"))
    assert shown["description"] == text
    assert f"  {text}" in api.cli(a.bob, "env", "show", "desc-env").stdout
    name = _kernel(api, "desc-env")["display_name"]
    assert name.startswith("envctl: desc-env — Course env for STAT101: bpandas/b  friends"[:40])
    assert len(name) <= 80 and name.endswith("…")
    assert not set("<>&\"'`") & set(name), name
    # only its owner and admins may change it
    for user in (a.bob, a.mallory):
        res = api.cli(user, "env", "describe", "desc-env", "mine now")
        assert res.returncode == EX_NOPERM, res.stderr
    # one paragraph of printable text, at most 500 characters
    for bad, why in (("two\nlines", "U+000A"), ("\x1b]0;pwned\x07", "U+001B"),
                     ("right\u202eleft", "U+202E"), ("x" * 501, "at most 500")):
        res = api.cli(a.alice, "env", "describe", "desc-env", bad)
        assert res.returncode == EX_DATAERR and why in res.stderr, res.stderr
        res = api.cli(a.alice, "request", "create", "desc-bad", "-f", _spec(api, "app=1.0"),
                      "--description", bad)
        assert res.returncode == EX_DATAERR and why in res.stderr, res.stderr
    assert "desc-bad" not in {e["name"] for e in
                              _json(api.cli(a.alice, "env", "list", "--json"))}
    out = _json(api.cli(a.alice, "env", "describe", "desc-env", "  Teaching env  ", "--json"))
    assert out["name"] == "desc-env" and out["description"] == "Teaching env"
    assert _kernel(api, "desc-env")["display_name"] == "envctl: desc-env — Teaching env"
    out = _json(api.cli(ROOT, "env", "describe", "desc-env", "", "--json"))  # an admin clears
    assert out["description"] is None
    assert _kernel(api, "desc-env")["display_name"] == "envctl: desc-env"
    listed = {e["name"]: e for e in _json(api.cli(a.bob, "env", "list", "--json"))}
    assert listed["desc-env"]["description"] is None


def test_diff_between_versions_and_changes_in_show(api: ApiDaemon, accounts: Accounts) -> None:
    a = accounts
    res = api.cli(a.alice, "request", "create", "diffed", "-f", _spec(api, "app=1.0"),
                  "--description", "first cut")
    assert res.returncode == 0, res.stderr
    res = api.cli(a.alice, "request", "create", "diffed", "-f", _spec(api, "app=2.0", "hello"),
                  "--replace", "--description", "app 2 and hello for week 3")
    assert res.returncode == 0, res.stderr
    diff = _json(api.cli(a.mallory, "env", "diff", "diffed", "--json"))  # anyone may look
    assert (diff["name"], diff["from"], diff["to"]) == ("diffed", "v1", "v2")
    assert diff["why"] == "app 2 and hello for week 3"
    assert diff["by"]["name"] == a.alice.name and diff["at"] > 0
    assert [(p["name"], p["source"]) for p in diff["added"]] == \
        [("greet-data", "conda"), ("hello", "conda"), ("libgreet", "conda")]
    assert diff["removed"] == []
    assert diff["changed"] == [{"name": "app", "from": "1.0", "to": "2.0", "source": "conda",
                                "direction": "up"}]
    back = _json(api.cli(a.bob, "env", "diff", "diffed", "v2", "v1", "--json"))
    assert back["changed"][0]["direction"] == "down"
    assert [p["name"] for p in back["removed"]] == ["greet-data", "hello", "libgreet"]
    assert back["why"] == "first cut"
    text = api.cli(a.bob, "env", "diff", "diffed").stdout
    assert "diffed: v1 -> v2" in text and "why: app 2 and hello for week 3" in text
    assert "  up       app 1.0 -> 2.0 (conda)" in text and "  added    hello 2.1 (conda)" in text
    one = _json(api.cli(a.bob, "env", "diff", "diffed", "v1", "--json"))  # what v1 brought
    assert one["from"] is None and [p["name"] for p in one["added"]] == ["app"]
    same = api.cli(a.bob, "env", "diff", "diffed", "v2", "v2")
    assert same.returncode == 0 and "no package changed" in same.stdout
    res = api.cli(a.bob, "env", "diff", "diffed", "v7", "v2")
    assert res.returncode == EX_DATAERR and "no built version v7" in res.stderr
    # env show: each version's changes from the one before, and why it was built
    shown = _json(api.cli(a.bob, "env", "show", "diffed", "--json"))
    v1, v2 = shown["versions"]
    assert v1["why"] == "first cut" and v1["changes"]["from"] is None
    assert v2["why"] == diff["why"]
    assert v2["changes"] == {k: v for k, v in diff.items() if k not in ("name", "by", "at")}
    text = api.cli(a.bob, "env", "show", "diffed").stdout
    assert "    why: app 2 and hello for week 3" in text
    assert "    changes from v1:\n      added    greet-data 1.0 (conda)" in text


@pytest.mark.parametrize(("source", "old", "new", "want"), [
    ("conda", "1.9", "1.10", "up"), ("conda", "2.0", "2.0a1", "down"),
    ("conda", "1.0", "1.0.0", "other"), ("conda", "2021.1", "2020.12", "down"),
    ("pip", "1.0rc1", "1.0", "up"), ("pip", "1.0.post1", "1.0", "down"),
    ("pip", "1!0.1", "2.0", "down"), ("pip", "not a version", "1.0", "other"),
    ("conda", "1.0", "1.0", "other"),
    # what a build's own code can leave in a dist-info's METADATA (the inventory keeps any
    # printable text): digits Python's int() refuses made env show and env diff an internal
    # error for everyone
    ("pip", "1.\u00b2", "2.\u00b2", "other"), ("conda", "\u0661.0", "\u0662.0", "other")])
def test_versions_compare_as_their_installer_orders_them(source: str, old: str, new: str,
                                                         want: str) -> None:
    assert envs.compare_versions(source, old, new) == want


def test_pip_names_compare_normalised() -> None:
    out = envs.diff_packages([{"manager": "pip", "name": "Foo_Bar", "version": "1.0"}],
                             [{"manager": "pip", "name": "foo.bar", "version": "1.1"},
                              {"manager": "conda", "name": "foo_bar", "version": "1.0",
                               "build": "0"}])
    assert out["changed"] == [{"name": "foo.bar", "from": "1.0", "to": "1.1", "source": "pip",
                               "direction": "up"}]
    assert out["added"] == [{"name": "foo_bar", "version": "1.0", "source": "conda"}]
