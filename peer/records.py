"""Writing the run's records (format: docs/RECORDS.md). Every file has one writer at a time, and each write is
a whole line or a whole file, so a peer killed at any moment leaves readable records."""
from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

ROUNDS_COLUMNS = ["round", "term", "controller", "trainers", "accuracy", "loss", "duration_s", "bytes_sent", "finished_at"]
ELECTIONS_COLUMNS = ["term", "controller", "reason", "time", "members"]
EVALUATIONS_COLUMNS = ["round", "term", "accuracy", "loss", "samples", "time"]
CHAOS_COLUMNS = ["time", "action", "peer", "signal"]


def join_ids(ids) -> str:
    return ";".join(ids)


def append_row(path: Path, columns: list[str], row: dict) -> None:
    """One CSV row, with the header if the file is new, written in a single call (O_APPEND keeps lines whole)."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temp, path)


class RunRecords:
    def __init__(self, run_dir: Path, peer_id: str):
        self.run_dir = Path(run_dir)
        self.peer_dir = self.run_dir / "peers" / peer_id
        self.peer_dir.mkdir(parents=True, exist_ok=True)

    def round(self, **row) -> None:
        append_row(self.run_dir / "rounds.csv", ROUNDS_COLUMNS, row)

    def election(self, term: int, controller: str, reason: str, members) -> None:
        append_row(self.run_dir / "elections.csv", ELECTIONS_COLUMNS,
                   {"term": term, "controller": controller, "reason": reason, "time": time.time(), "members": members})

    def evaluation(self, round_: int, term: int, accuracy: float, loss: float, samples: int) -> None:
        append_row(self.peer_dir / "evaluations.csv", EVALUATIONS_COLUMNS,
                   {"round": round_, "term": term, "accuracy": accuracy, "loss": loss, "samples": samples,
                    "time": time.time()})

    def data(self, description: dict) -> None:
        write_json(self.peer_dir / "data.json", description)

    def status(self, **state) -> None:
        write_json(self.peer_dir / "status.json", {**state, "pid": os.getpid(), "updated": time.time()})

    def run(self, summary: dict) -> None:
        write_json(self.run_dir / "run.json", summary)

    @property
    def model_path(self) -> Path:
        return self.run_dir / "model.keras"
