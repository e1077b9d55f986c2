"""Every user mistake costs one line on stderr, exit code 2 and less than two seconds (issue 14).

Each case runs ``python -m fedwarden`` in a subprocess, the way a person runs it. The table holds
the mistakes a newcomer made (issue 14) and, generated from ``fedwarden.config``, an out-of-range
value for every setting that has a range or a set of choices, through each subcommand that takes
it. The two seconds are the process's CPU time, Python start included (wall time on the shared
machine depends on the other jobs: 0.8-1.3 s at load 4, over 2 s at load 20); a ``tensorflow``
that refuses to import proves every check runs before TensorFlow.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedwarden.cli.serve import SERVE_SKIPS
from fedwarden.config import FLAT, RunConfig, flag_name
from fedwarden.server.checkpoint import path_for

COMPARE = ["compare", "--attacks", "gaussian", "--aggregators", "mean,median"]
SERVE = ["serve", "--insecure"]


def run(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Runs the command with a ``tensorflow`` that cannot be imported (see ``workdir``); returns
    the result and the CPU seconds it took (user + system: what the command itself cost,
    whatever else the machine is doing)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(cwd / "no-tensorflow")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [sys.executable, "-m", "fedwarden", *argv],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, cpu


def assert_one_line_exit_2(argv: list[str], cwd: Path, expected: str) -> None:
    start = time.perf_counter()
    result, cpu = run(argv, cwd)
    wall = time.perf_counter() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (argv, result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, (argv, result.stderr)
    assert "Traceback" not in result.stderr
    assert expected in lines[0], (argv, lines[0])
    assert lines[0].startswith("fedwarden"), lines[0]
    load = os.getloadavg()[0]
    assert cpu < 2.0, f"{argv} took {cpu:.2f} CPU s ({wall:.2f} s wall, load {load:.1f})"


def out_of_range(f: dataclasses.Field) -> tuple[str, str] | None:
    """A value of the setting's flag that its declared range or choices refuse, with the text
    the error must contain."""
    m = f.metadata
    if m["choices"]:
        return "nonsense", "invalid choice: 'nonsense'"
    if m["low"] is not None:
        value = m["low"] if m["low_open"] else m["low"] - 1
    elif m["high"] is not None:
        value = m["high"] if m["high_open"] else m["high"] + 1
    else:
        return None
    text = str(int(value)) if m["kind"] is int else str(value)
    return text, f"{flag_name(f)} must be"


def range_cases() -> list:
    cases = []
    for name, (_, f) in sorted(FLAT.items()):
        bad = out_of_range(f)
        if bad is None:
            continue
        value, expected = bad
        cases.append(
            pytest.param(["simulate", flag_name(f), value], expected, id=f"simulate-{name}")
        )
        if name not in SERVE_SKIPS:
            argv = [*SERVE, "--state-dir", "STATE", flag_name(f), value]
            cases.append(pytest.param(argv, expected, id=f"serve-{name}"))
        if name in ("rounds", "trust_decay", "dp_clip", "seed", "partition"):
            cases.append(
                pytest.param([*COMPARE, flag_name(f), value], expected, id=f"compare-{name}")
            )
    return cases


NEWCOMER = [
    # issue 14: tracebacks that became one line
    (["simulate", "--config", "CFG/wrong-type.toml"], "rounds: --rounds must be an integer"),
    (["simulate", "--config", "CFG/thresholds.toml"], "--trust-unflag-above must be above"),
    (["simulate", "--trust-flag-below", "0.9", "--trust-unflag-above", "0.7"], "hysteresis"),
    (["simulate", "--out", "/proc/nope"], "cannot write to the output directory /proc/nope"),
    (["simulate", "--metrics-port", "BUSY"], "cannot listen on"),
    (["serve", "--insecure", "--state-dir", "STATE", "--metrics-port", "BUSY"], "cannot listen"),
    (["serve", "--insecure", "--state-dir", "/proc/nope"], "cannot write"),
    (["serve", "--insecure", "--state-dir", "STATE", "--dp-sgd"], "--dp-sgd-noise-multiplier"),
    # issue 14: silent surprises that now say why not
    (["simulate", "--resume", "--out", "MISSING"], "--resume: no checkpoint"),
    (["simulate", "--resume", "--out", "SEVEN", "--rounds", "3"], "already holds 7 rounds"),
    (["serve"], "the following arguments are required: --state-dir"),
    # serve and compare refuse what they would ignore
    (["serve", "--clients", "50", "--state-dir", "STATE"], "--clients is a setting"),
    (
        ["serve", "--partition", "dirichlet", "--collude", "--state-dir", "STATE"],
        "--partition, --collude are settings fedwarden serve does not use",
    ),
    (["serve", "--state-dir", "STATE", "--config", "CFG/simulation.toml"], "partition"),
    ([*COMPARE, "--attack", "alie"], "--attack is a setting fedwarden compare does not use"),
    ([*COMPARE, "--aggregator", "median"], "--aggregator is a setting"),
    ([*COMPARE, "--metrics-port", "9100"], "--metrics-port is a setting"),
    # settings that contradict each other or name nothing
    (["simulate", "--clients", "5", "--clients-per-round", "8"], "cannot exceed --clients (5)"),
    (["simulate", "--rounds", "3", "--average-last-rounds", "5"], "is more than --rounds (3)"),
    (["simulate", "--attack", "meteor"], "unknown attack 'meteor'"),
    (["simulate", "--aggregator", "avg"], "unknown aggregation step 'avg'"),
    (["simulate", "--clients", "5", "--aggregator", "krum:num_byzantine=2"], "krum needs"),
    (["simulate", "--attack", "gaussian", "--malicious-fraction", "0.01"], "no attacker"),
    (["simulate", "--attack-param", "boost=3"], "--attack-param has no effect without --attack"),
    (["simulate", "--dp-noise-multiplier", "1"], "need --dp central"),
    (["simulate", "--dp", "central"], "--dp central needs --dp-noise-multiplier"),
    (["simulate", "--dp-sgd"], "--dp-sgd needs --dp-sgd-noise-multiplier"),
    (["simulate", "--dp-sgd-noise-multiplier", "1"], "only apply with --dp-sgd"),
    # a round memory budget the run could not keep (issue 16)
    (
        ["simulate", "--round-memory-budget", "64", "--aggregator", "clip:max_norm=5+bulyan"],
        "bulyan would copy it into memory",
    ),  # fmt: skip
    (["simulate", "--round-memory-budget", "64", "--engine", "tff"], "cannot bound a round of"),
    (
        ["simulate", "--round-memory-budget", "64", "--ray-address", "local"],
        "cannot bound a round trained on Ray",
    ),  # fmt: skip
    (
        [*COMPARE[:3], "--round-memory-budget", "64", "--aggregators", "median,geometric_median"],
        "geometric_median would copy it",
    ),  # fmt: skip
    (
        [
            "serve",
            "--insecure",
            "--state-dir",
            "STATE",
            "--round-memory-budget",
            "64",
            "--aggregator",
            "geometric_median",
        ],
        "geometric_median would copy it",
    ),  # fmt: skip
    (["simulate", "--dataset", "missing.npz"], "--dataset file not found"),
    (["simulate", "--dataset", "cifar"], "--dataset must be one of"),
    (["simulate", "--model", "notamodule"], "--model must be package.module:function"),
    (["simulate", "--num-byzantine", "1.5"], "a count (an integer >= 0) or a fraction"),
    (["simulate", "--rounds", "two"], "invalid int value: 'two'"),
    (["simulate", "--config", "CFG/unknown-key.toml"], "unknown keys roundz"),
    (["simulate", "--config", "CFG/twice.toml"], "rounds is set twice"),
    (["simulate", "--config", "CFG/deployment.toml"], "[deployment] holds fedwarden serve's"),
    (
        ["serve", "--state-dir", "STATE", "--config", "CFG/bad-deployment.toml"],
        "[deployment] min_clients: --min-clients must be an integer. Received: 'two'",
    ),  # fmt: skip
    (
        ["serve", "--state-dir", "STATE", "--config", "CFG/unknown-deployment.toml"],
        "[deployment] hostt is not an option",
    ),  # fmt: skip
    (["simulate", "--config", "CFG/not-toml.toml"], "is not valid TOML"),
    (["simulate", "--config", "CFG/none.toml"], "config file not found"),
    (["simulate", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["simulate", "--roun", "3"], "unrecognized arguments: --roun"),  # no abbreviations
    ([*COMPARE[:3], "--aggregators", "mean,bogus"], "unknown aggregation step 'bogus'"),
    (["compare", "--attacks", ",", "--aggregators", "mean"], "at least one name"),
    (["serve", "--state-dir", "STATE"], "TLS needs --tls-cert and --tls-key"),
    (["serve", "--insecure", "--tls-cert", "x.pem", "--state-dir", "STATE"], "--insecure"),
    (
        [
            "serve",
            "--insecure",
            "--state-dir",
            "STATE",
            "--dp",
            "central",
            "--dp-noise-multiplier",
            "1",
        ],
        "needs --dp-delta",
    ),  # fmt: skip
    (["serve", "--insecure", "--state-dir", "STATE", "--port", "70000"], "--port must be"),
    (["agent", "--client-id", "c00", "--data", "x.npz"], "required: --server"),
    (
        [
            "agent",
            "--server",
            "h:1",
            "--client-id",
            "c",
            "--data",
            "x.npz",
            "--attack-param",
            "boost=2",
            "--insecure",
        ],
        "need --attack",
    ),  # fmt: skip
    *[
        (
            ["agent", "--server", "h:1", "--client-id", "c", "--data", "x.npz", "--insecure", *bad],
            expected,
        )
        for bad, expected in (
            (["--poll-wait", "0"], "--poll-wait must be > 0"),
            (["--backoff-max", "-1"], "--backoff-max must be > 0"),
            (["--give-up-after", "-1"], "--give-up-after must be >= 0"),
            (["--compression", "zip"], "invalid choice: 'zip'"),
            (["--attack", "gaussian", "--attack-cohort", "0"], "--attack-cohort must be >= 2"),
            (["--attack", "gaussian", "--attack-start-round", "0"], "--attack-start-round must"),
            (["--attack", "gaussian", "--attack-rate", "0"], "--attack-rate must be in (0, 1]"),
        )
    ],  # fmt: skip
    *[
        (["serve", "--insecure", "--state-dir", "STATE", *bad], expected)
        for bad, expected in (
            (["--min-clients", "0"], "--min-clients must be >= 1. Received: 0"),
            (["--round-timeout", "0"], "--round-timeout must be > 0. Received: 0.0"),
            (["--max-agents", "0"], "--max-agents must be >= 1. Received: 0"),
            (["--stall-timeout", "-1"], "--stall-timeout must be > 0. Received: -1.0"),
            (["--min-transfer-rate", "-5"], "--min-transfer-rate must be > 0"),
            (["--idle-timeout", "0"], "--idle-timeout must be > 0"),
            (["--overselect", "0.5"], "--overselect must be >= 1. Received: 0.5"),
            (["--max-attempts", "0"], "--max-attempts must be >= 1"),
            (["--max-silences", "0"], "--max-silences must be >= 1"),
            (["--bench-rounds", "-1"], "--bench-rounds must be >= 0"),
            (["--port", "-1"], "--port must be"),
            (["--compression", "zip"], "invalid choice: 'zip'"),
            (["--eval-data", "missing.npz"], "--eval-data file not found"),
        )
    ],  # fmt: skip
    (["trust", "list", "--ledger", "missing.sqlite"], "not found"),
    (["trust", "list"], "one of the arguments --ledger --server is required"),
    (["data", "split", "--dataset", "digits", "--clients", "0", "--out", "D"], "--clients must"),
    (
        ["data", "split", "--dataset", "digits", "--clients", "3", "--alpha", "0", "--out", "D"],
        "--alpha must be > 0",
    ),  # fmt: skip
    (["nonsense"], "invalid choice: 'nonsense'"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "CFG"
    cfg.mkdir()
    (cfg / "wrong-type.toml").write_text('rounds = "two"\n')
    (cfg / "thresholds.toml").write_text("[trust]\nflag_below = 0.9\nunflag_above = 0.7\n")
    (cfg / "unknown-key.toml").write_text("roundz = 3\n")
    (cfg / "twice.toml").write_text("rounds = 3\n[training]\nrounds = 4\n")
    (cfg / "deployment.toml").write_text("[deployment]\ninsecure = true\n")
    (cfg / "bad-deployment.toml").write_text('[deployment]\ninsecure = true\nmin_clients = "two"\n')
    (cfg / "unknown-deployment.toml").write_text('[deployment]\nhostt = "x"\n')
    (cfg / "not-toml.toml").write_text("rounds = = 3\n")
    (cfg / "simulation.toml").write_text('[data]\npartition = "dirichlet"\n')
    # Importing TensorFlow fails in these commands: every check must come before it.
    (root / "no-tensorflow" / "tensorflow").mkdir(parents=True)
    (root / "no-tensorflow" / "tensorflow" / "__init__.py").write_text(
        "raise ImportError('tensorflow imported before the settings were checked')\n"
    )
    seven = root / "SEVEN" / "checkpoints"
    seven.mkdir(parents=True)
    path_for(seven, 7).write_bytes(b"")  # only the file name is read before the run
    return root


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("argv, expected", [*NEWCOMER, *range_cases()])
def test_bad_input_is_one_line_exit_2_under_two_seconds(argv, expected, workdir, busy_port):
    argv = [str(busy_port) if a == "BUSY" else a for a in argv]
    assert_one_line_exit_2(argv, workdir, expected)


def test_every_ranged_setting_is_in_the_table():
    ranged = {name for name, (_, f) in FLAT.items() if out_of_range(f) is not None}
    covered = {p.id.split("-", 1)[1] for p in range_cases() if p.id.startswith("simulate-")}
    assert ranged == covered and len(ranged) > 20


def test_defaults_do_not_contradict_each_other():
    assert RunConfig(clients=10).clients_per_round == 10  # `simulate --clients 10` runs
    assert RunConfig(clients=50, clients_per_round=10).clients_per_round == 10


def test_a_closed_pipe_is_not_an_error(workdir):
    """`fedwarden ... | head`: the reader leaves early; no traceback, exit 0."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)  # smaller than the help text
    process = subprocess.Popen(
        [sys.executable, "-m", "fedwarden", "simulate", "--help"],
        stdout=write, stderr=subprocess.PIPE, cwd=workdir,
    )  # fmt: skip
    os.close(write)
    assert os.read(read, 100).startswith(b"usage: fedwarden simulate")
    os.close(read)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0 and stderr == b"", stderr.decode()


def test_version_and_top_level_help_read_plainly(workdir):
    result, _ = run(["--version"], workdir)
    assert result.returncode == 0 and result.stdout.startswith("fedwarden ")
    for command in ([], ["simulate"], ["compare"], ["serve"], ["agent"], ["trust", "list"],
                    ["data", "split"]):  # fmt: skip
        result, _ = run([*command, "--help"], workdir)
        assert result.returncode == 0, command
        assert "``" not in result.stdout and ":class:" not in result.stdout, command


def test_help_is_grouped_and_states_each_default_once(workdir):
    result, _ = run(["simulate", "--help"], workdir)
    text = result.stdout
    for group in ("data, model and training:", "attack:", "defence:", "trust:", "privacy:",
                  "output:"):  # fmt: skip
        assert f"\n{group}\n" in text, group
    assert "(default: 20)" in text and "{iid,dirichlet,shards}" in text
    assert "(20)" not in text  # the old second style
    serve, _ = run(["serve", "--help"], workdir)
    for unused in ("--clients ", "--partition", "--collude", "--attack ", "--engine", "--out "):
        assert unused not in serve.stdout, unused
    compare, _ = run(["compare", "--help"], workdir)
    assert "--attacks" in compare.stdout and "--attack " not in compare.stdout
    assert "--aggregator " not in compare.stdout


def test_serve_reads_its_deployment_options_from_the_config_file_and_flags_win(tmp_path):
    from fedwarden.cli.main import build_parser
    from fedwarden.cli.serve import deployment_config

    toml = tmp_path / "serve.toml"
    toml.write_text(
        "[training]\nrounds = 3\n[deployment]\ninsecure = true\nround_timeout = 30\n"
        'port = 6000\noperator = ["alice"]\ncompression = "gzip"\n'
    )
    argv = ["serve", "--state-dir", str(tmp_path), "--config", str(toml), "--port", "7000"]
    d = deployment_config(build_parser().parse_args(argv))
    assert d.insecure is True and d.round_timeout == 30.0 and d.operator == ["alice"]
    assert d.compression == "gzip" and d.port == 7000  # the flag wins over the file
