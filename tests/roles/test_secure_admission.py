"""Who hears secure aggregation's messages: keys, masked vectors and reveals only the controller of their term;
rosters, maskers and unmask requests only the followers of the controller that sent them; shares the peers of the
term."""

from __future__ import annotations

import numpy as np

from peer.roles.admission import Route, View, admit, entitled
from peer.roles.election import Role
from peer.wire.errors import Refused
from peer.wire.messages import Keys, Masked, Maskers, Reveal, Roster, Shares, Unmask

FOLLOWER = View("me", 3, Role.FOLLOWER, "c")
CONTROLLER = View("me", 3, Role.CONTROLLER, "me")
WAITING = View("me", 3, Role.WAITING, None)
K = "ab" * 32

TO_CONTROLLER = [
    Keys(3, 1, 1, "p2", K, K, K),
    Masked(3, 1, 1, "p2", 10, 0.5, [np.zeros(2, np.uint32)]),
    Reveal(3, 1, 1, "p2", (("p2", K),)),
]
FROM_CONTROLLER = [
    Roster(3, "c", 1, 1, 2, 8.0, 20, (("p1", K, K, K), ("p2", K, K, K))),
    Maskers(3, "c", 1, 1, ("p1", "p2")),
    Unmask(3, "c", 1, 1, ("p1", "p2"), ()),
]


def test_keys_masked_vectors_and_reveals_reach_only_the_controller_of_their_term():
    for message in TO_CONTROLLER:
        assert admit(message, False, CONTROLLER) is Route.TO_CONTROLLER
        assert isinstance(admit(message, False, FOLLOWER), Refused)
        assert isinstance(admit(message, False, View("me", 4, Role.CONTROLLER, "me")), Refused)
        assert isinstance(admit(message, True, CONTROLLER), Refused)  # never retained


def test_the_controllers_requests_reach_its_followers_in_its_term_only():
    for message in FROM_CONTROLLER:
        assert admit(message, False, FOLLOWER) is Route.FROM_CONTROLLER
        assert entitled(message, FOLLOWER) is Route.FROM_CONTROLLER
        assert isinstance(entitled(message, View("me", 3, Role.FOLLOWER, "other")), Refused)
        assert admit(message, False, View("me", 4, Role.FOLLOWER, "c")) is Route.EARLIER_CONTROLLER  # stale term
        assert isinstance(admit(message, True, FOLLOWER), Refused)


def test_shares_reach_the_peers_of_their_term():
    shares = Shares(3, 1, 1, "p2", (("p1", "A" * 107 + "="),))
    assert admit(shares, False, FOLLOWER) is Route.SHARES
    assert admit(shares, False, CONTROLLER) is Route.SHARES
    assert isinstance(admit(shares, False, WAITING), Refused)
    assert isinstance(admit(shares, False, View("me", 4, Role.FOLLOWER, "c")), Refused)
    assert isinstance(admit(shares, True, FOLLOWER), Refused)
