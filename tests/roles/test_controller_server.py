"""The controller's server side: the server optimizer applied to each round's aggregate, its state published before the
model and taken over by the next controller, and client-level DP (clipping and noise at the controller, the
privacy ledger, the budget). Pure: inputs and the time in, actions out."""

from __future__ import annotations

import numpy as np
import pytest

from peer.learning.aggregation import Aggregator
from peer.learning.privacy import Ledger, Privacy, epsilon, l2_norm, update_of
from peer.learning.server_optimizers import ServerOptimizer
from peer.roles.actions import Exit, Publish, RecordEvent, RecordRound, RecordRun, SaveCheckpoint
from peer.roles.controller import Phase
from peer.roles.rounds import GlobalModel, ModelStore, RoundSummary, ServerMemory
from peer.wire.messages import Aggregation, Finish, Metrics, ServerState, Solution, Training
from tests.roles.test_controller import Run, weights

ADAM = ServerOptimizer("adam", lr=0.05)


def run_rounds(r: Run, rounds, start_round=1, value=lambda round_, i: round_ + i, now=2.0):
    """Train `rounds` rounds: every chosen trainer answers; every peer evaluates."""
    for round_ in rounds:
        training = r.sent(Training)[-1]
        assert training.round == round_
        for i, peer in enumerate(training.trainers):
            r.on_message(
                Solution(r.c.term, round_, training.attempt, peer, 10, 0.1, weights(value(round_, i))), 500, now
            )
        r.evaluate_all(round_, now + 1)


def test_the_model_is_the_optimizers_step_from_the_fedavg_aggregate_and_its_state_goes_out_first():
    r = Run(optimizer=ADAM, max_rounds=3)
    r.take_office(0)
    r.evaluate_all(0, 1)
    expected, state = weights(0), None
    run_rounds(r, [1, 2, 3])
    for round_ in (1, 2, 3):
        fedavg = [np.full_like(w, (round_ * 3 + 3) / 3) for w in expected]  # the mean of round, round+1, round+2
        expected, state = ADAM.apply(expected, fedavg, state)
        published = [m for m in r.sent(Aggregation) if m.round == round_][0]
        assert all(np.allclose(a, b, rtol=1e-6) for a, b in zip(published.weights, expected))
    states = r.sent(ServerState)
    assert [(s.round, s.step, s.optimizer) for s in states] == [(1, 1, "adam"), (2, 2, "adam"), (3, 3, "adam")]
    last = states[-1]
    assert last.digest == GlobalModel(3, 1, r.sent(Aggregation)[-1].weights).digest and last.controller == "c"
    assert all(np.array_equal(a, b) for a, b in zip(last.weights, state.tensors()))
    # each state is published (retained) before the model it belongs to
    kinds = [type(a.message).__name__ for a in r.actions if isinstance(a, Publish)]
    for index, kind in enumerate(kinds):
        if kind == "ServerState":
            assert kinds[index + 1] == "Aggregation"
    assert all(a.retain for a in r.actions if isinstance(a, Publish) and isinstance(a.message, ServerState))
    # the checkpoint holds it, and the events say what each round left
    saved = [a.server for a in r.of(SaveCheckpoint) if a.model.round == 3][0]
    assert saved.optimizer.step == 3 and saved.digest == last.digest
    updates = [e.fields for e in r.of(RecordEvent) if e.fields["action"] == "updated"]
    assert [u["step"] for u in updates] == [1, 2, 3] and updates[-1]["m_norm"] > 0
    assert r.sent(Aggregation)[-1].plan["server_optimizer"] == "adam"
    [run] = r.of(RecordRun)
    assert run.summary["outcome"]["server_step"] == 3 and run.summary["outcome"]["epsilon"] is None


def test_fedavg_publishes_no_state_and_its_model_is_the_aggregate_bit_for_bit():
    r = Run(max_rounds=1)
    r.take_office(0)
    r.evaluate_all(0, 1)
    origin = r.c.model.weights
    run_rounds(r, [1], value=lambda round_, i: [0.1, 1 / 3, 7.25][i])
    trainers = r.sent(Training)[-1].trainers
    expected = Aggregator().aggregate(origin, [(p, weights([0.1, 1 / 3, 7.25][i]), 10) for i, p in enumerate(trainers)])
    model = r.sent(Aggregation)[-1].weights
    assert all(a.tobytes() == b.tobytes() for a, b in zip(model, expected.weights))
    assert r.sent(ServerState) == [] and r.of(RecordEvent) == []
    assert r.of(SaveCheckpoint)[-1].server is None


def held_model(round_=2, term=1, controller="c", value=3.0) -> ModelStore:
    memory = ModelStore()
    memory.offer(round_, term, weights(value), ("p1", "p2"), controller)
    for r in range(round_ + 1):
        memory.finish_round(RoundSummary(r, term, 0.5, 1.0, 100), 1.0)
    return memory


def state_of(memory: ModelStore, step=2, term=1, controller="c", optimizer="adam", **fields) -> ServerState:
    model = memory.latest
    moments = ADAM.initial(model.weights).tensors()
    moments = [t + 0.125 for t in moments]
    values = dict(
        term=term,
        controller=controller,
        round=model.round,
        digest=model.digest,
        optimizer=optimizer,
        step=step,
        participation={"p1": 2, "p2": 1},
        unattributed=0,
        weights=moments,
    )
    return ServerState(**(values | fields))


def test_a_new_controller_waits_for_the_state_of_its_model_then_continues_its_moments():
    memory = held_model()
    r = Run(memory=memory, term=2, optimizer=ADAM, max_rounds=3)
    r.take_office(0)
    assert r.sent(Training) == [] and r.c.phase is Phase.STARTING and r.logs("waiting for the server state")
    r.tick(1.0)
    assert r.sent(Training) == []
    # states that are not the held model's, as its publisher made it, change nothing
    for wrong in (
        state_of(memory, digest="00" * 16),
        state_of(memory, round=1),
        state_of(memory, controller="p3"),
        state_of(memory, term=2),
        state_of(memory, optimizer="yogi"),
        state_of(memory, weights=[np.zeros(1, np.float32)]),
    ):
        r.on_server_state(wrong, 1.5)
        assert r.sent(Training) == [] and r.c.state_missing
    good = state_of(memory)
    r.on_server_state(good, 2.0)
    assert not r.c.state_missing and r.sent(Training)[-1].round == 3
    [continued] = [e.fields for e in r.of(RecordEvent) if e.fields["action"] == "continued"]
    assert continued["source"] == "c" and continued["step"] == 2 and continued["round"] == 2
    # a second copy (the live one after the retained one) is ignored
    assert r.on_server_state(good, 2.1)[0].level == "debug" and len(r.sent(Training)) == 1
    run_rounds(r, [3], value=lambda round_, i: 4.0, now=3.0)
    expected, _ = ADAM.apply(memory.latest.weights, weights(4.0), ADAM.restore(2, good.weights, weights(3.0)))
    assert np.allclose(r.sent(Aggregation)[-1].weights[0], expected[0], rtol=1e-6)
    assert r.sent(ServerState)[-1].step == 3  # the old controller's 2 steps, then this one's


def test_a_state_that_never_comes_is_replaced_by_a_fresh_one_after_a_deadline():
    r = Run(memory=held_model(), term=2, optimizer=ADAM, round_deadline=10.0)
    r.take_office(0)
    r.tick(9.9)
    assert r.sent(Training) == []
    r.tick(10.0)
    assert r.sent(Training)[-1].round == 3 and r.logs("starts from fresh moments")
    [fresh] = [e.fields for e in r.of(RecordEvent) if e.fields["action"] == "fresh"]
    assert fresh["step"] == 0


def test_a_resumed_run_takes_the_state_from_its_checkpoint():
    memory = held_model()
    memory.server = ServerMemory(memory.latest.digest, ADAM.initial(memory.latest.weights), Ledger())
    r = Run(memory=memory, term=2, optimizer=ADAM)
    r.take_office(0)
    assert r.sent(Training)[-1].round == 3
    assert [e.fields["action"] for e in r.of(RecordEvent)] == ["restored"]


def test_a_controller_that_republishes_a_model_shares_the_state_it_took_over():
    memory = held_model()
    memory.finished.pop(2)  # round 2's metrics were lost: the new controller evaluates it again
    r = Run(memory=memory, term=2, optimizer=ADAM)
    r.take_office(0)
    r.on_server_state(state_of(memory), 0.5)
    [shared] = r.sent(ServerState)
    assert (shared.term, shared.controller, shared.round, shared.step) == (2, "c", 2, 2)
    assert r.sent(Aggregation)[-1].round == 2 and r.sent(Aggregation)[-1].term == 2


# --- differential privacy ---------------------------------------------------------------------------------------------


def test_central_dp_clips_every_update_and_divides_the_noised_sum_by_the_trainers_chosen():
    privacy = Privacy(clip=0.5, noise_multiplier=1e-6)  # noise too small to matter here; its scale: test_privacy
    r = Run(privacy=privacy, max_rounds=1, trainers=4)
    r.take_office(0)
    r.evaluate_all(0, 1)
    training = r.sent(Training)[-1]
    origin = r.c.model.weights
    sizes = [0.01, 0.2, 3.0, 1e6]  # a small, a mid, a large and a wild update (norms from 0.026 to 2.6e6)
    for peer, size in zip(training.trainers, sizes):
        r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(size)), 500, 2)
    clipped = []
    for size in sizes:
        update = update_of(origin, weights(size))
        norm = l2_norm(update)
        clipped.append([u * min(1.0, 0.5 / norm) for u in update])
    expected = [o + sum(c[i] for c in clipped) / 4 for i, o in enumerate(origin)]
    model = r.sent(Aggregation)[-1].weights
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(model, expected))
    assert l2_norm(update_of(origin, model)) <= 0.5 + 1e-5  # a mean of updates within C is within C
    [state] = r.sent(ServerState)
    assert state.participation == {p: 1 for p in training.trainers} and state.weights == []
    r.evaluate_all(1, 3)
    [row] = r.of(RecordRound)
    assert (
        row.row["epsilon"] == pytest.approx(epsilon(1e-6, 1, 1e-5))
        and r.sent(Metrics)[-1].epsilon == row.row["epsilon"]
    )


def test_central_dp_noise_is_not_drawn_from_the_controllers_seeded_rng():
    # The trainer choices every peer reads come from the controller's rng: noise drawn from it could be predicted
    # and subtracted. Two controllers with the same rng state and the same solutions publish differently noised
    # models (with noise from the rng they were the same, bit for bit), each off the clipped mean by the noise's
    # scale, Z*C divided by the 4 trainers chosen (7 coordinates: a loose bound).
    models = []
    for _ in range(2):
        r = Run(privacy=Privacy(clip=1.0, noise_multiplier=1.0), max_rounds=1, trainers=4)
        r.take_office(0)
        r.evaluate_all(0, 1)
        training = r.sent(Training)[-1]
        for peer in training.trainers:
            r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(0.0)), 500, 2)  # updates of norm 0: no signal
        models.append(r.sent(Aggregation)[-1].weights)
        noise = np.concatenate([w.ravel() for w in models[-1]])  # the origin is 0: the model is the noised mean
        assert 0 < np.abs(noise).max() < 6 * 1.0 / 4
    assert not all(np.array_equal(a, b) for a, b in zip(*models))


def test_the_controllers_noise_comes_from_its_noise_source():
    r = Run(privacy=Privacy(clip=1.0, noise_multiplier=1.0), max_rounds=1, trainers=4)
    drawn = []
    r.c.noise_source = lambda: drawn.append(1) or np.random.default_rng(7)
    r.take_office(0)
    r.evaluate_all(0, 1)
    for peer in r.sent(Training)[-1].trainers:
        r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(0.0)), 500, 2)
    expected = [n / 4 for n in np.random.default_rng(7).normal(0.0, 1.0, size=(4,))]  # (2, 2) first, (3,) next
    assert drawn == [1] and np.allclose(r.sent(Aggregation)[-1].weights[0].ravel(), expected, atol=1e-6)


def test_the_run_ends_before_a_round_that_would_overspend_the_privacy_budget():
    # Every peer but the controller trains every round (4 of 4): after round k each was released k times.
    z, delta = 2.0, 1e-5
    budget = (epsilon(z, 3, delta) + epsilon(z, 4, delta)) / 2  # 3 rounds fit, a 4th would overspend
    r = Run(privacy=Privacy(clip=1.0, noise_multiplier=z, delta=delta, target_epsilon=budget), trainers=4, max_rounds=9)
    r.take_office(0)
    r.evaluate_all(0, 1)
    run_rounds(r, [1, 2, 3])
    [finish] = r.sent(Finish)
    assert finish.reason == "privacy-budget" and finish.round == 3 and r.of(Exit)[-1].code == 0
    assert [row.row["epsilon"] for row in r.of(RecordRound)] == [pytest.approx(epsilon(z, k, delta)) for k in (1, 2, 3)]
    assert r.of(RecordRound)[-1].row["epsilon"] <= budget and r.logs("privacy budget is spent")
    outcome = r.of(RecordRun)[0].summary["outcome"]
    assert outcome["reason"] == "privacy-budget" and outcome["epsilon"] == pytest.approx(epsilon(z, 3, delta))


def test_a_budget_too_small_for_one_round_ends_the_run_at_round_0():
    r = Run(privacy=Privacy(clip=1.0, noise_multiplier=1.0, target_epsilon=0.01))
    r.take_office(0)
    r.evaluate_all(0, 1)
    assert r.sent(Training) == [] and r.sent(Finish)[0].reason == "privacy-budget"


def test_local_dp_counts_every_solution_received_as_a_release_and_adds_no_noise_itself():
    privacy = Privacy(clip=1.0, noise_multiplier=1.0, local=True)
    r = Run(privacy=privacy, max_rounds=2, trainers=2)
    r.take_office(0)
    r.evaluate_all(0, 1)
    run_rounds(r, [1, 2], value=lambda round_, i: 1.0 + i)
    assert np.allclose(r.sent(Aggregation)[-1].weights[0], 1.5)  # the plain FedAvg of what came: no clip, no noise
    assert sum(r.sent(ServerState)[-1].participation.values()) == 4
    assert r.sent(Aggregation)[-1].plan["dp_local"] is True
