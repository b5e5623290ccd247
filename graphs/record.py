"""One run, one set of records: a recorder writes the whole run from the wire, on whichever machine runs it.

    python -m graphs.record --broker HOST:PORT[,HOST:PORT...] [--every-broker] --run-id ID --run-dir D
                            [--secret-file F] [--tls-ca CA]
    python -m graphs D            # draws it, however many machines the peers ran on

It subscribes to the run's topics (a read-only login is enough: the observer's) and passes every publication
through the wire session a peer has (`peer.wire.session.Inbox`: signature, topic, chunks, freshness), so it records
exactly what a peer would trust, and writes docs/RECORDS.md's files as the peers do: `rounds.csv` (each round's
metrics, from the controller's `metrics`; `started_at` from its first training order), `elections.csv` (the first
claim of each term: the one every peer follows), `peers/<id>/evaluations.csv` (each peer's evaluations) and, at the
finish, `run.json`'s outcome. Times are the senders' (the envelope's `sent_at`). It follows the brokers of its list
as a peer does, and stops at the run's finish (or Ctrl-C).

Bridged brokers form a tree: when one is lost, the others are cut apart until their bridges form again (a second or
two), and what is published meanwhile does not cross. The peers' protocol makes up for it (orders and answers are
sent again), but a recorder on one broker would miss those messages for good. With `--every-broker` it listens on
every broker of its list at once: a copy of every message comes from each, and the wire session drops the copies.

What only the peers' machines know (their logs, data.json, status.json, chaos.csv, the checkpoint) stays there.
"""

from __future__ import annotations

import argparse
import os
import queue
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peer.wire.envelope import Stamp
from peer.wire.messages import Claim, Evaluation, Finish, Message, Metrics, Training

if TYPE_CHECKING:
    from peer.node.transport import MqttTransport

FINISH_GRACE_S = 2.0  # after the finish, the last evaluations still on their way


@dataclass
class Transcript:
    """Messages in, record rows out (sans-IO): `take` answers the rows a delivered message adds, as (kind, fields)
    with kind one of round, election, evaluation, run. Copies and re-sent messages add nothing."""

    elected: set[int] = field(default_factory=set)  # terms whose first claim is recorded
    started: dict[tuple[int, int], float] = field(default_factory=dict)  # (term, round) -> first training order
    rounds: set[tuple[int, int]] = field(default_factory=set)
    evaluations: set[tuple[str, int, int]] = field(default_factory=set)
    finished: bool = False

    def take(self, message: Message, stamp: Stamp) -> list[tuple[str, dict]]:
        at = stamp.sent_at
        if isinstance(message, Claim) and message.term not in self.elected:
            self.elected.add(message.term)
            fields = {"term": message.term, "controller": message.peer, "reason": message.reason}
            return [("election", {**fields, "members": list(message.members), "at": at})]
        if isinstance(message, Training):
            self.started.setdefault((message.term, message.round), at)
        if isinstance(message, Metrics) and message.round > 0 and (message.term, message.round) not in self.rounds:
            self.rounds.add((message.term, message.round))
            row = dict(
                round=message.round,
                term=message.term,
                controller=message.controller,
                trainers=list(message.trainers),
                accuracy=message.accuracy,
                loss=message.loss,
                duration_s=message.duration_s,
                bytes_sent=message.bytes,
                finished_at=at,
                started_at=self.started.get((message.term, message.round)),
            )
            return [("round", row)]
        if isinstance(message, Evaluation) and (message.peer, message.term, message.round) not in self.evaluations:
            self.evaluations.add((message.peer, message.term, message.round))
            fields = {"round": message.round, "term": message.term, "accuracy": message.accuracy}
            return [("evaluation", {"peer": message.peer, **fields, "loss": message.loss, "samples": message.samples,
                                    "at": at})]  # fmt: skip
        if isinstance(message, Finish) and not self.finished:
            self.finished = True
            outcome = {
                "reason": message.reason,
                "rounds": message.round,
                "final_accuracy": message.accuracy,
                "terms": message.term,
                "controller": message.controller,
                "finished_at": at,
            }
            return [
                ("run", {"settings": {}, "outcome": outcome, "recorded_from": "the wire (python -m graphs.record)"})
            ]
        return []


def write(run_dir: Path, kind: str, row: dict) -> None:
    """One record row into `run_dir`, through the peers' own writer."""
    from peer.records.run_dir import RunRecorder

    if kind == "round":
        RunRecorder(run_dir, row["controller"]).round(**row)
    elif kind == "election":
        RunRecorder(run_dir, row["controller"]).election(
            row["term"], row["controller"], row["reason"], row["members"], at=row["at"]
        )
    elif kind == "evaluation":
        RunRecorder(run_dir, row["peer"]).evaluation(
            row["round"], row["term"], row["accuracy"], row["loss"], row["samples"], at=row["at"]
        )
    elif kind == "run":
        from peer.records.run_dir import RUN_FILE, write_json

        write_json(run_dir / RUN_FILE, row)


def record(events: queue.Queue, inbox, run_dir: Path, stop_after: float | None = None) -> int:
    """Write the run from the publications its transports put on `events` until its finish (and FINISH_GRACE_S
    more) or `stop_after` seconds; the number of rows written."""
    from peer.node.transport import BrokerRefused, Inbound
    from peer.wire.session import Delivered

    transcript, written = Transcript(), 0
    finish_at: float | None = None
    deadline = None if stop_after is None else time.monotonic() + stop_after
    while (finish_at is None or time.monotonic() < finish_at) and (deadline is None or time.monotonic() < deadline):
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(event, BrokerRefused) and event.fatal:
            raise SystemExit(f"python -m graphs.record: error: {event.reason}")
        if not isinstance(event, Inbound):
            continue
        verdict = inbox.receive(event.topic, event.payload, event.retained, time.time())
        if isinstance(verdict, Delivered):
            for kind, row in transcript.take(verdict.message, verdict.stamp):
                write(run_dir, kind, row)
                written += 1
            if transcript.finished and finish_at is None:
                finish_at = time.monotonic() + FINISH_GRACE_S
    return written


def listeners(
    brokers: Sequence[tuple[str, int]],
    every_broker: bool,
    subscription: str,
    events: queue.Queue,
    username: str | None = None,
    password: str | None = None,
    tls: Callable[[], ssl.SSLContext | None] = lambda: None,
) -> list[MqttTransport]:
    """The recorder's connections, all putting what they hear on `events`: one that follows `brokers` as a peer does,
    or (`every_broker`) one on each broker (client ids told apart by a suffix; each its own TLS context)."""
    from peer.node.transport import MqttTransport

    name = f"recorder-{time.time_ns() & 0xFFFFFF:06x}"
    lists = [[broker] for broker in brokers] if every_broker else [list(brokers)]
    return [
        MqttTransport(
            listed,
            f"{name}-{k}" if every_broker else name,
            [(subscription, False)],
            events,
            username=username,
            password=password,
            tls=tls(),
        )
        for k, listed in enumerate(lists, 1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphs.record", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True, metavar="HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--run-id", required=True, help="the run to record")
    parser.add_argument("--run-dir", required=True, type=Path, help="where to write its records")
    parser.add_argument("--topic-prefix", default="sd")
    parser.add_argument("--secret-file", type=Path, help="the federation secret (or FL_SECRET): to verify messages")
    parser.add_argument("--username", help="broker login (a read-only one is enough; or FL_USERNAME)")
    parser.add_argument("--password", help="broker password (prefer FL_PASSWORD)")
    parser.add_argument("--tls-ca", type=Path, help="connect over TLS trusting these CA certificates (or FL_TLS_CA)")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument(
        "--every-broker",
        action="store_true",
        help="listen on every broker of the list at once, not on the first that answers: nothing published while "
        "the bridges form again after a broker's loss is missed (a copy of every message from each broker)",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="stop after this many seconds (default: the finish)"
    )
    args = parser.parse_args(argv)

    from peer.config import SettingsError, parse_brokers, read_secret_file, tls_context
    from peer.wire.envelope import Seal
    from peer.wire.session import Inbox
    from peer.wire.topics import Topics

    try:
        brokers = parse_brokers(args.broker)
        ca = args.tls_ca or (Path(os.environ["FL_TLS_CA"]) if os.environ.get("FL_TLS_CA") else None)
        tls_context(ca, args.tls_cert, args.tls_key)  # (checked here; each transport gets a context of its own)
        topics = Topics(args.topic_prefix, args.run_id)
        secret = read_secret_file(args.secret_file) if args.secret_file else os.environ.get("FL_SECRET", "").encode()
    except (SettingsError, ValueError) as err:
        parser.error(str(err))
    events: queue.Queue = queue.Queue()
    transports = listeners(
        brokers,
        args.every_broker,
        topics.subscription,
        events,
        username=args.username or os.environ.get("FL_USERNAME"),
        password=args.password or os.environ.get("FL_PASSWORD"),
        tls=lambda: tls_context(ca, args.tls_cert, args.tls_key),
    )
    args.run_dir.mkdir(parents=True, exist_ok=True)
    for transport in transports:
        transport.start(None)  # no Last Will: it is no peer (and its login may publish nothing)
    on = f" on {len(brokers)} brokers at once" if args.every_broker else ""
    print(f"graphs.record: recording run {args.run_id} into {args.run_dir}{on}", flush=True)
    try:
        written = record(events, Inbox("", topics, Seal(secret or None)), args.run_dir, args.timeout)
    except KeyboardInterrupt:
        written = -1
    finally:
        for transport in transports:
            transport.close()
    done = "stopped" if written < 0 else f"{written} records written"
    print(f"graphs.record: {done}; draw them: python -m graphs {args.run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
