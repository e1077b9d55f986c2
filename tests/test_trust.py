"""Trust (server/trust.py), the SQLite ledger (server/ledger.py), `fedwarden trust` and the
detection report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedwarden.aggregation.detection import Association, CopyGroups
from fedwarden.aggregation.scoring import DEFAULT_ANOMALY_WEIGHTS
from fedwarden.cli.trust import trust_main
from fedwarden.records import ClientSummary
from fedwarden.report import detection_summary, honest_flags, plot_trust_heatmap
from fedwarden.server.ledger import Ledger, LedgerError, remove_ledger
from fedwarden.server.trust import (
    CORROBORATED_ASSOCIATION_MARGIN,
    CORROBORATION_SHARE,
    EvidenceSums,
    TrustBook,
    TrustPolicy,
    explain,
    round_rows,
    verdict,
)

REPO = Path(__file__).resolve().parents[1]


def run(book: TrustBook, round: int, scores: dict[str, float], rejected=None):
    ids = sorted(scores)
    return book.update(round, ids, np.array([scores[c] for c in ids]), rejected or {})


# -- policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": 1.0}, "decay"),
        ({"flag_below": 0.6, "unflag_above": 0.5}, "hysteresis"),
        ({"quarantine": "ban"}, "none, exclude, downweight"),
        ({"downweight": 1.5}, "downweight"),
        ({"probation_rounds": -1}, "probation_rounds"),
        ({"probation_rounds": 2.5}, "integer"),
        ({"initial_trust": 2.0}, "initial_trust"),
    ],
)
def test_policy_rejects_bad_values_with_clear_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrustPolicy(**kwargs)


# -- trust book -----------------------------------------------------------------------------------


def test_ewma_math_and_rejections():
    book = TrustBook(TrustPolicy(decay=0.6, initial_trust=0.9))
    run(book, 1, {"a": 0.2, "b": 0.0})
    assert book.get("a").trust == pytest.approx(0.6 * 0.9 + 0.4 * 0.8)
    assert book.get("b").trust == pytest.approx(0.6 * 0.9 + 0.4 * 1.0)
    # b rejected: counts as anomaly 1.0; a not selected keeps its trust
    states = book.update(2, [], np.zeros(0), {"b": 1})
    assert set(states) == {"b"}
    assert states["b"].trust == pytest.approx(0.6 * (0.6 * 0.9 + 0.4) + 0.0)
    assert states["b"].anomaly == 1.0 and states["b"].rejected == 1
    assert book.get("a").trust == pytest.approx(0.86) and book.get("a").rounds == 1


def test_update_validates_inputs():
    book = TrustBook(TrustPolicy())
    with pytest.raises(ValueError, match="one score per client"):
        book.update(1, ["a", "b"], np.zeros(3), {})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        book.update(1, ["a"], np.array([1.5]), {})
    run(book, 1, {"a": 0.1})
    with pytest.raises(ValueError, match="rounds must increase"):
        run(book, 1, {"a": 0.1})


def test_hysteresis_one_bad_round_does_not_quarantine_for_good():
    policy = TrustPolicy(decay=0.5, flag_below=0.55, unflag_above=0.7, quarantine="downweight",
                         flag_rule="threshold")  # fmt: skip
    book = TrustBook(policy)
    run(book, 1, {"honest": 1.0})  # one bad round: 1.0 -> 0.5, flagged
    assert book.get("honest").flagged and book.weight_multiplier("honest") == policy.downweight
    run(book, 2, {"honest": 0.2})  # 0.65: above flag_below but not above unflag_above
    assert book.get("honest").flagged, "hysteresis: stays flagged between the thresholds"
    run(book, 3, {"honest": 0.2})  # 0.725 > 0.7: released
    state = book.get("honest")
    assert not state.flagged and not state.quarantined
    assert book.weight_multiplier("honest") == 1.0


def test_persistent_attacker_is_flagged_and_excluded_honest_are_not():
    book = TrustBook(TrustPolicy(quarantine="exclude", probation_rounds=3))
    for r in range(1, 11):
        run(book, r, {"bad": 0.85, "h1": 0.15, "h2": 0.2})
    assert book.flagged() == {"bad"}
    assert book.get("bad").quarantined
    assert book.weight_multiplier("bad") == 0.0 and book.weight_multiplier("h1") == 1.0
    assert book.is_excluded("bad") and not book.is_excluded("h1")


def test_probation_path_back_under_exclude():
    policy = TrustPolicy(decay=0.5, flag_below=0.55, unflag_above=0.7, quarantine="exclude",
                         probation_rounds=2, flag_rule="threshold")  # fmt: skip
    book = TrustBook(policy)
    run(book, 1, {"c": 1.0})  # trust 0.5: quarantined in round 1
    assert book.get("c").quarantined_since == 1
    assert book.is_excluded("c")  # round 2
    run(book, 2, {})
    assert book.is_excluded("c")  # round 3
    run(book, 3, {})
    assert not book.is_excluded("c")  # round 4: on probation, may be sampled
    assert book.weight_multiplier("c") == 0.0  # ... but its update does not count yet
    run(book, 4, {"c": 0.1})  # 0.7: not above unflag_above yet
    assert book.get("c").quarantined and book.weight_multiplier("c") == 0.0
    assert not book.is_excluded("c")  # trust went up: probation continues
    run(book, 5, {"c": 0.1})  # 0.8: released
    assert not book.get("c").flagged and book.weight_multiplier("c") == 1.0


def test_misbehaving_on_probation_restarts_exclusion():
    policy = TrustPolicy(decay=0.5, flag_below=0.55, unflag_above=0.7, quarantine="exclude",
                         probation_rounds=1, flag_rule="threshold")  # fmt: skip
    book = TrustBook(policy)
    run(book, 1, {"c": 1.0})
    run(book, 2, {})
    assert not book.is_excluded("c")  # round 3: probation
    run(book, 3, {"c": 0.9})  # trust fell again
    assert book.get("c").quarantined_since == 3 and book.is_excluded("c")


def test_policy_none_flags_without_quarantine():
    book = TrustBook(TrustPolicy(decay=0.0, quarantine="none", flag_rule="threshold"))
    run(book, 1, {"x": 0.9})
    assert book.get("x").flagged and not book.get("x").quarantined
    assert book.weight_multiplier("x") == 1.0 and not book.is_excluded("x")


def test_snapshot_cannot_change_the_book():
    book = TrustBook(TrustPolicy())
    run(book, 1, {"a": 0.1})
    snap = book.snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap["a"].trust = -1.0
    snap.pop("a")
    assert book.get("a").trust > 0
    assert isinstance(book.get("a"), ClientSummary) and book.get("a").to_dict()["client_id"] == "a"


# -- ledger ---------------------------------------------------------------------------------------


def test_record_round_is_idempotent_and_merges_columns(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        rows = [{"client_id": "a", "trust": 0.9, "anomaly": 0.1, "flagged": False},
                {"client_id": "b", "trust": 0.4, "anomaly": 0.8, "flagged": True}]  # fmt: skip
        ledger.record_round(1, rows)
        ledger.record_round(1, rows)  # replayed after a crash
        ledger.record_round(2, [{"client_id": "a", "trust": 0.92, "anomaly": 0.05}])
        # a second writer adds measurements to the same row; the trust columns stay
        ledger.record_round(2, [{"client_id": "a", "norm": 3.5, "cosine": 0.9, "extra": "x"}])
        clients = {c["client_id"]: c for c in ledger.list_clients()}
        assert clients["a"]["rounds"] == 2 and clients["b"]["rounds"] == 1
        assert clients["a"]["trust"] == pytest.approx(0.92) and clients["a"]["norm"] == 3.5
        assert clients["b"]["flagged"] is True
        assert [c["client_id"] for c in ledger.list_clients()] == ["b", "a"]  # lowest trust first
        history = ledger.client_history("a")
        assert [h["round"] for h in history] == [1, 2]
        assert history[1]["anomaly"] == pytest.approx(0.05)
        assert ledger.last_round() == 2
        assert ledger.client_history("nobody") == []
        with pytest.raises(ValueError, match="several rows"):
            ledger.record_round(3, [{"client_id": "a"}, {"client_id": "a"}])


def test_truncate_after_restores_an_earlier_round(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        for r in range(1, 6):
            rows = [{"client_id": "a", "trust": 1 - 0.1 * r}]
            if r >= 4:
                rows.append({"client_id": "late", "trust": 0.5, "rejected_reason": "non_finite"})
            ledger.record_round(r, rows)
        assert ledger.get_client("late")["rejected"] == 2
        ledger.truncate_after(3)
        assert ledger.last_round() == 3
        assert ledger.get_client("late") is None
        a = ledger.get_client("a")
        assert a["rounds"] == 3 and a["last_round"] == 3 and a["trust"] == pytest.approx(0.7)
        assert [h["round"] for h in ledger.client_history("a")] == [1, 2, 3]


def test_the_detectors_forecasts_are_kept_exactly_and_forgotten_with_their_rounds(tmp_path):
    rng = np.random.default_rng(0)
    kept = {}
    with Ledger(tmp_path / "l.sqlite") as ledger:
        for r in range(1, 4):
            ids = ["a", "b"] if r < 3 else ["b"]
            ledger.record_round(r, [{"client_id": c, "norm": 1.0} for c in ids])
            forecast, across = rng.normal(size=(2, len(ids), 8)).astype(np.float32)
            output = None if r == 2 else rng.normal(size=(len(ids), 5)).astype(np.float32)
            ledger.record_histories(r, ids, forecast, across, output)
            kept[r] = {c: (forecast[i], across[i], None if output is None else output[i])
                       for i, c in enumerate(ids)}  # fmt: skip
        assert ledger.records_histories()
        for r, rows in kept.items():
            back = ledger.round_histories(r)
            assert back.keys() == rows.keys()
            for c, (forecast, across, output) in rows.items():
                assert np.array_equal(back[c][0], forecast) and np.array_equal(back[c][1], across)
                assert back[c][2] is None if output is None else np.array_equal(back[c][2], output)
        ledger.truncate_after(2)
        assert ledger.round_histories(3) == {} and ledger.records_histories()
        ledger.record_round(3, [{"client_id": "a", "norm": 2.0}])  # a round kept without them
        assert not ledger.records_histories()
        with pytest.raises(ValueError, match="one row of each forecast per client"):
            ledger.record_histories(4, ["a", "b"], np.zeros((1, 8)), np.zeros((1, 8)))


def test_a_second_process_reads_while_a_writer_holds_a_transaction(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        ledger.record_round(1, [{"client_id": "a", "trust": 0.9}])
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO client_rounds (round, client_id, trust) VALUES (2, 'b', 0.1)")
    writer.execute("UPDATE clients SET trust = 0.0 WHERE client_id = 'a'")
    reader = textwrap.dedent(f"""
        import json
        from fedwarden.server.ledger import Ledger
        with Ledger({str(path)!r}, readonly=True) as ledger:
            print(json.dumps([ledger.list_clients(), ledger.last_round()]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        # the reader must neither block on the open write transaction nor see its changes
        out = subprocess.run([sys.executable, "-c", reader], env=env, cwd=REPO, timeout=60,
                             capture_output=True, text=True, check=True)  # fmt: skip
        clients, last = json.loads(out.stdout)
        assert [(c["client_id"], c["trust"]) for c in clients] == [("a", 0.9)] and last == 1
        with Ledger(path, readonly=True) as same_process:  # a second connection, same process
            assert same_process.list_clients()[0]["trust"] == 0.9
    finally:
        writer.execute("COMMIT")
        writer.close()
    with Ledger(path, readonly=True) as after:
        assert after.get_client("a")["trust"] == 0.0


def test_readonly_ledger_errors(tmp_path):
    with pytest.raises(LedgerError, match="not found"):
        Ledger(tmp_path / "missing.sqlite", readonly=True)
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all " * 100)
    with pytest.raises(LedgerError, match="not a fedwarden ledger"):
        Ledger(junk, readonly=True)
    Ledger(tmp_path / "ok.sqlite").close()
    with Ledger(tmp_path / "ok.sqlite", readonly=True) as ro, pytest.raises(LedgerError):
        ro.record_round(1, [])


def test_remove_ledger_removes_the_wal_too(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    ledger.record_round(1, [{"client_id": "old", "trust": 0.1}])
    assert Path(f"{path}-wal").exists()  # while open, the WAL holds the round
    ledger.close()
    remove_ledger(path)
    remove_ledger(path)  # nothing left to remove: no error
    assert list(tmp_path.iterdir()) == []
    with Ledger(path) as fresh:
        assert fresh.list_clients() == [] and fresh.last_round() == 0


def test_trust_book_persists_and_restarts_from_the_ledger(tmp_path):
    path = tmp_path / "l.sqlite"
    policy = TrustPolicy(quarantine="exclude", probation_rounds=4, flag_rule="threshold")
    metrics = {"norm": np.array([1.0, 30.0]), "cosine": np.array([0.9, -0.8])}
    with Ledger(path) as ledger:
        book = TrustBook(policy, ledger)
        for r in range(1, 8):
            book.update(r, ["good", "bad"], np.array([0.1, 0.95]), {"late": 1} if r == 3 else {},
                        metrics=metrics, losses=np.array([0.3, 2.0]))  # fmt: skip
        before = book.snapshot()
        assert before["bad"].quarantined and book.is_excluded("bad")
        assert ledger.client_history("bad")[-1]["loss"] == pytest.approx(2.0)
        assert ledger.client_history("late")[0]["rejected_reason"] == "rejected"
    with Ledger(path) as ledger:
        restarted = TrustBook(policy, ledger)
        assert restarted.last_round == 7
        after = restarted.snapshot()
        assert after.keys() == before.keys()
        for cid in before:
            assert after[cid].trust == pytest.approx(before[cid].trust)
            for field in ("flagged", "quarantined", "quarantined_since", "rounds", "rejected",
                          "norm", "cosine"):  # fmt: skip
                assert getattr(after[cid], field) == getattr(before[cid], field), (cid, field)
        assert restarted.is_excluded("bad") == book.is_excluded("bad")
        restarted.update(8, ["good"], np.array([0.1]), {})
        assert ledger.get_client("good")["rounds"] == 8


def test_a_restart_under_other_weights_forgets_the_excess_of_a_signal_no_longer_scored(tmp_path):
    comp = {"loss_z": np.array([0.02, 0.9]), "cosine": np.array([0.1, 0.8])}
    with Ledger(tmp_path / "l.sqlite") as ledger:
        book = TrustBook(TrustPolicy(), ledger)
        weights = {"cosine": 0.1, "loss_z": 0.5}  # an operator who weighed the loss
        for r in range(1, 4):
            book.update(r, ["a", "b"], np.array([0.1, 0.6]), {}, components=comp, weights=weights)
        assert set(EvidenceSums.of(book.get("b")).excess) == {"loss_z", "cosine"}
    with Ledger(tmp_path / "l.sqlite") as ledger:
        restarted = TrustBook(TrustPolicy(), ledger)  # the default weights: the loss at 0
        restarted.update(4, ["a", "b"], np.array([0.1, 0.6]), {}, components=comp)
        assert set(EvidenceSums.of(restarted.get("b")).excess) == {"cosine"}


def test_resume_from_checkpoint_replays_rounds_exactly(tmp_path):
    path = tmp_path / "l.sqlite"
    policy = TrustPolicy(decay=0.5)
    scores = {r: np.array([0.1 * (r % 3), 0.9]) for r in range(1, 7)}
    with Ledger(path) as ledger:
        book = TrustBook(policy, ledger)
        for r in range(1, 7):
            book.update(r, ["a", "b"], scores[r], {})
        final = book.snapshot()
        ledger.truncate_after(3)  # crash after round 6, checkpoint at round 3
        resumed = TrustBook(policy, ledger)
        for r in range(4, 7):
            resumed.update(r, ["a", "b"], scores[r], {})
        assert {c: s.trust for c, s in resumed.snapshot().items()} == pytest.approx(
            {c: s.trust for c, s in final.items()}
        )
        assert ledger.get_client("a")["rounds"] == 6


def test_round_rows_leave_rejected_clients_without_measurements():
    states = {"a": ClientSummary("a", 0.9, anomaly=0.1), "r": ClientSummary("r", 0.5, anomaly=1.0)}
    rows = round_rows(states, ["a"], {"norm": np.array([2.0])}, np.array([0.4]), {"r": 1},
                      {"r": "wrong_shape"})  # fmt: skip
    by_id = {r.client_id: r for r in rows}
    assert by_id["a"].norm == 2.0 and by_id["a"].loss == pytest.approx(0.4)
    assert by_id["a"].rejected_reason is None
    assert by_id["r"].norm is None and by_id["r"].rejected_reason == "wrong_shape"


# -- fedwarden trust -----------------------------------------------------------------------------


@pytest.fixture
def ledger_file(tmp_path) -> Path:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        book = TrustBook(TrustPolicy(decay=0.5, flag_rule="threshold"), ledger)
        for r in (1, 2):
            book.update(r, ["c01", "c02", "c03"], np.array([0.1, 0.9, 0.3]), {},
                        metrics={"norm": np.array([1.0, 9.0, 2.0])})  # fmt: skip
    return path


def test_trust_list_json_lowest_trust_first(ledger_file, capsys):
    assert trust_main(["trust", "list", "--ledger", str(ledger_file), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["client_id"] for r in rows] == ["c02", "c03", "c01"]
    assert {"client_id", "trust", "anomaly", "flagged", "rounds"} <= rows[0].keys()
    assert rows[0]["flagged"] is True and rows[0]["rounds"] == 2
    assert rows[0]["trust"] == pytest.approx(0.5 * (0.5 + 0.5 * 0.1) + 0.5 * 0.1)


def test_trust_list_table(ledger_file, capsys):
    assert trust_main(["trust", "list", "--ledger", str(ledger_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["client_id", "trust", "anomaly", "flagged"]
    assert lines[1].startswith("c02") and "yes" in lines[1]


def test_trust_show_history(ledger_file, capsys):
    assert (
        trust_main(["trust", "show", "c02", "--ledger", str(ledger_file), "--format", "json"]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["client_id"] == "c02" and [h["round"] for h in data["history"]] == [1, 2]
    assert data["history"][0]["norm"] == 9.0
    assert trust_main(["trust", "show", "c02", "--ledger", str(ledger_file)]) == 0
    assert "round" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trust", "show", "c99", "--ledger", "{ledger}"], "unknown client 'c99'"),
        (["trust", "list", "--ledger", "{missing}"], "ledger file not found"),
        (["trust", "list", "--server", "127.0.0.1:7070"], "unavailable"),
        (["trust", "list", "--server", "nowhere"], "HOST:PORT"),
    ],
)
def test_trust_errors_are_one_line_and_exit_2(ledger_file, capsys, argv, message):
    argv = [a.format(ledger=ledger_file, missing=ledger_file.parent / "nope.sqlite") for a in argv]
    assert trust_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_trust_through_the_fedwarden_command(ledger_file, capsys):
    cli = pytest.importorskip("fedwarden.cli.main")
    assert cli.main(["trust", "list", "--ledger", str(ledger_file), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["client_id"] == "c02"
    assert cli.main(["trust", "show", "zz", "--ledger", str(ledger_file)]) == 2
    assert "unknown client" in capsys.readouterr().err


# -- report ---------------------------------------------------------------------------------------


def test_detection_summary():
    summary = detection_summary([set(), {"m1"}, {"m1", "h1"}], {"m1", "m2"})
    assert summary == {"precision": 0.5, "recall": 0.5, "first_detection_round": 2}
    nothing = detection_summary([set(), set()], {"m1"})
    assert nothing == {"precision": None, "recall": 0.0, "first_detection_round": None}
    assert detection_summary([], set())["recall"] is None
    attacked = detection_summary([{"m1", "h1"}], {"m1", "m2", "m3"}, attacked={"m1", "m2"})
    assert (attacked["recall"], attacked["attacked"], attacked["recall_attacked"]) == (
        1 / 3,
        2,
        0.5,
    )
    assert detection_summary([{"m1"}], {"m1"}, attacked=set())["recall_attacked"] is None


def test_honest_flags_count_only_the_rounds_a_client_was_sampled_in():
    # h1 flagged in rounds 1, 2 and 4 but sampled in 1, 3 and 4; h2 flagged in both its rounds;
    # m1's flags are not false positives; h3 was flagged only while it sat out (association).
    flagged = [{"h1", "m1"}, {"h1", "h2"}, {"h2", "m1"}, {"h1", "h3"}]
    selected = [{"h1", "m1"}, {"h2", "h3"}, {"h1", "h2", "m1"}, {"h1"}]
    summary = detection_summary(flagged, {"m1"}, {"m1"}, selected)
    assert summary["honest_client_rounds"] == 6  # h1 3, h2 2, h3 1
    assert summary["honest_client_rounds_flagged"] == 4  # h1 in rounds 1 and 4, h2 in 2 and 3
    assert summary["longest_honest_streak"] == 2  # h2; h1's rounds 1 and 4 had an unflagged 3
    assert "honest_client_rounds_flagged" not in detection_summary(flagged, {"m1"})
    assert honest_flags(summary) == "66.7% (4 of 6)"
    assert honest_flags({"honest_client_rounds_flagged": 0, "honest_client_rounds": 0}) == "-"


def test_the_run_summary_gives_recall_over_the_attackers_that_attacked():
    from fedwarden.cli.main import summary_table

    clients = {c: {"malicious": c.startswith("m"), "trust": 0.5, "flagged": c in ("m1", "m2")}
               for c in ("m1", "m2", "m3", "m4", "h1")}  # fmt: skip
    detection = detection_summary([{"m1", "m2"}], {"m1", "m2", "m3", "m4"}, {"m1", "m2", "m3"})
    results = {"final": {"accuracy": 0.8, "loss": 0.5, "attack_success_rate": None,
                         "detection": detection}, "clients": clients, "rounds": [{}]}  # fmt: skip
    table = summary_table(results)
    assert "| detection precision / recall | 1.000 / 0.500 |" in table
    assert "| recall, attackers that attacked | 0.667 (2 of 3) |" in table
    assert "honest client-rounds flagged" not in table  # no cohorts given
    selected = [{"m1", "m2", "h1"}]
    results["final"]["detection"] = detection_summary([{"m1", "h1"}], {"m1", "m2"}, None, selected)
    table = summary_table(results)
    assert "| honest client-rounds flagged | 100.0% (1 of 1), longest streak 1 |" in table
    results["final"]["detection"] = detection_summary([{"m1"}], {"m1"})
    assert "attackers that attacked" not in summary_table(results)


def test_detection_by_round_counts_each_attacker_from_the_round_it_first_attacked(tmp_path):
    from fedwarden.report import detection_by_round, plot_detection_by_round

    clients = {
        "m1": {"malicious": True, "attacked_rounds": [1, 3]},
        "m2": {"malicious": True, "attacked_rounds": [2]},
        "m3": {"malicious": True, "attacked_rounds": []},  # never attacked: not counted
        "h1": {"malicious": False, "attacked_rounds": []},
    }
    rounds = [{"round": 1, "flagged": []}, {"round": 2, "flagged": ["m1", "h1"]},
              {"round": 3, "flagged": ["m1", "m2", "m3"]}]  # fmt: skip
    recall, precision = detection_by_round({"clients": clients, "rounds": rounds})
    assert recall == [0.0, 0.5, 1.0]
    assert np.isnan(precision[0]) and precision[1:] == [0.5, 1.0]
    late = {"clients": {"m1": {"malicious": True, "attacked_rounds": [2]}},
            "rounds": [{"round": 1, "flagged": []}, {"round": 2, "flagged": ["m1"]}]}  # fmt: skip
    assert np.isnan(detection_by_round(late)[0][0])
    path = plot_detection_by_round({"a": [{"clients": clients, "rounds": rounds}, late]},
                                   tmp_path / "d.png")  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trust_heatmap_writes_a_png(tmp_path):
    path = tmp_path / "trust.png"
    plot_trust_heatmap({"c1": [None, 0.9, 0.8], "c2": [0.7, 0.4, 0.2]}, {"c2"}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- flags from evidence ---------------------------------------------------------------------------


def population_rounds(
    rounds: int, clients: int = 40, per_round: int = 10, seed: int = 0, tails: str = "normal"
):
    """Rounds of honest-looking anomaly scores: ids sampled per round, scores around 0.2 with a
    spread of 0.05 in robust units (normal, or Laplace: exponential tails)."""
    rng = np.random.default_rng(seed)
    ids = [f"h{i:02d}" for i in range(clients)]
    for r in range(1, rounds + 1):
        cohort = sorted(rng.choice(ids, per_round, replace=False).tolist())
        if tails == "normal":
            noise = rng.normal(0, 0.05, per_round)
        else:  # Laplace(b) with 1.4826 MAD = 0.05
            noise = rng.laplace(0, 0.05 / (1.4826 * np.log(2)), per_round)
        yield r, cohort, np.clip(0.2 + noise, 0, 1)


def test_a_client_seen_once_is_judged_on_that_round_and_explained():
    book = TrustBook(TrustPolicy())
    for r, cohort, scores in population_rounds(6):
        comp = {"collusion": np.full(len(cohort), 0.02), "cosine": np.full(len(cohort), 0.1)}
        if r == 6:  # the newcomer's only round: a twin of nobody but anomalous in one signal
            cohort, scores = [*cohort, "x"], np.append(scores, 0.6)
            comp = {"collusion": np.append(comp["collusion"], 0.98),
                    "cosine": np.append(comp["cosine"], 0.12)}  # fmt: skip
        book.update(r, cohort, scores, {}, components=comp)
    x = book.get("x")
    assert x.rounds == 1 and x.flagged and x.evidence > book.policy.flag_z
    assert x.explanation.startswith("evidence") and "collusion 0.98 (typical 0.02)" in x.explanation
    assert "cosine" not in x.explanation.split(":")[1].split(",")[0]  # the top signal is collusion
    assert book.flagged() == {"x"}


def test_a_colluder_is_explained_with_the_clients_it_sent_the_same_update_as():
    book = TrustBook(TrustPolicy())
    copies = CopyGroups()
    for r, cohort, scores in population_rounds(6):
        comp = {"collusion": np.full(len(cohort), 0.02)}
        if r == 6:
            cohort, scores = [*cohort, "x"], np.append(scores, 0.9)
            comp = {"collusion": np.append(comp["collusion"], 0.98)}
            copies.add_round(["a4", "a1", "a3", "a2", "x"], np.ones((5, 5), bool))
        book.update(r, cohort, scores, {}, components=comp, copies=copies)
    x = book.get("x")
    assert x.flagged
    assert "collusion 0.98 (typical 0.02; same update as a1, a2, a3 and 1 more)" in x.explanation
    assert explain(x, {"collusion": 0.02}) == x.explanation.replace(
        "; same update as a1, a2, a3 and 1 more", ""
    )


def test_a_member_of_a_boosted_group_is_explained_with_the_others_of_its_group():
    book = TrustBook(TrustPolicy())
    for r, cohort, scores in population_rounds(6):
        comp = {"boosted": np.zeros(len(cohort))}
        if r == 6:
            cohort, scores = [*cohort, "x", "y"], np.append(scores, [0.9, 0.9])
            comp = {"boosted": np.append(comp["boosted"], [1.0, 1.0])}
        book.update(r, cohort, scores, {}, components=comp)
    assert book.get("x").flagged and book.get("y").flagged
    assert "boosted 1.00 (typical 0.00; boosted group with y)" in book.get("x").explanation
    assert "boosted 1.00 (typical 0.00; boosted group with x)" in book.get("y").explanation


def test_an_explanation_names_the_signals_by_their_part_in_the_score():
    # an honest-looking outlier (Dirichlet 0.1, seed 48): its reported loss, which the default
    # weights do not score, is its largest excess; what flags it is shrinking, then the cosine
    def flag(weights):
        book = TrustBook(TrustPolicy())
        for r, cohort, scores in population_rounds(6):
            names = ("loss_z", "cluster", "shrinking", "collusion", "oversized")
            comp = {name: np.full(len(cohort), 0.02) for name in names}
            comp["cosine"] = np.full(len(cohort), 0.25)
            if r == 6:  # its collusion is a hair above typical and its oversized under the
                # sharp floor, where it weighs 0.001: too small a part to name
                cohort, scores = [*cohort, "x"], np.append(scores, 0.6)
                x = {"loss_z": 0.97, "cluster": 0.4, "shrinking": 0.5, "cosine": 0.6,
                     "collusion": 0.025, "oversized": 0.3}  # fmt: skip
                comp = {name: np.append(values, x[name]) for name, values in comp.items()}
            book.update(r, cohort, scores, {}, components=comp, weights=weights)
        x = book.get("x")
        assert x.flagged
        everything = explain(x, {}, top=10, weights=weights)
        assert "collusion" not in everything and "oversized" not in everything
        return x.explanation.split(": ", 1)[1].split(", "), set(verdict(x)["signal_excess"])

    named, exported = flag(None)
    assert [s.split()[0] for s in named] == ["shrinking", "cosine", "cluster"]
    assert named[0] == "shrinking 0.50 (typical 0.02)"
    assert exported == {"shrinking", "cosine", "cluster", "collusion", "oversized"}  # not loss_z
    named, exported = flag({**DEFAULT_ANOMALY_WEIGHTS, "loss_z": 0.5})  # an operator's choice
    assert named[0].startswith("loss_z 0.97") and "loss_z" in exported


def twins_of(ids: list[str], *groups: tuple[str, ...]) -> np.ndarray:
    """The ``(K, K)`` copy pairs of ``ids`` that ``groups`` make."""
    twins = np.zeros((len(ids), len(ids)), bool)
    for group in groups:
        rows = [ids.index(c) for c in group]
        twins[np.ix_(rows, rows)] = True
    np.fill_diagonal(twins, False)
    return twins


def test_a_victim_copied_whenever_it_was_sampled_is_named_once_its_copiers_are_known():
    """v is copied by x and y in round 1 and never sends an update of its own. In round 2 x
    copies w and in round 3 y copies u, who have sent updates of their own: x and y are
    copiers, so v was round 1's original. A group of crafted vectors (a, b, c) has none; p,
    seen copying u, is a copier whatever its other group holds; an original found through its
    copiers is the original of its other groups too."""
    copies = CopyGroups()

    def copied(*members: str) -> None:
        """A round in which ``members`` sent one update."""
        copies.add_round(list(members), twins_of(list(members), members))

    copies.record_own(["w", "u"])
    copied("v", "x", "y")
    copied("a", "b", "c")
    assert copies.originals() == set()  # nothing known of v, x and y yet
    copied("w", "x")
    assert copies.originals() == {"w"}  # v's group still has an unknown member, y
    copied("u", "y", "p")
    assert copies.originals() == {"w", "u", "v"}
    copied("p", "q")
    assert copies.originals() == {"w", "u", "v", "q"}  # p copied u: q was the original
    copied("q", "x")  # q copied by a copier again: still the original
    assert copies.originals() == {"w", "u", "v", "q"}
    copied("m", "r", "t")
    copied("m", "x")  # m copied by a copier: m is no copier, so it
    assert copies.originals() == {"w", "u", "v", "q", "m"}  # was the original of r's group too
    copied("r", "n")
    assert "n" in copies.originals()  # r copied m, so n was the original
    # u flagged on more than its copies: it makes no copiers, so y is none and v is not named
    assert copies.originals(suspects={"u"}) == {"w", "u", "q", "m", "n"}
    copied("v", "u")  # v sends u's update: a copier after all
    assert copies.originals() == {"w", "u", "q", "m", "n"}


def test_an_original_found_later_gets_back_the_evidence_its_copies_made(tmp_path):
    """x copies v and y copies w in round 3: all four score 1.0 and are flagged. In round 4 v
    and w send updates of their own, which shows them the originals: the part of their evidence
    the copies made is taken back, and v, ordinary had the update been its own, is unflagged at
    once (worn down by one ordinary round its evidence would be about 4, still flagged); w, odd
    on its own too, and the copiers stay flagged. An update sent alone that flags its sender
    (a crafted vector) does not count as its own: c is no original of the group it joins."""
    honest = [f"h{i}" for i in range(8)]
    copies = CopyGroups()

    def round_(r: int, ids: list[str], scores: list[float], *groups, alone_scores=None):
        alone = copies.add_round(ids, twins_of(ids, *groups))
        as_original = scores if alone_scores is None else alone_scores
        return book.update(r, ids, np.array(scores), {}, copies=copies, alone=alone,
                           as_original=np.array(as_original))  # fmt: skip

    with Ledger(tmp_path / "l.sqlite") as ledger:
        book = TrustBook(TrustPolicy(quarantine="exclude"), ledger)
        for r in (1, 2):
            round_(r, honest, [0.1] * 8)
        ids = [*honest, "v", "x", "w", "y"]
        round_(3, ids, [0.1] * 8 + [1.0] * 4, ("v", "x"), ("w", "y"),
               alone_scores=[0.1] * 8 + [0.1, 0.1, 0.9, 0.1])  # fmt: skip
        assert book.flagged() == {"v", "x", "w", "y"}
        assert EvidenceSums.of(book.get("v")).copied > 0
        round_(4, [*honest, "v", "w", "c"], [0.1] * 10 + [1.0])
        assert copies.originals() == {"v", "w"}
        assert book.flagged() == {"x", "w", "y", "c"}
        v = book.get("v")
        assert v.evidence < 1.0 and EvidenceSums.of(v).copied == 0.0 and v.rounds == 2
        assert v.explanation is None and not v.quarantined
        assert not ledger.client_history("v")[-1]["flagged"]
        round_(5, [*honest, "c", "q"], [0.1] * 8 + [1.0, 1.0], ("c", "q"))
        assert "c" not in copies.originals() and {"c", "q"} <= book.flagged()


def test_a_client_flagged_on_its_own_vouches_for_no_copiers():
    """u sent an ordinary update of its own in round 3, then a flagged one in round 4 (a crafted
    vector sent alone looks like that). In round 5 y sends u's update and in round 6 v sends
    y's. Had u been taken for round 5's original, y would be a copier and v round 6's original,
    its collusion taken back; u is flagged on more than copies, so v stays flagged with y."""
    honest = [f"h{i}" for i in range(8)]
    copies = CopyGroups()
    book = TrustBook(TrustPolicy())

    def round_(r: int, extra: list[str], scores: list[float], alone_scores: list[float], *groups):
        ids = [*honest, *extra]
        alone = copies.add_round(ids, twins_of(ids, *groups))
        book.update(r, ids, np.array([0.1] * 8 + scores), {}, copies=copies, alone=alone,
                    as_original=np.array([0.1] * 8 + alone_scores))  # fmt: skip

    round_(1, [], [], [])
    round_(2, [], [], [])
    round_(3, ["u"], [0.1], [0.1])
    round_(4, ["u"], [1.0], [1.0])
    assert book.flagged() == {"u"}
    round_(5, ["u", "y"], [1.0, 1.0], [1.0, 0.1], ("u", "y"))
    round_(6, ["v", "y"], [1.0, 1.0], [0.1, 0.1], ("v", "y"))
    assert "v" in copies.originals()  # what u, trusted, would have said
    assert book.flagged() == {"u", "y", "v"}


def flag_share(rate: float, tails: str, **policy) -> float:
    book = TrustBook(TrustPolicy(false_positive_rate=rate, **policy))
    flagged = scored = 0
    for r, cohort, scores in population_rounds(300, clients=100, per_round=20, seed=1,
                                               tails=tails):  # fmt: skip
        states = book.update(r, cohort, scores, {})
        scored += len(states)
        flagged += sum(s.flagged for s in states.values())
    return flagged / scored


@pytest.mark.parametrize("rate", [0.005, 0.05])
def test_flag_rate_of_an_exponential_tailed_population_is_near_the_configured_rate(rate):
    # rounds independent, as the line assumes without the cap on evidence rounds
    independent = flag_share(rate, "laplace", evidence_rounds=10**6)
    assert 0.25 * rate < independent < 2.5 * rate
    assert flag_share(rate, "normal", evidence_rounds=10**6) < rate  # lighter tails: fewer
    # the cap (clients here are seen 60 times each) can only take flags away
    assert flag_share(rate, "laplace") <= independent


def test_a_modest_persistent_excess_is_flagged_after_a_few_rounds_not_at_once():
    book = TrustBook(TrustPolicy())
    first_flag = None
    for r, cohort, scores in population_rounds(12, seed=2):
        states = book.update(r, [*cohort, "m"], np.append(scores, 0.2 + 3.0 * 0.05), {})
        if first_flag is None and states["m"].flagged:
            first_flag = r
    assert first_flag is not None and 2 <= first_flag <= 8
    assert all(not book.get(c).flagged for c in book.snapshot() if c != "m")


def persistent_outlier_flags(policy: TrustPolicy, z: float, rounds: int = 20) -> list[bool]:
    """Flags, round by round, of a client seen every round with the same excess of ``z``
    population scales: an honest client whose own data keeps it off-centre."""
    book = TrustBook(policy)
    flags = []
    for r, cohort, scores in population_rounds(rounds, seed=4):
        states = book.update(r, [*cohort, "o"], np.append(scores, 0.2 + z * 0.05), {})
        flags.append(states["o"].flagged)
    return flags


def test_a_steady_moderate_excess_seen_every_round_does_not_add_up_to_a_flag():
    # rounds counted as independent add a steady z up to 2 z (memory 0.6), past the 4.48 line
    line = {"false_positive_rate": 0.005}
    assert sum(persistent_outlier_flags(TrustPolicy(evidence_rounds=10**6, **line), z=2.6)) >= 5
    assert not any(persistent_outlier_flags(TrustPolicy(**line), z=2.6))
    # a larger excess, steady, is still evidence
    assert any(persistent_outlier_flags(TrustPolicy(**line), z=3.5))


def test_the_first_rounds_are_judged_as_independent_draws():
    uncapped = TrustPolicy(evidence_rounds=10**6)
    for k in (1, 2, 3):
        capped = TrustBook(TrustPolicy(evidence_rounds=3))
        plain = TrustBook(uncapped)
        for r in range(1, k + 1):
            ids, scores = ["a", "b", "c", "d", "x"], np.array([0.2, 0.25, 0.15, 0.2, 0.4])
            got = capped.update(r, ids, scores, {})["x"].evidence
            want = plain.update(r, ids, scores, {})["x"].evidence
        assert got == pytest.approx(want)  # k <= K rounds: the cap does not bind
    # one round's evidence is its z: pool median 0.2, scale 1.4826 * 0.05
    book = TrustBook(TrustPolicy(evidence_rounds=1))
    x = book.update(1, ["a", "b", "c", "d", "x"], np.array([0.2, 0.25, 0.15, 0.2, 0.4]), {})["x"]
    assert x.evidence == pytest.approx(0.2 / (1.4826 * 0.05))


def test_scores_at_the_ceiling_stay_out_of_the_population(tmp_path):
    """Rounds in which four attackers of ten score 1.0 (40% malicious): in the pool they put its
    median and scale among the honest clients' upper tail, and a 1.0 was little evidence."""
    with Ledger(tmp_path / "l.sqlite") as ledger:
        book = TrustBook(TrustPolicy(), ledger)
        for r, cohort, scores in population_rounds(4, tails="laplace", per_round=6, seed=2):
            attackers = [f"a{r}{i}" for i in range(4)]  # new each round: judged on this round
            states = book.update(r, [*cohort, *attackers], np.append(scores, [1.0] * 4), {})
            assert all(states[a].flagged for a in attackers)
            assert not any(states[c].flagged for c in cohort)
        center, scale, _ = book._population()
        assert center == pytest.approx(0.2, abs=0.05) and scale < 0.1
        restarted = TrustBook(TrustPolicy(), ledger)  # the pool rebuilt from the ledger
        assert restarted._population()[:2] == pytest.approx((center, scale))


def test_half_a_first_cohort_at_the_ceiling_is_flagged_not_taken_for_the_population():
    """Round 1 of a mimic run (Fashion-MNIST seed 12): four copiers and the client they copied
    send one update, five of ten scores at 1.0, and the first round's pool is that cohort alone.
    Half of a pool is a tie, which the latest round breaks: half of it at the ceiling, the five
    are judged against the other five (a round all at the ceiling is the next test's)."""
    book = TrustBook(TrustPolicy())
    _, cohort, scores = next(population_rounds(1, per_round=5, seed=4))
    copies = [f"m{i}" for i in range(5)]
    states = book.update(1, [*cohort, *copies], np.append(scores, [1.0] * 5), {})
    assert all(states[c].flagged for c in copies)
    assert not any(states[c].flagged for c in cohort)
    one_more = TrustBook(TrustPolicy())  # six of eleven at the ceiling: most of the pool
    states = one_more.update(1, [*cohort, *copies, "m5"], np.append(scores, [1.0] * 6), {})
    assert not any(s.flagged for s in states.values())


def test_when_most_scores_reach_the_ceiling_the_population_follows_them():
    """A model broken in round 1 (a plain mean and Gaussian noise): every update of the next
    rounds scores 1.0. They are the population now, not outliers to flag."""
    book = TrustBook(TrustPolicy())
    _, cohort, scores = next(population_rounds(1, per_round=10, seed=3))
    book.update(1, cohort, scores, {})
    for r in (2, 3):
        ids = [f"h{r}{i}" for i in range(10)]
        states = book.update(r, ids, np.ones(10), {})
        assert not any(s.flagged for s in states.values())


def test_stored_sums_give_the_evidence_of_the_rounds_they_hold():
    # two rounds at memory 0.6 (Q = 1.36, W = 1.6): under the cap of 3, as if uncapped
    two = EvidenceSums.of(ClientSummary("m", evidence_state=json.dumps({"sum": 6.0, "sq": 1.36})))
    assert two.evidence(0.6, 10**6) == pytest.approx(6.0 / math.sqrt(1.36))
    assert two.evidence(0.6, 3) == pytest.approx(6.0 / math.sqrt(1.36))
    # five rounds (Q = 1 + 0.36 + ... + 0.36**4, W = 1 + 0.6 + ... + 0.6**4): capped at 3 rounds
    sq, weight = sum(0.36**i for i in range(5)), sum(0.6**i for i in range(5))
    five = EvidenceSums(sum=6.0, sq=sq)
    gain3 = sum(0.6**i for i in range(3)) / math.sqrt(sum(0.36**i for i in range(3)))
    assert five.evidence(0.6, 3) == pytest.approx(gain3 * 6.0 / weight)
    assert five.evidence(0.6, 10**6) == pytest.approx(6.0 / math.sqrt(sq))


def test_evidence_and_population_survive_a_restart(tmp_path):
    path = tmp_path / "l.sqlite"
    rounds = list(population_rounds(8, seed=3))

    def feed(book, r, cohort, scores):
        comp = {"norm_z": np.linspace(0, 1, len(cohort) + 1)}
        return book.update(r, [*cohort, "m"], np.append(scores, 0.5), {}, components=comp)

    with Ledger(path) as ledger:
        book = TrustBook(TrustPolicy(), ledger)
        for r, cohort, scores in rounds[:5]:
            feed(book, r, cohort, scores)
        for r, cohort, scores in rounds[5:]:
            expected = feed(book, r, cohort, scores)
    with Ledger(path) as ledger:
        ledger.truncate_after(5)
        resumed = TrustBook(TrustPolicy(), ledger)
        assert resumed.get("m").flagged and "norm_z" in resumed.get("m").explanation
        for r, cohort, scores in rounds[5:]:
            got = feed(resumed, r, cohort, scores)
    for cid, state in expected.items():
        assert got[cid].evidence == pytest.approx(state.evidence), cid
        assert got[cid].flagged == state.flagged and got[cid].explanation == state.explanation


def test_a_schema_1_ledger_gains_the_detection_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE clients (client_id TEXT PRIMARY KEY, trust REAL, anomaly REAL, flagged "
        "INTEGER NOT NULL DEFAULT 0, quarantined INTEGER NOT NULL DEFAULT 0, quarantined_since "
        "INTEGER, rounds INTEGER NOT NULL DEFAULT 0, last_round INTEGER, rejected INTEGER NOT "
        "NULL DEFAULT 0);"
        "CREATE TABLE client_rounds (round INTEGER NOT NULL, client_id TEXT NOT NULL, norm REAL, "
        "norm_z REAL, cosine REAL, distance REAL, krum_score REAL, trimmed_share REAL, loss REAL, "
        "anomaly REAL, trust REAL, flagged INTEGER NOT NULL DEFAULT 0, quarantined INTEGER NOT "
        "NULL DEFAULT 0, quarantined_since INTEGER, rejected_reason TEXT, "
        "PRIMARY KEY (round, client_id));"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
        "INSERT INTO meta VALUES ('schema_version', '1'), ('last_round', '1');"
        "INSERT INTO client_rounds (round, client_id, anomaly, trust) VALUES (1, 'a', 0.1, 0.97);"
        "INSERT INTO clients (client_id, trust, anomaly, rounds, last_round) "
        "VALUES ('a', 0.97, 0.1, 1, 1);"
    )
    conn.commit()
    conn.close()
    with Ledger(path, readonly=True) as old:  # read-only: read as it is
        assert old.list_clients()[0]["client_id"] == "a"
        assert not old.records_histories() and old.round_histories(1) == {}
    with Ledger(path) as ledger:
        book = TrustBook(TrustPolicy(), ledger)
        book.update(2, ["a"], np.array([0.2]), {}, components={"cosine": np.array([0.3])})
        assert ledger.get_meta("schema_version") == "2"
        assert json.loads(ledger.client_history("a")[-1]["signals"]) == {"cosine": 0.3}


def test_forecasts_kept_before_the_output_layers_read_back_without_it(tmp_path):
    path = tmp_path / "stop39.sqlite"
    with Ledger(path) as ledger:
        ledger.record_round(1, [{"client_id": "a", "norm": 1.0}])
    conn = sqlite3.connect(path)  # the histories table as it was made before the output column
    conn.executescript(
        "DROP TABLE histories; CREATE TABLE histories (round INTEGER NOT NULL, client_id TEXT "
        "NOT NULL, forecast BLOB NOT NULL, across BLOB NOT NULL, PRIMARY KEY (round, client_id));"
    )
    row = np.ones(4, "<f4").tobytes()
    conn.execute("INSERT INTO histories VALUES (1, 'a', ?, ?)", (row, row))
    conn.commit()
    conn.close()
    with Ledger(path, readonly=True) as old:
        forecast, across, output = old.round_histories(1)["a"]
        assert forecast.tolist() == [1.0] * 4 and output is None and old.records_histories()
    with Ledger(path) as ledger:  # opened to write, the table gains the column
        ledger.record_histories(2, ["a"], np.zeros((1, 4)), np.zeros((1, 4)), np.ones((1, 3)))
        assert ledger.round_histories(2)["a"][2].tolist() == [1.0] * 3
        assert ledger.round_histories(1)["a"][2] is None


@pytest.fixture
def flagged_ledger(tmp_path) -> Path:
    """A ledger where client m is flagged, mostly for collusion."""
    path = tmp_path / "flagged.sqlite"
    with Ledger(path) as ledger:
        book = TrustBook(TrustPolicy(), ledger)
        for r, cohort, scores in population_rounds(4, seed=4):
            ids = [*cohort, "m"]
            comp = {"collusion": np.append(np.full(len(cohort), 0.01), 1.0),
                    "norm_z": np.full(len(ids), 0.05)}  # fmt: skip
            book.update(r, ids, np.append(scores, 0.7), {}, components=comp)
    return path


def test_trust_show_and_report_say_why_a_client_is_flagged(flagged_ledger, tmp_path, capsys):
    assert trust_main(["trust", "show", "m", "--ledger", str(flagged_ledger),
                       "--format", "json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["flagged"] and "collusion 1.00 (typical 0.01)" in data["explanation"]
    assert data["history"][-1]["evidence"] > 2.5
    report = tmp_path / "m.jsonl"
    report.write_text(
        "\n".join(
            json.dumps({"client_id": "m", "round": r, "attacking": True, "attack": "alie"})
            for r in (1, 2, 3, 4)
        )
    )
    assert trust_main(["trust", "report", "--ledger", str(flagged_ledger), "--red-team",
                       str(report)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "why each flagged client is flagged:" in out and "m: evidence" in out
    assert "collusion 1.00" in out


def test_metrics_carry_a_flagged_clients_signals_and_drop_them_when_unflagged():
    from fedwarden.server.metrics import MetricsExporter

    exporter = MetricsExporter()
    flagged = {"client_id": "m", "trust": 0.4, "flagged": True, "evidence": 4.2,
               "signal_excess": {"collusion": 0.9, "norm_z": -0.1}}  # fmt: skip
    exporter.observe_round(1, 0.9, 0.3, 1.0, [flagged, {"client_id": "h", "trust": 0.9}])
    text = exporter.render().decode()
    assert 'fedwarden_client_flag_signal_excess{client_id="m",signal="collusion"} 0.9' in text
    assert (
        'signal="norm_z"' not in text
        and 'fedwarden_client_flag_evidence{client_id="m"} 4.2' in text
    )
    exporter.observe_round(2, 0.9, 0.3, 1.0, [{**flagged, "flagged": False}])
    assert "fedwarden_client_flag_signal_excess{" not in exporter.render().decode()


def test_associates_of_flagged_clients_are_flagged_in_rounds_they_sit_out(tmp_path):
    """Two clients flagged on their own evidence; a third, not sampled since, whose history the
    detector finds near theirs, is flagged in that round with a row of its own marked absent,
    which neither counts as a round it took part in nor enters the population pool; it is
    unflagged once the association fades, and a restarted book resumes the same standing."""
    kin_z = {"p2": 4.0, "h1": 0.3}

    def association(flagged):
        assert flagged <= {"p0", "p1"}  # association counts the flags of evidence only
        if len(flagged) < 2:
            return {}
        return {c: Association(0.6, z, ("p0", "p1")) for c, z in kin_z.items()}

    path = tmp_path / "l.sqlite"
    policy = TrustPolicy(quarantine="exclude")
    honest = [f"h{i}" for i in range(8)]
    with Ledger(path) as ledger:
        book = TrustBook(policy, ledger)
        book.update(1, [*honest, "p2"], np.full(9, 0.1), {}, association=association)
        for r in range(2, 5):
            scores = np.r_[np.full(8, 0.1), 0.9, 0.9]
            book.update(r, [*honest, "p0", "p1"], scores, {}, association=association)
        assert {"p0", "p1", "p2"} <= book.flagged() and "h1" not in book.flagged()
        p2 = book.get("p2")
        assert p2.rounds == 1 and p2.last_round == 1 and p2.quarantined and book.is_excluded("p2")
        assert p2.explanation.startswith("association 4.0") and "p0, p1" in p2.explanation
        assert ledger.get_client("p2")["flagged"] and ledger.get_client("p2")["rounds"] == 1
        absent = [row for row in ledger.client_history("p2") if row["absent"]]
        assert len(absent) == 1 and absent[0]["norm"] is None
        pooled_before = sum(len(a) for a, _ in book._pool)
    with Ledger(path) as ledger:
        restarted = TrustBook(policy, ledger)
        assert restarted.get("p2").flagged and restarted.get("p2").rounds == 1
        assert sum(len(a) for a, _ in restarted._pool) == pooled_before
        line = policy.association_z
        kin_z["p2"] = line - 0.5 * policy.unflag_margin  # within the unflag margin: stays flagged
        restarted.update(5, honest, np.full(8, 0.1), {}, association=association)
        assert restarted.get("p2").flagged
        kin_z["p2"] = line - 1.5 * policy.unflag_margin
        restarted.update(6, honest, np.full(8, 0.1), {}, association=association)
        assert not restarted.get("p2").flagged and restarted.get("p2").explanation is None
        assert not restarted.get("p2").quarantined
        assert ledger.get_client("p2")["rounds"] == 1 and not ledger.get_client("p2")["flagged"]


def test_own_evidence_replaces_an_association_and_association_can_be_turned_off():
    def association(flagged):
        return {"x": Association(0.7, 5.0, ("a", "b"))} if {"a", "b"} <= flagged else {}

    for line, expect in ((2.5, True), (0.0, False)):
        book = TrustBook(TrustPolicy(association_z=line))
        honest = [f"h{i}" for i in range(8)]
        for r in range(1, 4):
            book.update(r, [*honest, "a", "b", "x"], np.r_[np.full(8, 0.1), 0.9, 0.9, 0.1], {},
                        association=association)  # fmt: skip
        assert book.get("x").flagged is expect
    book.update(4, [*honest, "x"], np.r_[np.full(8, 0.1), 1.0], {}, association=association)
    x = book.get("x")  # flagged now on its own evidence (association off in this book)
    assert x.flagged and x.explanation.startswith("evidence")
    book = TrustBook(TrustPolicy())
    for r in range(1, 4):
        book.update(r, [*honest, "a", "b", "x"], np.r_[np.full(8, 0.1), 0.9, 0.9, 0.1], {},
                    association=association)  # fmt: skip
    assert EvidenceSums.of(book.get("x")).associated
    for r in range(4, 6):
        book.update(r, [*honest, "x"], np.r_[np.full(8, 0.1), 1.0], {}, association=association)
    x = book.get("x")
    assert x.flagged and x.explanation.startswith("evidence")
    assert not EvidenceSums.of(x).associated


def test_clients_near_the_line_that_deviate_alike_corroborate_one_another():
    """Attackers poisoned alike (DBA's trigger pieces) each collect evidence under the flag line,
    so none is flagged on its own and none by association with a flagged client. Three of them
    near the line (``CORROBORATION_SHARE`` of it) whose updates deviate alike corroborate one
    another and are flagged; an honest client as near the line that deviates its own way is
    not, nor are two alike alone (an association is measured against two others), nor three
    alike far under the line. A client far under the line that deviates like the corroborated
    ones (``f``) is flagged through them and a client flagged on its own evidence (``p``) only
    at a line ``CORROBORATED_ASSOCIATION_MARGIN`` higher than through clients flagged on their
    own, and not through corroborated clients alone: honest clients holding one class
    corroborate one another at Dirichlet 0.1, and through them drew their look-alikes in."""
    honest = [f"h{i}" for i in range(8)]

    def run(alike: set[str], score: float, f_z: float = 4.0, anchor: bool = True) -> TrustBook:
        def association(group):
            if len(group) < 2:
                return {}
            out = {}
            for c in [*honest, "a0", "a1", "a2", "o", "f"]:
                partners = sorted((group & alike) - {c})
                follows = (c in alike or c == "f") and len(partners) >= 2
                z = (f_z if c == "f" else 4.0) if follows else 0.4
                out[c] = Association(0.6, z, tuple(partners[:2]) or tuple(sorted(group)[:2]))
            return out

        book = TrustBook(TrustPolicy())
        rng = np.random.default_rng(0)
        ids = [*honest, "a0", "a1", "a2", "o", "f", "p"]
        for r in range(1, 5):
            scores = np.r_[0.1 + 0.01 * rng.standard_normal(8), np.full(4, score), 0.1,
                           0.9 if anchor else 0.1]  # fmt: skip
            book.update(r, ids, scores, {}, association=association)
        return book

    book = run({"a0", "a1", "a2"}, 0.18)
    line = book.policy.flag_z
    evidence = {c: book.get(c).evidence for c in ("a0", "a1", "a2", "o")}
    assert all(CORROBORATION_SHARE * line <= e < line for e in evidence.values()), evidence
    assert book.flagged() == {"a0", "a1", "a2", "f", "p"}  # not o
    explained = book.get("a0").explanation  # as of the round it was flagged in
    assert re.match(r"evidence 3\.\d and association 4\.0: .* a1, a2 ", explained), explained
    assert book.get("f").explanation.startswith("association 4.0: its updates deviate like")
    wider = book.policy.association_z + CORROBORATED_ASSOCIATION_MARGIN
    assert "f" not in run({"a0", "a1", "a2"}, 0.18, f_z=wider - 0.1).flagged()
    assert "f" in run({"a0", "a1", "a2"}, 0.18, f_z=wider + 0.1).flagged()
    assert run({"a0", "a1", "a2"}, 0.18, anchor=False).flagged() == {"a0", "a1", "a2"}
    assert run({"a0", "a1"}, 0.18).flagged() == {"p"}
    far = run({"a0", "a1", "a2"}, 0.13)
    assert max(far.get(c).evidence for c in ("a0", "a1", "a2")) < CORROBORATION_SHARE * line
    assert far.flagged() == {"p"}


def test_corroborated_clients_keep_their_flag_within_the_unflag_margin():
    """A client flagged through corroboration is unflagged, as any flag, only ``unflag_margin``
    under the lines that raised it (association z and evidence share); a dip just under them
    as the next rounds' forecasts move keeps it, a fall past the margin clears it."""
    honest = [f"h{i}" for i in range(8)]
    alike = ("a0", "a1", "a2")
    kin_z = {"z": 4.0}

    def association(group):
        if len(group) < 2:
            return {}
        return {
            c: Association(0.6, kin_z["z"] if c in alike else 0.4, ("a1", "a2"))
            for c in [*honest, *alike]
        }

    book = TrustBook(TrustPolicy())
    rng = np.random.default_rng(0)
    ids = [*honest, *alike]
    for r in range(1, 5):
        scores = np.r_[0.1 + 0.01 * rng.standard_normal(8), np.full(3, 0.18)]
        book.update(r, ids, scores, {}, association=association)
    policy = book.policy
    assert book.flagged() == set(alike)
    kin_z["z"] = policy.association_z - 0.5 * policy.unflag_margin
    book.update(5, honest, 0.1 + 0.01 * rng.standard_normal(8), {}, association=association)
    assert book.flagged() == set(alike)
    share = CORROBORATION_SHARE * policy.flag_z
    for r in range(6, 9):  # ordinary rounds bring a0's evidence under the share, not past it
        book.update(r, [*honest, "a0"], np.r_[0.1 + 0.01 * rng.standard_normal(8), 0.1], {},
                    association=association)  # fmt: skip
        lowered = book.get("a0").evidence
        if lowered < share:
            break
    assert share - policy.unflag_margin <= lowered < share, lowered
    assert book.flagged() == set(alike)
    kin_z["z"] = policy.association_z - 1.5 * policy.unflag_margin
    book.update(9, honest, 0.1 + 0.01 * rng.standard_normal(8), {}, association=association)
    assert not book.flagged() & set(alike)
