"""A cohort whose majority is noise (issue 17's 40% Gaussian collapse), end to end on digits."""

from __future__ import annotations

from fedwarden import api


def test_auto_learns_when_most_of_each_cohort_is_noise(tmp_path):
    # 12 of 20 clients send Gaussian noise every round: the median norm of the first round is a
    # noise norm, which clipped clustering used to take as its clipping bound (accuracy 0.1).
    # Flags are not asked for: they are relative to the population, here mostly noise.
    result = api.simulate(
        rounds=3, attack="gaussian", malicious_fraction=0.6, aggregator="auto", seed=0,
        out=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    assert result["final"]["accuracy"] > 0.6
    malicious = {cid for cid, c in result["clients"].items() if c["malicious"]}
    for record in result["rounds"]:
        set_aside = record["measurements"]["auto/clipped_clustering/unaligned_count"]
        assert set_aside == len(malicious)
