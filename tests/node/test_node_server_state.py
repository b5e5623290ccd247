"""The node carries a server optimizer's state across controllers (fake transport and learner, as in test_node): a
peer that takes office after a failover waits for the retained state of the model it holds and goes on with it, and
a peer resumed from a checkpoint goes on with the state the checkpoint kept. The machines' own rules are in
tests/roles/test_controller_server.py; here the routes, the store and the records between them."""

from __future__ import annotations

import random

import numpy as np

from peer.config import Settings
from peer.learning.privacy import Ledger
from peer.learning.server_optimizers import ServerOptimizer
from peer.node.loop import Peer
from peer.records.checkpoint import checkpoint_state, run_state
from peer.records.events import read_events
from peer.records.run_dir import RunRecorder, read_checkpoint
from peer.roles.rounds import GlobalModel, RoundSummary, ServerMemory
from peer.wire.messages import Aggregation, Metrics, Presence, ServerState, Solution, Training, Vote
from peer.wire.weights import WeightCodec
from tests.node.test_node import (
    Clock,
    FakeLearner,
    FakeRunner,
    FakeTransport,
    deliver,
    digest,
    follow,
    lines,  # noqa: F401 (the fixture)
    make_peer,
    run_until,
    weights,
)

ADAM = ServerOptimizer("adam", lr=0.01)


def adam_state_after_two_rounds():
    _, state = ADAM.apply(weights(0), weights(1))
    _, state = ADAM.apply(weights(1), weights(2), state)
    return state


def test_after_a_failover_the_new_controller_waits_for_the_state_of_its_model_and_goes_on_with_it(tmp_path, lines):  # noqa: F811
    peer, transport, _, _ = make_peer(tmp_path, max_rounds=5, server_optimizer="adam", server_lr=0.01)
    clock = Clock(peer)
    follow(peer, clock)
    deliver(peer, Presence("p2", "online"), clock.now)
    deliver(peer, Aggregation(1, "c", 2, ("p2",), weights(2)), clock.now)
    deliver(peer, Metrics(1, "c", 2, 0.7, 1.0, 100, ("p2",), 1.0, 10, 50.0), clock.now)
    deliver(peer, Presence("c", "offline"), clock.now)
    deliver(peer, Vote(2, "p2", 0.0, 2, "controller-lost"), clock.now)
    run_until(peer, clock, lambda: peer.controller is not None)
    assert transport.messages(Training) == [] and lines.having("waiting for the server state of round 2")
    state = adam_state_after_two_rounds()
    # p2 did not publish the model this peer holds: its state (even for the same model) is not taken
    deliver(peer, ServerState(1, "p2", 2, digest(weights(2)), "adam", 2, {}, 0, state.tensors()), clock.now, True)
    assert transport.messages(Training) == []
    # the state of the model's publisher, as the broker hands it over retained: taken, and the round goes on
    deliver(peer, ServerState(1, "c", 2, digest(weights(2)), "adam", 2, {"p2": 2}, 0, state.tensors()), clock.now, True)
    [training] = transport.messages(Training)
    assert (training.term, training.round, training.trainers) == (2, 3, ("p2",))
    held = peer.controller.optimizer_state
    assert held.step == 2 and all(np.array_equal(a, b) for a, b in zip(held.tensors(), state.tensors()))
    [event] = read_events(tmp_path, kinds={"server-state"})
    assert (event["action"], event["source"], event["step"], event["round"]) == ("continued", "c", 2, 2)
    # its next aggregation is the optimizer's third step from there, and its state goes out before the model
    deliver(peer, Solution(2, 3, 1, "p2", 500, 0.4, weights(3)), clock.now)
    expected, after = ADAM.apply(weights(2), weights(3), state)
    [new_state] = transport.messages(ServerState)
    model = transport.messages(Aggregation)[-1]
    assert model.round == 3 and all(np.allclose(a, b, rtol=1e-6) for a, b in zip(model.weights, expected))
    assert (new_state.step, new_state.round, new_state.digest) == (3, 3, digest(model.weights))


def test_a_peer_resumed_from_a_checkpoint_goes_on_with_the_server_state_it_kept(tmp_path, lines):  # noqa: F811
    state = adam_state_after_two_rounds()
    model = GlobalModel(2, 1, weights(2), ("p1",), "old")
    server = ServerMemory(model.digest, state, Ledger())
    rounds = (RoundSummary(1, 1, 0.5, 1.0, 10), RoundSummary(2, 1, 0.6, 0.9, 10))
    RunRecorder(tmp_path, "old").checkpoint(
        checkpoint_state("r1", model, rounds, 1.0, server),
        WeightCodec.parts(model.weights),
        WeightCodec.parts(state.tensors()),
    )
    settings = Settings(
        peer_id="c",
        min_peers=2,
        trainers=1,
        min_solutions=1,
        max_rounds=3,
        target_accuracy=0.99,
        heartbeat=0.5,
        election_window=0.5,
        round_deadline=10.0,
        run_dir=tmp_path,
        server_optimizer="adam",
        server_lr=0.01,
    )
    transport, runner = FakeTransport(), FakeRunner()
    peer = Peer(
        settings,
        FakeLearner(),
        rng=random.Random(1),
        transport=transport,
        runner=runner,
        resume=run_state(read_checkpoint(tmp_path)),
    )
    transport.events = peer.events
    clock = Clock(peer)
    deliver(peer, Presence("p1", "online"), clock.now)
    run_until(peer, clock, lambda: transport.messages(Vote))
    term = transport.messages(Vote)[0].term  # (a resumed run elects past the checkpoint's term)
    deliver(peer, Vote(term, "p1", 0.0, 0, "start"), clock.now)
    run_until(peer, clock, lambda: peer.controller is not None)
    # no waiting for a state: the checkpoint's is the model's own
    [training] = transport.messages(Training)
    assert training.round == 3 and peer.controller.optimizer_state.step == 2
    assert [e["action"] for e in read_events(tmp_path, kinds={"server-state"})] == ["restored"]
    deliver(peer, Solution(training.term, 3, 1, "p1", 500, 0.4, weights(3)), clock.now)
    expected, _ = ADAM.apply(weights(2), weights(3), state)
    model3 = transport.messages(Aggregation)[-1]
    assert model3.round == 3 and all(np.allclose(a, b, rtol=1e-6) for a, b in zip(model3.weights, expected))
    assert transport.messages(ServerState)[-1].step == 3
