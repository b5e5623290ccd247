"""Brokers in containers bridged into one federation, with Mosquitto's own MQTT v5 bridges (scripts.localnet.Uplink):

- a network's B brokers on one machine (`./up.sh --brokers B`): broker-1..broker-B, the tree of a local network
  (scripts.localnet.uplink_parents: broker-1 the root, broker-2 bridged to it, every other bridged to broker-1 with
  broker-2 as its stand-in), plain MQTT on the project's own network, which no other machine sees;
- a broker on another machine bridged to one that runs already (`./up.sh broker --tls --bridge-to HOST:PORT --login
  DIR`): TLS both ways, its bridge checking the first broker's certificate against that network's CA (the one in
  the login folder copied from there).

Each bridge logs in with a login of its own (logins.bridge_user): a broker in a container makes a client's id its
login, so two bridges under one login would throw each other out of the parent. A bridged broker's configuration
(the image's, with the bridge's lines after it) holds the bridge's password: it is written 0644 into a 0700 folder,
as the logins are, and mounted read-only.
"""

from __future__ import annotations

from pathlib import Path

from scripts.localnet import BrokerTls, Uplink, broker_name, broker_order, home_broker, uplink_parents
from scripts.up.common import ROOT, private_dir, write_file
from scripts.up.logins import BRIDGE, Login, bridge_user
from scripts.up.network import Network
from scripts.up.tls import MOUNT, tls_conf

PORT = 1883  # the brokers' plain listener, inside the project's network
CONF_MOUNT = "/etc/sdfl/broker/mosquitto.conf"  # where a bridged broker's container finds its configuration
UPSTREAM_CA = "upstream-ca.pem"  # the CA of the broker a --bridge-to bridge connects to (in the TLS folder)


def services(net: Network) -> list[str]:
    """The compose services of the network's brokers: `broker` alone, or broker-1..broker-B."""
    return ["broker"] if net.brokers == 1 else [broker_name(i) for i in range(1, net.brokers + 1)]


def bridged(net: Network) -> bool:
    """Whether the network's brokers run with a configuration of their own (a bridge in it)."""
    return net.brokers > 1 or net.bridge_to is not None


def folder(net: Network) -> Path:
    return net.state / "brokers"


def conf_file(net: Network, service: str) -> Path:
    return folder(net) / f"{service}.conf"


def addresses(net: Network, peer: str) -> str:
    """A peer's FL_BROKER inside the project: every broker of the network, its own (home_broker) first."""
    names = services(net)
    return ",".join(f"{names[i]}:{PORT}" for i in broker_order(home_broker(peer, len(names)), len(names)))


def with_bridge(base: str, uplink: Uplink, login: Login, user: str, tls: BrokerTls | None = None) -> str:
    """The configuration `base` with a bridge up to `uplink`'s brokers, logging in as `user` (last: a bridge's
    options run from its `connection` line to the file's end)."""
    lines = uplink.conf_lines(login.broker_login(user), tls)
    return (
        base.rstrip("\n")
        + "\n\n# The bridge up the tree of brokers (scripts/up/bridges.py).\n"
        + "\n".join(lines)
        + "\n"
    )


def write_confs(net: Network, login: Login) -> None:
    """Each broker's configuration: the image's, and for every broker but the root its bridge; with --bridge-to,
    the one broker's TLS configuration with a TLS bridge to the broker of the first machine."""
    private_dir(folder(net))
    base = (ROOT / "broker" / "mosquitto.conf").read_text()
    if net.bridge_to is not None:
        uplink = Uplink(f"{BRIDGE}-{net.project}", (net.bridge_to,), net.topic_prefix)
        upstream = BrokerTls(ca=Path(f"{MOUNT}/{UPSTREAM_CA}"), cert=Path(), key=Path())
        text = with_bridge(tls_conf(base), uplink, login, BRIDGE, upstream)
        write_file(conf_file(net, "broker"), text, 0o644)
        return
    for service, parents in zip(services(net), uplinks(net), strict=True):
        text = base
        if parents:
            uplink = Uplink(f"{BRIDGE}-{service}", tuple(parents), net.topic_prefix)
            text = with_bridge(base, uplink, login, bridge_user(service))
        write_file(conf_file(net, service), text, 0o644)


def uplinks(net: Network) -> list[list[str]]:
    """Each broker's parents, the order its bridge tries them (brokers.json's `uplink`)."""
    if net.bridge_to is not None:
        return [[net.bridge_to]]
    return [
        [f"{broker_name(parent)}:{PORT}" for parent in uplink_parents(index)] for index in range(1, net.brokers + 1)
    ]
