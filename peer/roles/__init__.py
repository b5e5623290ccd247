"""The machines: the election, the controller, the follower, the admission rules and the actions they return. Pure."""
