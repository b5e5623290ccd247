"""`python -m graphs.live`: a live page of a running federation, or of a finished run from its run dir.

    python -m graphs.live --broker 127.0.0.1:1883 [--run-id ID] [--secret-file FILE] [--port 8765]
    python -m graphs.live --run-dir runs/latest [--port 8765]

The page is an observer, not part of the federation: this process only subscribes (with the container broker, as a
read-only login), so nothing in the federation depends on it and killing it changes nothing. It opens every envelope
with the federation secret as a peer does (`peer.wire`), so a forged message never reaches the page, folds what
it hears into one state (`LiveState`, pure: messages and the time in, a JSON snapshot out) and pushes every change
to the browser as a server-sent event. The page (`graphs/live.html`) is one file with its own script and charts: no
CDN, it works offline.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from graphs.labels import plan_of, strategy_label

PAGE = Path(__file__).with_name("live.html")
TIMELINE_KEPT = 200  # the latest events of the timeline the page shows
KEEPALIVE_S = 15.0  # a comment line on an idle event stream, so proxies and browsers keep it open


class LiveState:
    """What the page shows of one run, folded from the messages heard: pure (no I/O, no clock of its own)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.peers: dict[str, dict] = {}
        self.term, self.controller, self.reason = 0, None, None
        self.round, self.phase, self.attempt = 0, None, 0
        self.trainers: list[str] = []
        self.solutions: set[str] = set()
        self.evaluations: set[str] = set()
        self.evaluators: list[str] = []
        self.rounds: dict[int, dict] = {}
        self.peer_accuracy: dict[str, dict[int, float]] = {}
        self.timeline: list[dict] = []
        self.finished: dict | None = None
        self.plan: dict = {}  # how the run trains, as its aggregations say (RoundRules.plan)
        self.last_heard = 0.0
        self.version = 0

    def _peer(self, peer: str, now: float, live: bool = True) -> dict:
        entry = self.peers.setdefault(peer, {"id": peer, "live": live, "last_seen": now})
        if live:
            entry["live"], entry["last_seen"] = True, now
        return entry

    def signalled(self, chaos) -> None:
        """A signal the launcher sent and chaos.csv recorded (a peer or a broker killed, stopped or thawed): the
        wire does not carry it, the run dir does (`peer.records.run_dir.ChaosRecord`)."""
        self._event(chaos.time, "kill", f"{chaos.action} {chaos.peer} ({chaos.signal})")

    def _event(self, now: float, kind: str, text: str) -> None:
        self.timeline.append({"t": now, "kind": kind, "text": text})
        del self.timeline[:-TIMELINE_KEPT]

    def apply(self, message, retained: bool, now: float) -> None:
        """Fold one decoded message in (`now`: wall-clock seconds)."""
        kind = type(message).__name__
        self.version += 1
        self.last_heard = now
        if kind == "Presence":
            entry = self._peer(message.peer, now, live=message.status == "online")
            if message.status == "offline" and entry["live"] is not False:
                entry["live"] = False
                if not retained:
                    self._event(now, "gone", f"{message.peer} is gone")
            return
        sender = message.sender
        if not retained:
            self._peer(sender, now)
        if kind == "Init":
            entry = self._peer(message.peer, now)
            entry["train_samples"], entry["test_samples"] = message.train_samples, message.test_samples
        elif kind == "Claim":
            if message.term > self.term or (message.term == self.term and self.controller is None):
                self.term, self.controller, self.reason = message.term, message.peer, message.reason
                self._event(now, "election", f"term {message.term}: {message.peer} leads ({message.reason})")
        elif kind == "Heartbeat":
            if message.term >= self.term:
                if message.term > self.term or self.controller != message.controller:
                    self._event(now, "election", f"term {message.term}: {message.controller} leads")
                self.term, self.controller = message.term, message.controller
                self.round, self.phase = message.round, message.phase
        elif kind == "Training" and message.term >= self.term:
            self.round, self.attempt, self.phase = message.round, message.attempt, "training"
            self.trainers, self.solutions, self.evaluations = list(message.trainers), set(), set()
        elif kind == "Solution" and (message.term, message.round) == (self.term, self.round):
            self.solutions.add(message.peer)
        elif kind == "Aggregation" and message.term >= self.term:
            if not retained:
                self.round, self.phase, self.evaluations = message.round, "evaluating", set()
                self.evaluators = list(getattr(message, "evaluators", ()))
            if getattr(message, "plan", None):
                self.plan = dict(message.plan)  # (a retained one too: a page opened late learns the plan at once)
        elif kind == "Evaluation":
            if message.round == self.round:
                self.evaluations.add(message.peer)
            self.peer_accuracy.setdefault(message.peer, {})[message.round] = message.accuracy
            self._peer(message.peer, now)["accuracy"] = message.accuracy
        elif kind == "Metrics":
            self.rounds[message.round] = {
                "round": message.round,
                "term": message.term,
                "accuracy": message.accuracy,
                "loss": message.loss,
                "bytes": message.bytes,
                "duration_s": message.duration_s,
                "epsilon": getattr(message, "epsilon", None),
            }
        elif kind == "Finish":
            if self.finished is None:
                self._event(
                    now,
                    "finish",
                    f"finished ({message.reason}) after round {message.round}: accuracy {message.accuracy:.4f}",
                )
            self.finished = {"reason": message.reason, "round": message.round, "accuracy": message.accuracy}

    def _epsilon(self) -> float | None:
        """The privacy spent after the latest round that reported it (DP runs)."""
        spent = [r["epsilon"] for _, r in sorted(self.rounds.items()) if r.get("epsilon") is not None]
        return spent[-1] if spent else None

    def snapshot(self) -> dict:
        roles = {}
        for peer, entry in self.peers.items():
            roles[peer] = (
                "gone"
                if not entry["live"]
                else "controller"
                if peer == self.controller
                else "trainer"
                if peer in self.trainers
                else "peer"
            )
        return {
            "run_id": self.run_id,
            "term": self.term,
            "controller": self.controller,
            "reason": self.reason,
            "round": self.round,
            "phase": self.phase,
            "attempt": self.attempt,
            "trainers": self.trainers,
            "solutions": sorted(self.solutions),
            "evaluations": sorted(self.evaluations),
            "evaluators": self.evaluators,
            "finished": self.finished,
            "plan": self.plan,
            "strategy": strategy_label(self.plan, self._epsilon()) if self.plan else None,
            "epsilon": self._epsilon(),
            "last_heard": self.last_heard,
            "peers": [{**self.peers[p], "role": roles[p]} for p in sorted(self.peers, key=_natural)],
            "rounds": [self.rounds[r] for r in sorted(self.rounds)],
            "peer_accuracy": {p: [[r, a] for r, a in sorted(v.items())] for p, v in self.peer_accuracy.items()},
            "timeline": list(self.timeline),
        }


def _natural(text: str):
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def state_from_records(run_dir: Path) -> dict:
    """The snapshot of a finished (or interrupted) run, from its run dir (`peer.records.run_dir`)."""
    from peer.records.run_dir import load_run

    history = load_run(run_dir)
    state = LiveState(history.summary.settings.get("run_id", run_dir.name) if history.summary else run_dir.name)
    for election in history.elections:
        state._event(
            election.time, "election", f"term {election.term}: {election.controller} leads ({election.reason})"
        )
        state.term, state.controller, state.reason = election.term, election.controller, election.reason
    for chaos in history.chaos:
        state.signalled(chaos)
    for row in history.rounds:
        state.rounds[row.round] = {
            "round": row.round,
            "term": row.term,
            "accuracy": row.accuracy,
            "loss": row.loss,
            "bytes": row.bytes_sent,
            "duration_s": row.duration_s,
            "epsilon": row.epsilon,
        }
        state.round, state.trainers = max(state.round, row.round), list(row.trainers)
    for peer, record in history.peers.items():
        state.peers[peer] = {"id": peer, "live": False, "last_seen": None}
        for evaluation in record.evaluations:
            state.peer_accuracy.setdefault(peer, {})[evaluation.round] = evaluation.accuracy
            state.peers[peer]["accuracy"] = evaluation.accuracy
    if history.summary:
        state.plan = plan_of(history.summary.settings)
        outcome = history.summary.outcome
        state.finished = {
            "reason": outcome.get("reason"),
            "round": outcome.get("rounds"),
            "accuracy": outcome.get("final_accuracy"),
        }
    state.timeline.sort(key=lambda event: event["t"] or 0)
    state.phase = "finished" if state.finished else None
    return state.snapshot()


class Board:
    """The snapshot the page shows, and a condition the event streams wait on for the next change."""

    def __init__(self):
        self.changed = threading.Condition()
        self.snapshot: dict = {"run_id": None, "peers": [], "rounds": [], "timeline": []}
        self.version = 0

    def publish(self, snapshot: dict) -> None:
        with self.changed:
            self.snapshot, self.version = snapshot, self.version + 1
            self.changed.notify_all()


class Observer:
    """Subscribes to a federation and keeps `board` current: per run id a `LiveState`; the page shows the run heard
    last (or the one given). Only subscribes: it never publishes."""

    def __init__(
        self,
        board: Board,
        host: str,
        port: int,
        prefix: str = "sd",
        run_id: str | None = None,
        secret: bytes | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        more_brokers: list[tuple[str, int]] | None = None,
    ):
        """`more_brokers`: the federation's other brokers, tried in turn when the one connected to is lost (as a
        peer does); `tls`: connect over TLS with this context."""
        import paho.mqtt.client as mqtt

        from peer.wire.envelope import Seal

        self.board, self.prefix, self.run_id = board, prefix, run_id
        self.seal = Seal(secret)
        self.inboxes: dict = {}  # run id -> the wire session a peer of that run has (peer.wire.session.Inbox)
        self.states: dict[str, LiveState] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            client_id=f"observer-{time.time_ns() & 0xFFFFFF:06x}",
        )
        if username:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(tls)
        self.brokers, self.current = [(host, port), *(more_brokers or [])], 0
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *args: self._move_on()
        self.client.on_connect_fail = lambda *args: self._move_on()
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=2)
        self.client.connect_async(host, port, keepalive=10)

    def _move_on(self) -> None:
        """The next broker of the federation for paho's next reconnect (paho's thread, between two attempts)."""
        if len(self.brokers) > 1:
            self.current = (self.current + 1) % len(self.brokers)
            host, port = self.brokers[self.current]
            self.client.connect_async(host, port, keepalive=10)

    def start(self) -> None:
        self.client.loop_start()

    def stop(self) -> None:
        self.brokers = self.brokers[:1]  # no moving on from here
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            # Every message of the run, chunks of large models included (`<topic>/<index>`), but the controllers'
            # server states: optimizer moments, a model's size or two, for the next controller only.
            from peer.wire.messages import MESSAGE_TYPES

            kinds = sorted({cls.TOPIC for cls in MESSAGE_TYPES.values()} - {"server-state"})
            client.subscribe([(f"{self.prefix}/{self.run_id or '+'}/{kind}/#", 0) for kind in kinds])

    def _on_message(self, client, userdata, message):
        try:
            self.take(message.topic, message.payload, bool(message.retain), time.time())
        except Exception as err:  # a bad message must never stop the observer's network thread
            print(f"graphs.live: skipped a message on {message.topic}: {err}", file=sys.stderr)

    def take(self, topic: str, payload: bytes, retained: bool, now: float) -> None:
        """One publication (`now`: wall-clock seconds). It trusts what a peer trusts: the same wire session checks
        signature, topic, chunks and freshness, so a forged, replayed or malformed message never reaches the page."""
        from peer.wire.session import Delivered, Inbox
        from peer.wire.topics import Topics

        run_id = topic[len(self.prefix) + 1 :].split("/", 1)[0] if topic.startswith(self.prefix + "/") else ""
        with self.lock:
            inbox = self.inboxes.get(run_id)
            if inbox is None:
                try:
                    inbox = self.inboxes[run_id] = Inbox("", Topics(self.prefix, run_id), self.seal)
                except ValueError:
                    return  # not a run id: nothing of a federation
            verdict = inbox.receive(topic, payload, retained, now)
            if not isinstance(verdict, Delivered):
                return
            state = self.states.setdefault(run_id, LiveState(run_id))
            state.apply(verdict.message, retained, now)
            shown = (
                self.states.get(self.run_id) if self.run_id else max(self.states.values(), key=lambda s: s.last_heard)
            )
            if shown is state:
                self.board.publish(state.snapshot())

    def take_signals(self, records: list) -> None:
        """Signals chaos.csv recorded since the last call (ChaosTail.new): into the state the page shows."""
        with self.lock:
            shown = self.states.get(self.run_id) if self.run_id else None
            if shown is None and not self.run_id and self.states:
                shown = max(self.states.values(), key=lambda s: s.last_heard)
            if shown is None or not records:
                return
            for record in records:
                shown.signalled(record)
            self.board.publish(shown.snapshot())


class ChaosTail:
    """The rows a run dir's chaos.csv gains (the launchers' `kill` of peers and brokers), as they come."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.seen = run_dir, 0

    def new(self) -> list:
        from peer.records.run_dir import read_chaos

        rows = read_chaos(self.run_dir)
        fresh, self.seen = rows[self.seen :], max(self.seen, len(rows))
        return fresh


class _Handler(BaseHTTPRequestHandler):
    board: Board

    def log_message(self, format, *args):  # one line per request is noise here
        pass

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._send(200, "text/html; charset=utf-8", PAGE.read_bytes())
        if path == "/state":
            return self._send(200, "application/json", json.dumps(self.board.snapshot).encode())
        if path == "/events":
            return self._stream()
        self._send(404, "text/plain", b"not found")

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        seen = -1
        try:
            while True:
                with self.board.changed:
                    if self.board.version == seen:
                        self.board.changed.wait(KEEPALIVE_S)
                    version, snapshot = self.board.version, self.board.snapshot
                if version == seen:
                    self.wfile.write(b": keepalive\n\n")
                else:
                    seen = version
                    self.wfile.write(b"data: " + json.dumps(snapshot).encode() + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return  # the page was closed


def serve(board: Board, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"board": board})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphs.live", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--broker",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="watch the federation on this broker (several: the first reachable, then the next when it is lost)",
    )
    source.add_argument("--run-dir", type=Path, help="show a finished run from its records")
    parser.add_argument("--run-id", help="the run to show (default: the run heard most recently)")
    parser.add_argument(
        "--signals-from",
        type=Path,
        metavar="RUN_DIR",
        help="with --broker: the run dir whose chaos.csv the page also shows as it grows (the peers and brokers "
        "./up.sh kill signals: the wire does not carry those)",
    )
    parser.add_argument("--topic-prefix", default="sd")
    parser.add_argument("--secret-file", type=Path, help="the federation secret (or FL_SECRET): to verify messages")
    parser.add_argument("--username", help="broker login (a read-only one is enough)")
    parser.add_argument("--password", help="broker password (prefer FL_PASSWORD)")
    parser.add_argument("--tls-ca", type=Path, help="connect over TLS trusting these CA certificates (or FL_TLS_CA)")
    parser.add_argument("--tls-cert", type=Path, help="the observer's TLS certificate, for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="its private key")
    parser.add_argument("--port", type=int, default=8765, help="the page's port on 127.0.0.1 (default 8765; 0: any)")
    parser.add_argument("--bind", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    args = parser.parse_args(argv)

    import os

    from peer.config import SettingsError, parse_brokers, read_secret_file, tls_context

    board = Board()
    observer = None
    if args.run_dir is not None:
        if not args.run_dir.is_dir():
            parser.error(f"--run-dir {args.run_dir}: no such folder")
        board.publish(state_from_records(args.run_dir))
    else:
        try:
            (host, port), *more = parse_brokers(args.broker)
            ca = args.tls_ca or (Path(os.environ["FL_TLS_CA"]) if os.environ.get("FL_TLS_CA") else None)
            tls = tls_context(ca, args.tls_cert, args.tls_key)
        except SettingsError as err:
            parser.error(str(err))
        secret = os.environ.get("FL_SECRET", "").encode() or None
        if args.secret_file:
            try:
                secret = read_secret_file(args.secret_file)
            except ValueError as err:
                parser.error(str(err))
        observer = Observer(
            board,
            host,
            port,
            args.topic_prefix,
            args.run_id,
            secret,
            args.username or os.environ.get("FL_USERNAME"),
            args.password or os.environ.get("FL_PASSWORD"),
            tls,
            more,
        )
        observer.start()
    signals = ChaosTail(args.signals_from) if observer and args.signals_from else None
    try:
        server = serve(board, args.port, args.bind)
    except OSError as err:
        parser.error(f"cannot serve on {args.bind}:{args.port}: {err.strerror or err}")
    print(f"graphs.live: http://{args.bind}:{server.server_address[1]}/", flush=True)
    try:
        while True:
            time.sleep(0.5 if signals else 3600)
            if observer and signals:
                observer.take_signals(signals.new())
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        if observer:
            observer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
