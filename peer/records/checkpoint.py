"""A run's state in its checkpoint (checkpoint/ in the run dir, written after every finished round), and back.

`run_dir.RunRecorder.checkpoint` writes the files and `run_dir.read_checkpoint` reads them (standard library only, as
the launchers need); this module turns the peer's state into what is written, and what is read into the state a peer
goes on from (`--resume`). The weights are in the wire's format (`peer.wire.weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from peer.learning.privacy import Ledger
from peer.learning.server_optimizers import state_from_tensors
from peer.records.run_dir import Checkpoint
from peer.roles.rounds import GlobalModel, RoundSummary, ServerMemory
from peer.wire.weights import WeightCodec


@dataclass(frozen=True)
class RunState:
    """A run's state read back from its checkpoint: what a peer goes on from."""

    run_id: str
    model: GlobalModel
    rounds: tuple[RoundSummary, ...]
    run_started: float | None
    server: ServerMemory | None = None
    term: int = 0  # the last term the run used (its elections.csv): a resumed run elects past it, never again in it


def checkpoint_state(
    run_id: str,
    model: GlobalModel,
    rounds: tuple[RoundSummary, ...],
    run_started: float | None,
    server: ServerMemory | None = None,
) -> dict:
    """The checkpoint's description (its JSON file); the weights go beside it (`WeightCodec.parts(model.weights)`),
    and the server state's tensors too (`WeightCodec.parts(server.optimizer.tensors())`)."""
    state = {
        "run_id": run_id,
        "round": model.round,
        "term": model.term,
        "trainers": list(model.trainers),
        "controller": model.controller,
        "run_started": run_started,
        "rounds": [
            {"round": r.round, "term": r.term, "accuracy": r.accuracy, "loss": r.loss, "bytes": r.bytes} for r in rounds
        ],
    }
    if server is not None:
        state["server"] = {
            "digest": server.digest,
            "optimizer": server.optimizer.optimizer,
            "step": server.optimizer.step,
            "participation": dict(server.ledger.counts),
            "unattributed": server.ledger.unattributed,
        }
    return state


def run_state(checkpoint: Checkpoint) -> RunState:
    """The checkpoint as the peer holds a run: ProtocolError if its weights are damaged, KeyError/TypeError/ValueError
    if a round or the server state is (OptimizerError is a ValueError)."""
    weights = WeightCodec.decode(checkpoint.weights)
    rounds = tuple(
        RoundSummary(int(r["round"]), int(r["term"]), float(r["accuracy"]), float(r["loss"]), int(r["bytes"]))
        for r in checkpoint.rounds
    )
    server = None
    if checkpoint.server is not None and checkpoint.server_weights is not None:
        described = checkpoint.server
        optimizer = state_from_tensors(
            str(described["optimizer"]),
            int(described["step"]),
            WeightCodec.decode(checkpoint.server_weights),
            [w.shape for w in weights],
        )
        counts = {str(peer): int(count) for peer, count in dict(described.get("participation") or {}).items()}
        ledger = Ledger(MappingProxyType(counts), int(described.get("unattributed") or 0))
        server = ServerMemory(str(described["digest"]), optimizer, ledger)
    return RunState(
        checkpoint.run_id,
        GlobalModel(checkpoint.round, checkpoint.term, weights, tuple(checkpoint.trainers), checkpoint.controller),
        rounds,
        checkpoint.run_started,
        server,
    )
