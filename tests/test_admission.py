"""The admission rules, one test per rule, and a fuzz of random forged and real messages: whatever arrives, the
verdict is a route or a refusal, and no rule lets a message reach a machine it is not for."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from peer.admission import Refused, Route, View, admit, entitled
from peer.election import Role
from peer.protocol import (Aggregation, Claim, Evaluation, Finish, Heartbeat, Init, Metrics, Presence, Solution,
                           Topics, Training, Vote)

TOPICS = Topics("sd")
W = [np.zeros(2, np.float32)]
FOLLOWER = View("me", 3, Role.FOLLOWER, "c")
CONTROLLER = View("me", 3, Role.CONTROLLER, "me")
NEW = View("me", 0, Role.WAITING, None)


def verdict(message, view=FOLLOWER, retained=False, topic=None):
    return admit(message, topic or TOPICS.of(message), retained, view, TOPICS)


def test_a_presence_on_its_own_topic_reaches_the_election():
    assert verdict(Presence("p2", "offline")) is Route.PRESENCE


def test_a_presence_on_another_peers_topic_is_a_forgery():
    refused = verdict(Presence("c", "offline"), topic="sd/presence/p2")
    assert isinstance(refused, Refused) and refused.level == "warning" and "another peer's topic" in refused.reason


def test_announcements_and_ballots_reach_the_election():
    assert verdict(Init("p2", 0, 0, 1, 600, 200)) is Route.ANNOUNCE
    assert verdict(Vote(4, "p2", 0.5, 0, "start")) is Route.BALLOT
    assert verdict(Claim(4, "p2", 0.5, 0, "start", ())) is Route.CLAIM


def test_a_retained_claim_or_heartbeat_tells_who_led_most_recently():
    assert verdict(Claim(2, "c", 0.5, 0, "start", ()), NEW, retained=True) is Route.RETAINED_LEADER
    assert verdict(Heartbeat(2, "c", 1, "training"), NEW, retained=True) is Route.RETAINED_LEADER


def test_a_retained_aggregation_is_the_model_to_start_from_not_an_order():
    assert verdict(Aggregation(3, "c", 4, (), W), retained=True) is Route.RETAINED_MODEL


def test_a_retained_finish_seen_before_any_term_is_an_earlier_runs():
    refused = verdict(Finish(7, "c", 9, "max-rounds", 0.9), NEW, retained=True)
    assert isinstance(refused, Refused) and "earlier run" in refused.reason
    # once this peer is in a run, a retained finish of its term ends it (it reconnected just after the end)
    assert verdict(Finish(3, "c", 9, "max-rounds", 0.9), retained=True) is Route.FROM_CONTROLLER


def test_a_controller_message_of_an_older_term_is_stale():
    for message in (Heartbeat(2, "c", 1, "x"), Training(2, "c", 1, 1, ("me",), W), Aggregation(2, "c", 1, (), W),
                    Metrics(2, "c", 1, 0.5, 1.0, 1, (), 0.0, 0, 0.0), Finish(2, "c", 1, "max-rounds", 0.5)):
        refused = verdict(message)
        assert isinstance(refused, Refused) and "stale term 2" in refused.reason


def test_a_controller_message_naming_this_peer_is_its_own_echo():
    refused = verdict(Aggregation(3, "me", 1, (), W), CONTROLLER)
    assert isinstance(refused, Refused) and "own echo" in refused.reason
    # also when this peer is no controller: an earlier life of its id
    assert isinstance(verdict(Heartbeat(3, "me", 1, "x"), FOLLOWER), Refused)


def test_a_controller_message_of_this_or_a_later_term_goes_to_the_election_first():
    assert verdict(Training(3, "c", 1, 1, ("me",), W)) is Route.FROM_CONTROLLER
    assert verdict(Heartbeat(9, "x", 1, "x")) is Route.FROM_CONTROLLER


def test_solutions_and_evaluations_are_only_for_the_controller_of_their_term():
    solution, evaluation = Solution(3, 1, 1, "p2", 10, 0.1, W), Evaluation(3, 1, "p2", 0.5, 1.0, 10)
    assert verdict(solution, CONTROLLER) is Route.TO_CONTROLLER
    assert verdict(evaluation, CONTROLLER) is Route.TO_CONTROLLER
    assert isinstance(verdict(solution, FOLLOWER), Refused)
    assert isinstance(verdict(Solution(2, 1, 1, "p2", 10, 0.1, W), CONTROLLER), Refused)
    assert isinstance(verdict(Evaluation(4, 1, "p2", 0.5, 1.0, 10), CONTROLLER), Refused)


def test_only_a_follower_of_that_controller_in_that_term_is_entitled_to_act():
    training = Training(3, "c", 1, 1, ("me",), W)
    assert entitled(training, FOLLOWER) is None
    assert isinstance(entitled(training, View("me", 3, Role.FOLLOWER, "other")), Refused)
    assert isinstance(entitled(training, View("me", 4, Role.FOLLOWER, "c")), Refused)
    assert isinstance(entitled(training, View("me", 3, Role.VOTING, None)), Refused)
    assert isinstance(entitled(training, View("me", 3, Role.CONTROLLER, "me")), Refused)


# --- fuzz -------------------------------------------------------------------------------------------------------------

ids = st.sampled_from(["me", "c", "p2", "x"])
terms = st.integers(0, 6)
messages = st.one_of(
    st.builds(Presence, ids, st.sampled_from(["online", "offline"])),
    st.builds(Init, ids, terms, terms, st.just(1), st.just(600), st.just(200)),
    st.builds(Vote, terms, ids, st.floats(0, 1), terms, st.just("r")),
    st.builds(Claim, terms, ids, st.floats(0, 1), terms, st.just("r"), st.just(())),
    st.builds(Heartbeat, terms, ids, terms, st.just("p")),
    st.builds(Training, terms, ids, terms, st.just(1), st.just(("me",)), st.just(W)),
    st.builds(Aggregation, terms, ids, terms, st.just(()), st.just(W)),
    st.builds(Metrics, terms, ids, terms, st.just(0.5), st.just(1.0), st.just(1), st.just(()), st.just(0.0),
              st.just(0), st.just(0.0)),
    st.builds(Finish, terms, ids, terms, st.just("r"), st.just(0.5)),
    st.builds(Solution, terms, terms, st.just(1), ids, st.just(1), st.just(0.1), st.just(W)),
    st.builds(Evaluation, terms, terms, ids, st.just(0.5), st.just(1.0), st.just(1)),
)
views = st.builds(View, st.just("me"), terms, st.sampled_from(list(Role)), st.sampled_from(["me", "c", None]))


@settings(max_examples=2000, deadline=None)
@given(message=messages, view=views, retained=st.booleans(), forged_topic=st.booleans())
def test_fuzz_every_verdict_respects_who_may_hear_what(message, view, retained, forged_topic):
    topic = "sd/presence/x" if forged_topic and isinstance(message, Presence) else TOPICS.of(message)
    result = admit(message, topic, retained, view, TOPICS)
    assert isinstance(result, (Route, Refused))
    if result is Route.TO_CONTROLLER:
        assert view.role is Role.CONTROLLER and message.term == view.term
    if result is Route.FROM_CONTROLLER:
        assert message.term >= view.term and message.controller != view.me
        assert not (isinstance(message, Finish) and retained and view.term == 0)
    if result is Route.PRESENCE:
        assert topic == TOPICS.presence(message.peer)
    if result in (Route.RETAINED_LEADER, Route.RETAINED_MODEL):
        assert retained


def test_a_term_can_only_move_forward_by_a_bounded_step_never_to_the_last_one():
    from peer.admission import MAX_TERM_STEP
    from peer.protocol import MAX_TERM
    for message in (Vote(MAX_TERM, "p2", 0.5, 0, "x"), Claim(MAX_TERM, "p2", 0.5, 0, "x", ()),
                    Heartbeat(MAX_TERM, "c", 1, "x")):
        assert "last usable term" in verdict(message, NEW).reason
    far = 3 + MAX_TERM_STEP + 1
    for message in (Vote(far, "p2", 0.5, 0, "x"), Training(far, "c", 1, 1, ("me",), W)):
        refused = verdict(message)
        assert isinstance(refused, Refused) and refused.level == "warning" and "ahead of ours" in refused.reason
    assert verdict(Vote(3 + MAX_TERM_STEP, "p2", 0.5, 0, "x")) is Route.BALLOT
    assert verdict(Heartbeat(MAX_TERM - 1, "c", 1, "x"), NEW) is Route.FROM_CONTROLLER   # a newcomer joins any run
