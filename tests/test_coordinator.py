"""The transport-agnostic round logic: admission, aggregation, trust, server optimizers."""

import numpy as np
import pytest

from fedwarden.aggregation.base import StatelessStep, StepOutput
from fedwarden.aggregation.chain import parse_chain
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook, TrustPolicy

D = 8


def make(aggregator="mean", optimizer="fedavg", quarantine="none"):
    return Coordinator(
        np.zeros(D, np.float32),
        parse_chain(aggregator, num_byzantine_default=1),
        ServerOptimizer(optimizer),
        TrustBook(TrustPolicy(quarantine=quarantine)),
    )


def update(cid, delta, round_number=1, n=10):
    return ClientUpdate(cid, round_number, np.asarray(delta), n, loss=0.5)


def test_bad_updates_are_rejected_with_reasons_and_the_round_goes_on():
    c = make()
    ids = ["a", "b", "c", "d", "e", "g"]
    good = np.ones(D, np.float32)
    nan = good.copy()
    nan[3] = np.nan
    updates = [
        update("a", good),
        update("b", nan),
        update("c", np.ones(D + 1, np.float32)),
        update("d", good, round_number=0),
        update("x", good),
        update("a", good * 2),
        update("e", np.ones(D, np.int32)),
        update("g", good),
    ]
    outcome = c.finish_round(1, ids, updates)
    reasons = {(r.client_id, r.reason) for r in outcome.rejected}
    assert reasons == {
        ("b", "non_finite"),
        ("c", "wrong_shape"),
        ("d", "wrong_round"),
        ("x", "not_selected"),
        ("a", "duplicate"),
        ("e", "wrong_dtype"),
    }
    assert outcome.admitted == ["a", "g"]
    assert np.allclose(c.weights, good)  # the good updates were applied
    trust = c.trust.snapshot()
    assert trust["b"].trust < trust["g"].trust  # a rejection is charged to trust
    assert trust["a"].rejected == 1 and trust["g"].rejected == 0


def test_too_large_updates_are_rejected_when_a_limit_is_set():
    c = make()
    c.max_update_norm = 10.0
    outcome = c.finish_round(
        1,
        ["a", "b"],
        [update("a", np.ones(D, np.float32)), update("b", np.full(D, 100.0, np.float32))],
    )
    assert [(r.client_id, r.reason) for r in outcome.rejected] == [("b", "too_large")]


def test_weighted_mean_uses_example_counts():
    c = make()
    c.finish_round(
        1,
        ["a", "b"],
        [update("a", np.zeros(D, np.float32), n=30), update("b", np.ones(D, np.float32) * 4, n=10)],
    )
    assert np.allclose(c.weights, 1.0)


def test_outlier_gets_the_highest_anomaly_and_median_ignores_it():
    c = make("median")
    rng = np.random.default_rng(0)
    ids = [f"c{i}" for i in range(7)]
    deltas = [rng.normal(1.0, 0.1, D).astype(np.float32) for _ in ids[:-1]]
    deltas.append(np.full(D, 50.0, np.float32))
    outcome = c.finish_round(1, ids, [update(i, d) for i, d in zip(ids, deltas)])
    by_anomaly = max(outcome.clients, key=lambda row: row.anomaly)
    assert by_anomaly.client_id == "c6"
    assert np.all(np.abs(c.weights - 1.0) < 0.5)


def test_thin_cohort_skips_the_aggregate_instead_of_crashing():
    c = make("krum:num_byzantine=2")
    outcome = c.finish_round(
        1, ["a", "b"], [update("a", np.ones(D, np.float32)), update("b", np.ones(D, np.float32))]
    )
    assert "krum needs" in outcome.measurements["skipped"]
    assert np.all(c.weights == 0) and c.round == 1


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_server_optimizers_move_along_the_aggregate(name):
    opt = ServerOptimizer(name, lr=0.5 if name != "fedadam" else 0.01)
    w, state = np.zeros(4, np.float32), opt.init(4)
    for _ in range(3):
        w, state = opt.step(w, np.array([1, -1, 2, 0], np.float32), state)
    assert w[0] > 0 and w[1] < 0 and w[2] > 0 and w[3] == 0


def test_fedavgm_accumulates_momentum():
    plain, momentum = ServerOptimizer("fedavg"), ServerOptimizer("fedavgm", momentum=0.9)
    a, sa = np.zeros(1, np.float32), plain.init(1)
    b, sb = np.zeros(1, np.float32), momentum.init(1)
    for _ in range(3):
        a, sa = plain.step(a, np.ones(1, np.float32), sa)
        b, sb = momentum.step(b, np.ones(1, np.float32), sb)
    assert b[0] == pytest.approx(1 + 1.9 + 2.71) and a[0] == pytest.approx(3)


def test_state_dict_round_trip():
    c = make("centered_clipping:radius=1.0", "fedadam")
    c.finish_round(1, ["a"], [update("a", np.ones(D, np.float32))])
    restored = make("centered_clipping:radius=1.0", "fedadam")
    restored.load_state_dict(c.state_dict())
    assert restored.round == 1 and np.array_equal(restored.weights, c.weights)
    assert np.array_equal(restored.optimizer_state["m"], c.optimizer_state["m"])


def test_exclude_policy_skips_quarantined_clients_in_selection():
    c = make("median", quarantine="exclude")
    ids = [f"c{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    for r in range(1, 6):
        deltas = [rng.normal(1.0, 0.1, D).astype(np.float32) for _ in ids[:-1]]
        deltas.append(np.full(D, -80.0, np.float32))
        c.finish_round(r, ids, [update(i, d, r) for i, d in zip(ids, deltas)])
    assert c.trust.snapshot()["c5"].quarantined
    assert "c5" not in c.select(ids, 6, np.random.default_rng(1))


HONEST = [f"h{i}" for i in range(4)]


def hostile_round(aggregator, hostile_delta, hostile_n=10):
    c = make(aggregator)
    honest = np.full(D, 0.1, np.float32)
    updates = [update(cid, honest) for cid in HONEST]
    updates.append(ClientUpdate("evil", 1, hostile_delta, hostile_n, loss=0.5))
    return c, c.finish_round(1, [*HONEST, "evil"], updates)


@pytest.mark.parametrize(
    "aggregator", ["mean", "clip:max_norm=1+mean", "clip:max_norm=5+trimmed_mean"]
)
def test_a_float64_update_beyond_float32_range_is_rejected_not_committed(aggregator):
    # 1e300 is finite as float64 and infinite as float32, the dtype of the update matrix.
    c, outcome = hostile_round(aggregator, np.full(D, 1e300, np.float64))
    assert [(r.client_id, r.reason) for r in outcome.rejected] == [("evil", "non_finite")]
    assert np.all(np.isfinite(c.weights)) and np.allclose(c.weights, 0.1, atol=1e-6)
    trust = c.trust.snapshot()
    assert trust["evil"].trust < min(trust[h].trust for h in HONEST)


class Float32Sum(StatelessStep):
    """A rule that sums in float32, as a user's plugin might: rows near float32's limit overflow."""

    name = "float32_sum"

    def apply(self, updates, weights):
        total = np.sum(updates, axis=0, dtype=np.float32)
        return StepOutput(total[None, :] / len(updates), np.ones(1))


def test_an_update_that_overflows_the_aggregate_is_rejected_and_the_round_still_counts():
    # Finite float32 values near the limit pass admission; the sum overflows to Inf.
    c = Coordinator(
        np.zeros(D, np.float32), Float32Sum(), ServerOptimizer("fedavg"), TrustBook(TrustPolicy())
    )
    honest = np.full(D, 0.1, np.float32)
    updates = [update(cid, honest) for cid in HONEST]
    updates += [update("evil", np.full(D, 3e38, np.float32)), update("evil2", np.full(D, 2e38))]
    outcome = c.finish_round(1, [*HONEST, "evil", "evil2"], updates)
    assert [(r.client_id, r.reason) for r in outcome.rejected] == [("evil", "overflow")]
    assert sorted(outcome.admitted) == sorted([*HONEST, "evil2"])  # evil2 alone does not overflow
    assert np.all(np.isfinite(c.weights))
    assert c.trust.snapshot()["evil"].rejected == 1


def test_a_huge_reported_example_count_buys_a_bounded_weight():
    c, outcome = hostile_round("mean", np.full(D, -100.0, np.float32), hostile_n=2**64 - 1)
    assert outcome.rejected == []
    ratio = c.max_weight_ratio  # the attacker weighs at most ratio x the median count (10)
    expected = (4 * 10 * 0.1 + ratio * 10 * -100.0) / (4 * 10 + ratio * 10)
    assert np.allclose(c.weights, expected, rtol=1e-5)
    assert expected > -100.0 * ratio / (4 + ratio) - 1e-6  # not the attacker's model


def test_jsonable_turns_non_finite_floats_into_null():
    from fedwarden.server.checkpoint import jsonable

    data = {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.array([np.nan, 2.0])}
    assert jsonable(data) == {"a": None, "b": [None, 1.5], "c": [None, 2.0]}


def test_write_json_atomic_never_writes_nan(tmp_path):
    import json

    from fedwarden.server.checkpoint import write_json_atomic

    path = tmp_path / "results.json"
    write_json_atomic(path, {"final": {"accuracy": float("nan")}})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"final": {"accuracy": None}}


def test_the_weight_ratio_is_a_setting():
    c = make()
    c.max_weight_ratio = 2.0
    honest = np.full(D, 0.1, np.float32)
    updates = [update(cid, honest) for cid in HONEST]
    updates.append(ClientUpdate("evil", 1, np.full(D, -100.0, np.float32), 2**64 - 1, loss=0.5))
    c.finish_round(1, [*HONEST, "evil"], updates)
    assert np.allclose(c.weights, (4 * 10 * 0.1 + 2 * 10 * -100.0) / (4 * 10 + 2 * 10), rtol=1e-5)


def around_one_direction(rng: np.random.Generator, d: int = 200):
    """A direction and a function drawing honest updates around it."""
    base = rng.normal(size=d)

    def honest() -> np.ndarray:
        return (base + 0.5 * rng.normal(size=d)).astype(np.float32)

    return base, honest


def median_coordinator(d: int = 200) -> Coordinator:
    return Coordinator(
        np.zeros(d, np.float32), parse_chain("median"), ServerOptimizer("fedavg"),
        TrustBook(TrustPolicy()),
    )  # fmt: skip


def test_flagged_clients_do_not_shape_the_reference_in_a_round_they_would_own():
    """Two sign flippers are flagged in round 1; in round 2 they and three new ones make half
    the cohort. Against the whole cohort's median the two halves would look alike; against the
    median of the clients not flagged every flipper points away and scores above every honest
    client. Centrality keeps the whole cohort's median (``cohort_cosine``)."""
    _, honest = around_one_direction(np.random.default_rng(0))
    c = median_coordinator()
    first = [f"h{i}" for i in range(8)] + ["f0", "f1"]
    ups = [ClientUpdate(cid, 1, -honest() if cid[0] == "f" else honest(), 10) for cid in first]
    c.finish_round(1, first, ups)
    assert c.trust.flagged() == {"f0", "f1"}

    second = [f"h{i}" for i in range(5)] + [f"f{i}" for i in range(5)]
    ups = [ClientUpdate(cid, 2, -honest() if cid[0] == "f" else honest(), 10) for cid in second]
    rows = {r.client_id: r for r in c.finish_round(2, second, ups).clients}
    flippers = [rows[f"f{i}"] for i in range(5)]
    honest_rows = [rows[f"h{i}"] for i in range(5)]
    assert all(r.cosine < 0 for r in flippers) and all(r.cosine > 0 for r in honest_rows)
    assert min(r.anomaly for r in flippers) > max(r.anomaly for r in honest_rows)
    # the whole cohort's median sits between the halves: neither side is aligned with it
    assert all(abs(r.cohort_cosine) < abs(r.cosine) for r in flippers)


def test_updates_boosted_by_one_factor_are_recorded_as_a_boosted_group_and_flagged():
    """Model replacement with four attackers of ten: each sends 2.5 times its update. The
    round's rows carry ``boosted_group`` (1 for the four, 0 for the others) and the four are
    flagged in that round, the honest six not (with ``boosted`` weighed 0, one of the four)."""
    _, honest = around_one_direction(np.random.default_rng(1))
    c = median_coordinator()
    for r in (1, 2):
        ids = [f"h{i}" for i in range(10)]
        c.finish_round(r, ids, [ClientUpdate(cid, r, honest(), 10) for cid in ids])
    ids = [f"h{i}" for i in range(6)] + [f"x{i}" for i in range(4)]
    ups = [ClientUpdate(cid, 3, honest() * (2.5 if cid[0] == "x" else 1.0), 10) for cid in ids]
    rows = {row.client_id: row for row in c.finish_round(3, ids, ups).clients}
    assert [rows[cid].boosted_group for cid in ids] == [0.0] * 6 + [1.0] * 4
    assert all(rows[f"x{i}"].flagged for i in range(4))
    assert not any(rows[f"h{i}"].flagged for i in range(6))


def test_half_a_cohort_of_huge_updates_is_oversized_against_the_earlier_rounds_norms():
    """Five of ten updates 40 times the honest norm move the cohort's median to theirs, so
    against the cohort they are not oversized; against the earlier rounds' unflagged norms
    they are, and they are flagged in their first round."""
    rng = np.random.default_rng(0)
    d = 200
    base, honest = around_one_direction(rng, d)
    c = median_coordinator(d)
    for r in (1, 2):
        ids = [f"h{i}" for i in range(10)]
        rows = c.finish_round(r, ids, [ClientUpdate(cid, r, honest(), 10) for cid in ids]).clients
        assert not any(row.flagged for row in rows)
    scale = float(np.median(c.norm_scales))
    assert 0.5 * np.linalg.norm(base) < scale < 2 * np.linalg.norm(base)
    restored = median_coordinator(d)
    restored.load_state_dict(c.state_dict())
    assert restored.norm_scales == c.norm_scales
    assert len(c.norm_spreads) == 2 and restored.norm_spreads == c.norm_spreads
    assert len(c.boost_spreads) == 2 and restored.boost_spreads == c.boost_spreads

    ids = [f"h{i}" for i in range(5)] + [f"x{i}" for i in range(5)]
    push = 40 * scale * rng.normal(size=d) / np.sqrt(d)
    ups = [ClientUpdate(cid, 3, honest() + (push if cid[0] == "x" else 0), 10) for cid in ids]
    rows = {row.client_id: row for row in c.finish_round(3, ids, ups).clients}
    assert all(rows[f"x{i}"].flagged for i in range(5))
    assert not any(rows[f"h{i}"].flagged for i in range(5))
    assert rows["x0"].norm_scale == pytest.approx(scale)
    assert c.trust.flagged() == {f"x{i}" for i in range(5)}


def test_the_clients_a_mimic_attacker_copies_are_not_flagged_with_their_copies():
    """Two attackers copy a different honest update every round (the mimic attack). In its first
    round nobody has a record and the copied client is flagged with its copies; in the next, its
    update of its own shows it was the original, and the part of its evidence the copies made is
    taken back. From then on the copied client is the one member of its group that has sent
    updates of its own, and only the copiers are flagged."""
    rng = np.random.default_rng(0)
    d = 300
    shared = rng.normal(size=d)
    own = {f"h{i}": rng.normal(size=d) for i in range(8)}
    c = Coordinator(
        np.zeros(d, np.float32), parse_chain("median"), ServerOptimizer("fedavg"),
        TrustBook(TrustPolicy()),
    )  # fmt: skip
    flagged_after: dict[int, set[str]] = {}
    for r in range(1, 13):
        honest = {
            cid: (shared + v + 0.3 * rng.normal(size=d)).astype(np.float32)
            for cid, v in own.items()
        }
        victim = f"h{r % 8}"
        sent = dict(honest, x0=honest[victim], x1=honest[victim])
        ids = sorted(sent)
        rows = c.finish_round(r, ids, [ClientUpdate(cid, r, sent[cid], 10) for cid in ids]).clients
        flagged_after[r] = set(c.trust.flagged())
        if r >= 2:  # the copied client's record says so; nobody else's does
            assert {row.client_id for row in rows if row.copied == 1.0} == {victim}
    assert flagged_after[1] == {"x0", "x1", "h1"}
    for r in range(2, 13):
        assert flagged_after[r] == {"x0", "x1"}, (r, flagged_after[r])


def test_norms_are_judged_against_the_steps_the_bounded_example_counts_make():
    """With the clients' batch size, a client with less than a batch of data (one step per
    epoch) and a small norm is ordinary, and one claiming 10**9 examples buys no more than the
    weight cap allows: its norm, twenty times the others', is still far out."""
    rng = np.random.default_rng(0)
    d = 300
    base = rng.normal(size=d) / np.sqrt(d)
    counts = {"tiny": 5, "liar": 10**9, **{f"h{i}": 60 + 20 * i for i in range(8)}}
    # honest norms grow with the square root of the steps (batches of 10)
    scale = {cid: np.sqrt(np.ceil(n / 10)) for cid, n in counts.items()}
    scale["liar"] = 20 * np.sqrt(13)

    def update(cid):
        delta = base + 0.3 * rng.normal(size=d) / np.sqrt(d)
        noise = np.exp(0.1 * rng.normal())
        return ClientUpdate(cid, 1, (scale[cid] * noise * delta).astype(np.float32), counts[cid])

    ups = [update(cid) for cid in counts]
    z = {}
    for batch_size in (None, 10):
        c = Coordinator(
            np.zeros(d, np.float32), parse_chain("median"), ServerOptimizer("fedavg"),
            TrustBook(TrustPolicy()), batch_size=batch_size,
        )  # fmt: skip
        rows = c.finish_round(1, list(counts), ups).clients
        z[batch_size] = {row.client_id: row.norm_z for row in rows}
    assert z[None]["tiny"] < -3 and abs(z[10]["tiny"]) < 1.5
    assert z[None]["liar"] > 3 and z[10]["liar"] > 3


def test_local_steps_count_a_short_last_batch_unless_only_full_batches_are_kept():
    """DP-SGD drops the short last batch (``clients/training.py``), so 40 examples in batches of
    32 are one step there and two otherwise; a client with less than a batch takes one step."""
    from types import SimpleNamespace

    from fedwarden.clients.training import LocalTrainer
    from fedwarden.server.coordinator import local_steps

    counts = np.array([40, 64, 65, 5])
    np.testing.assert_array_equal(local_steps(counts, 32), [2, 2, 3, 1])
    np.testing.assert_array_equal(local_steps(counts, 32, full_batches=True), [1, 2, 2, 1])
    for dp in (None, object()):  # the steps the trainer's batch plan takes, one epoch
        trainer = SimpleNamespace(batch_size=32, dp_sgd=dp, epochs=1)
        taken = [len(LocalTrainer.batch_plan(trainer, n, np.random.default_rng(0))[1])
                 for n in counts]  # fmt: skip
        np.testing.assert_array_equal(local_steps(counts, 32, full_batches=dp is not None), taken)


def test_a_flagged_copy_names_the_clients_that_sent_the_same_update():
    """Three clients send one vector (mimic's copies, or one crafted vector): each is flagged for
    collusion, and its explanation names the other two, so an operator sees the group."""
    rng = np.random.default_rng(1)
    d = 300
    base = rng.normal(size=d) / np.sqrt(d)
    honest = {f"h{i}": base + 0.5 * rng.normal(size=d) / np.sqrt(d) for i in range(7)}
    shared = base + 0.5 * rng.normal(size=d) / np.sqrt(d)
    updates = {**honest, **dict.fromkeys(("c1", "c2", "c3"), shared)}
    c = Coordinator(
        np.zeros(d, np.float32), parse_chain("median"), ServerOptimizer("fedavg"),
        TrustBook(TrustPolicy()),
    )  # fmt: skip
    ups = [ClientUpdate(cid, 1, u.astype(np.float32), 100) for cid, u in updates.items()]
    c.finish_round(1, list(updates), ups)
    assert c.trust.flagged() == {"c1", "c2", "c3"}
    for cid in ("c1", "c2", "c3"):
        others = ", ".join(sorted({"c1", "c2", "c3"} - {cid}))
        assert f"same update as {others})" in c.trust.get(cid).explanation
    assert c.history.copies.copies_of("h0") == ()


def test_a_flag_is_explained_by_the_signals_the_score_weighs_not_by_the_loss():
    """The copies also report a loss far above the cohort's: measured (``loss_z``), but at weight
    0 it flagged nobody, so the explanation leaves it out."""
    rng = np.random.default_rng(1)
    d = 300
    base = rng.normal(size=d) / np.sqrt(d)
    updates = {f"h{i}": base + 0.5 * rng.normal(size=d) / np.sqrt(d) for i in range(7)}
    shared = base + 0.5 * rng.normal(size=d) / np.sqrt(d)
    updates.update(dict.fromkeys(("c1", "c2", "c3"), shared))
    c = Coordinator(
        np.zeros(d, np.float32), parse_chain("median"), ServerOptimizer("fedavg"),
        TrustBook(TrustPolicy()),
    )  # fmt: skip
    ups = [ClientUpdate(cid, 1, u.astype(np.float32), 100, loss=9.0 if cid[0] == "c" else
                        1.0 + 0.1 * rng.normal()) for cid, u in updates.items()]  # fmt: skip
    c.finish_round(1, list(updates), ups)
    assert c.trust.flagged() == {"c1", "c2", "c3"}
    for cid in ("c1", "c2", "c3"):
        explanation = c.trust.get(cid).explanation
        assert "collusion" in explanation and "loss_z" not in explanation, explanation
