"""Comparison grids on a Ray cluster: every (attack, aggregator, seed) run is one Ray task.

A task rebuilds the run's federation from its configuration (data split, malicious set and model
initialisation depend only on the seed), runs it into a scratch directory on its node and returns
the final metrics with every output file. The driver writes those files into the grid's ``runs/``
directory, so the outputs are the ones a local ``compare`` writes, and nothing but the data needs
to be reachable from the worker machines (docs/scale.md).

A task lost with its node (``ray stop``, a crash, a killed raylet) is re-run from the start on
another node (``max_retries``): its scratch outputs died with it and only a finished task's files
are written, so a run is never lost and never written twice. An exception raised by the run
itself (a bad setting) is not retried and stops the grid.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedwarden.aggregation.chain import Chain
from fedwarden.config import RunConfig
from fedwarden.errors import UsageError

MAX_RETRIES = 3
"""Times a task lost with its node is re-run elsewhere before the grid fails."""


@dataclass
class RunOutput:
    """What one task sends back: the run's final metrics, its files, and where it ran."""

    final: dict[str, Any]
    files: dict[str, bytes]  # path relative to the run's directory -> content
    node_id: str
    hostname: str
    pid: int


def connect(address: str) -> None:
    """Connects this process to the Ray cluster at ``address`` (once; later calls do nothing).

    Args:
      address: ``auto`` (the cluster started by ``ray start`` on this machine), ``HOST:PORT``
        (the head's GCS address; this machine must be a node of that cluster) or ``local`` (a
        new single-machine Ray instance, for trying things out).
    """
    import ray

    if ray.is_initialized():
        return
    _check_reachable(address)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # an accelerator notice; no GPUs here
        try:
            ray.init(
                address=address,
                logging_level=logging.WARNING,
                log_to_driver=False,  # TensorFlow's start-up noise from every worker
                runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}},
            )
        except ConnectionError as exc:
            raise UsageError(
                f"no Ray cluster at --ray-address {address}: {exc}. Start one with "
                "`ray start --head` (docs/scale.md) or pass --ray-address local"
            ) from None


def _check_reachable(address: str) -> None:
    """Fails at once on a HOST:PORT nobody listens on (``ray.init`` would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # auto, local: Ray itself reports those at once
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise UsageError(
            f"no Ray cluster at --ray-address {address}: {exc}. Start one with "
            "`ray start --head --port PORT` on the head machine (docs/scale.md)"
        ) from None


def execute_run(config: RunConfig, cwd: str, aggregator: Chain | None = None) -> RunOutput:
    """Runs one configuration on this node (the body of a Ray task).

    Args:
      config: the run; its federation is rebuilt from it, as ``make_federation`` does locally.
      cwd: the driver's working directory; relative data paths resolve against it where it
        exists on this node.
      aggregator: the run's ``--aggregator`` as the driver parsed and checked it (a copy
        arrives with the task), so the task does not parse it again; None: parsed here.

    Returns:
      The final metrics, every output file, and this node's id and host name.
    """
    import ray

    from fedwarden.simulations.runner import Simulation, make_federation

    if os.path.isdir(cwd):
        os.chdir(cwd)
    federation = make_federation(config)  # an attack of "none" has no malicious clients
    scratch = Path(tempfile.mkdtemp(prefix="fedwarden-run-"))
    try:
        final = Simulation(config, federation).run(config, scratch, aggregator=aggregator)["final"]
        # The run's ledger is closed when its objects are collected: then its WAL is merged into
        # ledger.sqlite, the one file a local run leaves.
        gc.collect()
        files = {
            str(p.relative_to(scratch)): p.read_bytes()
            for p in sorted(scratch.rglob("*"))
            if p.is_file()
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    node = ray.get_runtime_context().get_node_id()
    return RunOutput(final, files, node, socket.gethostname(), os.getpid())


def run_grid(
    configs: dict[Hashable, RunConfig],
    dirs: dict[Hashable, Path],
    address: str,
    cpus_per_run: float = 1.0,
    progress: bool = True,
    chains: dict[Hashable, Chain] | None = None,
) -> dict[Hashable, RunOutput]:
    """Runs every configuration as a Ray task and writes each run's files into its directory.

    Args:
      configs: the runs, by key.
      dirs: the output directory of each key (replaced by the run's files when it finishes).
      address: the cluster (see ``connect``).
      cpus_per_run: CPUs each task asks Ray for; a node runs at most its CPUs / this at once.
      progress: show a progress bar.
      chains: each key's parsed ``--aggregator`` (``check_run``'s), sent with its task.

    Returns:
      Each key's ``RunOutput`` (files included), in the order of ``configs``.
    """
    import ray

    if cpus_per_run <= 0:
        raise UsageError(f"--ray-cpus-per-run must be positive. Received: {cpus_per_run}")
    connect(address)
    task = ray.remote(execute_run).options(
        num_cpus=cpus_per_run,
        max_retries=MAX_RETRIES,
        retry_exceptions=False,
        scheduling_strategy="SPREAD",  # over every node, not first filling the driver's
    )
    cwd = os.getcwd()
    chains = chains or {}
    pending = {task.remote(config, cwd, chains.get(key)): key for key, config in configs.items()}
    outputs: dict[Hashable, RunOutput] = {}
    bar = tqdm(total=len(configs), desc="compare on ray", unit="run", disable=not progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done[0])
            outputs[key] = ray.get(done[0])
            _write_files(dirs[key], outputs[key].files)
            bar.update()
    finally:
        bar.close()
        for ref in pending:  # an error or Ctrl-C: the rest of the grid is not wanted
            ray.cancel(ref, force=True)
    return {key: outputs[key] for key in configs}


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
