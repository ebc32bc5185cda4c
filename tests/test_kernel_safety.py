"""The kernels code never runs an env, names kernelspecs one-to-one, and keeps kernels.dir out
of the roots.

Reproduced against a real daemon, with hand-made envs as any member can make them: a
``bin/python`` that writes a marker and sleeps 60 s (``kernels sync`` ran it as the build user,
outside any cgroup, with no overall limit: two of them made a sync take 120 s); envs ``Foo`` and
``foo-1cbec737`` (both got kernelspec ``envctl-foo-1cbec737``: one overwrote the other, and a
removal deleted both envs' kernel), with a kernelspec of ``Foo`` left under that old name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from envctl_shared import config as cfgmod
from envctl_shared.errors import ConfigError, Conflict
from envctl_shared.jobs import kernels

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import VENV_BIN

ENVCTL = str(VENV_BIN / "envctl")


@pytest.fixture(scope="module")
def kapi(accounts: Accounts) -> Iterator[tuple[ApiDaemon, Path]]:
    base = Path("/tmp/envctl-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    kdir = base / f"kernels-safety-{os.getpid()}"
    try:
        for api in start_api_daemon(accounts, extra={"kernels": {"dir": str(kdir)}}):
            yield api, kdir
    finally:
        shutil.rmtree(kdir, ignore_errors=True)


def hand_made_env(path: Path) -> None:
    """A real venv (its python finds the package, as the old probe asked) with ipykernel's
    files in its site-packages — no more than the name's files are needed now."""
    subprocess.run([str(VENV_BIN / "python"), "-m", "venv", "--without-pip", str(path)],
                   check=True, timeout=60)
    site = next(path.glob("lib/python*/site-packages"))
    (site / "ipykernel").mkdir()
    (site / "ipykernel" / "__init__.py").write_text("")
    (site / "ipykernel_launcher.py").write_text("")


def sync(api: ApiDaemon, timeout: float = 150) -> dict:
    res = subprocess.run([ENVCTL, "kernels", "sync", "--json", "--socket", str(api.sock)],
                         text=True, capture_output=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def owner(kdir: Path, name: str) -> str:
    return str(json.loads((kdir / name / "kernel.json").read_text())["metadata"]["envctl"]["env"])


def test_sync_never_runs_a_hand_made_python(kapi: tuple[ApiDaemon, Path]) -> None:
    api, _ = kapi
    marker = api.base / "ran"
    for name in ("evil1", "evil2"):
        env = api.root / name
        site = env / "lib" / "python3.11" / "site-packages"
        site.mkdir(parents=True)
        (site / "ipykernel_launcher.py").write_text("")
        (env / "bin").mkdir()
        (env / "bin" / "python").write_text(f"#!/bin/sh\nid -u >> {marker}\nsleep 60\n")
        os.chmod(env / "bin" / "python", 0o755)
    os.chmod(api.base, 0o777)  # the "python" could write its marker as anyone
    try:
        started = time.monotonic()
        done = sync(api)
        took = time.monotonic() - started
    finally:
        os.chmod(api.base, 0o755)
        for name in ("evil1", "evil2"):
            shutil.rmtree(api.root / name)
    assert not marker.exists(), marker.read_text()
    assert took < 10, took
    assert {"envctl-evil1", "envctl-evil2"} <= set(done["written"])  # decided from its files
    assert sync(api)["removed"] == ["envctl-evil1", "envctl-evil2"]


def test_kernelspec_names_are_one_to_one_and_owned(kapi: tuple[ApiDaemon, Path]) -> None:
    api, kdir = kapi
    legacy = kdir / "envctl-foo-1cbec737"  # what the old naming gave Foo
    legacy.mkdir(parents=True)
    (legacy / "kernel.json").write_text(json.dumps({"argv": ["x"], "display_name": "envctl: Foo",
                                                    "metadata": {"envctl": {"env": "Foo"}}}))
    for name in ("Foo", "foo-1cbec737", "foo"):
        hand_made_env(api.root / name)
    try:
        done = sync(api)
        assert sorted(done["written"]) == ["envctl-_foo", "envctl-foo", "envctl-foo-1cbec737"]
        # Foo's kernelspec under its old name is removed; the name is foo-1cbec737's now.
        assert done["removed"] == ["envctl-foo-1cbec737"]
        for name, env in (("envctl-_foo", "Foo"), ("envctl-foo-1cbec737", "foo-1cbec737"),
                          ("envctl-foo", "foo")):
            assert owner(kdir, name) == env
            assert str(api.root / env) in json.loads((kdir / name / "kernel.json").read_text())[
                "argv"]
        shutil.rmtree(api.root / "foo-1cbec737")  # gone: only its own kernelspec goes
        done = sync(api)
        assert done["removed"] == ["envctl-foo-1cbec737"]
        assert sorted(p.name for p in kdir.iterdir()) == ["envctl-_foo", "envctl-foo"]
        # A kernelspec another env owns is never overwritten under its name.
        cfg = cfgmod.load(api.config)
        with pytest.raises(Conflict, match="belongs to environment 'Foo'"), \
                kernels._KernelsDir(kdir) as kd:
            kd.write("envctl-_foo", "foo", kernels.spec_for(cfg, "foo"))
        assert owner(kdir, "envctl-_foo") == "Foo"
        # Past the sync's time limit nothing more is decided: kept, said skipped.
        late = kernels.sync(cfg, set(), limit=0)
        assert late.written == late.removed == () and set(late.skipped) >= {"Foo", "foo"}
        assert sorted(p.name for p in kdir.iterdir()) == ["envctl-_foo", "envctl-foo"]
    finally:
        for name in ("Foo", "foo"):
            shutil.rmtree(api.root / name)
    assert sorted(sync(api)["removed"]) == ["envctl-_foo", "envctl-foo"]


def test_kernels_dir_inside_a_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    root.mkdir()
    (tmp_path / "link").symlink_to(root)
    for kdir in (root / "kernels", root, tmp_path / "link" / "share"):
        with pytest.raises(ConfigError) as err:
            cfgmod.parse({"roots": [{"path": str(root), "group": "root"}],
                          "kernels": {"dir": str(kdir)}})
        assert "kernels.dir" in err.value.message and "roots[0]" in err.value.message
        assert err.value.hint and "outside every root" in err.value.hint
    ok = cfgmod.parse({"roots": [{"path": str(root), "group": "root"}],
                       "kernels": {"dir": str(tmp_path / "kernels")}})
    assert ok.kernels.dir == tmp_path / "kernels"
