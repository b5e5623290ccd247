"""The one error of secure aggregation: a value from the network (or a caller) that the protocol cannot use."""

from __future__ import annotations


class SecAggError(ValueError):
    """`str()` is a one-line reason for the log; the message or round attempt it concerns is dropped."""
