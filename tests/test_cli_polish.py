"""The CLI never leaves a user guessing: global options on either side of the subcommand, JSON
errors under ``--json``, a true hint on every error, git-style job id prefixes, times with their
zone, ``--help`` that says what a command does, the daemon's own ``.envctl`` reported as the
daemon's, and no internal phase marker in a build log.

Everything runs the real ``envctl`` as real users against one real request-serving daemon.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from envctl_shared import errors
from envctl_shared.cli.output import DEFAULT_HINTS, print_error
from envctl_shared.errors import EX_DATAERR, EX_IOERR, EX_OK, EX_USAGE, NotFound
from envctl_shared.jobs.model import Job, State
from envctl_shared.jobs.store import JobStore

from tests.api_support import VENV_SPEC, ApiDaemon, start_api_daemon
from tests.conftest import Accounts, User
from tests.helpers import REPO, VENV_BIN, as_user, wait_for

PACKAGE = REPO / "daemon" / "envctl_shared"


@pytest.fixture(scope="module")
def api(accounts: Accounts) -> Iterator[ApiDaemon]:
    yield from start_api_daemon(accounts)


def _envctl(api: ApiDaemon, user: User, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``envctl ARGS`` as ``user`` without ENVCTL_SOCKET: the socket comes from the options."""
    argv = api.cli_argv(user, *args, env=env)
    argv = [a for a in argv if not a.startswith("ENVCTL_SOCKET=")]
    return subprocess.run(argv, text=True, capture_output=True, timeout=120, cwd="/")


@pytest.mark.parametrize("where", ["before", "after", "both sides"])
def test_global_options_before_or_after_the_subcommand(api: ApiDaemon, accounts: Accounts,
                                                       where: str) -> None:
    sock = ["--socket", str(api.sock)]
    argv = {"before": [*sock, "--json", "status"], "after": ["status", *sock, "--json"],
            "both sides": ["--json", "status", *sock]}[where]
    res = _envctl(api, accounts.alice, *argv)
    assert res.returncode == EX_OK, res.stderr
    assert json.loads(res.stdout)["pid"] == api.daemon.proc.pid  # type: ignore[union-attr]
    res = _envctl(api, accounts.alice, "--socket", str(api.sock), "request", "list")
    assert res.returncode == EX_OK, res.stderr


def test_errors_are_json_under_json(api: ApiDaemon, accounts: Accounts) -> None:
    # a daemon-side error, --json before the subcommand
    res = _envctl(api, accounts.alice, "--json", "--socket", str(api.sock), "request", "status",
                  "0123456789ab")
    assert res.returncode == EX_DATAERR
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["exit_code"] == EX_DATAERR
    assert doc["error"]["code"] == "not-found" and doc["error"]["hint"]
    assert res.stderr == ""
    # a usage error, found by argparse before it knew what --json meant
    res = _envctl(api, accounts.alice, "--json", "request", "frobnicate")
    assert res.returncode == EX_USAGE
    assert json.loads(res.stdout)["error"]["code"] == "usage"
    # a local error after the subcommand (heal/check)
    res = _envctl(api, accounts.alice, "check", "--group", accounts.shared_group,
                  "/nonexistent-share/envs", "--json")
    assert res.returncode == EX_IOERR
    assert "findmnt" in json.loads(res.stdout)["error"]["hint"]
    # without --json: text on stderr, nothing on stdout
    res = _envctl(api, accounts.alice, "--socket", str(api.sock), "request", "status", "nope")
    assert res.stdout == "" and res.stderr.startswith("envctl: error: ")


def test_heal_and_check_name_what_is_wrong_on_their_command_line(scratch: Path,
                                                                  accounts: Accounts) -> None:
    """A group that does not exist is the --group flag's (exit 64), not a configuration key;
    a configured root that does not exist is a typo or an unmounted share, not a race to
    retry; each command's example is itself."""
    def envctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "envctl"), *args], capture_output=True,
                              text=True, timeout=60, cwd="/")

    res = envctl("heal")
    assert res.returncode == EX_USAGE and "'envctl heal --group" in res.stderr, res.stderr
    res = envctl("check", "--group", "no-such-grp-x", str(scratch))
    assert res.returncode == EX_USAGE, res.stderr
    assert "--group: no such group 'no-such-grp-x'" in res.stderr
    assert "roots[0]" not in res.stderr and "getent group" in res.stderr
    cfg = scratch / "envctld.yaml"
    cfg.write_text(f"roots:\n  - path: ./share/envs\n    group: {accounts.shared_group}\n")
    res = envctl("check", "--config", str(cfg))
    assert res.returncode == EX_IOERR
    assert f"{scratch}/share/envs: no such directory" in res.stderr
    assert "findmnt" in res.stderr and "retry" not in res.stderr, res.stderr


def _hintless_raises(path: Path, error_names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in error_names and len(node.exc.args) < 2 and \
                    not any(k.arg == "hint" for k in node.exc.keywords):
                out.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    return out


def test_every_error_the_cli_raises_has_a_hint() -> None:
    """The CLI's own errors each carry a hint of their own (errors from elsewhere fall back to
    the one that is true of their kind: ``output.DEFAULT_HINTS``, checked below)."""
    names = {n for n, c in vars(errors).items()
             if isinstance(c, type) and issubclass(c, errors.EnvctlError)}
    files = [*sorted((PACKAGE / "cli").glob("*.py")), PACKAGE / "condarc.py",
             PACKAGE / "jobs" / "spec.py"]
    assert [h for f in files for h in _hintless_raises(f, names)] == []


def test_an_error_without_a_hint_still_gets_a_true_one() -> None:
    """Errors raised elsewhere (the daemon, the client) without a hint get their kind's."""
    codes = {c.code for c in vars(errors).values()
             if isinstance(c, type) and issubclass(c, errors.EnvctlError)} - {"error"}
    assert codes <= set(DEFAULT_HINTS)
    out = io.StringIO()
    print_error(errors.EnvctlError.from_dict({"code": "conflict", "message": "busy"}), out)
    assert out.getvalue() == f"envctl: error: busy\n  hint: {DEFAULT_HINTS['conflict']}\n"


def _slow_job(api: ApiDaemon, user: User, name: str) -> str:
    spec = api.write_spec(VENV_SPEC)
    res = api.cli(user, "request", "create", name, "-f", str(spec), "--backend", "venv",
                  "--no-wait")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_job_id_prefixes_and_times_with_their_zone(api: ApiDaemon, accounts: Accounts) -> None:
    job_id = _slow_job(api, accounts.alice, "slow-prefix")
    try:
        res = api.cli(accounts.alice, "request", "status", job_id[:5],
                      env={"TZ": "Asia/Tokyo"})
        assert res.returncode == EX_OK, res.stderr
        assert f"id:        {job_id}" in res.stdout
        created = next(line for line in res.stdout.splitlines() if line.startswith("created:"))
        assert created.endswith(" JST"), created
        res = api.cli(accounts.alice, "request", "list", "--json", env={"TZ": "Asia/Tokyo"})
        job = next(j for j in json.loads(res.stdout) if j["id"] == job_id)
        assert job["created"].endswith("+09:00") and isinstance(job["created_at"], float)
        assert job["finished"] is None
        res = api.cli(accounts.alice, "request", "cancel", job_id[:6])
        assert res.returncode == EX_OK, res.stderr
        assert f"job {job_id} (slow-prefix): cancelled" in res.stdout
        # too short to stand for a job: refused, not guessed
        res = api.cli(accounts.alice, "request", "status", job_id[:3])
        assert res.returncode == EX_DATAERR and "no job" in res.stderr
    finally:
        api.cli(accounts.alice, "request", "cancel", job_id)
        wait_for(lambda: api.cli(accounts.alice, "request", "status", job_id).returncode != 0,
                 30, what="the slow job cancelled")


def _job(job_id: str) -> Job:
    return Job(id=job_id, name=f"n{job_id}", state=State.SUCCEEDED, phase=None, backend="venv",
               requester_uid=1, requester_gid=1, requester_groups=(), requester_name="u",
               claimed_user=None, replace=False, created_at=0.0, started_at=None,
               finished_at=None, prefix="/x", exit_detail=None, log_path="/x.log")


def test_an_ambiguous_prefix_is_refused(scratch: Path) -> None:
    store = JobStore(scratch / "jobs.sqlite")
    try:
        for job_id in ("abcd11112222", "abcd33334444"):
            store.insert(_job(job_id), "dependencies: []", 1)
        assert store.get("abcd1").id == "abcd11112222"
        assert store.get("ABCD3").id == "abcd33334444"
        with pytest.raises(NotFound, match="ambiguous"):
            store.get("abcd")
        with pytest.raises(NotFound, match="no job"):
            store.get("abc")  # shorter than MIN_PREFIX
        with pytest.raises(NotFound):
            store.get("ab%d")  # never a LIKE pattern
    finally:
        store.close()


@pytest.mark.parametrize("action,words", [("status", "Show one job"),
                                          ("list", "oldest first"),
                                          ("logs", "build log"),
                                          ("cancel", "stop a running build")])
def test_request_subcommand_help_says_what_it_does(api: ApiDaemon, accounts: Accounts,
                                                   action: str, words: str) -> None:
    res = api.cli(accounts.alice, "request", action, "--help")
    assert res.returncode == EX_OK
    assert words in res.stdout


def test_every_command_help_says_what_it_does() -> None:
    """``envctl env rollback --help`` (remove, gc, ...) printed a bare usage line: every
    command's own help has a description, and every positional argument a help."""
    import argparse

    from envctl_shared.cli import main
    from envctl_shared.cli.parsing import leaves

    bare = [leaf.prog for leaf in leaves(main.build_parser()) if not leaf.description]
    unexplained = [f"{leaf.prog} {a.dest}" for leaf in leaves(main.build_parser())
                   for a in leaf._actions if not a.option_strings and not a.help
                   and not isinstance(a, argparse._SubParsersAction)]
    assert bare == [] and unexplained == []


def test_a_stray_word_hints_at_its_commands_help() -> None:
    """Left-over words are the top parser's to report: the hint was 'envctl --help'."""
    for argv, helped in ((["doctor", "a", "b"], "envctl doctor --help"),
                         (["env", "show", "x", "y"], "envctl env show --help")):
        res = subprocess.run([str(VENV_BIN / "envctl"), *argv], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == EX_USAGE, res.stderr
        assert f"hint: run '{helped}'" in res.stderr, res.stderr


@pytest.mark.parametrize("command", ["status", "doctor"])
def test_a_timeout_is_seconds_above_zero(command: str) -> None:
    """``--timeout -1`` was 'internal error: ValueError' (70); 0 was 'the daemon closed the
    connection' (69), 1e10 'internal error: OverflowError' (70, beyond what a socket's timeout
    can be): each the user's typo, said so before any socket is opened."""
    for value in ("-1", "0", "nan", "1e10", "inf"):
        res = subprocess.run([str(VENV_BIN / "envctl"), command, "--timeout", value,
                              "--socket", "/nonexistent.sock"], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == EX_USAGE, res.stdout + res.stderr
        assert "is not a number of seconds above 0" in res.stderr


def test_the_readme_command_table_has_every_command_and_option() -> None:
    """README's "Command line" table is where an admin looks first: every command, action and
    option of ``--help`` (the global ones aside) is in a row of its command (whoami, kernels
    sync, env diff/describe and a dozen options were not)."""
    from envctl_shared.cli import main
    from envctl_shared.cli.parsing import leaves

    section = (REPO / "README.md").read_text().split("\n## Command line\n")[1]
    rows = [line for line in section.split("\n## ")[0].splitlines()
            if line.startswith("| `envctl ")]
    common = {"-h", "--help", *(f for flags, _ in main.GLOBAL_OPTIONS.values() for f in flags)}
    missing = []
    for leaf in leaves(main.build_parser()):
        words = leaf.prog.split()[1:]  # "envctl env rollback": its command and action
        mine = " ".join(r for r in rows if re.match(rf"\| `envctl {words[0]}[ `]", r))
        if not mine or words[1:] and not re.search(rf"`((envctl )?{words[0]} )?{words[1]}\b",
                                                   mine):
            missing.append(leaf.prog)
        missing += [f"{leaf.prog} {a.option_strings[0]}" for a in leaf._actions
                    if a.option_strings and not common & set(a.option_strings)
                    and not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", mine)
                                for o in a.option_strings)]
    assert missing == []


def test_daemon_area_is_the_daemons_not_an_error(accounts: Accounts, scratch: Path) -> None:
    """A normal user's check of a root with the daemon's private ``.envctl`` in it: those
    entries are the daemon's, the tree is complete; elsewhere an unreadable dir stays an error,
    with a hint that names the actual cause."""
    root = scratch / "envs"
    root.mkdir()
    os.chown(root, 0, accounts.shared_gid)
    os.chmod(root, 0o2775)
    private = root / ".envctl" / "private"
    private.mkdir(parents=True)
    os.chmod(root / ".envctl", 0o755)
    os.chmod(private, 0o700)
    (private / "x").touch()
    cmd = [str(VENV_BIN / "envctl"), "check", "--group", accounts.shared_group, str(root)]
    res = as_user(accounts.alice.uid, accounts.alice.gid, cmd, init_groups=True, check=False)
    assert res.returncode == EX_OK, res.stdout + res.stderr
    assert "daemon 1" in res.stdout and "errors 0" in res.stdout
    res = as_user(accounts.alice.uid, accounts.alice.gid, [*cmd, "--json"], init_groups=True,
                  check=False)
    doc = json.loads(res.stdout)
    assert doc["totals"]["skipped"]["daemon"] == 1 and doc["totals"]["errors"] == 0
    findings = doc["paths"][0]["findings"]
    assert [f["reason"] for f in findings].count("daemon") == 1
    assert not [f for f in findings if f["action"] == "error"]
    # the same private directory elsewhere: an error (exit 74), and the hint names the mode
    os.rename(private, root / "private")
    res = as_user(accounts.alice.uid, accounts.alice.gid, cmd, init_groups=True, check=False)
    assert res.returncode == EX_IOERR
    assert "keeps the group out" in res.stderr
    # mallory, not in the group, on a 2770 root: the hint says so (not "run as root")
    os.chmod(root, 0o2770)
    res = as_user(accounts.mallory.uid, accounts.mallory.gid, cmd, init_groups=True,
                  check=False)
    assert res.returncode == EX_IOERR
    assert f"not in group {accounts.shared_group}" in res.stderr, res.stderr
    # alice added to the group database but her session predates it: log in again
    res = as_user(accounts.alice.uid, accounts.alice.gid, cmd, init_groups=False, check=False)
    assert res.returncode == EX_IOERR
    assert "log in again" in res.stderr and "after this session started" in res.stderr


def test_no_phase_marker_in_the_build_log(api: ApiDaemon, accounts: Accounts) -> None:
    spec = api.write_spec(api.hello_spec())
    res = api.cli(accounts.bob, "request", "create", "marker-env", "-f", str(spec))
    assert res.returncode == EX_OK, res.stderr
    job_id = res.stdout.splitlines()[0]
    assert "==> running: " in res.stderr  # phases still reach the user, as phases
    assert "ENVCTL-PHASE" not in res.stdout
    log = api.cli(accounts.bob, "request", "logs", job_id[:8])
    assert log.returncode == EX_OK and log.stdout
    assert "ENVCTL-PHASE" not in log.stdout


def test_a_build_interrupted_by_a_daemon_stop_is_hinted_truthfully(api: ApiDaemon,
                                                                  accounts: Accounts) -> None:
    """A follower told the daemon is stopping learns the job's real id and that a running build
    does not resume; afterwards the job says to request it again."""
    job_id = _slow_job(api, accounts.alice, "slow-interrupted")
    wait_for(lambda: json.loads(api.cli(accounts.alice, "request", "status", job_id,
                                        "--json").stdout)["state"] == "running", 30,
             what="the slow job running")
    follower = subprocess.Popen(api.cli_argv(accounts.alice, "request", "logs", job_id, "-f"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline()  # attached: the log is streaming
        api.daemon.stop()
        _, err = follower.communicate(timeout=60)
        api.daemon.restart()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert "shutting down" in err and f"envctl request status {job_id}" in err, err
    assert "resume" not in err and " ID" not in err
    res = api.cli(accounts.alice, "request", "status", job_id)
    assert res.returncode == 1 and "interrupted" in res.stderr
    assert "request it again (envctl request create slow-interrupted" in res.stderr


def test_a_name_being_built_is_not_hinted_to_replace(api: ApiDaemon, accounts: Accounts) -> None:
    """While a new version of NAME is being built, another request for it — with or without
    --replace — is told to wait or cancel (a --replace would fail the same way)."""
    first = api.write_spec(api.hello_spec())  # rattler: fast; the venv wrapper is the slow one
    res = api.cli(accounts.alice, "request", "create", "slow-busy", "-f", str(first))
    assert res.returncode == 0, res.stderr
    spec = api.write_spec(VENV_SPEC)
    res = api.cli(accounts.alice, "request", "create", "slow-busy", "-f", str(spec),
                  "--backend", "venv", "--replace", "--no-wait")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    try:
        for extra in ((), ("--replace",)):
            res = api.cli(accounts.alice, "request", "create", "slow-busy", "-f", str(spec),
                          "--backend", "venv", "--no-wait", *extra)
            assert res.returncode == 75, res.stderr
            assert "already queued or running" in res.stderr
            assert "--replace" not in res.stderr and "cancel it" in res.stderr
    finally:
        api.cli(accounts.alice, "request", "cancel", job_id)
        wait_for(lambda: api.cli(accounts.alice, "request", "status", job_id).returncode != 0,
                 30, what="the slow job cancelled")


def test_the_cli_starts_without_yaml_or_the_healer_extension() -> None:
    """Every command's start-up cost: YAML (doctor/init/config) and the C extension are loaded
    only by the commands that use them."""
    code = ("import sys, envctl_shared.cli.main; "
            "print(sorted(m for m in sys.modules if m == 'yaml' or m.endswith('_fastfs')))")
    res = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True,
                         text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_a_command_imports_only_its_own_module() -> None:
    """A command starts with its own module's imports, not every command's (they were ~0.07 s
    of every start, a no-op --replace's fifth); help lists every command; the map of command
    words to modules is what the modules register."""
    import argparse

    from envctl_shared.cli import main

    code = ("import sys\nfrom envctl_shared.cli.main import build_parser\n"
            "build_parser(['--json', 'request', 'list'])\n"
            "print(' '.join(sorted(m for m in sys.modules if m.endswith('_cmd'))))")
    out = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True,
                         text=True, check=True).stdout.split()
    assert "envctl_shared.cli.request_cmd" in out and "envctl_shared.cli.doctor_cmd" not in out
    registered = next(a for a in main.build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction)).choices
    assert set(registered) == set(main.COMMANDS)
    helped = next(a for a in main.build_parser(["-h", "request"])._actions
                  if isinstance(a, argparse._SubParsersAction)).choices
    assert set(helped) == set(main.COMMANDS)


def test_a_socket_only_its_owner_may_use_is_not_said_to_let_its_group_in(
        scratch: Path, accounts: Accounts) -> None:
    """``socket.mode: 0600``: joining the socket's group lets nobody in, yet the hint said
    'lets in its owner and group G: ask an administrator to add you to G' — a newcomer did,
    logged in again, and was refused the same."""
    path = scratch / "s.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        os.chmod(path, 0o600)
        res = as_user(accounts.alice.uid, accounts.alice.gid,
                      [str(VENV_BIN / "envctl"), "status", "--socket", str(path)], check=False)
    assert res.returncode == errors.EX_NOPERM, res.stderr
    assert "add you to" not in res.stderr and "lets in its owner alone" in res.stderr, res.stderr
    assert "socket.mode" in res.stderr, res.stderr
