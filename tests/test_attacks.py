"""Defining property of each attack in fedwarden/attacks.py, plus the plugin contract."""

from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedwarden.attacks import (
    ATTACKS,
    AttackError,
    alie_z,
    build_attack,
    describe_attacks,
    parse_attack_params,
    stamp_trigger,
)

NUM_CLASSES = 10


def updates(h: int = 8, m: int = 3, d: int = 50, seed: int = 0):
    """Honest updates around a common direction, and the attackers' own normal updates."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 0.1, size=d)
    honest = (base + rng.normal(0.0, 0.05, size=(h, d))).astype(np.float32)
    own = (base + rng.normal(0.0, 0.05, size=(m, d))).astype(np.float32)
    return honest, own


def images(n: int = 40, size: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.5, size=(n, size, size, 1)).astype(np.float32)
    y = np.arange(n) % NUM_CLASSES
    return x, y


def craft(name, params=None, collude=False, h=8, m=3, d=50, seed=0):
    honest, own = updates(h, m, d, seed)
    attack = build_attack(name, params, collude)
    return attack.craft(honest, own, np.random.default_rng(seed)), honest, own


def sq_dists(points, honest):
    return ((points[:, None, :].astype(np.float64) - honest[None, :, :]) ** 2).sum(-1)


# ---------------------------------------------------------------- every attack


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_keeps_shapes_and_inputs(name):
    attack = build_attack(name, {"num_classes": NUM_CLASSES})
    assert attack.kind in ("data", "model", "none")
    assert name in repr(attack)
    honest, own = updates()
    x, y = images()
    copies = [a.copy() for a in (honest, own, x, y)]
    rng = np.random.default_rng(1)
    out = attack.craft(honest, own, rng)
    x_new, y_new = attack.poison_data(x, y, rng)
    for before, after in zip(copies, (honest, own, x, y), strict=True):
        np.testing.assert_array_equal(before, after)
    if attack.kind == "model":
        assert out.shape == own.shape and out.dtype == np.float32 and np.isfinite(out).all()
        assert x_new is x and y_new is y
    else:
        assert out is own
    if attack.kind == "data":
        assert x_new is not x and y_new is not y
        assert x_new.shape == x.shape and x_new.dtype == x.dtype and y_new.dtype == y.dtype
    else:
        assert x_new is x and y_new is y


# ---------------------------------------------------------------- model attacks


def test_alie_is_mean_minus_z_std():
    out, honest, own = craft("alie", h=8, m=2)
    ref = honest.astype(np.float64)
    z = NormalDist().inv_cdf((10 - (6 - 2)) / 10)  # n=10, f=2: s = floor(10/2+1) - 2 = 4
    assert alie_z(10, 2) == pytest.approx(z)
    np.testing.assert_allclose(out, np.tile(ref.mean(0) - z * ref.std(0), (2, 1)), rtol=1e-5)
    deviation = np.abs(out - ref.mean(0)) / ref.std(0)
    assert np.all(deviation <= z + 1e-4)


def test_alie_fixed_z_and_majority_clamp():
    out, honest, _ = craft("alie", {"z": 1.5})
    ref = honest.astype(np.float64)
    np.testing.assert_allclose(out[0], ref.mean(0) - 1.5 * ref.std(0), rtol=1e-5)
    assert np.isfinite(alie_z(10, 7)) and alie_z(1, 1) == 0.0


def test_ipm_has_negative_inner_product_with_honest_mean():
    out, honest, _ = craft("ipm")
    mean = honest.astype(np.float64).mean(0)
    np.testing.assert_allclose(out[0], -0.1 * mean, rtol=1e-5)
    assert out[0] @ mean < 0


@pytest.mark.parametrize("perturbation", ["std", "unit_vec", "sign"])
def test_min_max_stays_within_honest_max_distance(perturbation):
    out, honest, _ = craft("min_max", {"perturbation": perturbation})
    bound = sq_dists(honest, honest).max()
    worst = sq_dists(out[:1], honest).max()
    assert worst <= bound * (1 + 1e-5)
    assert worst >= bound * (1 - 1e-3)  # gamma is the largest that fits
    mean = honest.astype(np.float64).mean(0)
    shift = out[0] - mean
    p = {
        "std": -honest.std(0),
        "unit_vec": -mean / np.linalg.norm(mean),
        "sign": -np.sign(mean),
    }[perturbation]
    gamma = shift @ p / (p @ p)
    assert gamma > 0
    np.testing.assert_allclose(shift, gamma * p, atol=1e-5)


@pytest.mark.parametrize("perturbation", ["std", "unit_vec", "sign"])
def test_min_sum_stays_within_honest_max_sum_of_distances(perturbation):
    out, honest, _ = craft("min_sum", {"perturbation": perturbation})
    bound = sq_dists(honest, honest).sum(1).max()
    total = sq_dists(out[:1], honest).sum()
    assert bound * (1 - 1e-3) <= total <= bound * (1 + 1e-5)
    assert not np.allclose(out[0], honest.mean(0))


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(2, 12),
    m=st.integers(1, 4),
    d=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    use_sum=st.booleans(),
)
def test_min_max_min_sum_bound_holds_for_any_cohort(h, m, d, seed, use_sum):
    out, honest, _ = craft("min_sum" if use_sum else "min_max", h=h, m=m, d=d, seed=seed)
    pair = sq_dists(honest, honest)
    mine = sq_dists(out[:1], honest)
    if use_sum:
        assert mine.sum() <= pair.sum(1).max() * (1 + 1e-4) + 1e-9
    else:
        assert mine.max() <= pair.max() * (1 + 1e-4) + 1e-9


def test_sign_flip_negates_and_scaling_multiplies():
    out, _, own = craft("sign_flip")
    np.testing.assert_allclose(out, -own)
    out, _, own = craft("sign_flip", {"scale": 4})
    np.testing.assert_allclose(out, -4 * own, rtol=1e-6)
    out, _, own = craft("scaling", h=7, m=3)
    np.testing.assert_allclose(out, own * (10 / 3), rtol=1e-6)
    out, _, own = craft("scaling", {"boost": 10})
    np.testing.assert_allclose(out, own * 10, rtol=1e-6)


def test_free_rider_sends_zeros():
    out, _, own = craft("free_rider")
    assert out.shape == own.shape and not out.any()


def test_gaussian_spread_and_per_client_variation():
    out, honest, _ = craft("gaussian", {"sigma": 3.0}, m=4, d=20000)
    assert out.std() == pytest.approx(3.0, rel=0.02) and abs(out.mean()) < 0.05
    assert not np.allclose(out[0], out[1])
    out, honest, _ = craft("gaussian", {"relative": True, "sigma": 200.0}, d=20000)
    expected = 200.0 * np.median(honest.astype(np.float64).std(0))
    assert out.std() == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("name", ["gaussian", "sign_flip", "scaling"])
def test_collude_sends_one_shared_row(name):
    out, _, _ = craft(name, collude=True, m=4)
    assert (out == out[0]).all()


def test_no_honest_updates_falls_back_to_own():
    _, own = updates()
    attack = build_attack("alie")
    out = attack.craft(np.empty((0, own.shape[1]), np.float32), own, np.random.default_rng())
    assert out.shape == own.shape and np.isfinite(out).all()


# ---------------------------------------------------------------- data attacks


def test_label_flip_maps_all_labels_without_mutating():
    x, y = images()
    x0, y0 = x.copy(), y.copy()
    attack = build_attack("label_flip", {"num_classes": NUM_CLASSES})
    x_new, y_new = attack.poison_data(x, y, np.random.default_rng(0))
    np.testing.assert_array_equal(y_new, NUM_CLASSES - 1 - y0)
    np.testing.assert_array_equal(x_new, x0)
    np.testing.assert_array_equal(y, y0)
    assert attack.target_class is None and attack.asr_inputs(x, y) is None


def test_targeted_label_flip_and_its_asr_inputs():
    x, y = images()
    attack = build_attack("label_flip", {"source": 3, "target": 8})
    _, y_new = attack.poison_data(x, y, np.random.default_rng(0))
    np.testing.assert_array_equal(y_new, np.where(y == 3, 8, y))
    assert attack.target_class == 8
    x_asr, y_asr = attack.asr_inputs(x, y)
    np.testing.assert_array_equal(x_asr, x[y == 3])
    assert (y_asr == 8).all() and len(y_asr) == (y == 3).sum()
    with pytest.raises(AttackError, match="no trigger"):
        attack.trigger(x)


def test_label_noise_redraws_a_fraction():
    x, y = images(n=200)
    attack = build_attack("label_noise", {"num_classes": NUM_CLASSES, "fraction": 0.25})
    _, y_new = attack.poison_data(x, y, np.random.default_rng(0))
    changed = (y_new != y).sum()
    assert 0 < changed <= 50 and y_new.min() >= 0 and y_new.max() < NUM_CLASSES


def stamped(x):
    return (x[:, -3:, -3:, :] == 1.0).all(axis=(1, 2, 3))


def test_backdoor_stamps_exactly_the_fraction_with_target_label():
    x, y = images(n=40)
    x0, y0 = x.copy(), y.copy()
    attack = build_attack("backdoor", {"poison_fraction": 0.25, "target": 2})
    x_new, y_new = attack.poison_data(x, y, np.random.default_rng(0))
    hit = stamped(x_new)
    assert hit.sum() == 10 and (y_new[hit] == 2).all()
    np.testing.assert_array_equal(x_new[~hit], x0[~hit])
    np.testing.assert_array_equal(y_new[~hit], y0[~hit])
    np.testing.assert_array_equal(x, x0)  # inputs untouched
    np.testing.assert_array_equal(y, y0)
    assert attack.target_class == 2


def test_backdoor_asr_inputs_exclude_target_class():
    x, y = images(n=40)
    attack = build_attack("backdoor")  # target 0, poison_fraction 0.5
    assert attack.params["poison_fraction"] == 0.5 and attack.target_class == 0
    x_asr, y_asr = attack.asr_inputs(x, y)
    assert len(x_asr) == (y != 0).sum() and (y_asr == 0).all()
    assert stamped(x_asr).all()
    np.testing.assert_array_equal(x_asr[:, :5, :5], x[y != 0][:, :5, :5])


def test_trigger_on_flat_features():
    x = np.zeros((4, 12), np.float32)
    out = stamp_trigger(x, 3)
    assert (out[:, -3:] == 1.0).all() and not out[:, :-3].any() and not x.any()
    attack = build_attack("backdoor", {"trigger_size": 2})
    assert (attack.trigger(x)[:, -2:] == 1.0).all()


# ---------------------------------------------------------------- building and errors


def test_unknown_name_lists_accepted_ones():
    with pytest.raises(AttackError) as error:
        build_attack("sign_flop")
    assert "'sign_flop'" in str(error.value)
    for name in ATTACKS:
        assert name in str(error.value)


def test_bad_params_are_named():
    with pytest.raises(AttackError, match=r"'zz'.*Accepted: z"):
        build_attack("alie", {"zz": 1})
    with pytest.raises(AttackError, match="poison_fraction"):
        build_attack("backdoor", {"poison_fraction": 1.5})
    with pytest.raises(AttackError, match="perturbation"):
        build_attack("min_max", {"perturbation": "random"})
    with pytest.raises(AttackError, match="num_classes"):
        build_attack("label_flip")
    with pytest.raises(AttackError, match="target"):
        build_attack("label_flip", {"source": 1})
    with pytest.raises(AttackError, match="scale"):
        build_attack("sign_flip", {"scale": "big"})


def test_num_classes_is_context_only():
    attack = build_attack("sign_flip", {"num_classes": NUM_CLASSES})
    assert attack.params == {"scale": 1.0}
    assert "scale" in repr(attack)


def test_describe_attacks_lists_every_attack_with_defaults():
    lines = describe_attacks()
    assert [line.split(" ")[0] for line in lines] == list(ATTACKS)
    assert any(line.startswith("ipm [model] epsilon=0.1: ") for line in lines)


def test_parse_attack_params():
    parsed = parse_attack_params(["boost=10", "z=1.5", "relative=true", "z2=none", "p=sign"])
    assert parsed == {"boost": 10, "z": 1.5, "relative": True, "z2": None, "p": "sign"}
    assert isinstance(parsed["boost"], int)
    for bad in ["boost", "=3", "boost=", "1x=2"]:
        with pytest.raises(AttackError, match="bad --attack-param"):
            parse_attack_params([bad])
    with pytest.raises(AttackError, match="twice"):
        parse_attack_params(["z=1", "z=2"])


# ---------------------------------------------------------------- plugins


@pytest.fixture
def plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return "attack_plugins"


def test_model_plugin(plugins):
    attack = build_attack(f"{plugins}:push_away", {"strength": 3.0})
    assert attack.kind == "model" and attack.params == {"strength": 3.0}
    honest, own = updates()
    out = attack.craft(honest, own, np.random.default_rng())
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.tile(-3.0 * honest.mean(0), (len(own), 1)), rtol=1e-5)


def test_a_model_plugin_that_names_the_round_context_receives_it(plugins):
    attack = build_attack(f"{plugins}:against_the_rule", {"step": 2.0})
    assert attack.params == {"step": 2.0} and attack.uses_aggregate
    assert attack.round_context == ("aggregate", "trained_from")
    honest, own = updates()
    weights = np.linspace(-1.0, 1.0, honest.shape[1]).astype(np.float32)

    def median(rows):
        return np.median(rows, axis=0)

    out = attack.craft(honest, own, np.random.default_rng(), median, weights)
    np.testing.assert_allclose(out[0], -2.0 * np.median(honest, axis=0) + weights, rtol=1e-5)
    with pytest.raises(AttackError, match="'trained_from' comes from the round"):
        build_attack(f"{plugins}:against_the_rule", {"trained_from": 1.0})


def test_data_plugin(plugins):
    attack = build_attack(f"{plugins}:relabel_all", {"num_classes": NUM_CLASSES})
    assert attack.kind == "data" and attack.params == {"label": 1}
    x, y = images()
    x_new, y_new = attack.poison_data(x, y, np.random.default_rng())
    assert (y_new == 1).all() and x_new is not x
    assert attack.craft(*updates(), np.random.default_rng()) is not None


@pytest.mark.parametrize(
    ("plugin", "problem"),
    [
        ("wrong_shape", "returned shape"),
        ("nan_update", "NaN"),
        ("int_update", "dtype"),
        ("raises", "RuntimeError: boom"),
        ("mutates", "read-only"),
    ],
)
def test_bad_model_plugin_errors_name_it(plugins, plugin, problem):
    attack = build_attack(f"{plugins}:{plugin}")
    with pytest.raises(AttackError, match=problem) as error:
        attack.craft(*updates(), np.random.default_rng())
    assert f"{plugins}:{plugin}" in str(error.value)
    if plugin == "raises":
        assert isinstance(error.value.__cause__, RuntimeError)


def test_bad_data_plugin_and_plugin_params(plugins):
    attack = build_attack(f"{plugins}:drops_labels")
    with pytest.raises(AttackError, match="drops_labels"):
        attack.poison_data(*images(), np.random.default_rng())
    with pytest.raises(AttackError, match=r"push_away.*'force'.*Accepted: strength"):
        build_attack(f"{plugins}:push_away", {"force": 1})
    with pytest.raises(AttackError, match="not callable"):
        build_attack(f"{plugins}:NOT_CALLABLE")
    with pytest.raises(AttackError, match="cannot import"):
        build_attack("no_such_module_xyz:fn")


def test_random_direction_has_the_median_honest_norm_and_random_directions():
    rng = np.random.default_rng(0)
    honest = rng.normal(size=(9, 500)).astype(np.float32) * np.arange(1, 10)[:, None]
    attack = build_attack("random_direction")
    crafted = attack.craft(honest, honest[:3].copy(), np.random.default_rng(1))
    median_norm = np.median(np.linalg.norm(honest, axis=1))
    assert np.allclose(np.linalg.norm(crafted, axis=1), median_norm, rtol=1e-5)
    cosines = (
        crafted
        @ honest.mean(0)
        / (np.linalg.norm(crafted, axis=1) * np.linalg.norm(honest.mean(0)))
    )
    assert np.all(np.abs(cosines) < 0.2)


def test_boosted_backdoor_scales_its_trained_update_and_plain_backdoor_does_not():
    own = np.random.default_rng(0).normal(size=(2, 30)).astype(np.float32)
    boosted = build_attack("backdoor", {"num_classes": 10, "boost": 5})
    assert np.allclose(boosted.craft(own[:0], own, np.random.default_rng(1)), 5 * own)
    assert build_attack("backdoor", {"num_classes": 10}).craft(own[:0], own, None) is own


# ---------------------------------------------------------------- strongest published variants


def _trimmed_mean(rows, t):
    ordered = np.sort(np.asarray(rows, np.float64), axis=0)
    return ordered[t : len(rows) - t].mean(axis=0)


def _median(rows):
    return np.median(np.asarray(rows, np.float64), axis=0)


def _deviation(rule, bad, honest):
    return np.linalg.norm(rule(np.concatenate([bad, honest])) - honest.astype(np.float64).mean(0))


def test_fang_trim_moves_trimmed_mean_against_the_honest_direction():
    # Fang et al. 2020, Sec. 4.3: each coordinate of the trimmed mean moves opposite to the
    # direction it would take without attack.
    bad, honest, _ = craft("fang_trim", h=8, m=3, d=200)
    s = np.sign(honest.astype(np.float64).mean(0))
    clean = _trimmed_mean(honest, 1)
    attacked = _trimmed_mean(np.concatenate([bad, honest]), 3)
    assert np.all((attacked - clean) * s <= 1e-7)
    assert np.mean((attacked - clean) * s < 0) > 0.9
    below, above = bad.min(0) <= honest.min(0), bad.max(0) >= honest.max(0)
    assert np.all(np.where(s > 0, below, above))  # beyond the honest extreme, as the paper crafts


def test_fang_trim_strength_knob_widens_the_range():
    weak, honest, _ = craft("fang_trim", {"b": 1.5}, d=200)
    strong, _, _ = craft("fang_trim", {"b": 4.0}, d=200)
    centre = honest.astype(np.float64).mean(0)
    assert np.abs(strong - centre).mean() > np.abs(weak - centre).mean()


def test_fang_krum_gets_a_reversed_update_selected_by_krum():
    from fedwarden.aggregation.rules import krum

    # Heterogeneous honest updates (spread larger than their mean), the regime of the paper.
    rng = np.random.default_rng(0)
    honest = (rng.normal(0.0, 0.1, 100) + rng.normal(0.0, 0.3, (8, 100))).astype(np.float32)
    bad = build_attack("fang_krum").craft(honest, honest[:3].copy(), rng)
    cohort = np.concatenate([bad, honest])
    out = krum(3)(cohort, np.ones(len(cohort)), None)
    assert out.per_client["selected"][:3].sum() == 1  # Krum picks a malicious update
    assert out.updates[0] @ honest.astype(np.float64).mean(0) < 0  # against the honest direction


def test_agr_tailored_searches_against_the_rule_it_is_given():
    honest, own = updates(h=8, m=3, d=100)
    rng = np.random.default_rng(0)
    attack = build_attack("agr_tailored")
    assert attack.uses_aggregate
    seen = []

    def rule(rows):
        seen.append(rows.shape)
        return _median(rows)

    bad = attack.craft(honest, own, rng, rule)
    assert seen and all(shape == (11, 100) for shape in seen)
    agnostic = build_attack("min_max").craft(honest, own, rng)
    formula = build_attack("alie").craft(honest, own, rng)
    tailored = _deviation(_median, bad, honest)
    assert tailored >= _deviation(_median, agnostic, honest) - 1e-6
    assert tailored >= _deviation(_median, formula, honest) - 1e-6


def test_agr_tailored_sends_the_honest_mean_when_no_scale_moves_the_rule():
    honest, own = updates()
    bad = build_attack("agr_tailored").craft(
        honest, own, np.random.default_rng(0), lambda rows: np.zeros(rows.shape[1])
    )
    np.testing.assert_allclose(bad[0], honest.astype(np.float64).mean(0), atol=1e-6)


def test_alie_optimized_beats_the_closed_form_z_on_the_rule_in_use():
    honest, own = updates(h=8, m=3, d=100, seed=3)
    rng = np.random.default_rng(0)
    rule = lambda rows: _trimmed_mean(rows, 3)  # noqa: E731
    optimized = build_attack("alie_optimized").craft(honest, own, rng, rule)
    closed_form = build_attack("alie").craft(honest, own, rng)
    assert _deviation(rule, optimized, honest) >= _deviation(rule, closed_form, honest) - 1e-6
    std = honest.astype(np.float64).std(0)
    z = (honest.astype(np.float64).mean(0) - optimized[0]) / std
    assert np.allclose(z, z[0], rtol=1e-3)  # still mean - z * std, one z for every coordinate


def test_ipm_optimized_reverses_the_mean_where_the_paper_small_epsilon_does_not():
    # Xie et al. 2019: against the mean, epsilon must exceed h / m to flip the inner product.
    honest, own = updates(h=8, m=3, d=50)
    mean_rule = lambda rows: rows.astype(np.float64).mean(0)  # noqa: E731
    direction = honest.astype(np.float64).mean(0)
    rng = np.random.default_rng(0)
    small = build_attack("ipm", {"epsilon": 0.1}).craft(honest, own, rng)
    best = build_attack("ipm_optimized").craft(honest, own, rng, mean_rule)
    assert mean_rule(np.concatenate([small, honest])) @ direction > 0
    assert mean_rule(np.concatenate([best, honest])) @ direction < 0
    weak = build_attack("ipm_optimized", {"max_epsilon": 0.1}).craft(honest, own, rng, mean_rule)
    assert mean_rule(np.concatenate([weak, honest])) @ direction > 0


def test_mimic_copies_the_honest_update_farthest_along_the_main_direction():
    honest, own = updates(h=8, m=3, d=30)
    honest[5] += 0.5 * np.linspace(-1, 1, 30).astype(np.float32)  # one client stands out
    bad = build_attack("mimic").craft(honest, own, np.random.default_rng(0))
    np.testing.assert_array_equal(bad, np.repeat(honest[5:6], 3, axis=0))


def test_dba_clients_carry_disjoint_parts_that_make_up_the_global_trigger():
    attack = build_attack("dba", {"num_classes": NUM_CLASSES})
    x = np.zeros((64, 8, 8, 1), np.float32)
    y = np.ones(64, np.int64)
    stamped = []
    for client in range(4):
        x_new, y_new = attack.poison_data(x, y, np.random.default_rng(client))
        assert (y_new == 0).sum() == 20  # 20 of 64, the paper's poisoned share of a batch
        stamped.append(x_new[y_new == 0][0, ..., 0] > 0)
    assert all((a & b).sum() == 0 for i, a in enumerate(stamped) for b in stamped[i + 1 :])
    union = np.logical_or.reduce(stamped)
    np.testing.assert_array_equal(union, attack.trigger(x[:1])[0, ..., 0] > 0)
    assert all(part.sum() == 4 for part in stamped)  # 1 x 4 bars


@pytest.mark.parametrize("stealth", ["min_max", "min_sum"])
def test_agr_tailored_with_stealth_stays_within_the_honest_distances(stealth):
    # Shejwalkar & Houmansadr 2021: min-max keeps the malicious update's largest distance to an
    # honest one within the largest honest pairwise distance; min-sum does so for the sums.
    honest, own = updates(h=8, m=3, d=60)
    rule = lambda rows: _trimmed_mean(rows, 3)  # noqa: E731
    free = build_attack("agr_tailored").craft(honest, own, np.random.default_rng(0), rule)
    bad = build_attack("agr_tailored", {"stealth": stealth}).craft(
        honest, own, np.random.default_rng(0), rule
    )
    d_bad, d_pair = sq_dists(bad[:1], honest)[0], sq_dists(honest, honest)
    if stealth == "min_max":
        assert d_bad.max() <= d_pair.max() * (1 + 1e-4)
    else:
        assert d_bad.sum() <= d_pair.sum(axis=1).max() * (1 + 1e-4)
    assert _deviation(rule, bad, honest) <= _deviation(rule, free, honest) + 1e-6


# ---------------------------------------------------------------- detector-aware


def weights_and_cohort(h: int = 8, m: int = 2, d: int = 400, seed: int = 1):
    """Global weights and a cohort whose honest updates grow them, as honest training does."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0, size=d)
    base = 0.004 * w + rng.normal(0.0, 0.05, size=d)
    honest = (base + rng.normal(0.0, 0.05, size=(h, d))).astype(np.float32)
    own = (base + rng.normal(0.0, 0.05, size=(m, d))).astype(np.float32)
    return w, honest, own


def test_the_detector_aware_attacker_pushes_against_the_honest_mean_under_the_full_scores_line():
    from fedwarden.aggregation.scoring import cohort_anomaly

    w, honest, own = weights_and_cohort()
    z = 1.0
    sent = build_attack("detector_aware", {"z": z}).craft(
        honest, own, np.random.default_rng(0), trained_from=w
    )
    push = sent.astype(np.float64) - own
    assert (push @ honest.mean(axis=0) < 0).all()  # it attacks
    # orthogonal to the weights: each update's inner product with them is as trained
    np.testing.assert_allclose(sent @ w, own @ w, rtol=1e-3)
    scores = cohort_anomaly(np.concatenate([honest, sent]), trained_from=w)
    theirs = scores[: len(honest)]
    med = np.median(theirs)
    line = med + z * max(1.4826 * np.median(np.abs(theirs - med)), 0.03)
    assert (scores[len(honest) :] <= line + 1e-9).all()
    assert (scores[len(honest) :] > med).any()  # it used its allowance, not nothing


def test_the_detector_aware_attacker_hands_the_weights_to_a_scorer_that_takes_them(plugins):
    import attack_plugins

    w, honest, own = weights_and_cohort()
    attack = build_attack("detector_aware", {"score": f"{plugins}:recording_score"})
    assert attack.round_context == ("trained_from",) and not attack.uses_aggregate
    attack_plugins.SCORED_WITH_WEIGHTS.clear()
    attack.craft(honest, own, np.random.default_rng(0), trained_from=w)
    seen = attack_plugins.SCORED_WITH_WEIGHTS
    assert seen and all(np.array_equal(v, w) for v in seen)
    seen.clear()
    attack.craft(honest, own, np.random.default_rng(0))
    assert seen and all(v is None for v in seen)
    with pytest.raises(AttackError, match=r"trained_from must be shaped \(400,\)"):
        attack.craft(honest, own, np.random.default_rng(0), trained_from=w[:10])


def test_a_scorer_without_the_weights_keyword_still_serves_the_detector_aware_attacker():
    w, honest, own = weights_and_cohort()
    blind = build_attack("detector_aware", {"score": lambda u: np.zeros(len(u)), "max_gamma": 4.0})
    sent = blind.craft(honest, own, np.random.default_rng(0), trained_from=w)
    push = np.linalg.norm(sent - own, axis=1) / np.median(np.linalg.norm(own, axis=1))
    np.testing.assert_allclose(push, 4.0, rtol=1e-4)  # never flagged: the largest push


@pytest.mark.parametrize("name", ["alie", "ipm", "detector_aware", "mimic", "min_max"])
def test_a_diverged_training_s_nan_passes_through_an_attack_instead_of_failing_the_run(name):
    honest, own = updates()
    honest[0, 3] = own[0, 3] = np.nan  # two trainings diverged
    out = build_attack(name).craft(honest, own, np.random.default_rng(0))
    # no AttackError: the NaN goes on to the server, which rejects and counts the update
    assert out.shape == own.shape and not np.isfinite(out).all()
