"""The plots a person puts in a paper: nothing cut, a legend entry for every colour (issue 14)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text

from fedwarden import report


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plotting functions close, to look at what they drew."""
    closed, close = [], plt.close
    monkeypatch.setattr(plt, "close", closed.append)
    yield closed
    for fig in closed:
        close(fig)


def test_trust_plot_explains_its_grey_cells_and_its_markers(figures, tmp_path: Path):
    trust = {"c00": [None, 0.4, 0.3], "c01": [0.9, 0.95, 0.97]}
    report.plot_trust_heatmap(trust, {"c00"}, tmp_path / "trust.png")
    legend = figures[0].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["malicious", "not scored yet"]


def test_trust_plot_without_unscored_cells_has_no_grey_entry(figures, tmp_path: Path):
    report.plot_trust_heatmap({"c00": [0.5, 0.6]}, set(), tmp_path / "trust.png")
    assert figures[0].axes[0].get_legend() is None


def test_matrix_title_is_never_cut(figures, tmp_path: Path):
    title = "final test accuracy\nfashion_mnist, 50 clients, 20% malicious, a long description"
    path = report.plot_matrix(np.array([[0.5], [0.9]]), ["none", "gaussian"], ["median"],
                              tmp_path / "m.png", title)  # fmt: skip
    fig, ax = figures[0], figures[0].axes[0]
    renderer = fig.canvas.get_renderer()
    (drawn,) = [a for a in ax.get_children() if isinstance(a, Text) and a.get_text() == title]
    title_px = drawn.get_window_extent(renderer).width * 150 / fig.dpi
    saved_px = matplotlib.image.imread(path).shape[1]
    assert saved_px >= title_px  # the saved image is at least as wide as its title
    # and sized to its content: no more than a margin around the title
    assert saved_px < title_px + 400
