"""The container packaging, checked statically (no Docker engine here): docker-compose.yml and the files up.sh
generates from it for other N, the peer Dockerfile, the pinned requirements and how the broker's files are mounted.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "peer" / "Dockerfile"
BROKER_CONF = ROOT / "broker" / "mosquitto.conf"
INTERPOLATION = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def generated(peers: int, *peer_flags: str) -> str:
    args = [str(ROOT / "up.sh"), "compose-file", "--peers", str(peers)]
    if peer_flags:
        args += ["--", *peer_flags]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True)
    return result.stdout


def load(text: str) -> dict:
    return yaml.safe_load(text)


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with every variable unset, and $$ as a literal $."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def peers_of(compose: dict) -> dict:
    return {name: svc for name, svc in compose["services"].items() if name != "broker"}


def mounts(service: dict) -> list[tuple[str, str, str]]:
    out = []
    for entry in service.get("volumes", []):
        parts = interpolate(entry).split(":")
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in rest.split()))
    return env


def conf_value(key: str) -> str:
    match = re.search(rf"^{key}\s+(.+)$", BROKER_CONF.read_text(), re.M)
    assert match, key
    return match.group(1).strip()


COMPOSES = {"base": lambda: BASE.read_text(), "n3": lambda: generated(3), "n7": lambda: generated(7)}


@pytest.fixture(params=sorted(COMPOSES), scope="module")
def compose(request):
    text = COMPOSES[request.param]()
    return load(text)


@pytest.fixture(scope="module")
def env_names():
    from peer.config import ENV_NAMES
    return ENV_NAMES


# ---------------------------------------------------------------------------------------------- the N mechanism

def test_base_file_is_what_up_sh_generates_for_five_peers():
    assert generated(5) == BASE.read_text()


@pytest.mark.parametrize("n", [2, 3, 7, 12])
def test_generated_file_keeps_the_shared_part_verbatim(n):
    marker = "  # ---- generated peers:"
    base_head = BASE.read_text().split(marker)[0]
    assert generated(n).split(marker)[0] == base_head


def test_services_are_the_broker_and_n_peers(compose):
    peers = peers_of(compose)
    n = len(peers)
    assert n in (3, 5, 7)
    assert set(compose["services"]) == {"broker"} | {f"peer-{k}" for k in range(1, n + 1)}


def test_peers_have_distinct_ids_and_shards_covering_the_data(compose):
    peers = peers_of(compose)
    n = len(peers)
    shards = {}
    for name, svc in peers.items():
        env = svc["environment"]
        assert env["FL_PEER_ID"] == name == svc["hostname"]
        k, total = map(int, env["FL_SHARD"].split("/"))
        assert total == n and name == f"peer-{k + 1}"
        shards[name] = k
    assert sorted(shards.values()) == list(range(n))


def test_peer_flags_become_the_command_of_every_peer():
    flags = ["--max-rounds", "2", "--note", 'quote " back \\ dollar $HOME ${X}']
    compose = load(generated(3, *flags))
    for svc in peers_of(compose).values():
        # Compose reads $$ as a literal $, so the peer receives exactly what was typed.
        assert [arg.replace("$$", "$") for arg in svc["command"]] == flags
        assert all("$" not in arg.replace("$$", "") for arg in svc["command"])
    assert all("command" not in svc for svc in peers_of(load(generated(3))).values())


def test_compose_file_rejects_bad_peer_counts():
    for bad in ("0", "1", "x"):
        result = subprocess.run([str(ROOT / "up.sh"), "compose-file", "--peers", bad], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 2 and "--peers needs a whole number of at least 2" in result.stderr


# ---------------------------------------------------------------------------------------------- broker

def test_broker_service(compose):
    broker = compose["services"]["broker"]
    assert broker["image"] == "eclipse-mosquitto:2"
    assert broker.get("restart", "no") == "no"


def test_broker_healthcheck_really_logs_in(compose):
    check = compose["services"]["broker"]["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD-SHELL"
    command = test[1]
    assert command.startswith("mosquitto_sub ")
    # The login comes from the container's environment at check time ($$ survives compose's interpolation).
    assert '-u health -P "$$MQTT_HEALTH_PASSWORD"' in command
    assert "-t '$$SYS/broker/uptime'" in command
    assert re.search(r"-C 1\b", command) and re.search(r"-W \d+", command)
    assert "-p 1883" in command and conf_value("listener") == "1883"
    for key in ("interval", "timeout", "retries"):
        assert key in check
    acl = (ROOT / "broker" / "acl").read_text()
    assert re.search(r"^user health\ntopic read \$SYS/broker/uptime$", acl, re.M)


def test_broker_files_are_mounted_where_the_conf_expects_them(compose):
    broker = compose["services"]["broker"]
    targets = {target: (source, mode) for source, target, mode in mounts(broker)}
    # The image starts `mosquitto -c /mosquitto/config/mosquitto.conf`.
    assert targets["/mosquitto/config/mosquitto.conf"] == ("./broker/mosquitto.conf", "ro")
    assert targets[conf_value("acl_file")] == ("./broker/acl", "ro")
    # Writable so the image's entrypoint can hand the 0600 file to the mosquitto user (see docker-compose.yml).
    assert targets[conf_value("password_file")] == ("./broker/passwd", "rw")
    assert broker["env_file"] == "broker/health.env"


def test_broker_conf_settings():
    conf = BROKER_CONF.read_text()
    assert conf_value("listener") == "1883"
    assert conf_value("allow_anonymous") == "false"
    assert conf_value("persistence") == "false"
    assert 1_000_000 <= int(conf_value("message_size_limit")) <= 256 * 1024 * 1024
    assert 0 < int(conf_value("max_queued_bytes")) <= 1024 ** 3
    assert "sd/#" in (ROOT / "broker" / "acl").read_text()
    assert "allow_anonymous true" not in conf


# ---------------------------------------------------------------------------------------------- peers

def test_peers_wait_for_a_healthy_broker(compose):
    for svc in peers_of(compose).values():
        assert svc["depends_on"] == {"broker": {"condition": "service_healthy"}}


def test_peers_build_the_peer_image(compose):
    for svc in peers_of(compose).values():
        assert svc["build"] == {"context": ".", "dockerfile": "peer/Dockerfile"}
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["image"] == "sd-fl-peer:latest"
        assert svc["env_file"] == "broker/credentials.env"
        assert svc.get("restart", "no") == "no"


def test_peer_volumes_run_dir_and_dataset_cache(compose):
    keras_home = dockerfile_env()["KERAS_HOME"]
    for svc in peers_of(compose).values():
        env = svc["environment"]
        targets = {target: source for source, target, _ in mounts(svc)}
        assert env["FL_RUN_DIR"] in targets, "the run dir must be on the host"
        assert svc["volumes"][0].startswith("${UP_RUN_DIR:-")
        assert targets[keras_home] == "datasets"
    assert "datasets" in compose["volumes"]


def test_peer_settings_reach_the_broker_service(compose):
    for svc in peers_of(compose).values():
        host, port = svc["environment"]["FL_BROKER"].split(":")
        assert host == "broker" and port == conf_value("listener")


def test_every_fl_variable_is_a_peer_setting(compose, env_names):
    for svc in peers_of(compose).values():
        names = set(svc["environment"])
        assert names <= env_names, names - env_names
        # Settings left out on purpose: the ACL fixes the prefix, and FL_DATA_DIR would name a host folder.
        assert "FL_TOPIC_PREFIX" not in names and "FL_DATA_DIR" not in names


def test_pass_through_covers_every_other_setting(env_names):
    compose = load(BASE.read_text())
    env = peers_of(compose)["peer-1"]["environment"]
    fixed = {"FL_BROKER", "FL_RUN_DIR", "FL_PEER_ID", "FL_SHARD"}  # set by compose per container
    login = {"FL_USERNAME", "FL_PASSWORD"}  # from broker/credentials.env
    excluded = {"FL_TOPIC_PREFIX", "FL_DATA_DIR"}
    passed = {name for name, value in env.items() if value is None}
    assert passed == env_names - fixed - login - excluded


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd (package mosquitto)")
def test_every_host_path_exists_or_is_made_by_up_sh(tmp_path, compose, env_names):
    # In a scratch copy, so the repository's own login is not touched.
    for rel in ("up.sh", "docker-compose.yml", "broker/mosquitto.conf", "broker/acl", "peer/Dockerfile",
                "requirements.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    subprocess.run([str(tmp_path / "up.sh"), "credentials"], check=True, capture_output=True, timeout=60)
    for name, svc in compose["services"].items():
        for source, _, _ in mounts(svc):
            if source.startswith("./") and source != "./runs/compose":
                assert (tmp_path / source).exists(), f"{name}: {source}"
        env_file = svc.get("env_file")
        if env_file:
            assert (tmp_path / env_file).is_file(), f"{name}: {env_file}"
    # The run dir's default is only for plain `docker compose up`; up.sh always sets UP_RUN_DIR and creates it
    # first (tests/test_shell.py::test_docker_run_end_to_end_against_a_stand_in).
    creds = (tmp_path / "broker" / "credentials.env").read_text()
    keys = {line.split("=", 1)[0] for line in creds.splitlines() if line and not line.startswith("#")}
    assert keys == {"FL_USERNAME", "FL_PASSWORD"} and keys <= env_names
    health = (tmp_path / "broker" / "health.env").read_text()
    assert re.search(r"^MQTT_HEALTH_PASSWORD=[0-9a-f]{48}$", health, re.M)
    assert re.search(r"^FL_USERNAME=peer$", creds, re.M)
    assert re.search(r"^FL_PASSWORD=[0-9a-f]{48}$", creds, re.M)
    users = [line.split(":")[0] for line in (tmp_path / "broker" / "passwd").read_text().splitlines()]
    assert users == ["peer", "health"]
    assert "$7$" in (tmp_path / "broker" / "passwd").read_text(), "passwords must be hashed"


def test_generated_secrets_and_files_are_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["broker/passwd", "broker/credentials.env", "broker/health.env", ".up.compose.yml", "runs/.last"]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == paths


# ---------------------------------------------------------------------------------------------- image

def test_dockerfile():
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["python", "-m", "peer"]') in instructions
    users = [rest for w, rest in instructions if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "every RUN as root, then drop"
    env = dockerfile_env()
    assert env["KERAS_HOME"].startswith("/data/")
    assert env["FL_RUN_DIR"] == "/run-dir"


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:], ".dockerignore should start from nothing and add back"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [rest.split() for w, rest in dockerfile_instructions() if w == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert not source.startswith("--"), "no COPY --from/--chown expected"
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in included, f"{source} is excluded by .dockerignore"
    # What a peer needs and nothing more: no secrets, runs or tests in the image.
    assert {"requirements.txt", "peer"} == included


def test_requirements_are_pinned():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [line for line in lines if line and not line.startswith("#")]
    assert reqs
    for line in reqs:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][A-Za-z0-9.+!-]*", line), line
    # The Dockerfile swaps tensorflow-cpu for tensorflow on arm64 by this exact spelling.
    assert any(line.startswith("tensorflow-cpu==") for line in reqs)
    assert "s/^tensorflow-cpu==/tensorflow==/" in DOCKERFILE.read_text()
