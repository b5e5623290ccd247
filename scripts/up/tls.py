"""TLS for the broker that peers on other machines reach (`./up.sh broker --tls`): the network's own CA and a
certificate for the broker (scripts.certs, the openssl command), a Mosquitto configuration whose only listener
beyond the container's loopback is TLS on 8883, and the CA certificate in the login folder, where joining peers
find it (`./up.sh --join HOST:8883 --login DIR`: FL_TLS_CA).

The CA's key and the broker's key stay in `.up/<project>/tls/` (0700), never in the login folder that is copied to
other machines. The broker's key is 0644 inside that folder: the container's mosquitto user reads it through a
read-only bind mount of the file, as it reads the password file and ACL.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from scripts.certs import Authority, Certificate, authority, certificate
from scripts.up.common import ROOT, write_file
from scripts.up.logins import CA_FILE
from scripts.up.network import Network

TLS_PORT = 8883
CONF_FILE = "mosquitto-tls.conf"
MOUNT = "/etc/sdfl/tls"  # where the broker container finds the files below
FILES = ("ca.pem", "broker.pem", "broker.key", CONF_FILE)
CA_MOUNT = "/run/secrets/ca.pem"  # where a peer container finds the CA certificate (FL_TLS_CA)


def folder(net: Network) -> Path:
    return net.state / "tls"


def broker_hosts(publish: str, extra: Sequence[str] = ()) -> list[str]:
    """The names and addresses peers may reach the broker by, for its certificate: the container's own name, this
    machine's host names and addresses, the address it is published on (unless a wildcard), and `extra`."""
    hosts = ["broker", "localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn(), *extra]
    try:
        hosts += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    except OSError:
        pass
    outbound = outbound_address()
    if outbound:
        hosts.append(outbound)
    published = publish.split(":")[0] if publish.count(":") >= 2 else ""
    if published and published not in ("0.0.0.0", "::"):
        hosts.append(published)
    return list(dict.fromkeys(h for h in hosts if h))


def outbound_address() -> str | None:
    """The address this machine's traffic to other machines leaves from (its host name may resolve to 127.0.0.1
    only): the source address the kernel picks for a route out. A UDP socket's connect sends nothing."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never reached, only routed
            return probe.getsockname()[0]
        except OSError:
            return None


def tls_conf(base: str) -> str:
    """The broker's configuration with TLS: the plain listener only on the container's loopback (its healthcheck),
    and a TLS listener on TLS_PORT for everyone else, with the certificates mounted at MOUNT."""
    lines = []
    for line in base.splitlines():
        if line.strip() == "listener 1883":
            lines += [
                "# Plain MQTT only inside the container (its healthcheck); everyone else: TLS on 8883.",
                "listener 1883 127.0.0.1",
                f"listener {TLS_PORT}",
                f"cafile {MOUNT}/ca.pem",
                f"certfile {MOUNT}/broker.pem",
                f"keyfile {MOUNT}/broker.key",
                "tls_version tlsv1.2",
            ]
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def make_broker_tls(net: Network, login_folder: Path, hosts: list[str]) -> tuple[Authority, Certificate]:
    """The network's CA and the broker's certificate (kept if they exist), its TLS configuration, and the CA
    certificate copied into the login folder for the peers."""
    ca = authority(folder(net), name=net.project)
    own = certificate(ca, "broker", hosts)
    own.key.chmod(0o644)  # (see the module's doc: the folder is 0700)
    write_file(folder(net) / CONF_FILE, tls_conf((ROOT / "broker" / "mosquitto.conf").read_text()), 0o644)
    shutil.copyfile(ca.ca, login_folder / CA_FILE)
    (login_folder / CA_FILE).chmod(0o644)
    return ca, own
