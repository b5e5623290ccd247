"""./up.sh: start a federation (one Mosquitto broker, N peers) in containers, or as local processes, follow it to
the finish, poke it (status, kill) and take it down. Standard library only: it runs on the host's python3.

    python -m scripts.up [--peers N] [--run-dir DIR] [--local | --docker] [-- PEER_FLAGS...]
    python -m scripts.up status | kill controller|random|peer ID [--signal S] | down
    python -m scripts.up broker --publish ADDR [--peers N]          # several hosts: the broker alone
    python -m scripts.up --join HOST:PORT --login DIR --peers N --first K --total T   # peers only
    python -m scripts.up images | credentials | compose-file

One module per concern:
- cli: the command line, one function per command;
- network: the network to start (peers, shards, settings, checked before anything starts) and the last one started;
- logins: the network's secrets (a broker login per peer, ACL, passwd, the federation secret), made in one place;
- images: the peer and broker images, on official or Debian-built bases;
- compose: the compose file, as data;
- containers: running, watching, signalling and taking down the containers;
- local: the same network as local processes (scripts.localnet);
- progress: the one-line progress and the end report, from the run's records.

State of its own (generated logins, the compose file, the last network started) lives in `.up/` at the checkout's
root, git-ignored and private (0700); nothing of the checkout is modified by a container, and nothing tracked by git
is written. The run dir's layout is docs/RECORDS.md.
"""

from scripts.up.cli import main

__all__ = ["main"]
