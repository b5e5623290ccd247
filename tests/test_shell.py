"""up.sh and the other shell scripts: lint, usage, the choice between Docker and local processes, and the control
commands, all without a Docker engine.

Where a real network would start, up.sh runs in a scratch copy of the repository whose `docker`, `mosquitto`,
`scripts/localnet.py` and `scripts/chaos.py` are stand-ins that record how they were called, so these tests take
seconds and leave no process behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UP = ROOT / "up.sh"
SKIP_DIRS = {".git", ".venv", "runs", "node_modules", "__pycache__", ".pytest_cache"}
NO_DOCKER_LINE = ("up.sh: no Docker engine reachable (docker info failed); "
                  "running the same network as local processes (./up.sh --local)")


def shell_scripts() -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".sh")]
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        found.append(ci)
    return sorted(found)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck (apt-get install shellcheck)")
def test_shellcheck_passes_on_every_shell_script():
    scripts = shell_scripts()
    assert UP in scripts
    result = subprocess.run(["shellcheck", "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_up_sh_is_executable_bash():
    assert os.access(UP, os.X_OK)
    assert UP.read_text().splitlines()[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in UP.read_text()


# ---------------------------------------------------------------------------------------------- stand-ins

FAKE_DOCKER = r"""#!/bin/sh
# Stand-in for docker: records each call, answers as FAKE_DOCKER_INFO says (ok, fail, hang).
[ -z "${FAKE_LOG:-}" ] || printf 'docker %s\n' "$*" >>"$FAKE_LOG"
case "$1" in
info)
    case "${FAKE_DOCKER_INFO:-fail}" in
    ok) exit 0 ;;
    hang) exec sleep 30 ;;
    *) echo "Cannot connect to the Docker daemon" >&2; exit 1 ;;
    esac ;;
compose)
    shift
    while [ $# -gt 0 ]; do case "$1" in -p|-f) shift 2 ;; *) break ;; esac; done
    case "$1" in
    up)
        if [ -d "$UP_RUN_DIR" ]; then made=yes; else made=no; fi
        printf 'up UP_RUN_DIR=%s made=%s UP_UID=%s FL_MIN_PEERS=%s\n' "$UP_RUN_DIR" "$made" "$UP_UID" \
            "${FL_MIN_PEERS:-}" >>"$FAKE_LOG" ;;
    ps) printf 'cid1\ncid2\ncid3\n' ;;
    logs)
        case "$*" in
        *" -f "*) exec sleep 30 ;;
        *) printf 'log of %s\n' "$(eval echo \${$#})" ;;
        esac ;;
    esac
    exit 0 ;;
inspect)
    case "$*" in
    *ExitCode*) printf '/sdfl-peer-1-1 0\n/sdfl-peer-2-1 0\n/sdfl-peer-3-1 %s\n' "${FAKE_EXIT:-0}" ;;
    *) s="${FAKE_STATE:-exited}"; printf '%s\n%s\n%s\n' "$s" "$s" "$s" ;;
    esac ;;
esac
exit 0
"""

FAKE_LOCALNET = '''
"""Stand-in for scripts.localnet: records its arguments, then waits for SIGTERM (or exits at once)."""
import os, signal, sys, time
from pathlib import Path
log = Path(os.environ["FAKE_LOG"])
def note(text):
    with log.open("a") as f:
        f.write(text + "\\n")
note("localnet " + " ".join(sys.argv[1:]) + " FL_MIN_PEERS=" + os.environ.get("FL_MIN_PEERS", ""))
if os.environ.get("FAKE_LOCALNET_EXIT"):
    sys.exit(int(os.environ["FAKE_LOCALNET_EXIT"]))
def stop(signum, frame):
    note("localnet got " + signal.Signals(signum).name)
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
Path(os.environ["FAKE_LOG"] + ".started").write_text(str(os.getpid()))
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    time.sleep(0.05)
note("localnet timed out")
'''

FAKE_CHAOS = '''
"""Stand-in for scripts.chaos: records its arguments; `which` answers peer-3."""
import os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("chaos " + " ".join(sys.argv[1:]) + "\\n")
if "which" in sys.argv:
    print("peer-3")
'''


class Sandbox:
    """A scratch copy of what up.sh touches, with stand-ins on PATH and in scripts/."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "fakebin"
        self.log = root / "calls.log"
        self.bin.mkdir()
        (root / "broker").mkdir()
        (root / "scripts").mkdir()
        shutil.copy(UP, root / "up.sh")
        shutil.copy(ROOT / "docker-compose.yml", root / "docker-compose.yml")
        for name in ("mosquitto.conf", "acl"):
            shutil.copy(ROOT / "broker" / name, root / "broker" / name)
        (root / "scripts" / "__init__.py").write_text("")
        (root / "scripts" / "localnet.py").write_text(FAKE_LOCALNET)
        (root / "scripts" / "chaos.py").write_text(FAKE_CHAOS)
        self.fake("docker", FAKE_DOCKER)

    def fake(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "UP_"))}
        env.update(PATH=f"{self.bin}{os.pathsep}{env['PATH']}", PYTHON=sys.executable, FAKE_LOG=str(self.log))
        env.update(extra)
        return env

    def run(self, *args, timeout=30, **env) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.root / "up.sh"), *args], cwd=self.root, env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, *args, **env) -> subprocess.Popen:
        return subprocess.Popen([str(self.root / "up.sh"), *args], cwd=self.root, env=self.env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_started(self, proc: subprocess.Popen, timeout=15.0) -> int:
        marker = Path(str(self.log) + ".started")
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the launcher never started"
            time.sleep(0.05)
        while not marker.read_text():
            time.sleep(0.01)
        return int(marker.read_text())


@pytest.fixture
def sandbox(tmp_path):
    return Sandbox(tmp_path)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is gone in every sense that matters here.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- usage

def test_help_explains_itself():
    result = subprocess.run([str(UP), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    text = result.stdout
    for words in ("--peers N", "--run-dir DIR", "--local", "status", "kill controller", "kill peer ID", "down",
                  "Docker", "local processes", "python -m scripts.localnet", "FL_", "docs/RECORDS.md"):
        assert words in text, words


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--peers"], "--peers needs a number"),
    (["--peers", "x"], "--peers needs a whole number of at least 2, not 'x'"),
    (["--peers", "1"], "--peers needs a whole number of at least 2, not '1'"),
    (["kill"], "kill needs a target"),
    (["kill", "controller", "--signal", "HUP"], "--signal must be KILL, TERM, STOP or CONT"),
    (["status", "--bogus"], "unknown option '--bogus' for status"),
])
def test_wrong_arguments_fail_clearly(args, message, sandbox):
    result = sandbox.run(*args)
    assert result.returncode == 2
    assert f"up.sh: error: {message}" in result.stderr
    assert sandbox.calls() == [], "nothing may start on a usage error"


# ---------------------------------------------------------------------------------------------- choosing the path

def test_without_docker_engine_says_so_once_and_runs_local(sandbox):
    result = sandbox.run("--peers", "3", "--run-dir", "out", "--", "--max-rounds", "2", UP_DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines.count(NO_DOCKER_LINE) == 1
    assert "dry run: would run" in result.stderr
    assert f"-m scripts.localnet --peers 3 --run-dir {sandbox.root}/out -- --max-rounds 2" in result.stderr
    assert not (sandbox.root / "out").exists(), "a dry run writes nothing"
    assert not (sandbox.root / "runs").exists()


def test_docker_info_that_hangs_times_out(sandbox):
    started = time.monotonic()
    result = sandbox.run(UP_DRY_RUN="1", FAKE_DOCKER_INFO="hang", UP_DOCKER_TIMEOUT="1")
    assert result.returncode == 0
    assert time.monotonic() - started < 10
    assert "no Docker engine reachable (docker info timed out after 1s); running the same network as local " \
           "processes (./up.sh --local)" in result.stderr


def test_local_flag_never_asks_docker(sandbox):
    result = sandbox.run("--local", UP_DRY_RUN="1", FAKE_DOCKER_INFO="ok")
    assert result.returncode == 0
    assert "no Docker engine" not in result.stderr
    assert "-m scripts.localnet --peers 5 --run-dir" in result.stderr
    assert not any(c.startswith("docker") for c in sandbox.calls())


def test_docker_flag_refuses_to_fall_back(sandbox):
    result = sandbox.run("--docker", UP_DRY_RUN="1")
    assert result.returncode != 0
    assert "no Docker engine reachable (docker info failed)" in result.stderr
    assert "localnet" not in result.stderr


def test_with_docker_engine_dry_run_shows_compose(sandbox):
    result = sandbox.run("--peers", "4", UP_DRY_RUN="1", FAKE_DOCKER_INFO="ok")
    assert result.returncode == 0, result.stderr
    assert "no Docker engine" not in result.stderr
    assert "docker compose -p sdfl -f" in result.stderr and "up -d" in result.stderr
    assert "logs -f peer-1 peer-2 peer-3 peer-4" in result.stderr
    assert not (sandbox.root / ".up.compose.yml").exists()
    assert not (sandbox.root / "broker" / "passwd").exists()


# ---------------------------------------------------------------------------------------------- local path

def test_local_run_passes_settings_and_remembers_the_run(sandbox):
    result = sandbox.run("--local", "--peers", "3", "--run-dir", "r1", "--", "--epochs", "1",
                         FAKE_LOCALNET_EXIT="0")
    assert result.returncode == 0, result.stderr
    run_dir = sandbox.root / "r1"
    assert f"localnet --peers 3 --run-dir {run_dir} -- --epochs 1 FL_MIN_PEERS=3" in sandbox.calls()
    last = (sandbox.root / "runs" / ".last").read_text()
    assert "mode=local\n" in last and f"run_dir={run_dir}\n" in last
    assert f"records: {run_dir}" in result.stderr
    assert f"-m graphs {run_dir}" in result.stderr


def test_local_run_keeps_an_explicit_min_peers_and_reports_failure(sandbox):
    result = sandbox.run("--local", "--peers", "3", FAKE_LOCALNET_EXIT="1", FL_MIN_PEERS="2")
    assert result.returncode == 1
    assert any(c.startswith("localnet --peers 3 ") and c.endswith("FL_MIN_PEERS=2") for c in sandbox.calls())


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_is_forwarded_to_the_launcher(sandbox, sig, code):
    proc = sandbox.popen("--local", "--peers", "2")
    try:
        launcher = sandbox.wait_started(proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == code
        assert "localnet got SIGTERM" in sandbox.calls()
        deadline = time.monotonic() + 5
        while not gone(launcher) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(launcher), "the launcher outlived up.sh"
    finally:
        stop(proc)


def test_down_stops_the_local_network(sandbox):
    proc = sandbox.popen("--local", "--peers", "2")
    try:
        sandbox.wait_started(proc)
        result = sandbox.run("down")
        assert result.returncode == 0, result.stderr
        assert "stopped the local network" in result.stderr
        assert "localnet got SIGTERM" in sandbox.calls()
        proc.wait(timeout=15)
        again = sandbox.run("down")
        assert again.returncode == 0 and "no local network is running" in again.stderr
    finally:
        stop(proc)


def test_status_and_kill_on_the_local_path_use_scripts_chaos(sandbox):
    sandbox.run("--local", "--peers", "2", "--run-dir", "r2", FAKE_LOCALNET_EXIT="0")
    run_dir = sandbox.root / "r2"
    assert sandbox.run("status").returncode == 0
    assert sandbox.run("kill", "controller").returncode == 0
    assert sandbox.run("kill", "peer", "peer-2", "--signal", "stop").returncode == 0
    calls = [c for c in sandbox.calls() if c.startswith("chaos")]
    assert calls == [f"chaos --run-dir {run_dir} status",
                     f"chaos --run-dir {run_dir} kill controller --signal KILL",
                     f"chaos --run-dir {run_dir} kill peer-2 --signal STOP"]


def test_local_run_without_the_project_packages_says_how_to_get_them(sandbox):
    sandbox.fake("nopython", "#!/bin/sh\nexit 1\n")
    result = sandbox.run("--local", PYTHON=str(sandbox.bin / "nopython"))
    assert result.returncode == 2
    assert "cannot import the project's packages" in result.stderr and "requirements.txt" in result.stderr
    assert sandbox.calls() == []


def test_control_commands_without_a_run_say_what_to_do(sandbox):
    result = sandbox.run("status")
    assert result.returncode != 0
    assert "no run to act on" in result.stderr


# ---------------------------------------------------------------------------------------------- container path

@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd (package mosquitto)")
def test_docker_run_end_to_end_against_a_stand_in(sandbox):
    result = sandbox.run("--peers", "3", "--run-dir", "r3", "--", "--max-rounds", "2", FAKE_DOCKER_INFO="ok")
    assert result.returncode == 0, result.stderr
    run_dir = sandbox.root / "r3"
    calls = sandbox.calls()
    compose = f"docker compose -p sdfl -f {sandbox.root}/.up.compose.yml"
    # The login exists before compose needs it, the run dir before it is mounted, and N sets FL_MIN_PEERS.
    for name in ("passwd", "credentials.env", "health.env"):
        assert (sandbox.root / "broker" / name).stat().st_size > 0
        assert (sandbox.root / "broker" / name).stat().st_mode & 0o077 == 0, f"broker/{name} readable by others"
    assert any(c.startswith(f"up UP_RUN_DIR={run_dir} made=yes ") and c.endswith("FL_MIN_PEERS=3") for c in calls)
    order = [c for c in calls if c.startswith(compose)]
    assert order[0] == f"{compose} build peer-1"
    assert order[1] == f"{compose} up -d --force-recreate --remove-orphans"
    assert f"{compose} logs -f peer-1 peer-2 peer-3" in order
    assert order[-1] == f"{compose} down --remove-orphans"
    generated = (sandbox.root / ".up.compose.yml").read_text()
    assert "peer-3:" in generated and "peer-4:" not in generated and '"--max-rounds", "2"' in generated
    assert f"records: {run_dir}" in result.stderr and f"-m graphs {run_dir}" in result.stderr
    # The containers' logs land where a local run keeps them.
    assert (run_dir / "peers" / "peer-2" / "peer.log").read_text() == "log of peer-2\n"
    assert (run_dir / "broker.log").read_text() == "log of broker\n"
    last = (sandbox.root / "runs" / ".last").read_text()
    assert "mode=docker\n" in last and f"run_dir={run_dir}\n" in last

    # A second run keeps the login: a broker started earlier must not see it change.
    before = (sandbox.root / "broker" / "credentials.env").read_text()
    failed = sandbox.run("--peers", "3", "--run-dir", "r4", FAKE_DOCKER_INFO="ok", FAKE_EXIT="137")
    assert failed.returncode == 1
    assert "exited: sdfl-peer-3-1 137" in failed.stderr
    assert (sandbox.root / "broker" / "credentials.env").read_text() == before


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd (package mosquitto)")
def test_kill_on_the_container_path_uses_chaos_which_and_compose(sandbox):
    assert sandbox.run("--peers", "3", "--run-dir", "r5", FAKE_DOCKER_INFO="ok").returncode == 0
    run_dir = sandbox.root / "r5"
    compose = f"docker compose -p sdfl -f {sandbox.root}/.up.compose.yml"
    for args, expected in ((("kill", "controller"), "kill -s SIGKILL peer-3"),
                           (("kill", "random", "--signal", "STOP"), "pause peer-3"),
                           (("kill", "peer", "peer-3", "--signal", "CONT"), "unpause peer-3")):
        result = sandbox.run(*args, FAKE_DOCKER_INFO="ok")
        assert result.returncode == 0, result.stderr
        assert sandbox.calls()[-1] == f"{compose} {expected}"
    assert f"chaos --run-dir {run_dir} which controller" in sandbox.calls()
    rows = (run_dir / "chaos.csv").read_text().splitlines()
    assert rows[0] == "time,action,peer,signal"
    assert [r.split(",", 1)[1] for r in rows[1:]] == ["kill,peer-3,KILL", "stop,peer-3,STOP", "cont,peer-3,CONT"]
    assert sandbox.run("down", FAKE_DOCKER_INFO="ok").returncode == 0
    assert sandbox.calls()[-1] == f"{compose} down --remove-orphans"


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd (package mosquitto)")
@pytest.mark.skipif(not Path("/proc").is_dir() or shutil.which("pgrep") is None, reason="needs /proc and pgrep")
def test_interrupt_on_the_container_path_takes_the_network_down(sandbox):
    proc = sandbox.popen("--peers", "2", FAKE_DOCKER_INFO="ok", FAKE_STATE="running")
    try:
        compose = f"docker compose -p sdfl -f {sandbox.root}/.up.compose.yml"
        deadline = time.monotonic() + 15
        while f"{compose} logs -f peer-1 peer-2" not in sandbox.calls():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130
        assert sandbox.calls()[-1] == f"{compose} down --remove-orphans"
        # The log follower (here a sleep execed by the docker stand-in) went with it.
        sleepers = subprocess.run(["pgrep", "-f", "sleep 30"], capture_output=True, text=True).stdout.split()
        assert [pid for pid in sleepers if environ_mentions(pid, str(sandbox.root))] == []
    finally:
        stop(proc)


def test_topic_prefix_other_than_the_acl_is_refused_in_containers(sandbox):
    result = sandbox.run(FAKE_DOCKER_INFO="ok", FL_TOPIC_PREFIX="lab")
    assert result.returncode != 0
    assert "grants only sd/#" in result.stderr


def environ_mentions(pid: str, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:  # exited meanwhile, or not ours to read
        return False


@pytest.mark.skipif(not Path("/proc").is_dir() or shutil.which("pgrep") is None, reason="needs /proc and pgrep")
def test_timed_out_docker_info_leaves_no_process(sandbox):
    # The hanging `docker info` stand-in execs sleep; the timeout must have ended that very process.
    sandbox.run(UP_DRY_RUN="1", FAKE_DOCKER_INFO="hang", UP_DOCKER_TIMEOUT="1")
    sleepers = subprocess.run(["pgrep", "-f", "sleep 30"], capture_output=True, text=True).stdout.split()
    assert [pid for pid in sleepers if environ_mentions(pid, str(sandbox.root))] == []


def test_no_bash4_only_constructs():
    # macOS ships bash 3.2: no mapfile/readarray, associative arrays, case-changing expansions or wait -n, and
    # arrays that may be empty are expanded in the guarded form (set -u rejects "${a[@]}" on an empty one there).
    code = "\n".join(line.split(" #")[0] for line in UP.read_text().splitlines() if not line.lstrip().startswith("#"))
    for construct in ("mapfile", "readarray", "declare -A", "local -A", ",,}", "^^}", "wait -n"):
        assert construct not in code, construct
    assert '"${EXTRA[@]}"' not in code.replace('${EXTRA[@]+"${EXTRA[@]}"}', "").replace(
        'cmd+=(-- "${EXTRA[@]}")', "")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
