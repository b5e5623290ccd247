"""Pictures of a run dir: `python -m graphs RUN_DIR [--out DIR]` or `draw_all(run_dir)`.

Files written (fixed names, other tools rely on them):
    accuracy_peer_<id>.png    one per peer: its accuracy and loss of the global model per round
    accuracy_all_peers.png    every peer's accuracy, and the global sample-weighted accuracy as a thick line
    global_accuracy_loss.png  global accuracy and loss per round, target accuracy dashed
    round_durations.png       duration per round, bars coloured by term
    election_timeline.png     who was controller when, chaos kills/stops and the run's end marked
    class_distribution.png    each peer's train class histogram

`python -m graphs RUN_A RUN_B ...` draws comparison.png instead: the global accuracy per round of each run, labelled
with how it trained (`draw_comparison`; `strategy_label` is also in every title above).

The records are read with peer.records (`load_run`, `global_series`), the one home of the run dir's format.
"""

from graphs.draw import (
    ACCURACY_ALL_PEERS,
    CLASS_DISTRIBUTION,
    COMPARISON,
    ELECTION_TIMELINE,
    GLOBAL_ACCURACY_LOSS,
    ROUND_DURATIONS,
    NoRecordsError,
    draw_all,
    draw_comparison,
    peer_accuracy_file,
    plot_comparison,
    plot_panels,
    strategy_label,
)

__all__ = [
    "ACCURACY_ALL_PEERS",
    "CLASS_DISTRIBUTION",
    "COMPARISON",
    "ELECTION_TIMELINE",
    "GLOBAL_ACCURACY_LOSS",
    "ROUND_DURATIONS",
    "NoRecordsError",
    "draw_all",
    "draw_comparison",
    "peer_accuracy_file",
    "plot_comparison",
    "plot_panels",
    "strategy_label",
]
