"""Reads a run dir (see docs/RECORDS.md) into plain dataclasses.

Runs can be killed half way, so every file is optional and every row is suspect: a file that is missing yields an
empty list or None, a row that does not parse is skipped and described in `RunRecords.warnings`. Nothing here
raises on bad content; only a run dir that does not exist is an error, and the caller decides what that means.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

ROUNDS_FILE = "rounds.csv"
ELECTIONS_FILE = "elections.csv"
RUN_FILE = "run.json"
CHAOS_FILE = "chaos.csv"
PEERS_DIR = "peers"
EVALUATIONS_FILE = "evaluations.csv"
DATA_FILE = "data.json"

ID_LIST_SEPARATOR = ";"


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


@dataclass(frozen=True)
class Election:
    term: int
    controller: str
    reason: str
    time: float
    members: list[str]


@dataclass(frozen=True)
class Evaluation:
    round: int
    term: int
    accuracy: float
    loss: float
    samples: int
    time: float


@dataclass(frozen=True)
class ChaosEvent:
    time: float
    action: str
    peer: str
    signal: str


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


@dataclass
class RunSummary:
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
    def finished_at(self) -> float | None:
        return self._number(self.outcome, "finished_at")

    @property
    def target_accuracy(self) -> float | None:
        return self._number(self.settings, "target_accuracy")


@dataclass
class PeerRecords:
    peer: str
    # one per round, the row that counts (the later one when a round was evaluated twice), sorted by round
    evaluations: list[Evaluation] = field(default_factory=list)
    data: PeerData | None = None


@dataclass
class RunRecords:
    run_dir: Path
    rounds: list[RoundRecord] = field(default_factory=list)
    elections: list[Election] = field(default_factory=list)
    chaos: list[ChaosEvent] = field(default_factory=list)
    summary: RunSummary | None = None
    peers: dict[str, PeerRecords] = field(default_factory=dict)
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


Row = TypeVar("Row")


def _read_csv(path: Path, columns: list[str], parse: Callable[[dict[str, str]], Row],
              warnings: list[str]) -> list[Row]:
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8", errors="replace") as stream:
            reader = csv.reader(stream)
            header = next(reader, None)
            if header is None:
                return []
            header = [name.strip() for name in header]
            missing = [name for name in columns if name not in header]
            if missing:
                warnings.append(f"{path}: skipped, header lacks {', '.join(missing)}")
                return []
            rows: list[Row] = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                line = reader.line_num
                if len(cells) != len(header):
                    warnings.append(f"{path}:{line}: skipped malformed row "
                                    f"({len(cells)} fields, expected {len(header)})")
                    continue
                try:
                    rows.append(parse(dict(zip(header, cells))))
                except (ValueError, TypeError) as error:
                    warnings.append(f"{path}:{line}: skipped malformed row ({error})")
            return rows
    except (OSError, csv.Error) as error:
        warnings.append(f"{path}: could not be read ({error})")
        return []


def _round_number(cell: str) -> int:
    value = int(cell)
    if value < 0:
        raise ValueError(f"negative round {value}")
    return value


def _parse_round(row: dict[str, str]) -> RoundRecord:
    return RoundRecord(
        round=_round_number(row["round"]), term=int(row["term"]), controller=_text(row["controller"]),
        trainers=_id_list(row["trainers"]), accuracy=float(row["accuracy"]), loss=float(row["loss"]),
        duration_s=float(row["duration_s"]), bytes_sent=int(float(row["bytes_sent"])),
        finished_at=float(row["finished_at"]))


def _parse_election(row: dict[str, str]) -> Election:
    return Election(term=int(row["term"]), controller=_text(row["controller"]), reason=row["reason"].strip(),
                    time=float(row["time"]), members=_id_list(row["members"]))


def _parse_evaluation(row: dict[str, str]) -> Evaluation:
    return Evaluation(round=_round_number(row["round"]), term=int(row["term"]), accuracy=float(row["accuracy"]),
                      loss=float(row["loss"]), samples=int(float(row["samples"])), time=float(row["time"]))


def _parse_chaos(row: dict[str, str]) -> ChaosEvent:
    return ChaosEvent(time=float(row["time"]), action=_text(row["action"]), peer=_text(row["peer"]),
                      signal=row["signal"].strip())


def _latest_per_round(rows: list[Row], round_of: Callable[[Row], int]) -> list[Row]:
    # later rows overwrite earlier ones: the file is append-only, so file order is the order of writing
    by_round = {round_of(row): row for row in rows}
    return [by_round[number] for number in sorted(by_round)]


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


def _class_counts(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(n, (int, float)) and not isinstance(n, bool)
                                              for n in value):
        raise ValueError("class counts must be a list of numbers")
    return [int(n) for n in value]


def _read_peer_data(path: Path, peer: str, warnings: list[str]) -> PeerData | None:
    content = _read_json(path, warnings)
    if content is None:
        return None
    try:
        train_classes = _class_counts(content.get("train_classes", []))
        test_classes = _class_counts(content.get("test_classes", []))
        num_classes = int(content.get("num_classes") or max(len(train_classes), len(test_classes)))
        seed = content.get("seed")
        return PeerData(
            peer=str(content.get("peer") or peer), dataset=str(content.get("dataset", "")),
            shard=str(content.get("shard", "")), partition=str(content.get("partition", "")),
            seed=int(seed) if isinstance(seed, (int, float)) else None, num_classes=num_classes,
            train_samples=int(content.get("train_samples", sum(train_classes))),
            test_samples=int(content.get("test_samples", sum(test_classes))),
            train_classes=train_classes, test_classes=test_classes)
    except (ValueError, TypeError) as error:
        warnings.append(f"{path}: skipped ({error})")
        return None


def _read_summary(path: Path, warnings: list[str]) -> RunSummary | None:
    content = _read_json(path, warnings)
    if content is None:
        return None
    settings = content.get("settings")
    outcome = content.get("outcome")
    return RunSummary(settings=settings if isinstance(settings, dict) else {},
                      outcome=outcome if isinstance(outcome, dict) else {})


def _read_peers(peers_dir: Path, warnings: list[str]) -> dict[str, PeerRecords]:
    if not peers_dir.is_dir():
        return {}
    peers: dict[str, PeerRecords] = {}
    for peer_dir in sorted((p for p in peers_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        evaluations = _read_csv(peer_dir / EVALUATIONS_FILE, ["round", "term", "accuracy", "loss", "samples", "time"],
                                _parse_evaluation, warnings)
        peers[peer_dir.name] = PeerRecords(
            peer=peer_dir.name, evaluations=_latest_per_round(evaluations, lambda e: e.round),
            data=_read_peer_data(peer_dir / DATA_FILE, peer_dir.name, warnings))
    return peers


def load_run(run_dir: str | Path) -> RunRecords:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} does not exist" if not run_dir.exists()
                          else f"run dir {run_dir} is not a directory")
    warnings: list[str] = []
    rounds = _read_csv(run_dir / ROUNDS_FILE,
                       ["round", "term", "controller", "trainers", "accuracy", "loss", "duration_s", "bytes_sent",
                        "finished_at"], _parse_round, warnings)
    elections = _read_csv(run_dir / ELECTIONS_FILE, ["term", "controller", "reason", "time", "members"],
                          _parse_election, warnings)
    chaos = _read_csv(run_dir / CHAOS_FILE, ["time", "action", "peer", "signal"], _parse_chaos, warnings)
    return RunRecords(
        run_dir=run_dir,
        rounds=_latest_per_round(rounds, lambda r: r.round),
        elections=sorted(elections, key=lambda e: (e.time, e.term)),
        chaos=sorted(chaos, key=lambda c: c.time),
        summary=_read_summary(run_dir / RUN_FILE, warnings),
        peers=_read_peers(run_dir / PEERS_DIR, warnings),
        warnings=warnings)


def weighted_mean(values_and_weights: list[tuple[float, int]]) -> float | None:
    total = sum(weight for _, weight in values_and_weights)
    if total <= 0:
        return None
    return sum(value * weight for value, weight in values_and_weights) / total


@dataclass(frozen=True)
class GlobalPoint:
    round: int
    accuracy: float | None
    loss: float | None
    # rebuilt from peer evaluations rather than read from rounds.csv / run.json
    estimated: bool = False


def _members_of_term(records: RunRecords) -> dict[int, set[str]]:
    """Who took part in each term: elections.csv members, else everyone who trained a round of that term."""
    members: dict[int, set[str]] = {}
    for finished in records.rounds:
        members.setdefault(finished.term, set()).update(finished.trainers)
    members.update({e.term: set(e.members) for e in records.elections if e.members})
    return {term: peers for term, peers in members.items() if peers}


def _estimate_round(records: RunRecords, number: int) -> GlobalPoint | None:
    evaluations = {peer: e for peer, p in records.peers.items() for e in p.evaluations if e.round == number}
    if not evaluations:
        return None
    latest_term = max(e.term for e in evaluations.values())
    expected = _members_of_term(records).get(latest_term)
    if expected is not None:
        if not expected <= evaluations.keys():
            # a member's evaluation is lost: a mean over the rest would pass a subset off as the federation
            return None
        evaluations = {peer: e for peer, e in evaluations.items() if peer in expected}
    accuracy = weighted_mean([(e.accuracy, e.samples) for e in evaluations.values()])
    loss = weighted_mean([(e.loss, e.samples) for e in evaluations.values()])
    return GlobalPoint(number, accuracy, loss, estimated=True)


def global_series(records: RunRecords) -> list[GlobalPoint]:
    """Global (sample-weighted) accuracy and loss per round, round 0 included when it can be known.

    rounds.csv is the authority from round 1 on and run.json's initial_accuracy for round 0. run.json holds no
    initial loss, and a killed run may lack run.json or rounds.csv, so a round neither file gives is rebuilt the way
    the controller computes it, the sample-weighted mean of the peers' evaluations, but only when every member of
    the evaluating term (elections.csv, else that term's trainers in rounds.csv) has its evaluation on record.
    With rounds.csv present only round 0 is rebuilt: a later round missing from it never finished.
    """
    points = {r.round: GlobalPoint(r.round, r.accuracy, r.loss) for r in records.rounds}
    evaluated_rounds = sorted({e.round for p in records.peers.values() for e in p.evaluations})
    for number in evaluated_rounds:
        if number in points or (number != 0 and records.rounds):
            continue
        estimate = _estimate_round(records, number)
        if estimate is not None:
            points[number] = estimate
    initial = records.summary.initial_accuracy if records.summary else None
    if initial is not None:
        loss_at_start = points[0].loss if 0 in points else None
        points[0] = GlobalPoint(0, initial, loss_at_start)
    return [points[number] for number in sorted(points)]
