"""``fedwarden compare``: every attack against every aggregator on one data split and seed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fedwarden.config import RunConfig, validate  # noqa: E402
from fedwarden.simulations.report import fmt, markdown_table  # noqa: E402
from fedwarden.simulations.runner import Simulation, check_config, make_federation  # noqa: E402


def compare(base: RunConfig, attacks: list[str], aggregators: list[str], out: Path) -> str:
    """Runs the grid (plus a clean row), writes matrix.json, matrix.md, matrix.png; returns the table."""
    rows = (["none"] if "none" not in attacks else []) + list(attacks)
    configs = {
        (a, g): replace(base, attack=a, aggregator=g, progress=False)
        for a in rows
        for g in aggregators
    }
    federation = make_federation(base)
    for config in configs.values():
        validate(config)
        check_config(config, federation.dataset.num_classes)
    clean = replace(federation, malicious=frozenset())
    simulation = Simulation(base, federation)  # one data split and one compiled model for all cells
    matrix: dict[str, dict[str, dict]] = {a: {} for a in rows}
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(configs), desc="compare", unit="run", disable=not base.progress) as bar:
        for (attack, aggregator), config in configs.items():
            bar.set_postfix_str(f"{attack} x {aggregator}")
            simulation.federation = clean if attack == "none" else federation
            cell_dir = out / "runs" / f"{_slug(attack)}__{_slug(aggregator)}"
            final = simulation.run(config, cell_dir)["final"]
            matrix[attack][aggregator] = {
                "accuracy": final["accuracy"],
                "attack_success_rate": final["attack_success_rate"],
                "detection": final["detection"],
            }
            bar.update()
    (out / "matrix.json").write_text(json.dumps(matrix, indent=2))
    table = _table(matrix, aggregators, base)
    (out / "matrix.md").write_text(table + "\n")
    _heatmap(matrix, rows, aggregators, out / "matrix.png", base)
    return table


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "-" for ch in name)


def _table(matrix: dict, aggregators: list[str], base: RunConfig) -> str:
    clean = matrix["none"]
    header = ["attack", *aggregators]
    body = []
    for attack, cells in matrix.items():
        row: list = [attack]
        for g in aggregators:
            cell = cells[g]
            text = fmt(cell["accuracy"])
            if attack != "none":
                text += f" ({cell['accuracy'] - clean[g]['accuracy']:+.2f})"
            if cell["attack_success_rate"] is not None:
                text += f", ASR {cell['attack_success_rate']:.2f}"
            row.append(text)
        body.append(row)
    caption = (
        f"Final test accuracy on {base.dataset}: {base.clients} clients, "
        f"{base.clients_per_round} per round, {base.rounds} rounds, "
        f"{base.malicious_fraction:.0%} malicious, seed {base.seed}. "
        "In brackets: change against the clean run with the same aggregator."
    )
    return caption + "\n\n" + markdown_table(header, body)


def _heatmap(
    matrix: dict, rows: list[str], aggregators: list[str], path: Path, base: RunConfig
) -> None:
    values = np.array([[matrix[a][g]["accuracy"] for g in aggregators] for a in rows])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(aggregators), 1.2 + 0.55 * len(rows)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(len(aggregators)), aggregators, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(aggregators)):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_title(f"final accuracy, {base.dataset}, {base.malicious_fraction:.0%} malicious")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
