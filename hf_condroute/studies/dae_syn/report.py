"""The study's outputs: `<stem>.json` (row -> loss, loss_sem, focus, cover, seeds), `<stem>.md` (the table beside
paper A's numbers) and `<stem>.png` (loss and Focus/Cover against the fraction of tag-supervised images)."""

from __future__ import annotations

import os

from ..rows import supervision_figure, write_results_json
from .study import Row, TrainSettings

# paper A Table 1 (plain rows) and Table 2 (subnet init), DAE-Syn column: loss on 64x64 images after 100k steps
PAPER_LOSS = {
    "tag": 0.2,
    "hash": 1587.2,
    "monolithic": 1018.6,
    "top_k": 0.7,
    "st_gumbel": 20.9,
    "reinforce": 26.0,
    "top_k+init": 0.2,
    "st_gumbel+init": 3.9,
    "reinforce+init": 26.9,
}


def write_json(summary: dict[str, dict], path: str) -> None:
    write_results_json(summary, path)


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(summary: dict[str, dict]) -> str:
    lines = [
        "| Row | Loss (mean ± SEM) | Focus | Cover | Seeds | Paper A loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        loss = _fmt(s["loss"]) + ("" if s["loss_sem"] is None else f" ± {_fmt(s['loss_sem'])}")
        paper = _fmt(PAPER_LOSS.get(name))
        lines.append(f"| {name} | {loss} | {s['focus']:.2f} | {s['cover']:.2f} | {s['seeds']} | {paper} |")
    return "\n".join(lines)


def settings_text(settings: TrainSettings, workers: int, wall_seconds: float) -> str:
    m = settings.model
    return (
        f"{m.image_size}x{m.image_size} images, widths {list(m.widths)}, features {m.feature_dim}, embeddings "
        f"{m.embed_dim}; {settings.steps} steps of batch {settings.batch_size}, Adam lr {settings.lr:g} "
        f"(warm-up {settings.warmup_ratio:.0%}, linear decay), gradient clip {settings.grad_clip:g}, tag supervision "
        f"coefficient {settings.tag_supervision_coef:g} per block; {workers} worker process(es); "
        f"wall time {wall_seconds / 60:.1f} min."
    )


def write_markdown(
    summary: dict[str, dict], settings: TrainSettings, workers: int, wall_seconds: float, path: str
) -> None:
    text = (
        "# DAE-Syn (paper A, section 3): reconstruction loss over all 4096 images\n\n"
        "Loss = sum of squared pixel errors per image (pixels in [0, 1]), averaged over the images, after training. "
        "Focus/Cover: paper A section 4.2, over the 4 blocks x 8 subnetworks and the 4 factors x 8 tags. The paper "
        "trained 64x64 images for 100k steps, so compare orderings, not values.\n\n"
        f"{markdown_table(summary)}\n\nSettings: {settings_text(settings, workers, wall_seconds)}\n"
    )
    with open(path, "w") as f:
        f.write(text)


def plot_supervision(summary: dict[str, dict], path: str) -> bool:
    """Loss (log scale) and Focus/Cover against the tag-supervised fraction (paper A Figure 2); False (and nothing
    written) when no router has a supervision row."""
    drawn = supervision_figure(summary, Row, "loss", "DAE-Syn: effect of tag supervision (paper A Figure 2)")
    if drawn is None:
        return False
    fig, ax_loss, ax_fc = drawn
    ax_loss.set_yscale("log")
    ax_loss.set_ylim(top=8 * max(r["loss"] for r in summary.values()))  # room for the legend above every line
    ax_loss.set_ylabel("loss over all images (log scale)")
    for ax in (ax_loss, ax_fc):
        ax.set_xlabel("images with tag supervision")
    ax_loss.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_outputs(
    summary: dict[str, dict], settings: TrainSettings, workers: int, wall_seconds: float, output_dir: str, stem: str
) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, stem)
    write_json(summary, base + ".json")
    write_markdown(summary, settings, workers, wall_seconds, base + ".md")
    written = [base + ".json", base + ".md"]
    if plot_supervision(summary, base + ".png"):
        written.append(base + ".png")
    return written
