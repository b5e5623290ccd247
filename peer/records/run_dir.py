"""The run dir's format (docs/RECORDS.md): its file names and columns, the writer and the readers.

Writing: `RunRecorder` (one per peer) and `record_chaos`. Every file has one writer at a time, and each write is a
whole line or a whole file, so a process killed at any moment leaves readable records.

Reading: `load_run(run_dir)` gives a `RunHistory`; the `read_*` functions read one file each. Runs can be killed
half way, so every file is optional and every row is suspect: a missing file yields an empty list or None, a row
that does not parse is skipped and described in the `warnings` list passed in. Nothing here raises on bad content;
only a run dir that does not exist is an error (`RunDirError`), and the caller decides what that means.

Standard library only: `python -m scripts.chaos` runs on a bare host python.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from peer.learning.metrics import weighted_mean

# --- names ------------------------------------------------------------------------------------------------------------

ROUNDS_FILE = "rounds.csv"
ELECTIONS_FILE = "elections.csv"
CHAOS_FILE = "chaos.csv"
RUN_FILE = "run.json"
MODEL_FILE = "model.keras"
PEERS_DIR = "peers"
EVALUATIONS_FILE = "evaluations.csv"
DATA_FILE = "data.json"
STATUS_FILE = "status.json"
PEER_LOG_FILE = "peer.log"
BROKER_LOG_FILE = "broker.log"  # the broker's output (written by the launchers)
BROKERS_FILE = "brokers.json"  # a network of several bridged brokers: each one's name, address, pid, uplink
BROKERS_DIR = "brokers"  # a network of several brokers: each one's output, brokers/<name>.log
HOSTS_DIR = "hosts"  # the whole output of each process that hosts several peers (written by the launchers)
CHECKPOINT_DIR = "checkpoint"  # the run's state after its last finished round, for --resume
CHECKPOINT_FILE = "checkpoint.json"
SERVER_STATE_PREFIX = "server-state-"  # checkpoint/server-state-<round>.bin: the server optimizer's tensors

ID_LIST_SEPARATOR = ";"


def peer_dir(run_dir: str | Path, peer: str) -> Path:
    """RUN_DIR/peers/<id>: the files one peer writes (and its log, in local runs)."""
    return Path(run_dir) / PEERS_DIR / peer


def broker_log(run_dir: str | Path, name: str) -> Path:
    """The output of the broker `name` of a network of several (one broker's is BROKER_LOG_FILE)."""
    return Path(run_dir) / BROKERS_DIR / f"{name}.log"


def peer_log(run_dir: str | Path, peer: str) -> Path:
    """RUN_DIR/peers/<id>/peer.log: the peer's log as the launcher keeps it (the lines a host wrote about it)."""
    return peer_dir(run_dir, peer) / PEER_LOG_FILE


def host_log(run_dir: str | Path, first_peer: str) -> Path:
    """RUN_DIR/hosts/<first peer>.log: the whole output of the process (or container) whose first peer is that."""
    return Path(run_dir) / HOSTS_DIR / f"{first_peer}.log"


# --- rows: one dataclass per CSV file, its fields are the file's columns in order -------------------------------------


@dataclass(frozen=True)
class RoundRecord:
    round: int
    term: int
    controller: str
    trainers: list[str]
    accuracy: float
    loss: float
    duration_s: float
    bytes_sent: int
    finished_at: float
    # the round's first training order by the controller that finished it; None in files written before it existed
    started_at: float | None = None
    # the privacy spent after this round (runs with --dp-clip), at the run's --dp-delta; None without DP, and in files
    # written before the column existed
    epsilon: float | None = None


@dataclass(frozen=True)
class ElectionRecord:
    term: int
    controller: str
    reason: str
    time: float
    members: list[str]


@dataclass(frozen=True)
class EvaluationRecord:
    round: int
    term: int
    accuracy: float
    loss: float
    samples: int
    time: float


@dataclass(frozen=True)
class ChaosRecord:
    time: float
    action: str
    peer: str
    signal: str


def _columns(row_type: type) -> list[str]:
    return [f.name for f in fields(row_type)]


ROUNDS_COLUMNS = _columns(RoundRecord)
ELECTIONS_COLUMNS = _columns(ElectionRecord)
EVALUATIONS_COLUMNS = _columns(EvaluationRecord)
CHAOS_COLUMNS = _columns(ChaosRecord)
# columns added after the first release: a file without them is still read (the value is None)
OPTIONAL_COLUMNS = frozenset({"started_at", "epsilon"})


# --- writing ----------------------------------------------------------------------------------------------------------


def join_ids(ids: Iterable[str]) -> str:
    return ID_LIST_SEPARATOR.join(ids)


def append_row(path: Path, columns: list[str], row: dict) -> None:
    """One CSV row, with the header if the file is new, written in a single call (O_APPEND keeps lines whole)."""
    unknown = set(row) - set(columns)
    if unknown:
        raise TypeError(f"{path.name} has no column {', '.join(sorted(unknown))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    if not path.exists() or path.stat().st_size == 0:
        writer.writeheader()
    writer.writerow({key: _cell(row.get(key)) for key in columns})
    with open(path, "a", encoding="utf-8") as out:
        out.write(buffer.getvalue())


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, (list, tuple)):
        return join_ids(value)
    return "" if value is None else value


def write_json(path: Path, data: dict) -> None:
    """Replace the file atomically: readers see the old or the new version, never half of one."""
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def write_bytes(path: Path, data) -> str:
    """Replace the file atomically (a temporary file renamed over it) with `data`: bytes, or an iterable of
    bytes-like parts written one after the other (a large model is never joined in memory). Its SHA-256, in hex."""
    digest = hashlib.sha256()

    def write(temp: Path) -> None:
        with open(temp, "wb") as out:
            for part in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                out.write(part)
                digest.update(part)

    replace_atomically(path, write)
    return digest.hexdigest()


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Have `write` write the whole file at a temporary path beside `path` (same folder, so the same file system;
    the same suffix, which some writers insist on), then rename it over `path`. Readers see the
    old file or the new one, never half of one; a write that fails (a full disk) leaves the old file and no
    temporary one, and raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class RunRecorder:
    """What one peer writes into the run dir. `at`: the time to record (default: now)."""

    def __init__(self, run_dir: str | Path, peer_id: str):
        self.run_dir = Path(run_dir)
        self.peer_dir = peer_dir(self.run_dir, peer_id)
        self.peer_dir.mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        """OSError now if the run dir cannot take this peer's records, rather than a failed write later."""
        for folder in (self.run_dir, self.peer_dir):
            probe = folder / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()

    def round(self, **row) -> None:
        """A finished round: keywords are ROUNDS_COLUMNS (a missing one is left empty, an unknown one is refused)."""
        append_row(self.run_dir / ROUNDS_FILE, ROUNDS_COLUMNS, row)

    def election(self, term: int, controller: str, reason: str, members, *, at: float | None = None) -> None:
        append_row(
            self.run_dir / ELECTIONS_FILE,
            ELECTIONS_COLUMNS,
            {"term": term, "controller": controller, "reason": reason, "time": _now(at), "members": members},
        )

    def evaluation(
        self, round_: int, term: int, accuracy: float, loss: float, samples: int, *, at: float | None = None
    ) -> None:
        append_row(
            self.peer_dir / EVALUATIONS_FILE,
            EVALUATIONS_COLUMNS,
            {"round": round_, "term": term, "accuracy": accuracy, "loss": loss, "samples": samples, "time": _now(at)},
        )

    def data(self, description: dict) -> None:
        write_json(self.peer_dir / DATA_FILE, description)

    def status(self, **state) -> None:
        write_json(self.peer_dir / STATUS_FILE, {**state, "pid": os.getpid(), "updated": time.time()})

    def run(self, summary: dict) -> None:
        write_json(self.run_dir / RUN_FILE, summary)

    @property
    def model_path(self) -> Path:
        return self.run_dir / MODEL_FILE

    def model(self, save: Callable[[Path], object]) -> None:
        """The run's final model, written by `save(path)` (Keras), atomically: a failed save leaves no model.keras
        (or the one before), never a truncated one."""
        replace_atomically(self.model_path, save)

    def checkpoint(self, state: dict, weights, server_weights=None) -> None:
        """The run after a finished round (`state`: run_id, round, term, trainers, run_started, rounds, and "server"
        when the run keeps a server state; `weights`: the global model in the wire's weights format, as bytes or as
        parts; `server_weights`: the server state's tensors, likewise). The weights go to files named by round,
        then the description that names them and their digests, then older weights files go: killed at any
        moment, the folder holds one whole checkpoint."""
        folder = self.run_dir / CHECKPOINT_DIR
        name = f"weights-{state['round']}.bin"
        sha256 = write_bytes(folder / name, weights)
        description = {**state, "weights_file": name, "weights_sha256": sha256, "saved_at": time.time()}
        kept = {name}
        if server_weights is not None and isinstance(state.get("server"), dict):
            server_name = f"{SERVER_STATE_PREFIX}{state['round']}.bin"
            server_sha256 = write_bytes(folder / server_name, server_weights)
            description["server"] = {**state["server"], "weights_file": server_name, "weights_sha256": server_sha256}
            kept.add(server_name)
        write_json(folder / CHECKPOINT_FILE, description)
        for old in [*folder.glob("weights-*.bin"), *folder.glob(f"{SERVER_STATE_PREFIX}*.bin")]:
            if old.name not in kept:
                old.unlink(missing_ok=True)


def record_chaos(run_dir: str | Path, action: str, peer: str, signal: str, *, at: float | None = None) -> float:
    """A signal sent to a peer on purpose (kill, stop, cont); returns the time recorded."""
    when = _now(at)
    append_row(
        Path(run_dir) / CHAOS_FILE, CHAOS_COLUMNS, {"time": when, "action": action, "peer": peer, "signal": signal}
    )
    return when


def _now(at: float | None) -> float:
    return time.time() if at is None else at


# --- reading: the checkpoint --------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """The run dir's checkpoint cannot be used; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    round: int
    term: int
    trainers: list[str]
    run_started: float | None
    rounds: list[dict]  # per finished round: round, term, accuracy, loss, bytes
    weights: bytes  # the global model of `round`, in the wire's weights format (peer.protocol)
    controller: str = ""  # who published that model ("" in checkpoints written before it was recorded)
    server: dict | None = None  # the server state's description (optimizer, step, digest, participation, ...)
    server_weights: bytes | None = None  # its tensors, in the wire's weights format


def read_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The run dir's checkpoint, None if it has none; CheckpointError if it is damaged."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        weights = (folder / state["weights_file"]).read_bytes()
        if hashlib.sha256(weights).hexdigest() != state["weights_sha256"]:
            raise CheckpointError(f"{folder}: the weights file does not match its digest")
        server, server_weights = state.get("server"), None
        if isinstance(server, dict):
            server_weights = (folder / server["weights_file"]).read_bytes()
            if hashlib.sha256(server_weights).hexdigest() != server["weights_sha256"]:
                raise CheckpointError(f"{folder}: the server state's file does not match its digest")
        return Checkpoint(
            run_id=str(state["run_id"]),
            round=int(state["round"]),
            term=int(state["term"]),
            trainers=[str(p) for p in state.get("trainers", [])],
            run_started=state.get("run_started"),
            rounds=list(state.get("rounds", [])),
            weights=weights,
            controller=str(state.get("controller") or ""),
            server=server if isinstance(server, dict) else None,
            server_weights=server_weights,
        )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}: the checkpoint cannot be read ({type(err).__name__}: {err})") from None


# --- reading: one file ------------------------------------------------------------------------------------------------


class RunDirError(Exception):
    """The run dir does not exist or is not a directory."""


def natural_key(text: str) -> list[Any]:
    """Sort key so that peer-2 comes before peer-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _id_list(cell: str) -> list[str]:
    return [item.strip() for item in cell.split(ID_LIST_SEPARATOR) if item.strip()]


def _text(cell: str) -> str:
    value = cell.strip()
    if not value:
        raise ValueError("empty value")
    return value


def _round_number(cell: str) -> int:
    value = int(cell)
    if value < 0:
        raise ValueError(f"negative round {value}")
    return value


def _optional_float(cell: str | None) -> float | None:
    return float(cell) if cell is not None and cell.strip() else None


Row = TypeVar("Row")


def _read_csv(path: Path, columns: list[str], parse: Callable[[dict[str, str]], Row], warnings: list[str]) -> list[Row]:
    if not path.is_file():
        return []
    required = [name for name in columns if name not in OPTIONAL_COLUMNS]
    try:
        with path.open(newline="", encoding="utf-8", errors="replace") as stream:
            reader = csv.reader(stream)
            header = next(reader, None)
            if header is None:
                return []
            header = [name.strip() for name in header]
            missing = [name for name in required if name not in header]
            if missing:
                warnings.append(f"{path}: skipped, header lacks {', '.join(missing)}")
                return []
            rows: list[Row] = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                line = reader.line_num
                if len(cells) != len(header):
                    warnings.append(
                        f"{path}:{line}: skipped malformed row ({len(cells)} fields, expected {len(header)})"
                    )
                    continue
                try:
                    rows.append(parse(dict(zip(header, cells))))
                except (ValueError, TypeError) as error:
                    warnings.append(f"{path}:{line}: skipped malformed row ({error})")
            return rows
    except (OSError, csv.Error) as error:
        warnings.append(f"{path}: could not be read ({error})")
        return []


def _parse_round(row: dict[str, str]) -> RoundRecord:
    return RoundRecord(
        round=_round_number(row["round"]),
        term=int(row["term"]),
        controller=_text(row["controller"]),
        trainers=_id_list(row["trainers"]),
        accuracy=float(row["accuracy"]),
        loss=float(row["loss"]),
        duration_s=float(row["duration_s"]),
        bytes_sent=int(float(row["bytes_sent"])),
        finished_at=float(row["finished_at"]),
        started_at=_optional_float(row.get("started_at")),
        epsilon=_optional_float(row.get("epsilon")),
    )


def _parse_election(row: dict[str, str]) -> ElectionRecord:
    return ElectionRecord(
        term=int(row["term"]),
        controller=_text(row["controller"]),
        reason=row["reason"].strip(),
        time=float(row["time"]),
        members=_id_list(row["members"]),
    )


def _parse_evaluation(row: dict[str, str]) -> EvaluationRecord:
    return EvaluationRecord(
        round=_round_number(row["round"]),
        term=int(row["term"]),
        accuracy=float(row["accuracy"]),
        loss=float(row["loss"]),
        samples=int(float(row["samples"])),
        time=float(row["time"]),
    )


def _parse_chaos(row: dict[str, str]) -> ChaosRecord:
    return ChaosRecord(
        time=float(row["time"]), action=_text(row["action"]), peer=_text(row["peer"]), signal=row["signal"].strip()
    )


def _latest_per_round(rows: list[Row], round_of: Callable[[Row], int]) -> list[Row]:
    # later rows overwrite earlier ones: the file is append-only, so file order is the order of writing
    by_round = {round_of(row): row for row in rows}
    return [by_round[number] for number in sorted(by_round)]


def _warnings(warnings: list[str] | None) -> list[str]:
    return [] if warnings is None else warnings


def read_rounds(run_dir: str | Path, warnings: list[str] | None = None) -> list[RoundRecord]:
    """rounds.csv: one row per round, the row that counts (the later one of a round recorded twice), by round."""
    rows = _read_csv(Path(run_dir) / ROUNDS_FILE, ROUNDS_COLUMNS, _parse_round, _warnings(warnings))
    return _latest_per_round(rows, lambda r: r.round)


def read_elections(run_dir: str | Path, warnings: list[str] | None = None) -> list[ElectionRecord]:
    """elections.csv, in the order of time."""
    rows = _read_csv(Path(run_dir) / ELECTIONS_FILE, ELECTIONS_COLUMNS, _parse_election, _warnings(warnings))
    return sorted(rows, key=lambda e: (e.time, e.term))


def read_chaos(run_dir: str | Path, warnings: list[str] | None = None) -> list[ChaosRecord]:
    """chaos.csv, in the order of time."""
    rows = _read_csv(Path(run_dir) / CHAOS_FILE, CHAOS_COLUMNS, _parse_chaos, _warnings(warnings))
    return sorted(rows, key=lambda c: c.time)


def killed_on_purpose(run_dir: str | Path) -> set[str]:
    """The peers chaos.csv says were killed on purpose: their exit is no failure of the run."""
    return {event.peer for event in read_chaos(run_dir) if event.action == "kill"}


def read_evaluations(run_dir: str | Path, peer: str, warnings: list[str] | None = None) -> list[EvaluationRecord]:
    """A peer's evaluations.csv: one row per round, the row that counts (the later one), by round."""
    rows = _read_csv(
        peer_dir(run_dir, peer) / EVALUATIONS_FILE, EVALUATIONS_COLUMNS, _parse_evaluation, _warnings(warnings)
    )
    return _latest_per_round(rows, lambda e: e.round)


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError) as error:
        warnings.append(f"{path}: skipped, not valid JSON ({error})")
        return None
    if not isinstance(content, dict):
        warnings.append(f"{path}: skipped, expected a JSON object")
        return None
    return content


@dataclass(frozen=True)
class PeerData:
    peer: str
    dataset: str
    shard: str
    partition: str
    seed: int | None
    num_classes: int
    train_samples: int
    test_samples: int
    train_classes: list[int]
    test_classes: list[int]


def _class_counts(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in value):
        raise ValueError("class counts must be a list of numbers")
    return [int(n) for n in value]


def read_peer_data(run_dir: str | Path, peer: str, warnings: list[str] | None = None) -> PeerData | None:
    """A peer's data.json."""
    path = peer_dir(run_dir, peer) / DATA_FILE
    warnings = _warnings(warnings)
    content = _read_json(path, warnings)
    if content is None:
        return None
    try:
        train_classes = _class_counts(content.get("train_classes", []))
        test_classes = _class_counts(content.get("test_classes", []))
        num_classes = int(content.get("num_classes") or max(len(train_classes), len(test_classes)))
        seed = content.get("seed")
        return PeerData(
            peer=str(content.get("peer") or peer),
            dataset=str(content.get("dataset", "")),
            shard=str(content.get("shard", "")),
            partition=str(content.get("partition", "")),
            seed=int(seed) if isinstance(seed, (int, float)) else None,
            num_classes=num_classes,
            train_samples=int(content.get("train_samples", sum(train_classes))),
            test_samples=int(content.get("test_samples", sum(test_classes))),
            train_classes=train_classes,
            test_classes=test_classes,
        )
    except (ValueError, TypeError) as error:
        warnings.append(f"{path}: skipped ({error})")
        return None


@dataclass
class RunSummary:
    """run.json: the settings and the outcome, as written; the properties give the numbers that are usable."""

    settings: dict[str, Any]
    outcome: dict[str, Any]

    def _number(self, section: dict[str, Any], key: str) -> float | None:
        value = section.get(key)
        # bool is an int subclass, and a JSON `true` is never a meaningful accuracy or time
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    @property
    def initial_accuracy(self) -> float | None:
        return self._number(self.outcome, "initial_accuracy")

    @property
    def final_accuracy(self) -> float | None:
        return self._number(self.outcome, "final_accuracy")

    @property
    def finished_at(self) -> float | None:
        return self._number(self.outcome, "finished_at")

    @property
    def target_accuracy(self) -> float | None:
        return self._number(self.settings, "target_accuracy")


def read_run_summary(run_dir: str | Path, warnings: list[str] | None = None) -> RunSummary | None:
    """run.json, or None before the run has finished."""
    content = _read_json(Path(run_dir) / RUN_FILE, _warnings(warnings))
    if content is None:
        return None
    settings = content.get("settings")
    outcome = content.get("outcome")
    return RunSummary(
        settings=settings if isinstance(settings, dict) else {}, outcome=outcome if isinstance(outcome, dict) else {}
    )


def write_brokers(run_dir: str | Path, brokers: list[dict]) -> None:
    """brokers.json: the brokers of a network of several, each `{"name", "address", "pid", "uplink"}`."""
    write_json(Path(run_dir) / BROKERS_FILE, {"brokers": brokers})


def read_brokers(run_dir: str | Path) -> list[dict]:
    """brokers.json's brokers (none: the file is missing or unreadable, a network of one broker)."""
    try:
        content = json.loads((Path(run_dir) / BROKERS_FILE).read_text())
    except (OSError, ValueError):
        return []
    brokers = content.get("brokers") if isinstance(content, dict) else None
    return (
        [b for b in brokers if isinstance(b, dict) and isinstance(b.get("name"), str)]
        if isinstance(brokers, list)
        else []
    )


def read_statuses(run_dir: str | Path) -> dict[str, dict]:
    """Every peer's status.json by peer id, as written; a file being replaced or torn by a kill is left out."""
    statuses = {}
    for path in sorted((Path(run_dir) / PEERS_DIR).glob(f"*/{STATUS_FILE}")):
        try:
            statuses[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being rewritten or torn by a kill: the next read will have it
    return statuses


# --- reading: the whole run -------------------------------------------------------------------------------------------


@dataclass
class PeerHistory:
    peer: str
    # one per round, the row that counts (the later one when a round was evaluated twice), sorted by round
    evaluations: list[EvaluationRecord] = field(default_factory=list)
    data: PeerData | None = None


@dataclass
class RunHistory:
    run_dir: Path
    rounds: list[RoundRecord] = field(default_factory=list)
    elections: list[ElectionRecord] = field(default_factory=list)
    chaos: list[ChaosRecord] = field(default_factory=list)
    summary: RunSummary | None = None
    peers: dict[str, PeerHistory] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        has_peer_records = any(p.evaluations or p.data for p in self.peers.values())
        return not (self.rounds or self.elections or self.chaos or self.summary or has_peer_records)

    def controller_of_term(self) -> dict[int, str]:
        """Who led each term: elections.csv is authoritative, rounds.csv fills terms whose election row is lost."""
        controllers = {r.term: r.controller for r in self.rounds}
        controllers.update({e.term: e.controller for e in self.elections})
        return controllers


def _read_peers(run_dir: Path, warnings: list[str]) -> dict[str, PeerHistory]:
    peers_dir = run_dir / PEERS_DIR
    if not peers_dir.is_dir():
        return {}
    names = sorted((p.name for p in peers_dir.iterdir() if p.is_dir()), key=natural_key)
    return {
        name: PeerHistory(
            peer=name,
            evaluations=read_evaluations(run_dir, name, warnings),
            data=read_peer_data(run_dir, name, warnings),
        )
        for name in names
    }


def load_run(run_dir: str | Path) -> RunHistory:
    """Everything the run dir holds (status.json and peer.log aside). Raises RunDirError if there is no run dir."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(
            f"run dir {run_dir} does not exist" if not run_dir.exists() else f"run dir {run_dir} is not a directory"
        )
    warnings: list[str] = []
    return RunHistory(
        run_dir=run_dir,
        rounds=read_rounds(run_dir, warnings),
        elections=read_elections(run_dir, warnings),
        chaos=read_chaos(run_dir, warnings),
        summary=read_run_summary(run_dir, warnings),
        peers=_read_peers(run_dir, warnings),
        warnings=warnings,
    )


# --- the global metric ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalPoint:
    round: int
    accuracy: float | None
    loss: float | None
    # rebuilt from peer evaluations rather than read from rounds.csv / run.json
    estimated: bool = False


def _members_of_term(history: RunHistory) -> dict[int, set[str]]:
    """Who took part in each term: elections.csv members, else everyone who trained a round of that term."""
    members: dict[int, set[str]] = {}
    for finished in history.rounds:
        members.setdefault(finished.term, set()).update(finished.trainers)
    members.update({e.term: set(e.members) for e in history.elections if e.members})
    return {term: peers for term, peers in members.items() if peers}


def _estimate_round(history: RunHistory, number: int) -> GlobalPoint | None:
    evaluations = {peer: e for peer, p in history.peers.items() for e in p.evaluations if e.round == number}
    if not evaluations:
        return None
    latest_term = max(e.term for e in evaluations.values())
    expected = _members_of_term(history).get(latest_term)
    if expected is not None:
        if not expected <= evaluations.keys():
            # a member's evaluation is lost: a mean over the rest would pass a subset off as the federation
            return None
        evaluations = {peer: e for peer, e in evaluations.items() if peer in expected}
    accuracy = weighted_mean((e.accuracy, e.samples) for e in evaluations.values())
    loss = weighted_mean((e.loss, e.samples) for e in evaluations.values())
    return GlobalPoint(number, accuracy, loss, estimated=True)


def global_series(history: RunHistory) -> list[GlobalPoint]:
    """Global (sample-weighted) accuracy and loss per round, round 0 included when it can be known.

    rounds.csv is the authority from round 1 on and run.json's initial_accuracy for round 0. run.json holds no
    initial loss, and a killed run may lack run.json or rounds.csv, so a round neither file gives is rebuilt the way
    the controller computes it, the sample-weighted mean of the peers' evaluations, but only when every member of
    the evaluating term (elections.csv, else that term's trainers in rounds.csv) has its evaluation on record.
    With rounds.csv present only round 0 is rebuilt: a later round missing from it never finished.
    """
    points = {r.round: GlobalPoint(r.round, r.accuracy, r.loss) for r in history.rounds}
    evaluated_rounds = sorted({e.round for p in history.peers.values() for e in p.evaluations})
    for number in evaluated_rounds:
        if number in points or (number != 0 and history.rounds):
            continue
        estimate = _estimate_round(history, number)
        if estimate is not None:
            points[number] = estimate
    initial = history.summary.initial_accuracy if history.summary else None
    if initial is not None:
        loss_at_start = points[0].loss if 0 in points else None
        points[0] = GlobalPoint(0, initial, loss_at_start)
    return [points[number] for number in sorted(points)]
