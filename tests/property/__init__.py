"""Property tests: random sequences of user actions against a real controller (issue #14)."""
