"""Installing more without writing the shared version: ``env add``/``env update`` and ``env layer``.

A real daemon (``api_support``), real users, real builds, offline:

- ``env add`` as the owner (alice) builds a version from the current version's recorded spec
  plus the package (rattler, from the local channel), a package already listed is replaced by
  the new entry of its name, the current version's tests run again; ``env update`` builds the
  same spec again and takes a package published since; a member who is not the owner (bob) is
  refused with exit 77, the owner named and both ways out given; a change whose base version
  stopped being current meanwhile (a rollback in between) is refused, never built over it.
- ``env layer`` as bob over a shared venv env (ipykernel and a hand-made wheel in it): made in
  well under a second, its ``bin/python`` a symlink to ``<root>/NAME/bin/python``, ``pip
  install`` of a local wheel works in it (``--no-index --find-links``), it imports the shared
  env's packages, the shared version is untouched; the shared env replaced under it (alice,
  ``--replace``) is what the layer's next start sees; its kernelspec, started by real
  ``jupyter_client`` as bob, imports a package from the layer and one from the shared env.
- two hub users on one uid and one HOME (``JUPYTERHUB_USER`` differs) get separate layers and
  kernels; a layer over a conda prefix (a real Python from a local channel) has ``home`` =
  ``<root>/NAME/bin`` and follows a replace of the shared env.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from envctl_shared.errors import EX_NOPERM, Conflict
from envctl_shared.jobs import JobManager, State

from tests.api_support import ApiDaemon, start_api_daemon
from tests.conftest import Accounts, User
from tests.helpers import SYSTEM_PYTHON, VENV_BIN
from tests.jobs_support import (
    CondaPackage,
    JobsEnv,
    app_package,
    build_channel,
    full_log,
    python_package,
    wait_done,
    write_conda_package,
    write_wheel,
)
from tests.test_kernels import kernel_wheels

pytest_plugins = ("tests.fixtures_jobs",)  # jobs_env, manager_factory
pytestmark = pytest.mark.slow

jupyter_client = pytest.importorskip("jupyter_client")

KSPEC = "dependencies:\n  - pip:\n    - ipykernel\n    - kversion=={v}\n"


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    """A daemon whose venv builds find ipykernel's wheels and ``kversion`` 1.0/2.0."""
    own = Path(tempfile.mkdtemp(dir="/tmp", prefix="envctl-layer-wheels-"))
    os.chmod(own, 0o755)
    try:
        for version in ("1.0", "2.0"):
            write_wheel(own, "kversion", version, f"VERSION = {version!r}\n")
        write_wheel(own, "kextra", "1.0")
        yield from start_api_daemon(accounts, timeout=600, pip_args=[
            "--no-index", "--no-compile", "--find-links", str(kernel_wheels()),
            "--find-links", str(own)])
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _create(api: ApiDaemon, user: User, name: str, spec: str, *extra: str) -> dict:
    res = api.cli(user, "request", "create", name, "-f", str(api.write_spec(spec)), "--json",
                  *extra, timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    return dict(json.loads(res.stdout))


def _show(api: ApiDaemon, user: User, name: str) -> dict:
    res = api.cli(user, "env", "show", name, "--json", check=True)
    return dict(json.loads(res.stdout))


def _version(env: dict, version: str) -> dict:
    return next(v for v in env["versions"] if v["version"] == version)


def _names(version: dict) -> dict[str, str]:
    return {p["name"]: p["version"] for p in version["packages"]}


# -- env add / env update -----------------------------------------------------------------------


def test_env_add_and_update_by_the_owner_and_a_clear_refusal_for_others(
        api: ApiDaemon, accounts: Accounts) -> None:
    name = "addme"
    _create(api, accounts.alice, name, api.hello_spec(), "--test", "hello")
    # the owner adds a package: v2 = v1's spec + app, built, tested, current
    res = api.cli(accounts.alice, "env", "add", name, "app=1.0", "--test", "app")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "environment addme is ready" in res.stdout and "==> running" in res.stderr
    env = _show(api, accounts.alice, name)
    v2 = _version(env, "v2")
    assert env["current"] == "v2" and v2["current"]
    assert {"hello", "libgreet", "app"} <= set(_names(v2)) and _names(v2)["app"] == "1.0"
    assert v2["tests"] == ["hello", "app"]  # v1's, then the new one
    assert "- hello" in v2["spec"] and "- app=1.0" in v2["spec"]
    assert (api.root / name / "share" / "app" / "VERSION").read_text() == "1.0\n"
    # a package already listed is replaced by the new entry of its name, not listed twice
    res = api.cli(accounts.alice, "env", "add", name, "app>=2", "--json")
    assert res.returncode == 0, res.stderr + res.stdout
    job = json.loads(res.stdout)
    assert job["state"] == "succeeded" and job["replace"] and "version v3" in job["exit_detail"]
    v3 = _version(_show(api, accounts.alice, name), "v3")
    assert "app=1.0" not in v3["spec"] and v3["spec"].count("app") == 1
    assert _names(v3)["app"] == "2.0"

    # a member who is not the owner: refused, exit 77, the owner and the ways out named
    res = api.cli(accounts.bob, "env", "add", name, "app=1.0")
    assert res.returncode == EX_NOPERM, res.stderr
    assert f"belongs to {accounts.alice.name}" in res.stderr
    assert f"envctl env layer {name}" in res.stderr
    assert f"envctl request create {name}-test" in res.stderr
    res = api.cli(accounts.bob, "env", "update", name, "--json")
    assert res.returncode == EX_NOPERM
    assert json.loads(res.stdout)["error"]["code"] == "not-authorised"
    assert _show(api, accounts.bob, name)["current"] == "v3"  # nothing queued, nothing built

    # update: the same spec solved again takes a package published since
    write_conda_package(app_package("3.0"), api.channel / "noarch")
    build_channel(api.channel, [])  # re-index
    res = api.cli(accounts.alice, "env", "update", name)
    assert res.returncode == 0, res.stderr + res.stdout
    env = _show(api, accounts.alice, name)
    v4 = _version(env, "v4")
    assert env["current"] == "v4" and v4["spec"] == v3["spec"]
    assert _names(v4)["app"] == "3.0"
    # nothing to add is a usage error; an env nobody built is not found
    assert api.cli(accounts.alice, "env", "add", name).returncode == 64
    res = api.cli(accounts.alice, "env", "update", "no-such-env")
    assert res.returncode == 65 and "no environment 'no-such-env'" in res.stderr


def test_env_add_pip_replaces_a_listed_requirement_and_adds_another(
        api: ApiDaemon, accounts: Accounts) -> None:
    name = "addpip"
    _create(api, accounts.alice, name, "dependencies:\n  - pip:\n    - kversion==1.0\n",
            "--backend", "venv")
    res = api.cli(accounts.alice, "env", "add", name, "--pip", "kversion==2.0", "kextra")
    assert res.returncode == 0, res.stderr + res.stdout
    v2 = _version(_show(api, accounts.alice, name), "v2")
    assert "kversion==1.0" not in v2["spec"] and "- kversion==2.0" in v2["spec"]
    assert _names(v2)["kversion"] == "2.0" and _names(v2)["kextra"] == "1.0"


def test_a_change_is_not_built_over_a_version_that_stopped_being_current(
        jobs_env: JobsEnv, manager_factory: Callable[..., JobManager]) -> None:
    """A rollback between reading the current spec and queuing: Conflict, nothing queued."""
    mgr = manager_factory()
    who = jobs_env.requester()
    for spec in ("dependencies:\n  - app=1.0\n", "dependencies:\n  - app=2.0\n"):
        job = wait_done(mgr, mgr.submit(who, "racy", spec, replace=True).id, 240)
        assert job.state is State.SUCCEEDED, full_log(mgr, job.id)

    def change(text: str) -> str:
        # what another request did meanwhile
        mgr.environments.rollback(who, "racy", "v1", jobs_env.allow(who, "env-rollback", "racy"))
        return text

    with pytest.raises(Conflict, match="changed while the request was prepared"):
        mgr.submit_change(who, "racy", change, (), jobs_env.allow(who, "env-update", "racy"))
    assert mgr.list() == [] and mgr.environments.show("racy")["current"] == "v1"


# -- env layer ----------------------------------------------------------------------------------


def _as(user: User, home: Path, *argv: str, env: dict[str, str] | None = None,
        check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``user`` with HOME ``home`` and a clean environment."""
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
               **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ
                  else {}), **(env or {})}
    res = subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                          "--init-groups", "env", "-i",
                          *(f"{k}={v}" for k, v in environ.items()), *argv],
                         text=True, capture_output=True, timeout=timeout, cwd="/", check=False)
    if check:
        assert res.returncode == 0, f"{argv}: {res.stderr}{res.stdout}"
    return res


def _home(api: ApiDaemon, user: User, name: str) -> Path:
    home = Path(tempfile.mkdtemp(dir=api.base, prefix=f"home-{name}-"))
    os.chown(home, user.uid, user.gid)
    return home


def _layer(api: ApiDaemon, user: User, home: Path, name: str,
           env: dict[str, str] | None = None) -> dict:
    res = _as(user, home, str(VENV_BIN / "envctl"), "env", "layer", name, "--json",
              env={"ENVCTL_SOCKET": str(api.sock), **(env or {})})
    return dict(json.loads(res.stdout))


@pytest.mark.serial  # a wall-time bound: it needs the CPUs to itself
def test_a_layer_is_made_in_well_under_a_second(scratch: Path, accounts: Accounts) -> None:
    """The README's promise, timed where nothing else runs (the stories below print their
    times beside other tests): a layer over a plain venv, named by its path (no daemon)."""
    shared = scratch / "envs" / "plain"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(shared)], check=True)
    home = scratch / "home"
    home.mkdir()
    os.chown(home, accounts.bob.uid, accounts.bob.gid)
    res = _as(accounts.bob, home, str(VENV_BIN / "envctl"), "env", "layer", str(shared), "--json")
    made = json.loads(res.stdout)
    assert made["env"] == str(shared) and made["seconds"] < 1.0, made


def _tree(path: Path) -> list[tuple[str, int, int, float]]:
    """Every entry of a version with its mode, size and (files) mtime: what "untouched" means.
    Python's bytecode caches aside: importing from a version that is still group-writable
    (not frozen yet) writes them."""
    out = []
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for entry in dirs + files:
            st = os.lstat(os.path.join(dirpath, entry))
            out.append((os.path.join(dirpath, entry), st.st_mode, st.st_size,
                        st.st_mtime if entry in files else 0.0))
    return sorted(out)


KERNEL_SCRIPT = """
import json, sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
name, runtime, code = sys.argv[1:4]
ksm = KernelSpecManager()
spec = ksm.get_kernel_spec(name)
km = KernelManager(kernel_name=name, kernel_spec_manager=ksm,
                   connection_file=runtime + "/" + name + ".json")
km.start_kernel()
out = []
try:
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda m: out.append(
            m["content"]["text"]) if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
finally:
    km.shutdown_kernel(now=False)
print(json.dumps({"display_name": spec.display_name, "out": "".join(out)}))
"""


def test_a_layer_takes_pip_installs_follows_the_shared_env_and_is_a_kernel(
        api: ApiDaemon, accounts: Accounts, capsys: pytest.CaptureFixture[str]) -> None:
    name = "layered"
    _create(api, accounts.alice, name, KSPEC.format(v="1.0"), "--backend", "venv")
    version = (api.root / name).resolve()
    before = _tree(version)
    bob = accounts.bob
    home = _home(api, bob, name)
    made = _layer(api, bob, home, name)
    with capsys.disabled():
        print(f"\nenv layer made in {made['seconds']:.3f} s (a venv over a shared venv)")
    layer = home / ".local" / "share" / "envctl" / "layers" / name
    assert made["prefix"] == str(layer) and made["env"] == str(api.root / name)
    # through the stable path, at every start
    assert os.readlink(layer / "bin" / "python") == str(api.root / name / "bin" / "python")
    assert f"envctl-layer = {api.root / name}" in (layer / "pyvenv.cfg").read_text()
    # pip install of a local wheel, offline, into the layer (as bob)
    wheels = Path(tempfile.mkdtemp(dir=api.base, prefix="mine-"))
    write_wheel(wheels, "mine", "1.0", "WHO = 'mine'\n")
    os.chmod(wheels, 0o755)
    _as(bob, home, str(layer / "bin" / "pip"), "install", "--no-index", "--find-links",
        str(wheels), "mine")
    code = "import mine, kversion; print(mine.WHO, kversion.VERSION, kversion.__file__)"
    out = _as(bob, home, str(layer / "bin" / "python"), "-c", code).stdout.split()
    assert out[:2] == ["mine", "1.0"] and out[2].startswith(str(api.root / name))
    assert list(layer.glob("lib/python3*/site-packages/mine.py"))
    # the shared version is untouched, and has no 'mine'
    after = _tree(version)
    assert after == before, sorted(set(after) ^ set(before))[:10]
    assert not list(version.glob("lib/python3*/site-packages/mine*"))

    # its kernel, started by jupyter_client as bob: a package of the layer and one of the env
    kernel = made["kernel"]
    assert kernel["display_name"] == f"{name} (my layer)"
    kjson = home / ".local" / "share" / "jupyter" / "kernels" / kernel["name"] / "kernel.json"
    assert str(layer) in json.loads(kjson.read_text())["argv"]
    runtime = Path(tempfile.mkdtemp(dir=home))
    os.chown(runtime, bob.uid, bob.gid)
    got = json.loads(_as(bob, home, str(VENV_BIN / "python"), "-c", KERNEL_SCRIPT,
                         kernel["name"], str(runtime), code + "; import sys; print(sys.prefix)",
                         env={"JUPYTER_RUNTIME_DIR": str(runtime)}, timeout=300).stdout)
    assert got["display_name"] == f"{name} (my layer)"
    assert got["out"].split()[:2] == ["mine", "1.0"] and got["out"].split()[3] == str(layer)

    # the shared env replaced under it: the layer's next start sees the new version
    _create(api, accounts.alice, name, KSPEC.format(v="2.0"), "--backend", "venv", "--replace")
    out = _as(bob, home, str(layer / "bin" / "python"), "-c", code).stdout.split()
    assert out[:2] == ["mine", "2.0"] and str(api.root / name) in out[2]
    # made again: re-pointed, what was installed kept
    again = _layer(api, bob, home, name)
    assert again["refreshed"] and again["prefix"] == str(layer)
    assert _as(bob, home, str(layer / "bin" / "python"), "-c", "import mine").returncode == 0


def test_hub_users_on_one_uid_and_one_home_get_separate_layers(
        api: ApiDaemon, accounts: Accounts) -> None:
    name = "hubshared"
    _create(api, accounts.alice, name, KSPEC.format(v="1.0"), "--backend", "venv")
    jovyan = accounts.bob  # one uid for every hub user, and one HOME
    home = _home(api, jovyan, name)
    ann = _layer(api, jovyan, home, name, env={"JUPYTERHUB_USER": "ann"})
    ben = _layer(api, jovyan, home, name, env={"JUPYTERHUB_USER": "ben"})
    base = home / ".local" / "share" / "envctl" / "layers"
    assert ann["prefix"] == str(base / "@ann" / name) and ben["prefix"] == str(base / "@ben" / name)
    assert ann["kernel"]["name"] != ben["kernel"]["name"]
    assert "ann" in ann["kernel"]["display_name"] and "ben" in ben["kernel"]["display_name"]
    wheels = Path(tempfile.mkdtemp(dir=api.base, prefix="annwheel-"))
    write_wheel(wheels, "annonly", "1.0")
    os.chmod(wheels, 0o755)
    _as(jovyan, home, f"{ann['prefix']}/bin/pip", "install", "--no-index", "--find-links",
        str(wheels), "annonly")
    assert _as(jovyan, home, f"{ann['prefix']}/bin/python", "-c", "import annonly").returncode == 0
    res = _as(jovyan, home, f"{ben['prefix']}/bin/python", "-c", "import annonly", check=False)
    assert res.returncode == 1 and "No module named 'annonly'" in res.stderr


# -- a layer over a conda prefix ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pyapi(accounts: Accounts) -> Iterator[ApiDaemon]:
    """A daemon whose channel also holds a real Python (the machine's) and ``pymod`` 1/2: a
    module where this Debian python's site finds it in a prefix (``lib/python3/dist-packages``).
    """
    channel = Path(tempfile.mkdtemp(dir="/tmp/envctl-tests", prefix="pylayer-"))
    os.chmod(channel, 0o755)
    try:
        build_channel(channel, [python_package(), *(
            CondaPackage("pymod", v, files={"lib/python3/dist-packages/pymod.py":
                                            (f"V = {v!r}\n", False)}) for v in ("1", "2"))])
        yield from start_api_daemon(accounts, channels=[channel.as_uri()],
                                    default_channels=[channel.as_uri()])
    finally:
        shutil.rmtree(channel, ignore_errors=True)


def test_a_layer_over_a_conda_prefix_has_its_stable_bin_as_home(
        pyapi: ApiDaemon, accounts: Accounts, capsys: pytest.CaptureFixture[str]) -> None:
    name = "condashared"
    _create(pyapi, accounts.alice, name, "dependencies:\n  - python\n  - pymod=1\n")
    bob = accounts.bob
    home = _home(pyapi, bob, name)
    made = _layer(pyapi, bob, home, name)
    with capsys.disabled():
        print(f"\nenv layer made in {made['seconds']:.3f} s (a venv over a conda prefix)")
    stable = pyapi.root / name
    assert made["home"] == str(stable / "bin")
    assert made["kernel"] is None  # no ipykernel anywhere
    layer = Path(made["prefix"])
    code = "import sys, pymod; print(sys.base_prefix, pymod.V, pymod.__file__)"
    out = _as(bob, home, str(layer / "bin" / "python"), "-c", code).stdout.split()
    assert out[0] == str(stable) and out[1] == "1" and out[2].startswith(str(stable))
    # no pip in the shared env: the layer's pip bootstraps itself into the layer, then installs
    assert made["pip"] is False
    wheels = Path(tempfile.mkdtemp(dir=pyapi.base, prefix="mine-"))
    write_wheel(wheels, "mine", "1.0", "WHO = 'mine'\n")
    os.chmod(wheels, 0o755)
    _as(bob, home, str(layer / "bin" / "pip"), "install", "--no-index", "--find-links",
        str(wheels), "mine")
    assert list(layer.glob("lib/python3.11/site-packages/pip")) and \
        not list(stable.glob("lib/python3.11/site-packages/pip"))
    _create(pyapi, accounts.alice, name, "dependencies:\n  - python\n  - pymod=2\n",
            "--replace")
    out = _as(bob, home, str(layer / "bin" / "python"), "-c", code + "; import mine").stdout
    assert out.split()[0] == str(stable) and out.split()[1] == "2"
    # as root: refused, nothing run
    res = subprocess.run([str(VENV_BIN / "envctl"), "env", "layer", str(stable), "--prefix",
                          str(home / "root-layer")], capture_output=True, text=True, check=False)
    assert res.returncode == 64 and "not as root" in res.stderr
    assert not (home / "root-layer").exists()
