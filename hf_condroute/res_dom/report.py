"""The study's outputs: `<stem>.json` (the settings, the domain accuracy of a ResNet, and per row: accuracy, its
SEM, accuracy per domain, Focus/Cover, per-block load, seeds), `<stem>.md` (the table beside paper A's Res-Dom
column) and `<stem>.png` (accuracy and Focus/Cover against the fraction of tag-supervised images)."""

from __future__ import annotations

import json
import os

from matplotlib.figure import Figure

from .study import HEURISTIC_ROUTERS, LEARNED_ROUTERS, SUPERVISION_PERCENTS, Row

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
    """Accuracy and Focus/Cover against the tag-supervised fraction for each learned router with supervision rows;
    the heuristic rows as horizontal lines. Returns False (and writes nothing) when no router has such a row."""
    routers = [
        r for r in LEARNED_ROUTERS if any(Row(r, supervision_percent=p).name in summary for p in SUPERVISION_PERCENTS)
    ]
    if not routers:
        return False
    percents = (0, *SUPERVISION_PERCENTS)
    fig = Figure(figsize=(11, 4.2))  # no pyplot: no global figure manager, the backend left as it is
    ax_acc, ax_fc = fig.subplots(1, 2)
    for i, router in enumerate(routers):
        names = [Row(router, supervision_percent=p).name for p in percents]
        xs = [x for x, n in enumerate(names) if n in summary]
        rows = [summary[n] for n in names if n in summary]
        color = f"C{i}"
        ax_acc.errorbar(xs, [r["accuracy"] for r in rows], yerr=[r["accuracy_sem"] or 0.0 for r in rows], marker="o",
                        capsize=3, color=color, label=router)  # fmt: skip
        ax_fc.plot(xs, [r["focus"] for r in rows], marker="o", color=color, label=f"{router} focus")
        ax_fc.plot(xs, [r["cover"] for r in rows], marker="s", linestyle="--", color=color, label=f"{router} cover")
    for j, name in enumerate(HEURISTIC_ROUTERS):
        if name in summary:
            ax_acc.axhline(
                summary[name]["accuracy"], color="0.4", linestyle=(0, (1 + 2 * j, 2)), linewidth=1, label=name
            )
    ax_acc.set_ylabel("test accuracy (%), mean over domains")
    ax_fc.set_ylabel("Focus (solid) / Cover (dashed)")
    ax_fc.set_ylim(0, 1.05)
    for ax in (ax_acc, ax_fc):
        ax.set_xticks(range(len(percents)), [f"{p}%" for p in percents])
        ax.set_xlabel("training images with tag supervision")
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, ncol=2)
    ax_fc.legend(fontsize=7, ncol=2)
    fig.suptitle("Res-Dom: effect of tag supervision (paper A Figure 2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_outputs(summary: dict[str, dict], meta: dict, output_dir: str, stem: str) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, stem)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": summary}, f, indent=2)
        f.write("\n")
    write_markdown(summary, meta, base + ".md")
    written = [base + ".json", base + ".md"]
    if plot_supervision(summary, base + ".png"):
        written.append(base + ".png")
    return written
