"""The study's outputs: `<stem>.json` (the settings, the domain accuracy of a ResNet, and per row: accuracy, its
SEM, accuracy per domain, Focus/Cover, per-block load, seeds), `<stem>.md` (the table beside paper A's Res-Dom
column) and `<stem>.png` (accuracy and Focus/Cover against the fraction of tag-supervised images)."""

from __future__ import annotations

import os

from ..rows import supervision_figure, write_results_json
from .study import Row

# paper A Table 1 (plain rows) and Table 2 (subnet init), Res-Dom column: DomainNet test accuracy (%)
PAPER_ACCURACY = {
    "tag": 62.5,
    "hash": 54.5,
    "monolithic": 60.5,
    "top_k": 61.5,
    "st_gumbel": 60.3,
    "reinforce": 61.5,
    "top_k+init": 62.0,
    "st_gumbel+init": 60.8,
    "reinforce+init": 61.9,
}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def max_load(row: dict) -> float:
    """The largest share of test images one expert gets, averaged over the blocks (1/6: balanced; 1: collapsed)."""
    loads = list(row["load"].values())
    return sum(max(load) for load in loads) / len(loads)


def markdown_table(summary: dict[str, dict]) -> str:
    domains = list(next(iter(summary.values()))["domain_accuracy"])
    lines = [
        "| Row | Accuracy % (mean ± SEM) | " + " | ".join(domains) + " | Focus | Cover | Max load | Seeds | Paper A |",
        "|---|---|" + "---|" * len(domains) + "---|---|---|---|---|",
    ]
    for name, s in summary.items():
        acc = _fmt(s["accuracy"]) + ("" if s["accuracy_sem"] is None else f" ± {_fmt(s['accuracy_sem'])}")
        per_domain = " | ".join(_fmt(s["domain_accuracy"][d]) for d in domains)
        lines.append(
            f"| {name} | {acc} | {per_domain} | {s['focus']:.2f} | {s['cover']:.2f} | {max_load(s):.2f} | "
            f"{s['seeds']} | {_fmt(PAPER_ACCURACY.get(name))} |"
        )
    return "\n".join(lines)


def write_markdown(summary: dict[str, dict], meta: dict, path: str) -> None:
    text = (
        "# Res-Dom (paper A, section 3): test accuracy of a frozen ResNet with routed conv adapters\n\n"
        "Built-in data: scikit-learn's digits rendered in six DomainNet-like domains (recipes/res_dom.py). "
        "Accuracy is the mean over the six domains of the test split; Focus/Cover (paper A 4.2) over the 8 blocks x "
        "6 experts and the 6 domains; Max load: the largest share of test images one expert gets, mean over the "
        "blocks (1/6 balanced, 1 collapsed). Paper A's column is DomainNet with an ImageNet ResNet-18, so compare "
        "orderings, not values.\n\n"
        f"A ResNet reads the domain with {meta['domain_accuracy']:.1f}% test accuracy (paper A: 85% on DomainNet).\n\n"
        f"{markdown_table(summary)}\n\nSettings: {meta['settings_text']}\n"
    )
    with open(path, "w") as f:
        f.write(text)


def plot_supervision(summary: dict[str, dict], path: str) -> bool:
    """Accuracy and Focus/Cover against the tag-supervised fraction (paper A Figure 2); False (and nothing written)
    when no router has a supervision row."""
    drawn = supervision_figure(summary, Row, "accuracy", "Res-Dom: effect of tag supervision (paper A Figure 2)")
    if drawn is None:
        return False
    fig, ax_acc, ax_fc = drawn
    ax_acc.set_ylabel("test accuracy (%), mean over domains")
    for ax in (ax_acc, ax_fc):
        ax.set_xlabel("training images with tag supervision")
    ax_acc.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_outputs(summary: dict[str, dict], meta: dict, output_dir: str, stem: str) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, stem)
    write_results_json({"meta": meta, "rows": summary}, base + ".json")
    write_markdown(summary, meta, base + ".md")
    written = [base + ".json", base + ".md"]
    if plot_supervision(summary, base + ".png"):
        written.append(base + ".png")
    return written
