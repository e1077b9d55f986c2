"""Run outputs people read: per-round CSV, accuracy plot, summary table."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

GREY = "0.85"  # trust cells of a client not scored yet
MAX_LABELLED_CLIENTS = 300  # the trust plot names each client up to this many


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported on first use: importing it
    costs about 0.6 s, which a command that stops at a settings error should not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


ROUND_COLUMNS = (
    "round",
    "accuracy",
    "loss",
    "attack_success_rate",
    "admitted",
    "rejected",
    "flagged",
    "duration_s",
)
"""Columns of ``rounds.csv``: the run's figures, one row per round (keys of ``results.json``'s
round records). Per-client figures are ``fedwarden.records.ClientRound``, in the ledger."""


def write_rounds_csv(rounds: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ROUND_COLUMNS)
        for r in rounds:
            row = {**r, "flagged": " ".join(r["flagged"])}
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in ROUND_COLUMNS])


def plot_accuracy(series: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """Test accuracy per round, one line per run (attack success rate dashed where there is one)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rounds in series.items():
        xs = [r["round"] for r in rounds]
        (line,) = ax.plot(xs, [r["accuracy"] for r in rounds], label=label)
        asr = [r.get("attack_success_rate") for r in rounds]
        if any(a is not None for a in asr):
            ax.plot(
                xs,
                [float("nan") if a is None else a for a in asr],
                "--",
                color=line.get_color(),
                label=f"{label} (attack success)",
            )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title, loc="left", fontsize="medium")
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_trust_heatmap(
    trust_by_round: dict[str, list[float | None]], malicious: set[str], path: Path
) -> Path:
    """Trust of every client (rows, sorted by id) in every round (columns), red = low trust.

    ``trust_by_round[client][i]`` is the client's trust after round i + 1, None before it was
    first scored (drawn grey). Malicious clients' labels are red, with a red triangle beside them.
    """
    ids = sorted(trust_by_round)
    num_rounds = max((len(v) for v in trust_by_round.values()), default=0)
    grid = np.full((len(ids), max(num_rounds, 1)), np.nan)
    for row, cid in enumerate(ids):
        values = [np.nan if t is None else float(t) for t in trust_by_round[cid]]
        grid[row, : len(values)] = values
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    plt = _pyplot()
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad=GREY)  # not scored yet
    height = min(max(2.5, 0.22 * len(ids) + 1.2), 40)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * num_rounds + 3), height))
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        cmap=cmap,
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=(0.5, max(num_rounds, 1) + 0.5, len(ids) - 0.5, -0.5),
    )
    # Laying out thousands of labels takes matplotlib minutes (10,000 clients: 5+ minutes).
    labelled = len(ids) <= MAX_LABELLED_CLIENTS
    if labelled:
        ax.set_yticks(range(len(ids)), ids, fontsize="small" if len(ids) <= 40 else "xx-small")
    bad_rows = [row for row, cid in enumerate(ids) if cid in malicious]
    for row in bad_rows if labelled else ():
        ax.get_yticklabels()[row].set_color("red")
    legend = []
    if bad_rows:  # a marker just left of the plot area, on the malicious clients' rows
        beside = blended_transform_factory(ax.transAxes, ax.transData)
        ax.tick_params(axis="y", pad=12)  # room for the marker between label and plot
        (marker,) = ax.plot(
            [-0.014] * len(bad_rows),
            bad_rows,
            ">",
            color="red",
            markersize=5,
            transform=beside,
            clip_on=False,
            label="malicious",
            linestyle="none",
        )
        legend.append(marker)
    if np.isnan(grid).any():
        legend.append(Patch(facecolor=GREY, edgecolor="0.6", label="not scored yet"))
    if legend:
        ax.legend(
            handles=legend, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(legend),
            fontsize="small", frameon=False, borderaxespad=0.2,
        )  # fmt: skip
    ax.set_xlim(0.5, max(num_rounds, 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    # Above the legend (which sits on the plot's top edge), so neither covers the other.
    ax.set_title("trust per client and round", loc="left", pad=18 if legend else 6)
    fig.colorbar(image, ax=ax, label="trust", fraction=0.04)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return Path(path)


def plot_matrix(
    values: np.ndarray,
    rows: list[str],
    columns: list[str],
    path: Path,
    title: str,
    labels: list[list[str]] | None = None,
) -> Path:
    """A heatmap of values in [0, 1] (rows x columns), each cell labelled with its value (or
    ``labels[i][j]``).

    The figure is sized to its cells and saved with a tight bounding box, so a long title or
    label is never cut; ``title`` may hold a line break.
    """
    values = np.asarray(values, dtype=float)
    lines = max((label.count("\n") + 1 for row in labels or [] for label in row), default=1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.95 * len(columns), 0.9 + 0.42 * lines * len(rows)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, j in np.ndindex(values.shape):
        text = "-" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}"
        text = labels[i][j] if labels else text
        ax.text(j, i, text, ha="center", va="center", fontsize=9)
    ax.set_title(title, loc="left", fontsize="medium")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
    return Path(path)


def detection_summary(
    flagged_by_round: list[set[str]],
    malicious: set[str],
    attacked: set[str] | None = None,
    selected_by_round: list[set[str]] | None = None,
) -> dict[str, Any]:
    """How well the flags of the last round find the known malicious clients.

    Returns ``{"precision", "recall", "first_detection_round"}``: precision is the share of the
    finally flagged clients that are malicious, None when nothing is flagged (undefined, not 1.0
    or 0.0); recall is the share of malicious clients finally flagged, None when there are no
    malicious clients; first_detection_round is the first round (counting from 1, the index in
    ``flagged_by_round`` plus one) in which any malicious client was flagged, None if never.
    With ``attacked`` (the malicious clients that attacked in a round they were sampled in)
    also ``attacked`` (how many) and ``recall_attacked``, the share of them finally flagged
    (None when none did): what a detector can be asked to find, since a malicious client that
    was never sampled, or only trained honestly when it was, sent nothing to find.
    With ``selected_by_round`` (each round's cohort) also the false-positive figures:
    ``honest_client_rounds`` (honest clients sampled, summed over the rounds),
    ``honest_client_rounds_flagged`` (how many of those client-rounds ended flagged) and
    ``longest_honest_streak`` (the most rounds in a row, counting only the rounds it was sampled
    in, that one honest client ended flagged).
    """
    final = set(flagged_by_round[-1]) if flagged_by_round else set()
    malicious = set(malicious)
    hits = len(final & malicious)
    first = next(
        (i + 1 for i, flagged in enumerate(flagged_by_round) if set(flagged) & malicious), None
    )
    out = {
        "precision": hits / len(final) if final else None,
        "recall": hits / len(malicious) if malicious else None,
        "first_detection_round": first,
    }
    if attacked is not None:
        found = len(final & attacked)
        out.update(
            attacked=len(attacked), recall_attacked=found / len(attacked) if attacked else None
        )
    if selected_by_round is not None:
        out.update(_false_positives(flagged_by_round, selected_by_round, malicious))
    return out


def attackers_found(detection: dict[str, Any]) -> int:
    """How many of the attackers that attacked a :func:`detection_summary` found (0 when it
    knows none)."""
    return round((detection.get("recall_attacked") or 0.0) * (detection.get("attacked") or 0))


def detection_totals(runs: list[dict[str, Any]]) -> dict[str, int]:
    """Several runs' :func:`detection_summary` added up: the attackers that attacked and those
    found, the honest client-rounds sampled and flagged (sums), the longest honest streak (the
    largest)."""
    return {
        "attacked": sum(d.get("attacked") or 0 for d in runs),
        "found": sum(attackers_found(d) for d in runs),
        "honest_client_rounds": sum(d.get("honest_client_rounds") or 0 for d in runs),
        "honest_client_rounds_flagged": sum(
            d.get("honest_client_rounds_flagged") or 0 for d in runs
        ),
        "longest_honest_streak": max(
            (d.get("longest_honest_streak") or 0 for d in runs), default=0
        ),
    }


def honest_flags(detection: dict[str, Any]) -> str:
    """``"0.4% (3 of 796)"``: the honest client-rounds flagged of a :func:`detection_summary`
    (or of several, summed)."""
    flagged, sampled = detection["honest_client_rounds_flagged"], detection["honest_client_rounds"]
    return f"{100 * flagged / sampled:.1f}% ({flagged} of {sampled})" if sampled else "-"


def _false_positives(
    flagged_by_round: list[set[str]], selected_by_round: list[set[str]], malicious: set[str]
) -> dict[str, int]:
    """Honest client-rounds sampled, how many ended flagged, and the longest run of them."""
    sampled = flagged = longest = 0
    streak: dict[str, int] = {}
    for cohort, flags in zip(selected_by_round, flagged_by_round):
        for cid in set(cohort) - malicious:
            sampled += 1
            streak[cid] = streak.get(cid, 0) + 1 if cid in flags else 0
            flagged += cid in flags
            longest = max(longest, streak[cid])
    return {
        "honest_client_rounds": sampled,
        "honest_client_rounds_flagged": flagged,
        "longest_honest_streak": longest,
    }


def detection_by_round(results: dict[str, Any]) -> tuple[list[float], list[float]]:
    """A simulation's ``results.json`` read round by round: recall over the attackers that have
    attacked so far (``clients[id].attacked_rounds``) and precision of the flags after each
    round, NaN where undefined (no attacker yet, no flag)."""
    first = {
        cid: min(c["attacked_rounds"])
        for cid, c in results["clients"].items()
        if c.get("attacked_rounds")
    }
    malicious = {cid for cid, c in results["clients"].items() if c.get("malicious")}
    recall, precision = [], []
    for record in results["rounds"]:
        attacked = {cid for cid, r in first.items() if r <= record["round"]}
        flagged = set(record["flagged"])
        recall.append(len(flagged & attacked) / len(attacked) if attacked else float("nan"))
        precision.append(len(flagged & malicious) / len(flagged) if flagged else float("nan"))
    return recall, precision


def plot_detection_by_round(
    runs: dict[str, list[dict[str, Any]]], path: Path, title: str = ""
) -> Path:
    """Recall and precision after each round (:func:`detection_by_round`), each line the mean
    over one label's runs (the seeds of a grid cell), with the issue's 0.95 marked."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, results in runs.items():
        curves = [detection_by_round(r) for r in results]
        length = max(len(recall) for recall, _ in curves)
        for ax, k in ((left, 0), (right, 1)):
            values = np.full((len(curves), length), np.nan)
            for i, curve in enumerate(curves):
                values[i, : len(curve[k])] = curve[k]
            defined = np.isfinite(values).any(axis=0)
            mean = np.full(length, np.nan)
            mean[defined] = np.nanmean(values[:, defined], axis=0)
            ax.plot(np.arange(1, length + 1), mean, marker="o", ms=3,
                    label=f"{label} ({len(results)} run{'s' * (len(results) != 1)})")  # fmt: skip
    for ax, name in ((left, "recall over the attackers that attacked so far"),
                     (right, "precision of the flags")):  # fmt: skip
        ax.axhline(0.95, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="round", title=name, ylim=(0, 1.02))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
