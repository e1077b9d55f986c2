"""Attack plugins used by tests/test_attacks.py to exercise the plugin contract."""

import numpy as np

from fedwarden.attacks import fedwarden_data_attack


def push_away(honest, num_malicious, rng, strength=2.0):
    """Good model plugin: every malicious client sends -strength * honest mean."""
    return np.tile(-strength * honest.mean(axis=0), (num_malicious, 1))


@fedwarden_data_attack
def relabel_all(x, y, rng, label=1):
    """Good data plugin: every label becomes ``label``."""
    return x.copy(), np.full_like(y, label)


def wrong_shape(honest, num_malicious, rng):
    return np.zeros((num_malicious + 1, honest.shape[1]))


def nan_update(honest, num_malicious, rng):
    return np.full((num_malicious, honest.shape[1]), np.nan)


def int_update(honest, num_malicious, rng):
    return np.zeros((num_malicious, honest.shape[1]), dtype=np.int64)


def raises(honest, num_malicious, rng):
    raise RuntimeError("boom")


def mutates(honest, num_malicious, rng):
    honest[0] = 0.0
    return np.zeros((num_malicious, honest.shape[1]))


@fedwarden_data_attack
def drops_labels(x, y, rng):
    return x.copy(), y[:-1].copy()


NOT_CALLABLE = 3


SCORED_WITH_WEIGHTS: list = []


def recording_score(updates, trained_from=None):
    """Detector-aware scoring spy: records the weights it was given; the score is the norm."""
    SCORED_WITH_WEIGHTS.append(None if trained_from is None else np.array(trained_from))
    return np.linalg.norm(updates, axis=1)


def against_the_rule(honest, num_malicious, rng, aggregate=None, trained_from=None, step=1.0):
    """Model plugin that reads the round: -step * the rule's output on the honest updates, plus
    the global weights it was given (zeros when none)."""
    out = -step * aggregate(np.asarray(honest, np.float32))
    if trained_from is not None:
        out = out + trained_from
    return np.tile(out, (num_malicious, 1))
