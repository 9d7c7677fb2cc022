"""Heatmaps of routing statistics (matplotlib's Agg canvas directly: no pyplot, no global backend change)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOAD_PNG = "routing_load.png"
ALIGNMENT_PNG = "routing_alignment.png"


def _heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    colorbar_label: str,
    path: str,
    xlabel: str,
    annotate: bool,
    separators: Sequence[int] = (),
) -> str:
    rows, cols = matrix.shape
    width = min(4 + 0.6 * cols + 0.06 * max(len(r) for r in row_labels), 40)
    height = min(1.5 + 0.35 * rows, 30)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(matrix)
    image = ax.imshow(masked, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(rows), labels=list(row_labels), fontsize=8)
    step = max(1, cols // 48)  # keep the x labels readable for hundreds of subnetworks
    ax.set_xticks(range(0, cols, step), labels=list(col_labels)[::step], fontsize=7, rotation=90 if cols > 12 else 0)
    for x in separators:
        ax.axvline(x - 0.5, color="white", linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if annotate and rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                if np.isfinite(matrix[i, j]):
                    color = "black" if matrix[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    fig.tight_layout()
    fig.savefig(path)
    return path


def short_block_name(name: str) -> str:
    """Drop the wrappers' prefixes PEFT adds, keep what tells blocks apart."""
    for prefix in ("base_model.model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def plot_expert_load(blocks: dict, path: str, title: str | None = None) -> str:
    """Blocks x experts heatmap of each block's share of assignments (`blocks`: name -> BlockStats or its dict)."""
    loads = [b["load"] if isinstance(b, dict) else b.load for b in blocks.values()]
    width = max(len(load) for load in loads)
    matrix = np.full((len(loads), width), np.nan)
    for i, load in enumerate(loads):
        matrix[i, : len(load)] = load
    return _heatmap(
        matrix,
        [short_block_name(n) for n in blocks],
        [str(j) for j in range(width)],
        title or "Expert load per block",
        "share of assignments",
        path,
        "expert",
        annotate=True,
    )


def plot_alignment(
    alignment: Sequence[Sequence[float]],
    tag_labels: Sequence[str],
    subnetwork_labels: Sequence[str],
    path: str,
    title: str | None = None,
) -> str:
    """Tags x subnetworks heatmap of the F1 alignment behind Focus/Cover. Subnetworks ("<block>:<expert>") are
    labelled b<block index>:<expert>, blocks in the order of `subnetwork_labels`, separated by white lines."""
    blocks: list[str] = []
    cols, separators = [], []
    for label in subnetwork_labels:
        block, _, expert = label.rpartition(":")
        if block not in blocks:
            if blocks:
                separators.append(len(cols))
            blocks.append(block)
        cols.append(f"b{blocks.index(block)}:{expert}")
    return _heatmap(
        np.asarray(alignment, dtype=float),
        list(tag_labels),
        cols,
        title or "Tag / subnetwork alignment (F1)",
        "F1",
        path,
        "subnetwork (b<block>:<expert>, blocks in the order of routing_stats.json)",
        annotate=True,
        separators=separators,
    )
