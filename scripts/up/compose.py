"""The compose file of a network, as data (written as JSON, which is valid YAML): the broker with its logins and
healthcheck, a container per peer (or per K peers, python -m peer.host), the live page; and the labels by which the
launcher finds its containers again."""

from __future__ import annotations

from pathlib import Path

from scripts.up.images import BROKER_IMAGE, MOSQUITTO_VOLUMES, PEER_IMAGE
from scripts.up.logins import Login
from scripts.up.network import FASHION_MNIST, Network

LABEL_RUN_DIR = "org.sdfl.run-dir"
LABEL_PEER = "org.sdfl.peer"  # on a peer container: the peers it runs (its id, or ids joined by commas on a host)
LABEL_PROJECT = "com.docker.compose.project"
DASHBOARD = "dashboard"  # its compose service; the page listens on DASHBOARD_PORT inside
DASHBOARD_PORT = 8765
HOSTED_LOGINS = "/run/secrets/logins"  # where a host container finds its peers' logins (peer.host --login-dir)
DOWN_GRACE_S = 5  # a peer gets this long to leave after SIGTERM (it takes well under a second)
DATA_MOUNT = "/data/input"  # where a container finds the host's --data-dir


def data_mounts(net: Network) -> tuple[list[tuple[Path, str]], dict[str, str]]:
    """The dataset folders a peer container gets (host folder, container path; read-only) and the settings that
    point the peer at them: --data-dir at DATA_MOUNT; else, for fashion-mnist, Debian's copy of the host at the same
    path, where the peers look for it by default."""
    if net.data_dir is not None:
        return [(net.data_dir, DATA_MOUNT)], {"FL_DATA_DIR": DATA_MOUNT}
    if net.dataset == "fashion-mnist" and FASHION_MNIST.is_dir():
        return [(FASHION_MNIST, str(FASHION_MNIST))], {}
    return [], {}


def dollar(text: str) -> str:
    """Compose interpolates $ in every value: a literal $ is $$."""
    return text.replace("$", "$$")


def compose_config(net: Network, login: Login, uid: int, gid: int) -> dict:
    """The compose file for this network, as data. Paths are absolute, so it works from any folder."""
    services: dict[str, dict] = {}
    labels = {LABEL_RUN_DIR: dollar(str(net.run_dir))}
    if not net.join:
        health = (
            'mosquitto_sub -h 127.0.0.1 -p 1883 -u health -P "$MQTT_HEALTH_PASSWORD" '
            "-t '$SYS/broker/uptime' -C 1 -W 5 > /dev/null"
        )
        services["broker"] = {
            "image": BROKER_IMAGE,
            "pull_policy": "never",
            "hostname": "broker",
            "labels": labels,
            "env_file": [str(login.health_env)],
            # Read-only, and outside /mosquitto: no container ever writes to (or re-owns) a file of the host.
            "volumes": [
                {"type": "bind", "source": str(path), "target": f"/etc/sdfl/login/{path.name}", "read_only": True}
                for path in (login.passwd, login.acl)
            ],
            # The base image's VOLUMEs would each leave an anonymous volume behind: tmpfs instead.
            "tmpfs": MOSQUITTO_VOLUMES,
            "ports": [net.publish],
            "healthcheck": {"test": ["CMD-SHELL", dollar(health)], "interval": "2s", "timeout": "6s", "retries": 30},
            "restart": "no",
        }
    broker = net.join or "broker:1883"
    data_dirs, data_env = data_mounts(net)
    for name, peers in net.containers().items():
        env = {
            "FL_BROKER": broker,
            "FL_RUN_DIR": "/run-dir",
            "FL_MIN_PEERS": str(net.total),
            "FL_SECRET_FILE": "/run/secrets/federation",
            **net.env,
            **data_env,
        }
        volumes = [
            {"type": "bind", "source": str(net.run_dir), "target": "/run-dir"},
            {"type": "bind", "source": str(login.secret), "target": "/run/secrets/federation", "read_only": True},
            {"type": "volume", "source": "datasets", "target": "/data/keras"},
        ]
        volumes += [
            {"type": "bind", "source": str(host), "target": target, "read_only": True} for host, target in data_dirs
        ]
        command = list(net.peer_flags)
        if name in peers:  # one peer: `python -m peer`, its login in its environment
            env.update(FL_PEER_ID=name, FL_SHARD=net.shard(name))
            env_file = [str(login.env_file(name))]
        else:  # a host: its peers' logins mounted, and only theirs (the ACL binds a login to a peer)
            env_file = []
            volumes += [
                {
                    "type": "bind",
                    "source": str(login.env_file(peer)),
                    "target": f"{HOSTED_LOGINS}/{peer}.env",
                    "read_only": True,
                }
                for peer in peers
            ]
            command = [
                "--hosted",
                ",".join(f"{peer}={net.shard(peer)}" for peer in peers),
                "--login-dir",
                HOSTED_LOGINS,
                *command,
            ]
        service = {
            "image": PEER_IMAGE,
            "pull_policy": "never",
            "hostname": name,
            "labels": {**labels, LABEL_PEER: ",".join(peers)},
            # The invoking user's uid: the records in the run dir are theirs, and so is the secret it reads.
            "user": f"{uid}:{gid}",
            # An init as PID 1 forwards SIGTERM to the peer (Python as PID 1 would ignore it until its handler
            # is installed, after TensorFlow loads).
            "init": True,
            "environment": {k: dollar(v) for k, v in env.items()},
            "volumes": [{**v, "source": dollar(v["source"])} if v["type"] == "bind" else v for v in volumes],
            # A lookup of a name that is gone (the broker's container stopped) answers in 1 s, not 10.
            "dns_opt": ["timeout:1", "attempts:1"],
            "stop_grace_period": f"{DOWN_GRACE_S}s",
            "restart": "no",
        }
        if env_file:
            service["env_file"] = env_file
        if name not in peers:
            service["entrypoint"] = ["python", "-m", "peer.host"]
        if command:
            service["command"] = [dollar(word) for word in command]
        if not net.join:
            service["depends_on"] = {"broker": {"condition": "service_healthy"}}
        services[name] = service
    if not net.join:
        # The live page: an observer in the peer image, logged in read-only; the federation does not depend on it.
        services[DASHBOARD] = {
            "image": PEER_IMAGE,
            "pull_policy": "never",
            "hostname": DASHBOARD,
            "labels": labels,
            "user": f"{uid}:{gid}",
            "init": True,
            "entrypoint": ["python", "-m", "graphs.live"],
            "command": [
                "--broker",
                broker,
                "--run-id",
                dollar(net.run_id or "default"),
                "--bind",
                "0.0.0.0",
                "--port",
                str(DASHBOARD_PORT),
                "--secret-file",
                "/run/secrets/federation",
            ],
            "env_file": [str(login.observer_env)],
            "volumes": [
                {
                    "type": "bind",
                    "source": dollar(str(login.secret)),
                    "target": "/run/secrets/federation",
                    "read_only": True,
                }
            ],
            "ports": [f"127.0.0.1::{DASHBOARD_PORT}"],
            "depends_on": {"broker": {"condition": "service_healthy"}},
            "stop_grace_period": "1s",
            "restart": "no",
        }
    return {
        "name": net.project,
        "services": services,
        # The Keras download cache (mnist, cifar10 when the host has no copy), kept between runs.
        "volumes": {"datasets": {}},
    }


def compose_cmd(project: str, compose_file: Path) -> list[str]:
    return ["docker", "compose", "-p", project, "-f", str(compose_file)]
