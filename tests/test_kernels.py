"""Every env with ipykernel becomes a Jupyter kernel, found and started by real jupyter_client.

A real daemon builds a venv env with ipykernel (offline: the wheels of ipykernel and its
dependencies are downloaded from PyPI once into :data:`WHEELS` and reused by later runs) and a
hand-made ``kversion`` wheel whose module says which version it is. Then, as a user's server
would: ``JUPYTER_PATH`` points at the shared ``share/jupyter``, ``KernelSpecManager`` lists
the kernelspec, a ``KernelManager`` starts it, the kernel prints ``sys.prefix`` and the
version, and it is shut down cleanly. A replace with ``kversion`` 2.0 is seen by the next kernel
start through the same kernelspec; ``envctl kernels sync`` (admins) adds a hand-made env and
removes the kernel of an env that is gone; an update without ipykernel removes the kernel, a
rollback to a version with it brings it back; a kernel sees its version's variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envctl_shared.errors import EX_NOPERM
from envctl_shared.jobs import envs

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts
from tests.helpers import VENV_BIN
from tests.jobs_support import write_wheel

jupyter_client = pytest.importorskip("jupyter_client")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

pytestmark = pytest.mark.slow
WHEELS = Path("/tmp/envctl-kernel-wheels")  # a download cache shared by test runs
SPEC = "dependencies:\n  - pip:\n    - ipykernel\n    - kversion=={version}\n"


def kernel_wheels() -> Path:
    """ipykernel and its dependencies as wheels, downloaded at first use."""
    if not any(WHEELS.glob("ipykernel-*.whl")):
        WHEELS.mkdir(mode=0o755, parents=True, exist_ok=True)
        got = subprocess.run([str(VENV_BIN / "pip"), "download", "--quiet",
                              "--only-binary=:all:", "-d", str(WHEELS), "ipykernel"],
                             capture_output=True, text=True, timeout=540)
        if got.returncode != 0:  # offline and no cache: say so instead of failing
            pytest.skip(f"cannot download ipykernel's wheels into {WHEELS}: "
                        f"{got.stderr.strip()[-300:]}")
    os.chmod(WHEELS, 0o755)
    for wheel in WHEELS.iterdir():
        os.chmod(wheel, 0o644)  # the build user reads them
    return WHEELS


def kernel_daemon(accounts: Accounts, prefix: str,
                  **settings: Any) -> Iterator[tuple[ApiDaemon, Path]]:
    """A daemon that publishes kernelspecs into a kernels dir of its own, and builds from the
    ipykernel wheels plus ``kversion`` 1.0 and 2.0 (``settings``: more requests keys)."""
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    os.chmod(base, 0o755)
    own = base / "wheels"
    for version in ("1.0", "2.0"):
        write_wheel(own, "kversion", version, f"VERSION = {version!r}\n")
    kernels = base / "share" / "jupyter" / "kernels"
    try:
        # --no-compile: pip's byte-compiling of ipykernel's dependencies (IPython, jedi,
        # pygments...) is half of each build's time; a kernel compiles only what it imports.
        for api in start_api_daemon(
                accounts, extra={"kernels": {"dir": str(kernels)}}, timeout=600,
                pip_args=["--no-index", "--no-compile", "--find-links", str(kernel_wheels()),
                          "--find-links", str(own)], **settings):
            yield api, kernels
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def kapi(accounts: Accounts) -> Iterator[tuple[ApiDaemon, Path]]:
    yield from kernel_daemon(accounts, "envctl-kernels-")


def _build(api: ApiDaemon, accounts: Accounts, name: str, version: str,
           *extra: str) -> dict:
    spec = api.write_spec(SPEC.format(version=version))
    res = api.cli(accounts.alice, "request", "create", name, "-f", str(spec), "--backend",
                  "venv", "--json", *extra, timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    return dict(json.loads(res.stdout))


def _specs(kernels: Path, monkeypatch: pytest.MonkeyPatch) -> KernelSpecManager:
    """What a user's server sees with the shared directory on its JUPYTER_PATH."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernels.parent))
    return KernelSpecManager()


@contextlib.contextmanager
def _kernel(ksm: KernelSpecManager, name: str, runtime: Path) -> Iterator[Callable[[str], str]]:
    """Start kernel ``name``; yield a function running code in it (its stdout); shut it down."""
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm,
                       connection_file=str(runtime / f"{name}.json"))
    km.start_kernel()
    try:
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=120)

            def run(code: str) -> str:
                out: list[str] = []
                reply = kc.execute_interactive(
                    code, timeout=60,
                    output_hook=lambda m: out.append(m["content"]["text"])
                    if m["msg_type"] == "stream" else None)
                assert reply["content"]["status"] == "ok", reply["content"]
                return "".join(out)
            yield run
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=False)
    assert not km.is_alive()


def _run(ksm: KernelSpecManager, name: str, code: str, runtime: Path) -> str:
    """Start kernel ``name``, run ``code``, return its stdout; shut it down cleanly."""
    with _kernel(ksm, name, runtime) as run:
        return run(code)


CODE = "import sys, kversion; print(sys.prefix, kversion.VERSION)"


def test_a_built_env_is_a_kernel_and_an_update_is_the_next_start(
        kapi: tuple[ApiDaemon, Path], accounts: Accounts, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    api, kernels = kapi
    job = _build(api, accounts, "kenv", "1.0")
    assert "kernelspec envctl-kenv written" in Path(job["log_path"]).read_text()
    ksm = _specs(kernels, monkeypatch)
    assert "envctl-kenv" in ksm.find_kernel_specs()
    spec = ksm.get_kernel_spec("envctl-kenv")
    prefix = api.root / "kenv"
    assert spec.display_name == "envctl: kenv" and spec.language == "python"
    assert spec.argv[:2] == ["/bin/sh", "-c"] and str(prefix) in spec.argv  # the stable path
    kernel_json = kernels / "envctl-kenv" / "kernel.json"
    st = kernel_json.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    assert [p.name for p in kernel_json.parent.iterdir()] == ["kernel.json"]  # no temp left
    v1 = os.path.realpath(prefix)
    assert v1 != str(prefix)  # the daemon's symlink to its first version
    with _kernel(ksm, "envctl-kenv", tmp_path) as run:
        assert run("import os, sys; print(sys.prefix, os.environ['VIRTUAL_ENV'])") == \
            f"{v1} {v1}\n"
        # An update while the kernel runs: the same kernelspec; the running kernel keeps
        # its version (a module first imported now still comes from 1.0) ...
        _build(api, accounts, "kenv", "2.0", "--replace")
        assert os.path.realpath(prefix) != v1
        assert run(CODE) == f"{v1} 1.0\n"
    assert json.loads(kernel_json.read_text())["argv"] == spec.argv  # unchanged by the update
    # ... and the next start runs the new one.
    assert _run(_specs(kernels, monkeypatch), "envctl-kenv", CODE, tmp_path) == \
        f"{os.path.realpath(prefix)} 2.0\n"


def test_kernels_sync_adds_hand_made_envs_and_drops_gone_ones(
        kapi: tuple[ApiDaemon, Path], accounts: Accounts, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    api, kernels = kapi
    if not (api.root / "kenv").exists():
        _build(api, accounts, "kenv", "1.0")
    hand = api.root / "handmade"
    subprocess.run(["cp", "-a", f"{api.root / 'kenv'}/.", str(hand)], check=True)  # a copy
    (api.root / "no-python").mkdir()  # not a kernel: skipped quietly
    res = api.cli(accounts.alice, "kernels", "sync")
    assert res.returncode == EX_NOPERM and "only envctl admins" in res.stderr
    res = subprocess.run([str(VENV_BIN / "envctl"), "kernels", "sync", "--json", "--socket",
                          str(api.sock)], text=True, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    done = json.loads(res.stdout)
    assert sorted(done["written"]) == ["envctl-handmade", "envctl-kenv"], done
    assert _run(_specs(kernels, monkeypatch), "envctl-handmade", CODE, tmp_path) \
        .startswith(f"{hand} ")
    shutil.rmtree(hand)  # an admin removes an env by hand: the next sync drops its kernel
    res = subprocess.run([str(VENV_BIN / "envctl"), "kernels", "sync", "--json", "--socket",
                          str(api.sock)], text=True, capture_output=True, timeout=300)
    assert json.loads(res.stdout)["removed"] == ["envctl-handmade"], res.stderr
    assert "envctl-handmade" not in _specs(kernels, monkeypatch).find_kernel_specs()
    assert not (kernels / "envctl-handmade").exists()
    (api.root / "no-python").rmdir()
    # An update without ipykernel takes the kernel away with it.
    spec = api.write_spec("dependencies:\n  - pip:\n    - kversion==1.0\n")
    res = api.cli(accounts.alice, "request", "create", "kenv", "-f", str(spec), "--backend",
                  "venv", "--replace", "--json", timeout=600)
    assert res.returncode == 0, res.stderr
    assert "kernelspec envctl-kenv removed" in Path(json.loads(res.stdout)["log_path"]).read_text()
    assert "envctl-kenv" not in _specs(kernels, monkeypatch).find_kernel_specs()


def test_removing_an_env_removes_its_kernel(
        kapi: tuple[ApiDaemon, Path], accounts: Accounts, monkeypatch: pytest.MonkeyPatch) -> None:
    api, kernels = kapi
    _build(api, accounts, "kgone", "1.0")
    assert "envctl-kgone" in _specs(kernels, monkeypatch).find_kernel_specs()
    res = api.cli(accounts.alice, "env", "remove", "kgone", "--json")
    assert res.returncode == 0, res.stderr + res.stdout
    assert not (api.root / "kgone").exists()
    assert "envctl-kgone" not in _specs(kernels, monkeypatch).find_kernel_specs()
    assert not (kernels / "envctl-kgone").exists()


def _set_variables(api: ApiDaemon, name: str, version: str, variables: dict[str, str]) -> None:
    """``variables`` in a version's record, as a build of a spec with ``variables:`` writes
    them (the daemon runs as root here: a record root writes is the daemon's)."""
    env_dir = api.root / ".envctl" / "envs" / name
    fd = os.open(env_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rec = envs.read_record(fd, f"{version}.json")
        assert rec is not None and rec["state"] == "ready"
        envs.write_record(fd, f"{version}.json", {**rec, "variables": variables})
    finally:
        os.close(fd)


VARS = "import os, sys, kversion; print(os.environ.get('KVAR'), kversion.VERSION)"


def test_rollback_restores_the_kernel_and_a_kernel_sees_its_versions_variables(
        kapi: tuple[ApiDaemon, Path], accounts: Accounts, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """v1 has ipykernel and KVAR=one; v2 has no ipykernel: the update removes the kernel, a
    rollback to v1 brings it back (started, it sees v1's variable), a rollback to v2 removes
    it again. The variables are read when the kernel starts, from the version it starts on."""
    api, kernels = kapi
    _build(api, accounts, "kroll", "1.0")
    _set_variables(api, "kroll", "v1", {"KVAR": "one"})
    assert _run(_specs(kernels, monkeypatch), "envctl-kroll", VARS, tmp_path) == "one 1.0\n"
    spec = api.write_spec("dependencies:\n  - pip:\n    - kversion==2.0\n")
    res = api.cli(accounts.alice, "request", "create", "kroll", "-f", str(spec), "--backend",
                  "venv", "--replace", "--json", timeout=600)
    assert res.returncode == 0, res.stderr
    assert not (kernels / "envctl-kroll").exists()
    res = api.cli(accounts.alice, "env", "rollback", "kroll", "--json")
    assert res.returncode == 0, res.stderr + res.stdout
    assert json.loads(res.stdout)["kernel"].startswith("kernelspec envctl-kroll written")
    assert _run(_specs(kernels, monkeypatch), "envctl-kroll", VARS, tmp_path) == "one 1.0\n"
    res = api.cli(accounts.alice, "env", "rollback", "kroll", "--to", "v2", "--json")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "envctl-kroll" not in _specs(kernels, monkeypatch).find_kernel_specs()
    assert not (kernels / "envctl-kroll").exists()
