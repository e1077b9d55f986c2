"""``PrivacyAccount.for_run``: simulate and serve build a run's privacy account from its settings
in one place, and the checkpoint carries its DP-SGD account to a resumed run."""

from __future__ import annotations

import numpy as np

from fedwarden.aggregation.accounting import ClientPrivacyAccount, default_delta, dp_sgd_steps
from fedwarden.aggregation.chain import parse_chain
from fedwarden.config import RunConfig
from fedwarden.server import checkpoint
from fedwarden.server.admission import ClientUpdate
from fedwarden.server.callbacks import Checkpoint, PrivacyAccount
from fedwarden.server.coordinator import Coordinator
from fedwarden.server.driver import Cohort, History, RoundDriver, RunInfo
from fedwarden.server.optimizers import ServerOptimizer
from fedwarden.server.trust import TrustBook, TrustPolicy

IDS = ["a", "b", "c"]
EXAMPLES = {"a": 40, "b": 90, "c": 200}


def dp_sgd_config(**overrides) -> RunConfig:
    return RunConfig(dp_sgd=True, dp_sgd_noise_multiplier=1.1, batch_size=8, local_epochs=2,
                     **overrides)  # fmt: skip


def test_a_run_without_dp_sgd_has_no_client_account():
    assert PrivacyAccount.for_run(RunConfig(), None, EXAMPLES.get).client is None


def test_the_client_account_follows_the_settings():
    account = PrivacyAccount.for_run(dp_sgd_config(), None, EXAMPLES.get)
    assert account.client == ClientPrivacyAccount(noise_multiplier=1.1, batch_size=8)
    assert account.client_delta("b") == default_delta(90)
    assert account.local_steps(90) == dp_sgd_steps(90, 8, 2)
    assert account.client_settings["noise_multiplier"] == 1.1
    stated = PrivacyAccount.for_run(dp_sgd_config(dp_delta=1e-6), None, EXAMPLES.get)
    assert stated.client_delta("b") == 1e-6 and stated.client_settings["delta"] == 1e-6


class Clients:
    """Every client answers, with its example count."""

    def collect(self, round_number: int, coordinator: Coordinator) -> Cohort:
        rng = np.random.default_rng(round_number)
        updates = [
            ClientUpdate(cid, round_number, rng.normal(size=4).astype(np.float32), EXAMPLES[cid])
            for cid in IDS
        ]
        return Cohort(IDS, updates, 0)


def run(state, rounds: int, saved=None) -> PrivacyAccount:
    coordinator = Coordinator(
        np.zeros(4, np.float32), parse_chain("mean"), ServerOptimizer("fedavg", 1.0),
        TrustBook(TrustPolicy()),
    )  # fmt: skip
    history = None
    if saved is not None:
        coordinator.load_state_dict(saved["coordinator"])
        history = History.from_state(saved)
    account = PrivacyAccount.for_run(dp_sgd_config(), None, EXAMPLES.get, saved=saved)
    writer = Checkpoint(state, state / "results.json", RunInfo({}), account, shapes=[(4,)])
    evaluate = lambda weights: (0.0, 1.0, None)  # noqa: E731
    RoundDriver(coordinator, Clients(), evaluate, rounds, [account, writer], history=history).run()
    return account


def test_a_resumed_run_carries_on_the_checkpointed_dp_sgd_account(tmp_path):
    straight = run(tmp_path / "straight", 3)
    run(tmp_path / "resumed", 2)
    saved = checkpoint.load_latest(tmp_path / "resumed")
    resumed = run(tmp_path / "resumed", 3, saved)
    assert resumed.client.steps_by_size == straight.client.steps_by_size
    assert resumed.client.steps("c") == 3 * dp_sgd_steps(200, 8, 2)
