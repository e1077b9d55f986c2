"""`fedwarden trust replay`: a ledger's rounds decided again under other trust settings."""

import json

import pytest

from fedwarden.cli.main import main
from fedwarden.cli.trust import flags_by_round
from fedwarden.server.ledger import Ledger
from fedwarden.server.replay import replay_flags
from fedwarden.server.trust import TrustPolicy


@pytest.fixture(scope="module")
def sign_flip_run(tmp_path_factory):
    """A digits run whose flags are all the evidence rule's own (association off)."""
    from fedwarden.config import make_config
    from fedwarden.simulations.runner import simulate

    out = tmp_path_factory.mktemp("sign_flip")
    settings = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "clients": 20,
                "clients_per_round": 10, "rounds": 6, "attack": "sign_flip",
                "malicious_fraction": 0.2, "aggregator": "trimmed_mean:trim_fraction=0.2",
                "quarantine": "none", "trust_association_z": 0.0, "progress": False,
                "out": str(out)}  # fmt: skip
    results = simulate(make_config({}, settings))
    malicious = {cid for cid, c in results["clients"].items() if c["malicious"]}
    return out / "ledger.sqlite", malicious


def test_a_replay_at_the_runs_own_settings_gives_back_its_flags_round_by_round(sign_flip_run):
    path, malicious = sign_flip_run
    with Ledger(path, readonly=True) as ledger:
        recorded = flags_by_round(ledger)
        replayed = replay_flags(ledger, TrustPolicy(association_z=0.0))
        assert replayed == recorded
        assert recorded[-1] & malicious  # something to give back
        # the scores are recomputed from the measurements, not read back: other weights, other flags
        assert replay_flags(ledger, TrustPolicy(), {"norm_z": 1.0}) != recorded


def test_the_cli_sets_the_replay_beside_the_record_and_names_the_attackers(sign_flip_run, capsys):
    path, malicious = sign_flip_run
    argv = ["trust", "replay", "--ledger", str(path), "--format", "json"]
    assert main([*argv, "--trust-false-positive-rate", "0.2"]) == 0
    out = json.loads(capsys.readouterr().out)
    with Ledger(path, readonly=True) as ledger:
        assert out["recorded"]["flagged"] == sorted(flags_by_round(ledger)[-1])
    assert set(out["attackers"]) <= malicious and out["attackers"]  # from results.json
    assert out["attacked"] == out["attackers"]  # a sign flipper attacks whenever it is sampled
    assert out["replayed"]["recall_attacked"] == out["replayed"]["recall"]
    assert out["settings"]["flag_line"] < TrustPolicy().flag_z
    assert out["replayed"]["flagged_client_rounds"] > out["recorded"]["flagged_client_rounds"]
    assert set(out["newly_flagged"]) == set(out["replayed"]["flagged"]) - set(
        out["recorded"]["flagged"]
    )

    assert main(["trust", "replay", "--ledger", str(path), "--rounds", "3"]) == 0
    table = capsys.readouterr().out
    assert "rounds 1-3 of" in table and "precision" in table and "newly flagged:" in table
    assert "recall attacked" in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--anomaly-weights", '{"nrm": 1}'], "unknown anomaly weight(s) ['nrm']"),
        (["--anomaly-weights", "{nrm"], "must be a JSON object of names to weights"),
        (["--trust-false-positive-rate", "0.7"], "false_positive_rate must be in (0, 0.5)"),
        (["--rounds", "0"], "--rounds must be at least 1"),
    ],
)
def test_bad_replay_settings_are_one_line_errors(sign_flip_run, capsys, extra, message):
    path, _ = sign_flip_run
    assert main(["trust", "replay", "--ledger", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    ("keeps_forecasts", "extra", "heading"),
    [
        (True, ["--trust-association-z", "0"], "association off"),
        (False, [], "flags by association not replayed (the ledger keeps no forecasts)"),
    ],
)
def test_flags_the_replay_does_not_make_are_marked_as_association(
    sign_flip_run, tmp_path, capsys, keeps_forecasts, extra, heading
):
    """Association turned off, or a ledger written before the forecasts were kept: the clients
    the run flagged by association are marked as such among those no longer flagged."""
    import sqlite3

    path, _ = sign_flip_run
    copy = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    with Ledger(copy, readonly=True) as ledger:
        victim = sorted(flags_by_round(ledger)[-1])[0]
    with sqlite3.connect(copy) as con:  # as if the run had flagged it for its association
        con.execute(
            "UPDATE clients SET explanation = 'association 3.0: ...' WHERE client_id = ?",
            (victim,),
        )
        if not keeps_forecasts:
            con.execute("DROP TABLE histories")
    argv = ["trust", "replay", "--ledger", str(copy), "--trust-false-positive-rate", "1e-9"]
    assert main([*argv, *extra, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recorded_by_association"] == [victim] and victim in out["no_longer_flagged"]
    assert out["settings"]["association_line"] is None
    assert out["settings"]["association_replayable"] is keeps_forecasts
    assert main([*argv, *extra]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith(heading)
    assert f"{victim} (by association in the run)" in text


def test_a_grid_of_ledgers_is_replayed_run_by_run_and_added_up(sign_flip_run, tmp_path, capsys):
    """Several ledgers (a grid's) under one flag line: each row is what replaying that ledger
    alone gives, and the totals add up the runs whose results.json names the attackers; a
    ledger without one (a deployment's) gets its row but stays out of the totals."""
    import sqlite3

    path, _ = sign_flip_run
    bare = tmp_path / "deployment" / "ledger.sqlite"  # no results.json beside it
    bare.parent.mkdir()
    with sqlite3.connect(path) as source, sqlite3.connect(bare) as target:
        source.backup(target)
    options = ["--trust-false-positive-rate", "0.2", "--format", "json"]
    assert main(["trust", "replay", "--ledger", str(path), *options]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["trust", "replay", "--ledger", str(path), str(path), str(bare), *options]) == 0
    grid = json.loads(capsys.readouterr().out)
    assert [r["ledger"] for r in grid["runs"]] == [str(path), str(path), str(bare)]
    assert grid["runs"][0]["replayed"] == alone["replayed"]
    assert grid["runs"][2]["attackers"] is None and grid["runs_with_attackers"] == 2
    for side in ("recorded", "replayed"):
        one, total = alone[side], grid["total"][side]
        assert total["attacked"] == 2 * one["attacked"] > 0
        assert total["found"] == 2 * round(one["recall_attacked"] * one["attacked"])
        assert total["honest_client_rounds"] == 2 * one["honest_client_rounds"]
        assert total["honest_client_rounds_flagged"] == 2 * one["honest_client_rounds_flagged"]
    assert grid["total"]["replayed"]["found"] >= grid["total"]["recorded"]["found"]

    assert main(["trust", "replay", "--ledger", str(path), str(bare)]) == 0
    table = capsys.readouterr().out
    assert "total (1 of 2 runs name their attackers)" in table
    # runs named by where they sit below the directory the ledgers share
    assert table.splitlines()[4].split()[0].endswith("deployment")
    assert table.splitlines()[0].startswith("2 ledgers, every round replayed at their own")


def test_a_replay_without_options_decides_at_the_runs_own_settings(tmp_path, capsys):
    """A run made at another flag line and other weights is replayed at those (its results.json's
    config), so it gives back its own flags; the ledger alone is replayed at the defaults."""
    import sqlite3

    from fedwarden.config import make_config
    from fedwarden.simulations.runner import simulate

    out = tmp_path / "run"
    settings = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "clients": 20,
                "clients_per_round": 10, "rounds": 5, "attack": "sign_flip",
                "malicious_fraction": 0.2, "aggregator": "median", "quarantine": "none",
                "trust_association_z": 0.0, "trust_false_positive_rate": 0.3,
                "anomaly_weights": {"norm_z": 0.5, "cosine": 0.5}, "progress": False,
                "out": str(out)}  # fmt: skip
    simulate(make_config({}, settings))
    assert (
        main(["trust", "replay", "--ledger", str(out / "ledger.sqlite"), "--format", "json"]) == 0
    )
    own = json.loads(capsys.readouterr().out)
    with Ledger(out / "ledger.sqlite", readonly=True) as ledger:
        assert own["replayed"]["flagged"] == sorted(flags_by_round(ledger)[-1])
        assert own["replayed"] == own["recorded"]
    assert own["settings"]["false_positive_rate"] == 0.3
    assert own["settings"]["anomaly_weights"] == {"norm_z": 0.5, "cosine": 0.5}
    assert own["settings"]["other_settings_from"] == "the run's results.json"

    alone = tmp_path / "alone"
    alone.mkdir()
    with (
        sqlite3.connect(out / "ledger.sqlite") as source,
        sqlite3.connect(alone / "ledger.sqlite") as target,
    ):
        source.backup(target)
    assert (
        main(["trust", "replay", "--ledger", str(alone / "ledger.sqlite"), "--format", "json"]) == 0
    )
    default = json.loads(capsys.readouterr().out)
    assert default["settings"]["other_settings_from"] == "the defaults"
    assert default["settings"]["flag_line"] > own["settings"]["flag_line"]
    assert default["attackers"] is None
    assert default["replayed"]["flagged_client_rounds"] < own["replayed"]["flagged_client_rounds"]


def test_a_deployments_results_name_no_attackers():
    """A coordinator's results.json records ``malicious: null`` (no ground truth): the replay
    shows no precision or recall rather than scoring every flag as wrong."""
    from fedwarden.cli.trust import _attackers

    assert _attackers({"clients": {"c1": {"malicious": None}, "c2": {"malicious": None}}}) is None
    assert _attackers({}) is None
    assert _attackers({"clients": {"c1": {"malicious": True}, "c2": {"malicious": False}}}) == {
        "c1"
    }


def test_a_replay_counts_the_attackers_that_attacked_in_the_rounds_it_replays():
    from fedwarden.cli.trust import _attacked

    clients = {"c1": {"attacked_rounds": [4]}, "c2": {"attacked_rounds": [2, 5]},
               "c3": {"attacked_rounds": []}}  # fmt: skip
    assert _attacked({"clients": clients}, 3) == {"c2"}
    assert _attacked({"clients": clients}, 4) == {"c1", "c2"}
    assert _attacked({"clients": {"c1": {"malicious": True}}}, 3) is None  # older results.json


def test_a_replay_reads_the_copy_groups_back_and_gives_back_a_mimic_runs_flags(tmp_path):
    """Under mimic, victims seen for the first time are flagged with their copiers and unflagged
    once they send an update of their own (the copies' part of their evidence taken back); the
    replay finds the groups in the rows and makes the same decisions, round by round."""
    from fedwarden.config import make_config
    from fedwarden.simulations.runner import simulate

    settings = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "clients": 20,
                "clients_per_round": 10, "rounds": 8, "attack": "mimic",
                "malicious_fraction": 0.2, "aggregator": "median", "quarantine": "none",
                "trust_association_z": 0.0, "progress": False, "out": str(tmp_path)}  # fmt: skip
    results = simulate(make_config({}, settings))
    honest = {cid for cid, c in results["clients"].items() if not c["malicious"]}
    with Ledger(tmp_path / "ledger.sqlite", readonly=True) as ledger:
        recorded = flags_by_round(ledger)
        assert replay_flags(ledger, TrustPolicy(association_z=0.0)) == recorded
        cleared = []  # each victim's first round unflagged after it was flagged as a copy
        for cid in honest:
            rows = ledger.client_history(cid)
            copy = next((r["round"] for r in rows if r["flagged"] and r["pair_gap"] < 1e-3), None)
            after = [r for r in rows if copy and r["round"] > copy and not r["flagged"]]
            cleared += after[:1]
        # taken back, not worn down: one ordinary round after a copy's 8 leaves about 4
        assert cleared and max(r["evidence"] for r in cleared) < 2.0
