"""The follower as a pure machine: what it does with each of the controller's messages and each finished job."""

from __future__ import annotations

import numpy as np

from peer.roles.actions import (
    AdoptModel,
    Exit,
    FetchModel,
    FinishRound,
    JobDone,
    Log,
    Publish,
    RecordEvaluation,
    StartJob,
)
from peer.roles.follower import Follower
from peer.roles.rounds import GlobalModel, ModelStore, RoundSummary
from peer.wire.messages import Aggregation, Evaluation, Finish, Heartbeat, Metrics, Solution, Training

W = [np.ones(2, np.float32)]
D = GlobalModel(1, 1, W).digest  # the digest a training order names for W


def holding(round_: int, weights=W) -> ModelStore:
    """A peer's store holding `weights` as the global model of `round_`."""
    memory = ModelStore()
    memory.offer(round_, 1, weights)
    return memory


def kinds(actions):
    return [type(a.message).__name__ if isinstance(a, Publish) else type(a).__name__ for a in actions]


def test_chosen_it_fits_not_chosen_it_waits():
    f = Follower("me", holding(1))
    assert f.on_controller(Training(1, "c", 2, 1, ("p2",), D)) == []
    log, job = f.on_controller(Training(1, "c", 2, 3, ("me", "p2"), D))
    assert isinstance(log, Log) and "chosen to train (attempt 3)" in log.text
    assert (job.kind, job.term, job.round, job.attempt) == ("fit", 1, 2, 3)
    assert job.weights is W  # the model it holds: the order carries none


def test_an_order_for_a_model_it_lacks_fetches_it_and_starts_when_it_comes():
    other = [np.zeros(2, np.float32)]
    for memory in (ModelStore(), holding(0), holding(1, other)):  # none, an older one, another one of that round
        f = Follower("me", memory)
        log, fetch = f.on_controller(Training(1, "c", 2, 1, ("me",), D))
        assert fetch == FetchModel(1, D) and "lacks the model the order names" in log.text
        assert kinds(f.on_retained_model(Aggregation(1, "c", 1, (), other), "c")) in (["AdoptModel"], [])  # not it
        out = f.on_retained_model(Aggregation(1, "x", 1, (), W), "c")  # whoever kept it: its digest vouches for it
        assert kinds(out) == ["AdoptModel", "Log", "StartJob"]
        assert out[-1].kind == "fit" and out[-1].round == 2 and out[-1].weights is W
        assert kinds(f.on_retained_model(Aggregation(1, "c", 1, (), W), "c")) in (["AdoptModel"], [])  # started once


def test_a_live_aggregation_of_the_model_an_order_waits_for_starts_it_too():
    f = Follower("me", ModelStore())
    f.on_controller(Training(1, "c", 2, 1, ("me",), D))
    assert kinds(f.on_controller(Aggregation(1, "c", 1, (), W))) == ["AdoptModel", "Log", "StartJob", "StartJob"]


def test_a_live_aggregation_is_adopted_when_newer_and_evaluated_unless_a_later_one_of_its_term_is_held():
    memory = ModelStore()
    adopt, evaluate = Follower("me", memory).on_controller(Aggregation(2, "c", 4, ("p2",), W))
    assert adopt == AdoptModel(GlobalModel(4, 2, W, ("p2",), "c"))
    assert isinstance(evaluate, StartJob) and (evaluate.kind, evaluate.round) == ("evaluate", 4)
    memory.offer(5, 2, W)
    # Round 4 of term 2 after round 5 of term 2: a late copy or a replay (a freshly restarted peer's replay guard
    # knows no numbers yet): not evaluated again.
    assert kinds(Follower("me", memory).on_controller(Aggregation(2, "c", 4, (), W))) == ["Log"]
    # A later term's controller that publishes round 4 again (it lacks round 5's metrics, say) is evaluated.
    assert kinds(Follower("me", memory).on_controller(Aggregation(3, "c", 4, (), W))) == ["StartJob"]
    assert memory.latest.round == 5  # the machine reads the store, never writes it


def test_a_training_order_for_a_round_whose_model_is_held_already_is_a_replay():
    f = Follower("me", holding(3))
    [log] = f.on_controller(Training(1, "c", 3, 1, ("me",), D))
    assert "replay" in log.text


def test_a_retained_aggregation_is_held_not_evaluated_only_its_controller_s():
    [adopt] = Follower("me", ModelStore()).on_retained_model(Aggregation(2, "c", 4, (), W), controller="c")
    assert adopt.note == "retained by the broker"
    # A member's planted model (a later round, say: its votes would then win elections): set aside, never held ...
    f = Follower("me", ModelStore())
    assert f.on_retained_model(Aggregation(2, "x", 10**6, (), W), controller="c") == []
    assert f.on_retained_model(Aggregation(2, "c", 4, (), W)) == []  # (not following anyone yet: aside too)
    # ... until this peer follows its publisher.
    [adopt] = f.on_follow("c")
    assert adopt.model.round == 4 and f.on_follow("c") == []


def test_metrics_finish_the_round_and_heartbeats_tell_the_phase():
    f = Follower("me", ModelStore())
    [finish] = f.on_controller(Metrics(2, "c", 4, 0.8, 0.5, 100, ("p2",), 1.5, 999, 77.0))
    assert isinstance(finish, FinishRound) and finish.summary.accuracy == 0.8 and finish.run_started == 77.0
    assert f.on_controller(Heartbeat(2, "c", 4, "training", "0" * 16)) == [] and f.phase == "training"


def test_the_finish_ends_the_peer():
    log, exit_ = Follower("me", ModelStore()).on_controller(Finish(2, "c", 4, "max-rounds", 0.8))
    assert exit_ == Exit(0) and "finish received from c (max-rounds) after round 4" in log.text


def test_a_finished_fit_becomes_a_solution_unless_its_term_is_over():
    f = Follower("me", ModelStore())
    job = StartJob("fit", 2, 4, 1, W)
    out = f.on_job_done(JobDone(job, ([np.zeros(2, np.float32)], 300, 0.25), None, 1.0), current_term=2)
    assert kinds(out) == ["Solution", "Log"]
    solution = out[0].message
    assert isinstance(solution, Solution) and (solution.term, solution.round, solution.samples) == (2, 4, 300)
    [late] = f.on_job_done(JobDone(job, (W, 300, 0.25), None, 1.0), current_term=3)
    assert "solution dropped" in late.text


def test_a_finished_evaluation_is_recorded_and_reported_and_a_failed_job_logged():
    f = Follower("me", ModelStore())
    out = f.on_job_done(JobDone(StartJob("evaluate", 2, 4, 1, W), (0.75, 0.5, 200), None, 0.2), current_term=3)
    assert kinds(out) == ["RecordEvaluation", "Evaluation", "Log"]
    assert out[0] == RecordEvaluation(4, 2, 0.75, 0.5, 200)
    assert out[1].message == Evaluation(2, 4, "me", 0.75, 0.5, 200)
    [error] = f.on_job_done(JobDone(StartJob("fit", 2, 4, 1, W), None, "ValueError: boom", 0.1), current_term=2)
    assert error.level == "error" and "fit failed: ValueError: boom" in error.text


def test_a_repeated_order_is_answered_from_what_was_done_not_done_twice():
    f = Follower("me", holding(1))
    order = Training(1, "c", 2, 1, ("me",), D)
    assert kinds(f.on_controller(order)) == ["Log", "StartJob"]
    assert kinds(f.on_controller(order)) == ["Log"]  # still training: nothing new
    f.on_job_done(JobDone(StartJob("fit", 1, 2, 1, W), (W, 30, 0.5), None, 1.0), current_term=1)
    again = f.on_controller(order)
    assert kinds(again) == ["Solution", "Log"] and again[0].message.samples == 30
    assert kinds(f.on_controller(Training(1, "c", 2, 2, ("me",), D))) == ["Log", "StartJob"]  # a new attempt


def test_a_repeated_model_is_answered_with_the_evaluation_already_made():
    f = Follower("me", ModelStore())
    model = Aggregation(1, "c", 2, (), W)
    assert kinds(f.on_controller(model)) == ["AdoptModel", "StartJob"]
    assert f.on_controller(model) == []  # evaluating: nothing new
    f.on_job_done(JobDone(StartJob("evaluate", 1, 2, 1, W), (0.5, 1.0, 10), None, 0.1), current_term=1)
    assert kinds(f.on_controller(model)) == ["Evaluation"]
    assert kinds(f.on_controller(Aggregation(2, "c2", 2, (), W))) == ["AdoptModel", "StartJob"]  # a new term's


def test_after_a_reconnect_answers_of_this_term_go_out_again():
    f = Follower("me", ModelStore())
    assert f.reconnected(1) == []
    f.on_job_done(JobDone(StartJob("fit", 1, 2, 1, W), (W, 30, 0.5), None, 1.0), current_term=1)
    f.on_job_done(JobDone(StartJob("evaluate", 1, 1, 1, W), (0.5, 1.0, 10), None, 0.1), current_term=1)
    assert kinds(f.reconnected(1)) == ["Solution", "Evaluation"]
    assert f.reconnected(2) == []  # a later term does not want them


def test_a_model_that_does_not_fit_this_peers_is_refused_in_one_line():
    f = Follower("me", ModelStore(), shapes=((2,),))
    other = [np.ones((3, 3), np.float32)]
    for out in (
        f.on_controller(Aggregation(1, "c", 1, (), other)),
        f.on_retained_model(Aggregation(1, "c", 1, (), other)),
    ):
        [warning] = out
        assert warning.level == "warning" and "does not fit this peer's" in warning.text
    assert kinds(f.on_retained_model(Aggregation(1, "c", 1, (), W), "c")) == ["AdoptModel"]


def test_a_finish_that_gives_the_run_up_ends_the_peer_with_exit_4():
    log, exit_ = Follower("me", ModelStore()).on_controller(Finish(2, "c", 4, "no-evaluations", 0.0))
    assert exit_ == Exit(4) and log.level == "error"


def test_an_order_that_brings_its_model_is_fitted_from_it_if_the_digest_matches():
    newer = [np.full(2, 7.0, np.float32)]
    f = Follower("me", holding(2, newer))  # it moved on to a model the new controller never had
    log, job = f.on_controller(Training(2, "c", 2, 1, ("me",), D, W))
    assert job.kind == "fit" and job.weights is W
    forged = Follower("me", holding(2, newer))
    log, fetch = forged.on_controller(Training(2, "c", 2, 1, ("me",), D, newer))  # weights that are not D
    assert isinstance(fetch, FetchModel)


def test_a_solution_larger_than_a_broker_message_is_not_kept_and_a_repeated_order_is_trained_again():
    f = Follower("me", holding(1), keep_solutions_up_to=4)  # W is 8 bytes: "large"
    order = Training(1, "c", 2, 1, ("me",), D)
    f.on_controller(order)
    assert kinds(f.on_controller(order)) == ["Log"]  # still training
    sent = f.on_job_done(JobDone(StartJob("fit", 1, 2, 1, W), (W, 30, 0.5), None, 1.0), current_term=1)
    assert kinds(sent) == ["Solution", "Log"] and f.solution is None  # sent, not kept
    again = f.on_controller(order)
    assert kinds(again) == ["Log", "StartJob"] and again[1].kind == "fit"
    assert f.reconnected(1) == []


def test_with_named_evaluators_only_they_evaluate_and_everyone_keeps_the_model():
    f = Follower("me", ModelStore())
    assert kinds(f.on_controller(Aggregation(1, "c", 3, ("p2",), W, ("p2", "p3")))) == ["AdoptModel"]
    # the same model published again naming everyone (it may be the final one): now it is evaluated
    assert kinds(f.on_controller(Aggregation(1, "c", 3, ("p2",), W, ()))) == ["AdoptModel", "StartJob"]
    named = Follower("me", ModelStore()).on_controller(Aggregation(1, "c", 3, ("p2",), W, ("me", "p3")))
    assert kinds(named) == ["AdoptModel", "StartJob"]


def test_a_finish_that_cannot_be_true_is_refused_and_one_that_can_is_obeyed():
    # Issue 19: a member holding the secret signed a finish in the controller's name (local mode, no logins).
    memory = holding(1)
    memory.finish_round(RoundSummary(1, 2, 0.45, 1.0, 10))
    f = Follower("me", memory, stop_rules=(5, 0.9))
    [refused] = f.on_controller(Finish(2, "c", 1, "max-rounds", 0.99))  # round 1 of 5
    assert refused.level == "warning" and "round 1 is not the last (5)" in refused.text and "forgery" in refused.text
    [refused] = f.on_controller(Finish(2, "c", 1, "target-accuracy", 0.99))  # its published accuracy: 0.45
    assert "below the target 0.9" in refused.text
    log, exit_ = f.on_controller(Finish(2, "c", 1, "no-evaluations", 0.1))  # a give-up: nobody can check it
    assert exit_ == Exit(4)
    memory.finish_round(RoundSummary(5, 2, 0.6, 1.0, 10))
    assert kinds(f.on_controller(Finish(2, "c", 5, "max-rounds", 0.6))) == ["Log", "Exit"]


def test_a_retained_finish_before_the_round_limit_is_refused():
    f = Follower("me", ModelStore(), stop_rules=(5, 0.9))
    [refused] = f.on_finished_run(Finish(2, "x", 1, "max-rounds", 0.99))
    assert refused.level == "warning" and "not the last (5)" in refused.text
    assert kinds(f.on_finished_run(Finish(2, "c", 5, "max-rounds", 0.6))) == ["Log", "Exit"]


def test_back_on_the_broker_it_evaluates_the_retained_model_the_controller_waits_for():
    memory = ModelStore()
    f = Follower("me", memory)
    # the retained model comes first; the heartbeat then says round 4 of term 2 is being evaluated
    actions = f.on_retained_model(Aggregation(2, "c", 4, ("p2",), W), "c")
    assert kinds(actions) == ["AdoptModel"]
    memory.offer(4, 2, W)
    assert f.on_controller(Heartbeat(2, "c", 4, "training", "0" * 16)) == []  # not evaluating that round
    log, job = f.on_controller(Heartbeat(2, "c", 4, "evaluating", "0" * 16))
    assert isinstance(job, StartJob) and (job.kind, job.term, job.round) == ("evaluate", 2, 4)
    assert f.on_controller(Heartbeat(2, "c", 4, "evaluating", "0" * 16)) == []  # once
    # the other way round: the heartbeat first, then the retained model
    g = Follower("me", ModelStore())
    assert g.on_controller(Heartbeat(3, "c", 5, "evaluating", "0" * 16)) == []
    assert kinds(g.on_retained_model(Aggregation(3, "c", 5, (), W), "c"))[-1] == "StartJob"


def test_a_retained_model_is_not_evaluated_by_a_peer_not_asked_or_when_it_is_another_round():
    f = Follower("me", ModelStore())
    f.on_controller(Heartbeat(2, "c", 4, "evaluating", "0" * 16))
    assert kinds(f.on_retained_model(Aggregation(2, "c", 4, (), W, ("p2", "p3")), "c")) == ["AdoptModel"]
    g = Follower("me", ModelStore())
    g.on_controller(Heartbeat(2, "c", 5, "evaluating", "0" * 16))
    assert kinds(g.on_retained_model(Aggregation(2, "c", 4, (), W), "c")) == ["AdoptModel"]  # an older round's model


def test_a_retained_model_set_aside_until_its_publisher_is_followed_is_evaluated_if_the_controller_waits_for_it():
    # A peer back on the broker before it follows anyone: the retained model waits aside (it might be a member's
    # planted one); once its publisher is followed it is held, and evaluated when the heartbeat says it is due.
    f = Follower("me", ModelStore())
    assert f.on_retained_model(Aggregation(2, "c", 4, (), W)) == []
    assert kinds(f.on_follow("c")) == ["AdoptModel"]
    log, job = f.on_controller(Heartbeat(2, "c", 4, "evaluating", "0" * 16))
    assert isinstance(job, StartJob) and (job.kind, job.term, job.round) == ("evaluate", 2, 4)
    # a planted model of a member that is not followed is never evaluated, whatever the heartbeat says
    g = Follower("me", ModelStore())
    g.on_controller(Heartbeat(2, "c", 4, "evaluating", "0" * 16))
    assert g.on_retained_model(Aggregation(2, "x", 4, (), W), "c") == []
