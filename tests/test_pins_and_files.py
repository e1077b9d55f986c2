"""Issue 13, item 9: agents refuse a spec other than the one they pin, a tokens file others can
read draws a warning, and simulate checks an .npz dataset as the agent checks its data."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from fedwarden.clients.agent import SpecPin
from fedwarden.data.datasets import load_dataset
from fedwarden.errors import UsageError
from fedwarden.protocol.convert import TrainingSpec
from fedwarden.server.auth import load_tokens
from tests.deploy_helpers import Proc, run_fedwarden
from tests.load_harness import write_client_data
from tests.wire_helpers import TINY_MODEL, start_serve

DP = {"l2_norm_clip": 1.0, "noise_multiplier": 0.8, "num_microbatches": None}


def spec(model=None, dp=None) -> TrainingSpec:
    return TrainingSpec(model, "digits", (8, 8, 1), 10, ((64, 10), (10,)), 0.1, 16, 1, dp_sgd=dp)


@pytest.mark.parametrize(
    "pin, model, dp, refused",
    [
        (SpecPin(), "evil.module:build", None, None),
        (SpecPin(model="default"), None, None, None),
        (
            SpecPin(model="default"),
            "evil.module:build",
            None,
            "names the model 'evil.module:build'",
        ),
        (SpecPin(model="mine:build"), None, None, "names the model 'default'"),
        (SpecPin(model="mine:build"), "mine:build", None, None),
        (SpecPin(min_dp_noise_multiplier=0.5), None, None, "turns DP-SGD off"),
        (SpecPin(min_dp_noise_multiplier=0.5), None, DP, None),
        (SpecPin(min_dp_noise_multiplier=1.0), None, DP, "noise multiplier to 0.8; .* at least 1"),
        (SpecPin(max_dp_l2_clip=1.0), None, DP, None),
        (SpecPin(max_dp_l2_clip=0.5), None, DP, "clip to 1; .* at most 0.5"),
    ],
)
def test_a_pinned_agent_refuses_any_other_spec(pin, model, dp, refused):
    problem = pin.problem(spec(model, dp))
    if refused is None:
        assert problem is None
    else:
        assert problem and re.search(refused, problem), problem


@pytest.mark.integration
def test_the_agent_cli_pins_the_model_and_dp_sgd(tmp_path, procs):
    files = write_client_data(tmp_path / "data", ["c00", "c01", "c02"])
    live = start_serve(
        procs, tmp_path, ["c00", "c01", "c02"], "--rounds", "1", "--min-clients", "3",
        "--dp-sgd", "--dp-sgd-noise-multiplier", "0.5", "--dp-l2-clip", "1.0",
    )  # fmt: skip

    def agent(cid: str, *pins: str) -> Proc:
        p = Proc(cid, "agent", "--server", live.address, "--client-id", cid, "--data",
                 str(files[cid]), "--insecure", "--give-up-after", "60", *pins,
                 env={"FEDWARDEN_TOKEN": live.tokens[cid]})  # fmt: skip
        procs.append(p)
        return p

    model = agent("c00", "--pin-model", "default")
    noise = agent("c01", "--pin-model", TINY_MODEL[3], "--min-dp-noise-multiplier", "1.0")
    fits = agent("c02", "--pin-model", TINY_MODEL[3], "--min-dp-noise-multiplier", "0.5",
                 "--max-dp-l2-clip", "1.0")  # fmt: skip
    assert model.wait(120) == 2
    model.wait_for(r"refusing the task: the coordinator's spec names the model "
                   r"'tests\.tiny_model:linear'; this agent is pinned to 'default'", 1)  # fmt: skip
    assert noise.wait(120) == 2
    noise.wait_for(r"noise multiplier to 0\.5; this agent requires at least 1", 1)
    fits.wait_for(r"examples fit the task", 120)
    assert fits.popen.poll() is None


def test_a_tokens_file_others_can_read_draws_a_warning(tmp_path, caplog):
    path = tmp_path / "tokens.toml"
    path.write_text('c00 = "' + "a" * 32 + '"\n')
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="fedwarden.serve"):
        assert load_tokens(path)[0] == {"c00": "a" * 32}
    assert re.search(r"tokens file .* readable or writable by others \(mode 644\).*chmod 600", caplog.text)  # fmt: skip
    assert "a" * 32 not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="fedwarden.serve"):
        load_tokens(path)
    assert caplog.text == ""


def dataset_file(tmp_path, break_rows: bool):
    rng = np.random.default_rng(0)
    x = rng.random((60, 4)).astype(np.float32)
    y = np.arange(60) % 3
    x[12] = x[11]  # a repeated row is kept
    if break_rows:
        x[7, 1], x[20, 0], y[33] = np.nan, np.inf, -1
    path = tmp_path / ("bad.npz" if break_rows else "good.npz")
    np.savez(path, x=x, y=y)
    return path


def test_a_dataset_file_with_bad_rows_is_refused_with_the_rows_named(tmp_path):
    with pytest.raises(UsageError) as err:
        load_dataset(str(dataset_file(tmp_path, True)))
    message = str(err.value)
    assert "rows 7, 20" in message and "row 33" in message and "fix or remove" in message
    data = load_dataset(str(dataset_file(tmp_path, False)))
    assert len(data.y_train) + len(data.y_test) == 60


@pytest.mark.integration
def test_simulate_and_data_split_refuse_a_dataset_file_with_nan_rows(tmp_path):
    bad = dataset_file(tmp_path, True)
    for args in (["simulate", "--rounds", "1", "--clients", "2", "--out", str(tmp_path / "run")],
                 ["data", "split", "--clients", "2", "--out", str(tmp_path / "split")]):  # fmt: skip
        proc = run_fedwarden(*args, "--dataset", str(bad))
        assert proc.returncode == 2, proc.stderr
        assert "rows 7, 20" in proc.stderr, proc.stderr
    assert not (tmp_path / "split").exists() or not list((tmp_path / "split").glob("*.npz"))
