"""``fedwarden compare``: every attack against every aggregator on one data split and seed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fedwarden.config import RunConfig, validate  # noqa: E402
from fedwarden.data.datasets import load_dataset  # noqa: E402
from fedwarden.report import (  # noqa: E402
    detection_totals,
    fmt,
    honest_flags,
    markdown_table,
    plot_detection_by_round,
    plot_matrix,
)
from fedwarden.simulations.preflight import cell_config  # noqa: E402
from fedwarden.simulations.runner import Simulation, check_config, make_federation  # noqa: E402


def compare(
    base: RunConfig,
    attacks: list[str],
    aggregators: list[str],
    out: Path,
    seeds: list[int] | None = None,
    ray_address: str | None = None,
    cpus_per_run: float = 1.0,
) -> str:
    """Runs the grid (plus a clean row), writes matrix.json, matrix.md, matrix.png; returns the table.

    Args:
      base: the settings every run shares; each run changes its attack, aggregator and seed.
      attacks: the attack rows (a clean ``none`` row is added if missing).
      aggregators: the aggregator columns.
      out: the grid's directory; run outputs go to ``out/runs/ATTACK__AGGREGATOR`` (with
        ``__seedN`` appended when there are several seeds).
      seeds: the seeds to run (default: ``base.seed``); with several, each cell of the matrix
        holds their mean and standard deviation, and each seed's own figures.
      ray_address: run every (attack, aggregator, seed) as a Ray task on this cluster (see
        ``ray_grid.connect``); the outputs are the same as those of a local run.
      cpus_per_run: CPUs each Ray task asks for.

    Returns:
      The markdown table written to matrix.md.
    """
    seeds = list(dict.fromkeys(seeds or [base.seed]))
    rows = (["none"] if "none" not in attacks else []) + list(attacks)
    configs = {
        (a, g, s): replace(cell_config(base, a, g), seed=s)
        for a in rows
        for g in aggregators
        for s in seeds
    }
    dirs = {key: out / "runs" / _run_name(*key, several_seeds=len(seeds) > 1) for key in configs}
    if base.tensorboard not in (None, "off"):  # one TensorBoard run per cell, side by side
        configs = {
            key: replace(c, tensorboard=str(Path(base.tensorboard) / dirs[key].name))
            for key, c in configs.items()
        }
    num_classes = load_dataset(base.dataset, base.data_dir, base.seed).num_classes
    chains = {}  # each cell's parsed --aggregator, checked here and used by its run
    for key, config in configs.items():
        validate(config)
        chains[key] = check_config(config, num_classes)
    out.mkdir(parents=True, exist_ok=True)
    if ray_address:
        from fedwarden.simulations.ray_grid import run_grid

        outputs = run_grid(
            configs, dirs, ray_address, cpus_per_run, progress=base.progress, chains=chains
        )
        finals = {key: output.final for key, output in outputs.items()}
        placement = {
            dirs[key].name: {"node_id": o.node_id, "hostname": o.hostname, "pid": o.pid}
            for key, o in outputs.items()
        }
        (out / "placement.json").write_text(json.dumps(placement, indent=2))
    else:
        finals = _run_here(base, configs, dirs, chains)
    matrix = {
        a: {g: _cell([finals[(a, g, s)] for s in seeds], seeds) for g in aggregators} for a in rows
    }
    (out / "matrix.json").write_text(json.dumps(matrix, indent=2))
    table = _table(matrix, aggregators, base, seeds)
    (out / "matrix.md").write_text(table + "\n")
    (out / "detection.md").write_text(_detection_table(matrix, aggregators, base, seeds) + "\n")
    _detection_plot(dirs, aggregators, base, out / "detection.png")
    _heatmap(matrix, rows, aggregators, out / "matrix.png", base)
    return table


def _run_here(base: RunConfig, configs: dict, dirs: dict, chains: dict) -> dict:
    """Runs the grid in this process, one run after the other; the final metrics by key."""
    finals = {}
    with tqdm(total=len(configs), desc="compare", unit="run", disable=not base.progress) as bar:
        for seed in dict.fromkeys(s for _, _, s in configs):
            runs = {key: config for key, config in configs.items() if key[2] == seed}
            # The malicious set is the one an attacked run of this seed draws (as a Ray task does).
            attacked = next((c for (a, _, _), c in runs.items() if a != "none"), base)
            federation = make_federation(attacked)
            clean = replace(federation, malicious=frozenset())
            # One data split and one compiled model for all the runs of a seed.
            simulation = Simulation(attacked, federation)
            for key, config in runs.items():
                bar.set_postfix_str(f"{key[0]} x {key[1]}, seed {seed}")
                simulation.federation = clean if key[0] == "none" else federation
                finals[key] = simulation.run(config, dirs[key], aggregator=chains[key])["final"]
                bar.update()
    return finals


def _cell(finals: list[dict], seeds: list[int]) -> dict:
    """One matrix cell: a run's figures, or with several seeds their mean, spread and each run."""
    cells = [
        {
            "accuracy": final["accuracy"],
            "attack_success_rate": final["attack_success_rate"],
            "detection": final["detection"],
        }
        for final in finals
    ]
    if len(cells) == 1:
        return cells[0]
    accuracy = np.array([c["accuracy"] for c in cells])
    asr = [c["attack_success_rate"] for c in cells]
    summary = {
        "accuracy": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std(ddof=1)),
        "accuracy_min": float(accuracy.min()),
        "accuracy_max": float(accuracy.max()),
        "attack_success_rate": None if None in asr else float(np.mean(asr)),
        "attack_success_rate_std": None if None in asr else float(np.std(asr, ddof=1)),
    }
    return {**summary, "seeds": {str(s): c for s, c in zip(seeds, cells)}}


def _run_name(attack: str, aggregator: str, seed: int, several_seeds: bool) -> str:
    name = f"{_slug(attack)}__{_slug(aggregator)}"
    return f"{name}__seed{seed}" if several_seeds else name


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "-" for ch in name)


def _table(matrix: dict, aggregators: list[str], base: RunConfig, seeds: list[int]) -> str:
    clean = matrix["none"]
    header = ["attack", *aggregators]
    body = []
    for attack, cells in matrix.items():
        row: list = [attack]
        for g in aggregators:
            cell = cells[g]
            text = fmt(cell["accuracy"])
            if "accuracy_std" in cell:
                text += f" ± {cell['accuracy_std']:.3f}"
            if attack != "none":
                text += f" ({cell['accuracy'] - clean[g]['accuracy']:+.2f})"
            if cell["attack_success_rate"] is not None:
                text += f", ASR {cell['attack_success_rate']:.2f}"
            row.append(text)
        body.append(row)
    runs = (
        f"seed {seeds[0]}"
        if len(seeds) == 1
        else f"seeds {', '.join(map(str, seeds))} (mean ± standard deviation over the seeds)"
    )
    caption = (
        f"Final test accuracy on {base.dataset}: {base.clients} clients, "
        f"{base.clients_per_round} per round, {base.rounds} rounds, "
        f"{base.malicious_fraction:.0%} malicious, {runs}. "
        "In brackets: change against the clean run with the same aggregator."
    )
    return caption + "\n\n" + markdown_table(header, body)


def _detection_table(
    matrix: dict, aggregators: list[str], base: RunConfig, seeds: list[int]
) -> str:
    """Each cell's flags at the last round, over the seeds: precision and recall (mean and
    range of the runs'), the attackers found of those that attacked and the honest client-rounds
    flagged (summed over the runs), the longest honest streak (the largest)."""
    header = ["attack", "aggregator", "precision", "recall (attackers that attacked)",
              "found", "honest client-rounds flagged", "longest honest streak"]  # fmt: skip
    body = []
    for attack, cells in matrix.items():
        for g in aggregators:
            runs = [c["detection"] for c in cells[g].get("seeds", {"": cells[g]}).values()]
            total = detection_totals(runs)
            body.append([
                attack, g, _spread([d["precision"] for d in runs]),
                _spread([d.get("recall_attacked") for d in runs]),
                f"{total['found']} of {total['attacked']}" if total["attacked"] else "-",
                honest_flags(total), total["longest_honest_streak"],
            ])  # fmt: skip
    caption = (
        f"Detection after round {base.rounds} on {base.dataset}: {base.clients} clients, "
        f"{base.clients_per_round} per round, {base.malicious_fraction:.0%} malicious, "
        + (
            f"seed {seeds[0]}."
            if len(seeds) == 1
            else f"seeds {', '.join(map(str, seeds))}. Precision and recall: mean (range) of the "
            "runs'; found and honest client-rounds: summed over the runs."
        )
    )
    return caption + "\n\n" + markdown_table(header, body)


def _detection_plot(dirs: dict, aggregators: list[str], base: RunConfig, path: Path) -> None:
    """Each attacked cell's recall and precision by round over its seeds, from the runs'
    results.json (written by a Ray task too)."""
    runs: dict[str, list[dict]] = {}
    for (attack, g, _), run_dir in dirs.items():
        if attack != "none":
            label = attack if len(aggregators) == 1 else f"{attack} x {g}"
            runs.setdefault(label, []).append(json.loads((run_dir / "results.json").read_text()))
    if runs:
        title = (f"{base.dataset}: {base.clients} clients, {base.clients_per_round} per round, "
                 f"{base.malicious_fraction:.0%} malicious")  # fmt: skip
        plot_detection_by_round(runs, path, title)


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(known) == 1:
        return fmt(known[0], 2)
    return f"{fmt(float(np.mean(known)), 2)} ({fmt(min(known), 2)}-{fmt(max(known), 2)})"


def _heatmap(
    matrix: dict, rows: list[str], aggregators: list[str], path: Path, base: RunConfig
) -> None:
    values = np.array([[matrix[a][g]["accuracy"] for g in aggregators] for a in rows])
    labels = [
        [
            f"{values[i, j]:.2f}"
            + (f"\n±{cell['accuracy_std']:.2f}" if "accuracy_std" in (cell := matrix[a][g]) else "")
            for j, g in enumerate(aggregators)
        ]
        for i, a in enumerate(rows)
    ]
    title = (
        f"final test accuracy\n{base.dataset}, {base.clients} clients, "
        f"{base.malicious_fraction:.0%} malicious"
    )
    plot_matrix(values, rows, aggregators, path, title, labels)
