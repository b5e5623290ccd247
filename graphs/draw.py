"""Draws the pictures of a run dir (names and contents: docs/RECORDS.md and graphs/__init__.py).

Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas rather than through pyplot: no global
figure registry to leak or to close, and the caller's backend choice (an experiment script may have one) is left
alone.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from graphs.labels import strategy_label
from peer.records.run_dir import GlobalPoint, RunDirError, RunHistory, global_series, load_run, natural_key

DPI = 110
GRAPHS_DIR = "graphs"

ACCURACY_ALL_PEERS = "accuracy_all_peers.png"
GLOBAL_ACCURACY_LOSS = "global_accuracy_loss.png"
ROUND_DURATIONS = "round_durations.png"
ELECTION_TIMELINE = "election_timeline.png"
CLASS_DISTRIBUTION = "class_distribution.png"

# kept apart from the C0..C9 cycle that colours the terms, so a chaos line never blends into a span
CHAOS_COLOURS = {"kill": "crimson", "stop": "darkviolet", "cont": "teal"}


class NoRecordsError(RunDirError):
    """The run dir holds nothing that can be drawn."""


class Skip(Exception):
    """One picture cannot be drawn from this run's records; the message says why."""


def peer_accuracy_file(peer: str) -> str:
    # ids come from directory names written by other programs; keep the file name portable whatever they hold
    return f"accuracy_peer_{re.sub(r'[^A-Za-z0-9_.-]', '_', peer)}.png"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _integer_rounds(axis) -> None:
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("round")


def _accuracy_axis(axis, values: Iterable[float | None]) -> None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    axis.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    # accuracy is a fraction; pin the axis to it so runs and peers compare by eye, unless a writer used percent
    if finite and 0.0 <= min(finite) and max(finite) <= 1.0:
        axis.set_ylim(0.0, 1.02)
    axis.set_ylabel("accuracy")
    axis.grid(True, alpha=0.3)


def _term_colours(terms: Iterable[int]) -> dict[int, str]:
    """One colour per term, shared by the duration bars and the election timeline so the two read together."""
    ordered = sorted(set(terms))
    return {term: f"C{index % 10}" for index, term in enumerate(ordered)}


def _run_label(history: RunHistory) -> str:
    settings = history.summary.settings if history.summary else {}
    data = next((p.data for p in history.peers.values() if p.data), None)
    dataset = settings.get("dataset") or (data.dataset if data else "")
    partition = settings.get("partition") or (data.partition if data else "")
    parts = [str(part) for part in (dataset, partition) if part]
    strategy = strategy_label(settings, _last_epsilon(history)) if settings else ""
    if strategy:
        parts.append(strategy)
    return f" ({', '.join(parts)})" if parts else ""


def _last_epsilon(history: RunHistory) -> float | None:
    spent = [r.epsilon for r in history.rounds if r.epsilon is not None]
    return spent[-1] if spent else None


def _global_accuracy_line(axis, points: list[GlobalPoint], **style) -> None:
    drawn = [p for p in points if p.accuracy is not None]
    if not drawn:
        return
    estimated = any(p.estimated for p in drawn)
    label = "global (sample-weighted)" + (", rebuilt from peer evaluations" if estimated else "")
    axis.plot([p.round for p in drawn], [p.accuracy for p in drawn], label=label, **style)
    rebuilt = [p for p in drawn if p.estimated]
    if rebuilt:
        axis.plot(
            [p.round for p in rebuilt],
            [p.accuracy for p in rebuilt],
            linestyle="none",
            marker="o",
            markersize=9,
            markerfacecolor="white",
            markeredgecolor=style.get("color", "black"),
        )


def draw_peer_accuracy(history: RunHistory, peer: str, out_dir: Path) -> Path:
    evaluations = history.peers[peer].evaluations if peer in history.peers else []
    if not evaluations:
        raise Skip(f"peer {peer} has no rows in evaluations.csv")
    figure = _new_figure(8, 4.5)
    accuracy_axis = figure.add_subplot()
    rounds = [e.round for e in evaluations]
    accuracy_axis.plot(
        rounds, [e.accuracy for e in evaluations], marker="o", color="tab:blue", linewidth=2, label=f"{peer} accuracy"
    )
    _global_accuracy_line(accuracy_axis, global_series(history), color="grey", linestyle=":", linewidth=1.5)
    _accuracy_axis(accuracy_axis, [e.accuracy for e in evaluations])
    _integer_rounds(accuracy_axis)
    loss_axis = accuracy_axis.twinx()
    loss_axis.plot(
        rounds, [e.loss for e in evaluations], marker="s", color="tab:red", linestyle="--", label=f"{peer} loss"
    )
    loss_axis.set_ylabel("loss", color="tab:red")
    loss_axis.tick_params(axis="y", colors="tab:red")
    handles, labels = accuracy_axis.get_legend_handles_labels()
    loss_handles, loss_labels = loss_axis.get_legend_handles_labels()
    loss_axis.legend(handles + loss_handles, labels + loss_labels, loc="center right", fontsize="small")
    data = history.peers[peer].data
    detail = f", shard {data.shard}, {data.test_samples} test samples" if data and data.shard else ""
    accuracy_axis.set_title(f"{peer}: its evaluation of the global model{detail}")
    return _save(figure, out_dir / peer_accuracy_file(peer))


def draw_all_peers_accuracy(history: RunHistory, out_dir: Path) -> Path:
    peers = [p for p in history.peers.values() if p.evaluations]
    points = global_series(history)
    if not peers and not any(p.accuracy is not None for p in points):
        raise Skip("no peer evaluations and no global accuracy")
    figure = _new_figure(9, 5.5)
    axis = figure.add_subplot()
    for peer in peers:
        axis.plot(
            [e.round for e in peer.evaluations],
            [e.accuracy for e in peer.evaluations],
            marker="o",
            markersize=4,
            linewidth=1.2,
            alpha=0.85,
            label=peer.peer,
        )
    _global_accuracy_line(axis, points, color="black", linewidth=3.5, alpha=0.8)
    _accuracy_axis(axis, [e.accuracy for p in peers for e in p.evaluations] + [p.accuracy for p in points])
    _integer_rounds(axis)
    axis.legend(loc="lower right", fontsize="small", ncol=2 if len(peers) > 8 else 1)
    axis.set_title(f"Accuracy of the global model on each peer's test shard{_run_label(history)}")
    return _save(figure, out_dir / ACCURACY_ALL_PEERS)


def draw_global_accuracy_loss(history: RunHistory, out_dir: Path) -> Path:
    points = global_series(history)
    with_accuracy = [p for p in points if p.accuracy is not None]
    with_loss = [p for p in points if p.loss is not None]
    if not with_accuracy and not with_loss:
        raise Skip("no rounds.csv rows, no initial_accuracy in run.json, no complete set of peer evaluations")
    figure = _new_figure(8, 6.5)
    accuracy_axis, loss_axis = figure.subplots(2, 1, sharex=True)
    _global_accuracy_line(accuracy_axis, points, color="tab:blue", linewidth=2.5, marker="o")
    target = history.summary.target_accuracy if history.summary else None
    if target is not None:
        accuracy_axis.axhline(
            target,
            color="tab:green",
            linestyle="--",
            linewidth=1.5,
            label=f"target {target:.0%}" if target <= 1 else f"target {target:g}",
        )
    if with_accuracy:
        last = with_accuracy[-1]
        accuracy_axis.annotate(
            f"{last.accuracy:.1%}" if last.accuracy <= 1 else f"{last.accuracy:.3g}",
            (last.round, last.accuracy),
            textcoords="offset points",
            xytext=(0, -16),
            ha="center",
            fontsize="small",
        )
    _accuracy_axis(accuracy_axis, [p.accuracy for p in points] + ([target] if target is not None else []))
    accuracy_axis.legend(loc="lower right", fontsize="small")
    accuracy_axis.set_title(f"Global accuracy and loss per round{_run_label(history)}")
    loss_axis.plot(
        [p.round for p in with_loss],
        [p.loss for p in with_loss],
        color="tab:red",
        linewidth=2.5,
        marker="s",
        label="global loss (sample-weighted)",
    )
    loss_axis.set_ylabel("loss")
    loss_axis.grid(True, alpha=0.3)
    if with_loss:
        loss_axis.legend(loc="upper right", fontsize="small")
    spent = [(r.round, r.epsilon) for r in history.rounds if r.epsilon is not None]
    if spent:  # a DP run: the privacy spent after each round, on an axis of its own
        privacy_axis = loss_axis.twinx()
        privacy_axis.plot(
            [r for r, _ in spent],
            [e for _, e in spent],
            color="tab:purple",
            linestyle="--",
            marker="^",
            label="epsilon",
        )
        privacy_axis.set_ylabel("privacy spent (epsilon)", color="tab:purple")
        privacy_axis.legend(loc="center right", fontsize="small")
    _integer_rounds(loss_axis)
    return _save(figure, out_dir / GLOBAL_ACCURACY_LOSS)


def draw_round_durations(history: RunHistory, out_dir: Path) -> Path:
    if not history.rounds:
        raise Skip("no rows in rounds.csv")
    colours = _term_colours([r.term for r in history.rounds] + [e.term for e in history.elections])
    controllers = history.controller_of_term()
    figure = _new_figure(max(7.0, 0.45 * len(history.rounds) + 4), 4.5)
    axis = figure.add_subplot()
    for term in sorted({r.term for r in history.rounds}):
        rounds = [r for r in history.rounds if r.term == term]
        bars = axis.bar(
            [r.round for r in rounds],
            [r.duration_s for r in rounds],
            color=colours[term],
            edgecolor="black",
            linewidth=0.5,
            label=f"term {term}, controller {controllers[term]}",
        )
        if len(history.rounds) <= 30:
            axis.bar_label(bars, fmt="%.1f s", fontsize="x-small", padding=2)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("round")
    axis.set_ylabel("duration (s)")
    axis.margins(y=0.12)
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize="small")
    axis.set_title("Duration of each round (training order to published metrics)")
    return _save(figure, out_dir / ROUND_DURATIONS)


def _last_known_time(history: RunHistory) -> float | None:
    times = [r.finished_at for r in history.rounds] + [c.time for c in history.chaos]
    times += [e.time for p in history.peers.values() for e in p.evaluations]
    times += [e.time for e in history.elections]
    finite = [t for t in times if math.isfinite(t)]
    return max(finite) if finite else None


def draw_election_timeline(history: RunHistory, out_dir: Path) -> Path:
    elections = [e for e in history.elections if math.isfinite(e.time)]
    if not elections:
        raise Skip("no rows in elections.csv")
    start = elections[0].time
    finished_at = history.summary.finished_at if history.summary else None
    end = finished_at if finished_at is not None else _last_known_time(history)
    controllers = sorted({e.controller for e in elections}, key=natural_key)
    row_of = {controller: index for index, controller in enumerate(controllers)}
    colours = _term_colours([e.term for e in elections] + [r.term for r in history.rounds])

    figure = _new_figure(11, max(3.8, 1.2 + 0.8 * len(controllers)))
    axis = figure.add_subplot()
    span_ends = [e.time for e in elections[1:]] + [end if end is not None else elections[-1].time]
    # a span too thin to see still has to show up for a term that ended (or was recorded) at once
    minimum_width = max(0.005 * (max(span_ends) - start), 0.2)
    for election, span_end in zip(elections, span_ends):
        width = max(span_end - election.time, minimum_width)
        row = row_of[election.controller]
        axis.broken_barh(
            [(election.time - start, width)],
            (row - 0.3, 0.6),
            facecolors=colours[election.term],
            edgecolor="black",
            linewidth=0.6,
            alpha=0.85,
        )
        members = f", {len(election.members)} members" if election.members else ""
        axis.text(
            election.time - start + width / 2,
            row,
            f"term {election.term}: {election.reason}{members}",
            ha="center",
            va="center",
            fontsize="small",
            clip_on=True,
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1.5},
        )
    finished_rounds = [r for r in history.rounds if r.controller in row_of and math.isfinite(r.finished_at)]
    if finished_rounds:
        axis.plot(
            [r.finished_at - start for r in finished_rounds],
            [row_of[r.controller] + 0.38 for r in finished_rounds],
            linestyle="none",
            marker="v",
            color="black",
            markersize=6,
            label="round finished",
        )
        for r in finished_rounds:
            axis.annotate(
                f"r{r.round}",
                (r.finished_at - start, row_of[r.controller] + 0.38),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize="x-small",
            )
    labelled_actions: set[str] = set()
    for event in history.chaos:
        colour = CHAOS_COLOURS.get(event.action, "dimgrey")
        label = None if event.action in labelled_actions else f"chaos: {event.action}"
        labelled_actions.add(event.action)
        axis.axvline(event.time - start, color=colour, linestyle="-", linewidth=1.8, label=label)
        # along the line: kills, stops and conts often come seconds apart and would overwrite each other flat
        axis.annotate(
            f"{event.action} {event.peer}",
            (event.time - start, 1.0),
            xycoords=("data", "axes fraction"),
            textcoords="offset points",
            xytext=(2, -4),
            rotation=90,
            ha="left",
            va="top",
            color=colour,
            fontsize="small",
            fontweight="bold",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1},
        )
        if event.peer in row_of:
            axis.plot(
                event.time - start, row_of[event.peer], marker="X", color=colour, markersize=11, markeredgecolor="black"
            )
    if finished_at is not None:
        reason = history.summary.outcome.get("reason") if history.summary else None
        axis.axvline(
            finished_at - start,
            color="black",
            linestyle="--",
            linewidth=1.5,
            label=f"run finished ({reason})" if reason else "run finished",
        )
    axis.set_yticks(range(len(controllers)), controllers)
    axis.set_ylim(-0.7, len(controllers) - 0.2)
    axis.set_xlabel("seconds since the first election")
    axis.set_ylabel("controller")
    axis.grid(True, axis="x", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axis.set_title("Who was controller when (spans per term, labelled with the election's reason)")
    return _save(figure, out_dir / ELECTION_TIMELINE)


def _class_colours(count: int) -> list:
    if count <= 10:
        return [f"C{index}" for index in range(count)]
    name = "tab20" if count <= 20 else "viridis"
    colormap = colormaps[name]
    return [colormap(index / max(count - 1, 1)) if name == "viridis" else colormap(index) for index in range(count)]


def draw_class_distribution(history: RunHistory, out_dir: Path) -> Path:
    shards = [p.data for p in history.peers.values() if p.data and p.data.train_classes]
    if not shards:
        raise Skip("no peers/<id>/data.json with train_classes")
    num_classes = max(max(d.num_classes, len(d.train_classes)) for d in shards)
    counts = [d.train_classes + [0] * (num_classes - len(d.train_classes)) for d in shards]
    peers = [d.peer for d in shards]
    colours = _class_colours(num_classes)

    figure = _new_figure(max(11.0, 1.2 * len(peers) + 0.5 * num_classes + 4), max(4.5, 0.45 * len(peers) + 2))
    bars_axis, heat_axis = figure.subplots(1, 2, width_ratios=[1, 1.3])
    bottoms = [0] * len(peers)
    for class_index in range(num_classes):
        heights = [row[class_index] for row in counts]
        bars_axis.bar(
            peers,
            heights,
            bottom=bottoms,
            color=colours[class_index],
            label=f"class {class_index}",
            edgecolor="white",
            linewidth=0.3,
        )
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    bars_axis.set_ylabel("train samples")
    bars_axis.set_xlabel("peer")
    bars_axis.tick_params(axis="x", rotation=45 if len(peers) > 6 else 0)
    if num_classes <= 20:
        bars_axis.legend(
            fontsize="x-small",
            ncol=2 if num_classes > 10 else 1,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            title="class",
            title_fontsize="small",
        )
    bars_axis.set_title("Train samples per peer, stacked by class")

    image = heat_axis.imshow(counts, aspect="auto", cmap="Blues")
    heat_axis.set_yticks(range(len(peers)), peers)
    heat_axis.set_xticks(range(num_classes))
    heat_axis.set_xlabel("class")
    if len(peers) * num_classes <= 300:
        peak = max((max(row) for row in counts), default=0) or 1
        for row_index, row in enumerate(counts):
            for class_index, value in enumerate(row):
                heat_axis.text(
                    class_index,
                    row_index,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="white" if value > 0.6 * peak else "black",
                )
    figure.colorbar(image, ax=heat_axis, label="train samples")
    heat_axis.set_title("Train class histogram per peer")
    figure.suptitle(f"Class distribution of the peers' train shards{_run_label(history)}")
    return _save(figure, out_dir / CLASS_DISTRIBUTION)


def plot_comparison(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """Global accuracy per round of several runs on one plot, one line per run (label -> [(round, accuracy)])."""
    figure = _new_figure(9, 5.5)
    axis = figure.add_subplot()
    values: list[float] = []
    for label, points in series.items():
        ordered = sorted(points)
        if not ordered:
            continue
        axis.plot([r for r, _ in ordered], [a for _, a in ordered], marker="o", linewidth=2, label=label)
        values += [a for _, a in ordered]
    if values:
        axis.legend(loc="lower right", fontsize="small")
    else:
        axis.text(0.5, 0.5, "no data", transform=axis.transAxes, ha="center", va="center", fontsize="large")
    _accuracy_axis(axis, values)
    axis.set_ylabel("global accuracy")
    _integer_rounds(axis)
    axis.set_title(title)
    return _save(figure, Path(path))


def plot_panels(
    panels: dict[str, dict[str, list[tuple[int, float]]]],
    path: str | Path,
    title: str,
    lines: Iterable[float] = (),
) -> Path:
    """Several comparisons side by side (panel title -> label -> [(round, accuracy)]), on one accuracy scale, with
    dashed horizontal `lines` (e.g. the accuracies a benchmark counts rounds to)."""
    figure = _new_figure(6.5 * max(1, len(panels)), 5.5)
    axes = figure.subplots(1, max(1, len(panels)), sharey=True, squeeze=False)[0]
    for axis, (name, series) in zip(axes, panels.items()):
        values: list[float] = []
        for index, (label, points) in enumerate(series.items()):
            ordered = sorted(points)
            if ordered:
                axis.plot(
                    [r for r, _ in ordered],
                    [a for _, a in ordered],
                    marker="o",
                    markersize=3,
                    label=label,
                    color=f"C{index % 10}",
                    linewidth=2,
                )
                values += [a for _, a in ordered]
        for level in lines:
            axis.axhline(level, color="grey", linestyle="--", linewidth=1)
        _accuracy_axis(axis, values + list(lines))
        _integer_rounds(axis)
        axis.set_title(name)
        if values:
            axis.legend(loc="lower right", fontsize="small")
    figure.suptitle(title)
    return _save(figure, Path(path))


COMPARISON = "comparison.png"


def draw_comparison(run_dirs: Iterable[str | Path], out: str | Path) -> Path:
    """The global accuracy per round of several runs on one plot, each line labelled with how it trained (its
    strategy, optimizer and privacy, from run.json) and, where two would read alike, its run dir's name. Raises
    RunDirError for a run dir that does not exist, NoRecordsError when none holds a round."""
    histories = [load_run(run_dir) for run_dir in run_dirs]
    labels = []
    for history in histories:
        settings = history.summary.settings if history.summary else {}
        labels.append(strategy_label(settings, _last_epsilon(history)) if settings else history.run_dir.name)
    series: dict[str, list[tuple[int, float]]] = {}
    for history, label in zip(histories, labels):
        if labels.count(label) > 1 or label in series:
            label = f"{label} [{history.run_dir.name}]"
        series[label] = [(p.round, p.accuracy) for p in global_series(history) if p.accuracy is not None]
    if not any(series.values()):
        raise NoRecordsError("none of the run dirs holds a finished round")
    datasets = sorted(
        {str(h.summary.settings.get("dataset")) for h in histories if h.summary and h.summary.settings.get("dataset")}
    )
    title = "Global accuracy per round" + (f" ({', '.join(datasets)})" if datasets else "")
    return plot_comparison(series, Path(out), title)


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def draw_all(
    run_dir: str | Path, out_dir: str | Path | None = None, *, notify: Callable[[str], None] | None = None
) -> list[Path]:
    """Draws every picture the run's records allow into out_dir (default RUN_DIR/graphs); returns the files written.

    What cannot be drawn is skipped, and skipped rows and pictures are reported one line each through notify
    (default: stderr). Raises RunDirError when run_dir does not exist, NoRecordsError when it holds no history.
    """
    notify = notify or _print_to_stderr
    history = load_run(run_dir)
    for warning in history.warnings:
        notify(f"warning: {warning}")
    if history.is_empty:
        raise NoRecordsError(
            f"run dir {history.run_dir} holds no records (no rounds.csv, elections.csv, run.json, "
            f"chaos.csv or peers/<id>/ files)"
        )
    out_dir = Path(out_dir) if out_dir is not None else history.run_dir / GRAPHS_DIR

    drawings: list[tuple[str, Callable[[], Path]]] = [
        (peer_accuracy_file(peer), lambda peer=peer: draw_peer_accuracy(history, peer, out_dir))
        for peer in history.peers
    ]
    drawings += [
        (ACCURACY_ALL_PEERS, lambda: draw_all_peers_accuracy(history, out_dir)),
        (GLOBAL_ACCURACY_LOSS, lambda: draw_global_accuracy_loss(history, out_dir)),
        (ROUND_DURATIONS, lambda: draw_round_durations(history, out_dir)),
        (ELECTION_TIMELINE, lambda: draw_election_timeline(history, out_dir)),
        (CLASS_DISTRIBUTION, lambda: draw_class_distribution(history, out_dir)),
    ]
    written: list[Path] = []
    for name, drawing in drawings:
        try:
            written.append(drawing())
        except Skip as reason:
            notify(f"skipped {name}: {reason}")
        except Exception as error:  # one picture's bad data must not cost the others
            notify(f"failed {name}: {type(error).__name__}: {error}")
    return written
