"""One network as the launcher starts it (which peers run here, on which shards, against which broker, with what
settings), made from the command line and checked before anything starts; and the last network started here, which
the control commands (status, kill, down) act on."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from peer.records.run_dir import CheckpointError, killed_on_purpose, read_checkpoint
from peer.wire.ids import launched_peer_id, new_run_id, valid_run_id
from scripts.localnet import launched_shard, processes_of
from scripts.up.common import ROOT, UpError, abs_path, private_dir, state_dir, write_file

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's, as peer.learning.data knows it (numpy: not here)
DEFAULT_PROJECT = "sdfl"
DEFAULT_PUBLISH = "127.0.0.1::1883"
PREFLIGHT_S = 600  # the peers' Python may try a Keras download of the dataset: give it time
# Settings the launcher sets for each peer itself; a peer flag or FL_* variable for them would be a mistake.
OWNED_FLAGS = {
    "--broker": "FL_BROKER",
    "--peer-id": "FL_PEER_ID",
    "--shard": "FL_SHARD",
    "--run-dir": "FL_RUN_DIR",
    "--username": "FL_USERNAME",
    "--password": "FL_PASSWORD",
}


@dataclass
class Network:
    """One network as the launcher starts it: which peers run here, against which broker, with what settings."""

    project: str
    run_dir: Path
    peers: list[str]  # the peers started here
    total: int  # peers in the whole federation (the shards' N)
    first: int = 1
    peer_flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # FL_* settings passed to every peer
    join: str | None = None  # HOST:PORT of a broker elsewhere (no broker here)
    publish: str = DEFAULT_PUBLISH
    data_dir: Path | None = None  # a host folder of dataset files (--data-dir)
    dataset: str = ""  # the peers' --dataset, as preflight found it
    max_rounds: int = 10
    topic_prefix: str = "sd"
    run_id: str = ""  # the run (FL_RUN_ID); empty: a new one, or with --join the broker's
    resume: bool = False  # go on from run_dir's checkpoint (run_id is the checkpoint's)
    per_process: int = 1  # peers per process (local) or per container (python -m peer.host)
    brokers: int = 1  # brokers bridged into one federation, the peers spread over them
    tls: bool = False  # the broker's listener for other machines is TLS (./up.sh broker --tls); peers trust its CA
    bridge_to: str | None = None  # HOST:PORT of another machine's broker this one bridges to (./up.sh broker)
    mutual_tls: bool = False  # every client presents a certificate naming its login (local, several brokers)

    @property
    def state(self) -> Path:
        return state_dir() / self.project

    def shard(self, peer: str) -> str:
        return launched_shard(peer, self.total)

    def containers(self) -> dict[str, list[str]]:
        """Each peer container's compose service and the peers it runs: a peer each (`peer-K`), or `per_process`
        peers to a host (`host-peer-K`, python -m peer.host, named after its first peer as a local host is)."""
        if self.per_process == 1:
            return {peer: [peer] for peer in self.peers}
        return {f"host-{group[0]}": group for group in processes_of(self.peers, self.per_process)}

    def killed_on_purpose(self) -> set[str]:
        """The peers chaos.csv says were killed, with those that shared their container: they died of it too."""
        killed = killed_on_purpose(self.run_dir)
        return {peer for peers in self.containers().values() if killed & set(peers) for peer in peers} | killed


def default_run_dir() -> Path:
    base = ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def peer_flag(flags: list[str], name: str) -> str | None:
    """The value of `name X` or `name=X` among the peer flags (the last one wins, as argparse does)."""
    value = None
    for i, word in enumerate(flags):
        if word == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif word.startswith(name + "="):
            value = word[len(name) + 1 :]
    return value


def without_flag(flags: list[str], name: str) -> list[str]:
    out, skip = [], False
    for word in flags:
        if skip:
            skip = False
        elif word == name:
            skip = True
        elif not word.startswith(name + "="):
            out.append(word)
    return out


def network_from_args(args, peer_flags: list[str]) -> Network:
    """The network the command line asks for, its usage checked (status 2 for a mistake): who, where, how many. The
    peers' own settings come next, from the peers' Python (`preflight`)."""
    project = args.project or DEFAULT_PROJECT
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", project):
        raise UpError(f"--project {project!r}: use lowercase letters, digits, '-' and '_'", 2)
    if args.peers < 1 or (args.total or args.first - 1 + args.peers) < 2:
        raise UpError(f"--peers needs at least 2 peers in the federation, not {args.peers}", 2)
    if args.first < 1:
        raise UpError(f"--first counts from 1, not {args.first}", 2)
    if args.peers_per_process < 1:
        raise UpError(f"--peers-per-process must be at least 1, not {args.peers_per_process}", 2)
    if args.brokers < 1:
        raise UpError(f"--brokers must be at least 1, not {args.brokers}", 2)
    if args.brokers > 1 and args.join:
        raise UpError("--brokers makes the brokers of a network here; --join uses a broker elsewhere: not both", 2)
    if getattr(args, "mutual_tls", False) and not (args.local and args.brokers > 1 and args.peers_per_process == 1):
        raise UpError(
            "--mutual-tls is for the TLS of a local network's bridged brokers, a certificate per peer: "
            "--local --brokers B (B >= 2), one peer to a process",
            2,
        )
    if args.peers_per_process > 1 and args.resume:
        raise UpError("--resume needs one peer per process: leave --peers-per-process out", 2)
    total = args.total or args.first - 1 + args.peers
    if args.first - 1 + args.peers > total:
        raise UpError(f"peers {args.first}..{args.first + args.peers - 1} do not fit in --total {total}", 2)
    for flag in OWNED_FLAGS:
        if peer_flag(peer_flags, flag) is not None:
            raise UpError(
                f"{flag} is set by up.sh for each peer: leave it out of the peer flags "
                + ("(--run-dir goes before --)" if flag == "--run-dir" else ""),
                2,
            )
    # The dataset folder is the host's: containers get it mounted at DATA_MOUNT, local peers as it is.
    data_dir = args.data_dir or peer_flag(peer_flags, "--data-dir") or os.environ.get("FL_DATA_DIR") or None
    if data_dir and not abs_path(data_dir).is_dir():
        raise UpError(f"--data-dir {data_dir}: no such folder", 2)
    run_dir = abs_path(args.run_dir) if args.run_dir else default_run_dir()
    run_id = ""
    if args.resume:
        resume_dir = abs_path(args.resume)
        if args.run_dir and run_dir != resume_dir:
            raise UpError(f"--resume {args.resume} goes on in its own run dir: leave --run-dir out", 2)
        try:
            checkpoint = read_checkpoint(resume_dir)
        except CheckpointError as err:
            raise UpError(f"--resume: {err}", 2) from None
        if checkpoint is None:
            raise UpError(f"--resume: no checkpoint in {resume_dir} (a run writes one after every finished round)", 2)
        run_dir, run_id = resume_dir, checkpoint.run_id
    return Network(
        project=project,
        run_dir=run_dir,
        total=total,
        first=args.first,
        peers=[launched_peer_id(k) for k in range(args.first, args.first + args.peers)],
        peer_flags=without_flag(peer_flags, "--data-dir"),
        join=args.join,
        publish=args.publish,
        data_dir=abs_path(data_dir) if data_dir else None,
        run_id=run_id,
        resume=bool(args.resume),
        per_process=args.peers_per_process,
        brokers=args.brokers,
        mutual_tls=getattr(args, "mutual_tls", False),
    )


def preflight(python: list[str], net: Network, env: dict[str, str], *, load_data: bool = False) -> dict:
    """What a peer of `net` would make of its flags (and, with `load_data`, of its dataset), asked once of the
    peers' Python (`python`: the command that runs scripts/preflight.py) before any peer starts; UpError with the
    peer's own reason if it would not start (status 2 for refused flags)."""
    cmd = [*python, "--shards", str(net.total), *(["--load-data"] if load_data else []), "--", *net.peer_flags]
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PREFLIGHT_S, start_new_session=True
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UpError(f"checking the peer flags with `{shlex.join(python)}` failed: {err}") from None
    answer = last_json_line(done.stdout)
    if done.returncode == 0 and "dataset" in answer:
        return answer
    reason = str(answer.get("error", ""))
    if done.returncode == 2 and reason:
        raise UpError(reason, 2)
    if done.returncode == 3 and reason:
        raise UpError("the peers cannot start: " + reason.replace("\n", "\n  "))
    detail = reason or "".join(f"\n  | {line}" for line in (done.stderr or "").strip().splitlines()[-5:])
    raise UpError(
        f"{python[0]} cannot import the project's packages (paho-mqtt, numpy, tensorflow): "
        f"`{python[0]} -m pip install -r requirements.txt`, or set PYTHON ({detail})"
    )


def last_json_line(text: str) -> dict:
    """The last line of `text` that is a JSON object ({} if none): a program's answer after whatever it printed."""
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def apply_settings(net: Network, found: dict) -> None:
    """The peers' settings as preflight found them: the rounds to expect, the topics (the ACL), the dataset (the
    mounts) and a run id given with --run-id; and every FL_* variable of the calling shell that the peers read,
    except those the launcher sets itself, to pass on."""
    net.dataset, net.max_rounds, net.topic_prefix = found["dataset"], found["max_rounds"], found["topic_prefix"]
    given = found["run_id"] if found["run_id"] != "default" else ""
    if net.resume and given and given != net.run_id:
        raise UpError(f"--resume: the checkpoint is of run {net.run_id}, not {given}", 2)
    net.run_id = net.run_id or given
    names = set(found.get("env_names", ())) - set(OWNED_FLAGS.values()) - {"FL_DATA_DIR"}
    net.env = {k: v for k, v in os.environ.items() if k in names and v}


def preflight_env(data_dir: Path | None) -> dict[str, str]:
    """The environment the peers' Python answers for: this one, with the dataset folder as local peers get it."""
    env = {k: v for k, v in os.environ.items() if k != "FL_DATA_DIR"}
    if data_dir is not None:
        env["FL_DATA_DIR"] = str(data_dir)
    return env


def run_settings(net: Network, run_id_file: Path | None = None) -> None:
    """The run's id and whether it resumes, into every peer's environment: given, the joined broker's (its login
    folder's `run_id_file`), or new."""
    if not net.run_id and net.join and run_id_file is not None and run_id_file.is_file():
        net.run_id = run_id_file.read_text().strip()
        if not valid_run_id(net.run_id):
            raise UpError(f"{run_id_file}: {net.run_id!r} is not a run id; copy the login folder again", 2)
    net.run_id = net.run_id or new_run_id(time.time())
    net.env["FL_RUN_ID"] = net.run_id
    if net.resume:
        net.env["FL_RESUME"] = "yes"


def remember(**info) -> None:
    write_file(private_dir(state_dir()) / "last.json", json.dumps(info, indent=2) + "\n")


def last() -> dict:
    """What `remember` wrote of the last network, or {} (none yet, or unreadable)."""
    try:
        info = json.loads((state_dir() / "last.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def launcher_alive(pid) -> bool:
    """The launcher that started the last network still runs (and the pid was not reused by something else)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return any(name in cmdline for name in ("scripts.up", "scripts/up", "sdfl-up", "scripts.localnet"))
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
