"""The admission rules, one test per rule, and a fuzz of random forged and real messages: whatever arrives, the
verdict is a route or a refusal, and no rule lets a message reach a machine it is not for."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.roles.admission import Route, View, admit, entitled, may_chunk
from peer.roles.election import Role
from peer.wire.errors import Refused
from peer.wire.messages import (
    Aggregation,
    Claim,
    Evaluation,
    Finish,
    Heartbeat,
    Init,
    Metrics,
    Presence,
    ServerState,
    Solution,
    Training,
    Vote,
)

W = [np.zeros(2, np.float32)]
FP, OTHER_FP = "0" * 16, "f" * 16  # model fingerprints: ours, another model's
D = "ab" * 16  # a model digest, as a training order names it
FOLLOWER = View("me", 3, Role.FOLLOWER, "c")
CONTROLLER = View("me", 3, Role.CONTROLLER, "me")
NEW = View("me", 0, Role.WAITING, None)


def verdict(message, view=FOLLOWER, retained=False):
    return admit(message, retained, view)


def test_a_presence_reaches_the_election():
    # (one forged on another peer's topic never gets here: decode binds a message to its topic's sender)
    assert verdict(Presence("p2", "offline")) is Route.PRESENCE


def test_a_peer_of_another_model_is_not_counted_and_its_ballots_are_ignored():
    ours = View("me", 3, Role.FOLLOWER, "c", FP, frozenset({"p9"}))
    assert admit(Init("p2", 0, 0, 1, 600, 200, False, OTHER_FP), False, ours) is Route.PEER_OTHER_MODEL
    assert admit(Init("p2", 0, 0, 1, 600, 200, False, FP), False, ours) is Route.ANNOUNCE
    assert isinstance(admit(Vote(4, "p9", 0.9, 0, "x"), False, ours), Refused)
    assert isinstance(admit(Claim(4, "p9", 0.9, 0, "x", ("p9",)), False, ours), Refused)
    assert admit(Vote(4, "p2", 0.9, 0, "x"), False, ours) is Route.BALLOT


def test_a_heartbeat_of_another_model_tells_a_peer_the_run_is_not_for_it_only_from_its_controller():
    # Who sends it is checked before what it says: it goes to the election like any controller's message ...
    for role in (Role.FOLLOWER, Role.WAITING, Role.CONTROLLER):
        assert admit(Heartbeat(3, "c", 1, "x", OTHER_FP), False, View("me", 3, role, "c", FP)) is Route.FROM_CONTROLLER
    assert admit(Heartbeat(3, "c", 1, "x", OTHER_FP), True, View("me", 3, Role.WAITING, None, FP)) is (
        Route.RETAINED_LEADER
    )
    # ... and only the controller this peer follows, in its term, tells it the run is not for its model.
    heartbeat = Heartbeat(3, "c", 1, "x", OTHER_FP)
    assert entitled(heartbeat, View("me", 3, Role.FOLLOWER, "c", FP)) is Route.RUN_OTHER_MODEL
    for view in (
        View("me", 0, Role.WAITING, None, FP),  # before the first election (a retained heartbeat of term 0, say)
        View("me", 3, Role.FOLLOWER, "d", FP),  # another peer leads
        View("me", 3, Role.CONTROLLER, "me", FP),  # this peer leads
        View("me", 3, Role.VOTING, None, FP),
    ):
        assert isinstance(entitled(heartbeat, view), Refused), view
    assert entitled(Heartbeat(3, "c", 1, "x", FP), View("me", 3, Role.FOLLOWER, "c", FP)) is Route.FROM_CONTROLLER


def test_announcements_and_ballots_reach_the_election():
    assert verdict(Init("p2", 0, 0, 1, 600, 200, False, FP)) is Route.ANNOUNCE
    assert verdict(Vote(4, "p2", 0.5, 0, "start")) is Route.BALLOT
    assert verdict(Claim(4, "p2", 0.5, 0, "start", ())) is Route.CLAIM


def test_a_retained_claim_or_heartbeat_tells_who_led_most_recently():
    assert verdict(Claim(2, "c", 0.5, 0, "start", ()), NEW, retained=True) is Route.RETAINED_LEADER
    assert verdict(Heartbeat(2, "c", 1, "training", FP), NEW, retained=True) is Route.RETAINED_LEADER


def test_a_retained_aggregation_is_the_model_to_start_from_not_an_order():
    assert verdict(Aggregation(3, "c", 4, (), W), retained=True) is Route.RETAINED_MODEL


def test_a_retained_finish_says_this_run_is_over_whenever_this_peer_comes():
    # topics are per run: a retained finish on them is this run's, for a peer just started or one in the run
    assert verdict(Finish(7, "c", 9, "max-rounds", 0.9), NEW, retained=True) is Route.RUN_FINISHED
    assert verdict(Finish(3, "c", 9, "max-rounds", 0.9), retained=True) is Route.RUN_FINISHED
    assert verdict(Finish(3, "c", 9, "max-rounds", 0.9)) is Route.FROM_CONTROLLER  # live: the controller's


def test_a_retained_message_of_a_kind_no_peer_retains_is_refused():
    for message in (
        Training(3, "c", 1, 1, ("me",), D),
        Metrics(3, "c", 1, 0.5, 1.0, 1, (), 0.0, 0, 0.0),
        Vote(4, "p2", 0.5, 0, "x"),
        Init("p2", 0, 0, 1, 1, 1, False, FP),
        Solution(3, 1, 1, "p2", 1, 0.1, W),
        Evaluation(3, 1, "p2", 0.5, 1.0, 1),
    ):
        refused = verdict(message, CONTROLLER, retained=True)
        assert isinstance(refused, Refused) and refused.level == "warning" and "retained" in refused.reason


def test_a_controller_message_of_an_older_term_is_stale_and_only_the_election_hears_it():
    # (a peer alone in a term that came to nothing goes back to the controller the others still follow)
    for message in (
        Heartbeat(2, "c", 1, "x", FP),
        Training(2, "c", 1, 1, ("me",), D),
        Aggregation(2, "c", 1, (), W),
        Metrics(2, "c", 1, 0.5, 1.0, 1, (), 0.0, 0, 0.0),
        Finish(2, "c", 1, "max-rounds", 0.5),
    ):
        assert verdict(message) is Route.EARLIER_CONTROLLER
        assert verdict(message, CONTROLLER) is Route.EARLIER_CONTROLLER
    assert isinstance(verdict(Heartbeat(2, "me", 1, "x", FP)), Refused)  # an earlier life of this id: not even that


def test_a_controller_message_naming_this_peer_is_its_own_echo():
    refused = verdict(Aggregation(3, "me", 1, (), W), CONTROLLER)
    assert isinstance(refused, Refused) and "own echo" in refused.reason
    # also when this peer is no controller: an earlier life of its id
    assert isinstance(verdict(Heartbeat(3, "me", 1, "x", FP), FOLLOWER), Refused)


def test_a_controller_message_of_this_or_a_later_term_goes_to_the_election_first():
    assert verdict(Training(3, "c", 1, 1, ("me",), D)) is Route.FROM_CONTROLLER
    assert verdict(Heartbeat(9, "x", 1, "x", FP)) is Route.FROM_CONTROLLER


def test_solutions_and_evaluations_are_only_for_the_controller_of_their_term():
    solution, evaluation = Solution(3, 1, 1, "p2", 10, 0.1, W), Evaluation(3, 1, "p2", 0.5, 1.0, 10)
    assert verdict(solution, CONTROLLER) is Route.TO_CONTROLLER
    assert verdict(evaluation, CONTROLLER) is Route.TO_CONTROLLER
    assert isinstance(verdict(solution, FOLLOWER), Refused)
    assert isinstance(verdict(Solution(2, 1, 1, "p2", 10, 0.1, W), CONTROLLER), Refused)
    # One of a later term is for no one here; the election hears that its sender stands in that term.
    assert verdict(Evaluation(4, 1, "p2", 0.5, 1.0, 10), CONTROLLER) is Route.LATER_ANSWER
    assert verdict(Solution(4, 1, 1, "p2", 10, 0.1, W), FOLLOWER) is Route.LATER_ANSWER


def test_a_server_state_is_for_a_controller_only_never_its_own_and_may_come_retained():
    state = ServerState(2, "c", 4, D, "adam", 4, {"p2": 1}, 0, W + W)
    for retained in (False, True):
        assert verdict(state, CONTROLLER, retained=retained) is Route.SERVER_STATE
        assert isinstance(verdict(state, FOLLOWER, retained=retained), Refused)
        assert isinstance(verdict(state, NEW, retained=retained), Refused)
    own = verdict(ServerState(2, "me", 4, D, "adam", 4, {}, 0, W + W), CONTROLLER)
    assert isinstance(own, Refused) and "our own" in own.reason
    # a state never moves a term: one of a far later term is still only history for the controller to check
    assert verdict(ServerState(3 + 5000, "c", 4, D, "adam", 4, {}, 0, W + W), CONTROLLER) is Route.SERVER_STATE


def test_only_a_follower_of_that_controller_in_that_term_is_entitled_to_act():
    training = Training(3, "c", 1, 1, ("me",), D)
    assert entitled(training, FOLLOWER) is Route.FROM_CONTROLLER
    assert isinstance(entitled(training, View("me", 3, Role.FOLLOWER, "other")), Refused)
    assert isinstance(entitled(training, View("me", 4, Role.FOLLOWER, "c")), Refused)
    assert isinstance(entitled(training, View("me", 3, Role.VOTING, None)), Refused)
    assert isinstance(entitled(training, View("me", 3, Role.CONTROLLER, "me")), Refused)


# --- fuzz -------------------------------------------------------------------------------------------------------------

ids = st.sampled_from(["me", "c", "p2", "x"])
terms = st.integers(0, 6)
messages = st.one_of(
    st.builds(Presence, ids, st.sampled_from(["online", "offline"])),
    st.builds(Init, ids, terms, terms, st.just(1), st.just(600), st.just(200), st.booleans()),
    st.builds(Vote, terms, ids, st.floats(0, 1), terms, st.just("r")),
    st.builds(Claim, terms, ids, st.floats(0, 1), terms, st.just("r"), st.just(())),
    st.builds(Heartbeat, terms, ids, terms, st.just("p")),
    st.builds(Training, terms, ids, terms, st.just(1), st.just(("me",)), st.just(W)),
    st.builds(Aggregation, terms, ids, terms, st.just(()), st.just(W)),
    st.builds(
        Metrics,
        terms,
        ids,
        terms,
        st.just(0.5),
        st.just(1.0),
        st.just(1),
        st.just(()),
        st.just(0.0),
        st.just(0),
        st.just(0.0),
    ),
    st.builds(Finish, terms, ids, terms, st.just("r"), st.just(0.5)),
    st.builds(Solution, terms, terms, st.just(1), ids, st.just(1), st.just(0.1), st.just(W)),
    st.builds(Evaluation, terms, terms, ids, st.just(0.5), st.just(1.0), st.just(1)),
    st.builds(ServerState, terms, ids, terms, st.just(D), st.just("adam"), terms, st.just({}), st.just(0), st.just(W)),
)
views = st.builds(View, st.just("me"), terms, st.sampled_from(list(Role)), st.sampled_from(["me", "c", None]))


@settings(max_examples=2000, deadline=None)
@given(message=messages, view=views, retained=st.booleans())
def test_fuzz_every_verdict_respects_who_may_hear_what(message, view, retained):
    result = admit(message, retained, view)
    assert isinstance(result, (Route, Refused))
    if result is Route.TO_CONTROLLER:
        assert view.role is Role.CONTROLLER and message.term == view.term
    if result is Route.SERVER_STATE:
        assert view.role is Role.CONTROLLER and message.controller != view.me
    if result is Route.FROM_CONTROLLER:
        assert message.term >= view.term and message.controller != view.me and not retained
    if result in (Route.RETAINED_LEADER, Route.RETAINED_MODEL, Route.RUN_FINISHED):
        assert retained
    if result in (Route.BALLOT, Route.CLAIM, Route.FROM_CONTROLLER, Route.RETAINED_LEADER):
        assert message.term < 2**31 - 1


def test_a_term_past_the_last_usable_one_is_refused_from_anyone_and_any_other_goes_to_the_election():
    from peer.wire.messages import MAX_TERM

    for message in (
        Vote(MAX_TERM, "p2", 0.5, 0, "x"),
        Claim(MAX_TERM, "p2", 0.5, 0, "x", ()),
        Heartbeat(MAX_TERM, "c", 1, "x", FP),
        Training(MAX_TERM, "c", 1, 1, ("me",), D),
    ):
        for view in (NEW, FOLLOWER):
            refused = verdict(message, view)
            assert isinstance(refused, Refused) and "last usable term" in refused.reason and refused.level == "warning"
    # Far terms are not refused here: what a term is worth is the election's call (a majority must stand in it).
    assert verdict(Vote(MAX_TERM - 1, "p2", 0.5, 0, "x")) is Route.BALLOT
    assert verdict(Heartbeat(MAX_TERM - 1, "c", 1, "x", FP), NEW) is Route.FROM_CONTROLLER


def test_chunks_are_taken_only_of_models_and_only_from_the_peers_that_send_them():
    follower = View("me", 3, Role.FOLLOWER, "c")
    controller = View("me", 3, Role.CONTROLLER, "me", trainers=frozenset({"p2"}))
    for kind in ("training", "aggregation"):
        assert may_chunk(kind, "c", False, follower) is None  # the controller this peer follows
        assert isinstance(may_chunk(kind, "p2", False, follower), Refused)  # any other member
        assert isinstance(may_chunk(kind, "c", False, NEW), Refused)  # before it follows anyone
    assert may_chunk("aggregation", "p2", True, NEW) is None  # a retained model: the one a late joiner starts from
    assert isinstance(
        may_chunk("aggregation", "p9", True, View("me", 0, Role.WAITING, None, misfits=frozenset({"p9"}))), Refused
    )
    assert may_chunk("solution", "p2", False, controller) is None  # a trainer it waits for
    for sender, view in (("p3", controller), ("p2", follower), ("p2", NEW)):
        assert isinstance(may_chunk("solution", sender, False, view), Refused)
    for kind in ("init", "vote", "heartbeat", "evaluation"):
        assert isinstance(may_chunk(kind, "c", False, follower), Refused)
