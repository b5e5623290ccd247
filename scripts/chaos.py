"""Rerun elections by killing peers: find the current controller (or any peer) of a running network and signal it.

    python -m scripts.chaos --run-dir runs/demo status
    python -m scripts.chaos --run-dir runs/demo kill controller            # SIGKILL the current controller
    python -m scripts.chaos --run-dir runs/demo kill random --signal STOP  # hang a random peer
    python -m scripts.chaos --run-dir runs/demo kill peer-3 --signal CONT
    python -m scripts.chaos --run-dir runs/demo which controller           # print its id only (for containers)
    python -m scripts.chaos --run-dir runs/demo kill broker                # SIGKILL the controller's broker
    python -m scripts.chaos --run-dir runs/demo kill broker-2 --signal STOP  # hang broker 2 (CONT thaws it)

It reads the peers' `peers/<id>/status.json` and `events.jsonl` and the network's `brokers.json` (docs/RECORDS.md),
so it needs nothing but the run dir and the standard library; local peers and brokers are signalled by pid, and
every signal sent is appended to `chaos.csv` (a broker's by its name, broker-K). For peers in containers,
`./up.sh kill ...` asks `which` for the id and lets docker compose deliver the signal.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from pathlib import Path

# stdlib-only module: chaos still runs on a bare host python. read_statuses is part of this script's API.
from peer.records.events import read_events
from peer.records.run_dir import read_brokers, read_statuses, record_chaos

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "STOP": signal.SIGSTOP, "CONT": signal.SIGCONT}
ACTIONS = {"KILL": "kill", "TERM": "kill", "STOP": "stop", "CONT": "cont"}


class ChaosError(RuntimeError):
    pass


def alive(status: dict) -> bool:
    """The peer's process exists (same machine) and is not a zombie."""
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def live_statuses(run_dir: Path, local: bool = True) -> dict[str, dict]:
    statuses = read_statuses(run_dir)
    return {peer: s for peer, s in statuses.items() if s.get("role") != "finished" and (not local or alive(s))}


def current_controller(statuses: dict[str, dict]) -> str | None:
    """The controller of the highest term any live peer knows, as the peers themselves report it."""
    best = None
    for peer, s in statuses.items():
        if s.get("role") == "controller" and (best is None or s.get("term", 0) > statuses[best].get("term", 0)):
            best = peer
    return best


def choose(target: str, statuses: dict[str, dict], rng: random.Random | None = None) -> str:
    if not statuses:
        raise ChaosError("no live peer found (is the network running, and is this its run dir?)")
    if target == "controller":
        peer = current_controller(statuses)
        if peer is None:
            raise ChaosError("no controller right now (an election may be under way); try again in a second")
        return peer
    if target == "random":
        return (rng or random).choice(sorted(statuses))
    if target not in statuses:
        raise ChaosError(f"no live peer {target!r}; live peers: {', '.join(sorted(statuses))}")
    return target


def record(run_dir: Path, action: str, peer: str, sig: str, at: float | None = None) -> float:
    """Append the signal to chaos.csv; `at` is when it was sent (default: now). Returns the time recorded."""
    return record_chaos(run_dir, action, peer, sig, at=at)


def kill(run_dir: Path, target: str, sig: str = "KILL") -> tuple[str, int]:
    """Signal the chosen local peer; returns (peer id, pid)."""
    statuses = (
        live_statuses(run_dir) if sig != "CONT" else {p: s for p, s in read_statuses(run_dir).items() if alive(s)}
    )
    peer = choose(target, statuses)
    pid = statuses[peer]["pid"]
    os.kill(pid, SIGNALS[sig])
    record(run_dir, ACTIONS[sig], peer, sig)
    return peer, pid


def connected_to(run_dir: Path, peer: str) -> str | None:
    """The broker (HOST:PORT) `peer` last said it connected to, from its events.jsonl; None if it is not connected
    (its last word about brokers is a disconnection) or never said."""
    events = read_events(run_dir, peer, {"connected", "disconnected"})
    return events[-1].get("broker") if events and events[-1]["event"] == "connected" else None


def broker_name(target: str) -> str:
    """The name a user's `target` means: broker-K, given as such or as K alone (local and container networks)."""
    return f"broker-{target}" if target.isdigit() else target


def broker_named(brokers: list[dict], target: str) -> dict:
    """The broker `target` names: broker-K, or K alone."""
    name = broker_name(target)
    for broker in brokers:
        if broker["name"] == name:
            return broker
    raise ChaosError(f"no broker {target!r}; this network's brokers: {', '.join(b['name'] for b in brokers)}")


def choose_broker(run_dir: Path, target: str | None) -> dict:
    """The broker to signal: the one `target` names, or (None) the one the current controller is connected to."""
    brokers = read_brokers(run_dir)
    if not brokers:
        raise ChaosError(f"no brokers.json in {run_dir}: its brokers were not started by a local network")
    if target is not None:
        return broker_named(brokers, target)
    controller = current_controller(live_statuses(run_dir))
    if controller is None:
        raise ChaosError("no controller right now (an election may be under way); try again in a second")
    address = connected_to(run_dir, controller)
    for broker in brokers:
        if broker.get("address") == address:
            return broker
    raise ChaosError(f"the controller {controller} is not connected to a broker of this network right now")


def kill_broker(run_dir: Path, target: str | None, sig: str = "KILL") -> tuple[str, int]:
    """Signal a local broker (the controller's, or the one `target` names); returns (its name, pid)."""
    broker = choose_broker(run_dir, target)
    if not alive(broker):
        raise ChaosError(f"{broker['name']} is not running")
    os.kill(broker["pid"], SIGNALS[sig])
    record(run_dir, ACTIONS[sig], broker["name"], sig)
    return broker["name"], broker["pid"]


def format_brokers(run_dir: Path, check_pids: bool = True) -> list[str]:
    """One line per broker of brokers.json: its name, address, state, and the peers connected to it."""
    brokers = read_brokers(run_dir)
    if not brokers:
        return []
    on: dict[str, list[str]] = {}
    for peer, s in read_statuses(run_dir).items():
        if s.get("role") != "finished" and (not check_pids or alive(s)):
            on.setdefault(connected_to(run_dir, peer) or "", []).append(peer)
    lines = [f"{'broker':<10} {'address':<21} {'state':<8} peers"]
    for broker in brokers:
        state = ("running" if alive(broker) else "gone") if check_pids else "?"
        if state == "running" and _stopped(broker["pid"]):
            state = "stopped"
        peers = ", ".join(sorted(on.get(broker.get("address", ""), []), key=lambda p: (len(p), p)))
        lines.append(f"{broker['name']:<10} {broker.get('address', '?'):<21} {state:<8} {peers}")
    return lines


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] == "T"
    except (OSError, IndexError):
        return False


def format_status(run_dir: Path, check_pids: bool = True) -> str:
    """The network as its peers report it. `check_pids=False` for peers in containers, whose pids mean nothing
    on the host."""
    statuses = read_statuses(run_dir)
    if not statuses:
        return f"no peers have reported in {run_dir}"
    running = {p: s for p, s in statuses.items() if not check_pids or alive(s)}
    controller = current_controller({p: s for p, s in running.items() if s.get("role") != "finished"} or statuses)
    lines = [f"controller: {controller or '(none right now)'}"]
    if controller:
        s = statuses[controller]
        lines.append(
            f"term {s.get('term')}, round {s.get('round')}, last accuracy "
            f"{'n/a' if s.get('accuracy') is None else format(s['accuracy'], '.4f')}"
        )
    lines.append(f"{'peer':<12} {'role':<11} {'term':>4} {'round':>5}  process")
    for peer, s in sorted(statuses.items()):
        state = ("running" if peer in running else "gone") if check_pids else "(in a container)"
        lines.append(f"{peer:<12} {s.get('role', '?'):<11} {s.get('term', '?'):>4} {s.get('round', '?'):>5}  {state}")
    return "\n".join(lines + format_brokers(run_dir, check_pids))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the running network's run dir")
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="who is controller, term, round, last accuracy, every peer's role")
    st.add_argument("--containers", action="store_true", help="peers run in containers: do not look up their pids")
    k = sub.add_parser(
        "kill", help="signal a peer (controller | random | PEER_ID) or a broker (broker: the controller's | broker-K)"
    )
    k.add_argument("target")
    k.add_argument("--signal", default="KILL", type=str.upper, choices=sorted(SIGNALS))
    w = sub.add_parser("which", help="print the id of: controller | random | PEER_ID (no signal sent)")
    w.add_argument("target")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.exit(2, f"python -m scripts.chaos: error: run dir {args.run_dir} does not exist\n")
    try:
        if args.command == "status":
            print(format_status(args.run_dir, check_pids=not args.containers))
        elif args.command == "which":
            print(choose(args.target, live_statuses(args.run_dir, local=False)))
        elif args.target == "broker" or args.target.startswith("broker-"):
            name, pid = kill_broker(args.run_dir, None if args.target == "broker" else args.target, args.signal)
            print(f"sent SIG{args.signal} to {name} (pid {pid})")
        else:
            peer, pid = kill(args.run_dir, args.target, args.signal)
            print(f"sent SIG{args.signal} to {peer} (pid {pid})")
    except (ChaosError, ProcessLookupError, PermissionError) as err:
        print(f"python -m scripts.chaos: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
