"""Aggregation plugins used by tests/test_aggregation.py to exercise parse_chain's plugin specs."""

import numpy as np

from fedwarden.aggregation.base import StatelessStep, StepOutput


def coordinate_max(updates, weights):
    """Plain function plugin: (updates, weights) -> (d,) vector."""
    return updates.max(axis=0)


def mutating(updates, weights):
    """A bad plain function: tries to write into the matrix it was given."""
    updates[0, 0] = 1e9
    return updates[0]


def wrong_shape(updates, weights):
    return updates[:2]


class ScaledMean(StatelessStep):
    name = "scaled_mean"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def apply(self, updates, weights):
        row = self.scale * updates.mean(axis=0)
        return StepOutput(row[None, :], np.array([weights.sum()]))


def make_scaled_mean(scale=1.0):
    """Factory plugin: returns a step."""
    return ScaledMean(scale)


def make_robust(num_byzantine):
    """Factory plugin that takes the run's Byzantine budget."""
    from fedwarden.aggregation import krum

    return krum(num_byzantine)


def not_a_step():
    return 42
