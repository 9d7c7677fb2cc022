"""Table 1 on Multi-Digits: mean +- standard error over seeds, the one-sided unpaired t-test of MOESART's test loss
against the best other sparse router's (scipy.stats.ttest_ind, alternative='less'), results json and markdown."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

import numpy as np

ROUTERS = ("softmax", "top_k", "v_moe", "smoe", "expert_choice", "x_moe", "moesart")
DENSE = ("softmax",)
LABELS = {
    "softmax": "Softmax (Dense)",
    "top_k": "Top-k",
    "v_moe": "V-MoE",
    "smoe": "SMoE",
    "expert_choice": "Expert Choice Router",
    "x_moe": "X-MoE",
    "moesart": "MOESART",
}
METRICS = ("loss", "task1_accuracy", "task2_accuracy", "val_loss", "k_per_gate", "experts_run")
# paper B Table 1, Multi-MNIST (TW = (0.5, 0.5)), k = 4 of 8: test loss (x 1e-2), task accuracies (%), k/s
PAPER_MULTI_MNIST = {
    "softmax": (7.16, 98.16, 97.57, 8),
    "top_k": (7.15, 98.12, 97.58, 4),
    "v_moe": (6.98, 98.16, 97.68, 4),
    "smoe": (6.90, 98.18, 97.69, 4),
    "expert_choice": (8.57, 97.80, 97.22, 4),
    "x_moe": (7.02, 98.21, 97.63, 4),
    "moesart": (5.86, 98.40, 97.92, 4),
}


def mean_sem(values: list[float]) -> tuple[float, float | None]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None)


def summarize(per_seed: list[dict[str, float]]) -> dict:
    """{metric: mean, metric_sem: standard error (None for one seed)}, seeds, and the per-seed test losses."""
    out: dict = {"seeds": len(per_seed), "losses": [s["loss"] for s in per_seed]}
    for m in METRICS:
        out[m], out[f"{m}_sem"] = mean_sem([s[m] for s in per_seed])
    return out


def ttest_moesart(summary: dict[str, dict]) -> dict | None:
    """MOESART against the sparse router (not softmax) of lowest mean test loss: one-sided unpaired t-test that
    MOESART's test loss is lower. None without MOESART or another sparse router; p is None for one seed."""
    from scipy.stats import ttest_ind

    others = {r: s for r, s in summary.items() if r != "moesart" and r not in DENSE}
    if "moesart" not in summary or not others:
        return None
    best = min(others, key=lambda r: others[r]["loss"])
    a, b = summary["moesart"]["losses"], others[best]["losses"]
    p = None
    if len(a) > 1 and len(b) > 1:
        p = float(ttest_ind(a, b, alternative="less").pvalue)
        p = None if math.isnan(p) else p
    return {"against": best, "p_value": p, "significant": p is not None and p < 0.05}


def _fmt(mean: float, sem: float | None, scale: float = 1.0, digits: int = 2) -> str:
    s = f"{mean * scale:.{digits}f}"
    return s + (f" ± {sem * scale:.{digits}f}" if sem is not None else "")


def markdown_table(summary: dict[str, dict], test: dict | None) -> str:
    lines = [
        "| Router | Test loss (×10⁻²) ↓ | Task-1 acc. (%) ↑ | Task-2 acc. (%) ↑ | k/s per gate (training) | "
        "experts run / example | paper B Multi-MNIST: loss, acc. 1, acc. 2, k/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r, s in summary.items():
        loss = _fmt(s["loss"], s["loss_sem"], 100)
        if r == "moesart" and test and test["significant"]:
            loss = f"**{loss}**"
        paper = PAPER_MULTI_MNIST.get(r)
        lines.append(
            f"| {LABELS.get(r, r)} | {loss} | {_fmt(s['task1_accuracy'], s['task1_accuracy_sem'])} | "
            f"{_fmt(s['task2_accuracy'], s['task2_accuracy_sem'])} | {s['k_per_gate']:.2f} | {s['experts_run']:.2f} | "
            + (f"{paper[0]:.2f}, {paper[1]:.2f}, {paper[2]:.2f}, {paper[3]} |" if paper else "– |")
        )
    if test is not None:
        p = "n/a (one seed)" if test["p_value"] is None else f"{test['p_value']:.3g}"
        lines.append(
            f"\nOne-sided unpaired t-test, MOESART's test loss < {LABELS.get(test['against'], test['against'])}'s "
            f"(the best other sparse router): p = {p}" + (" (bold: p < 0.05)." if test["significant"] else ".")
        )
    return "\n".join(lines)


def write_outputs(summary, test, settings, data_sizes, wall_s, output_dir: str, stem: str) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    seeds = next(iter(summary.values()))["seeds"] if summary else 0
    payload = {
        "dataset": "multi_digits",
        "settings": asdict(settings),
        "data_sizes": dict(zip(("train", "val", "test"), data_sizes)),
        "seeds": seeds,
        "wall_time_s": wall_s,
        "rows": summary,
        "ttest": test,
        "paper_multi_mnist": {
            r: dict(zip(("loss_x1e-2", "task1", "task2", "k"), v)) for r, v in PAPER_MULTI_MNIST.items()
        },
    }
    json_path, md_path = os.path.join(output_dir, f"{stem}.json"), os.path.join(output_dir, f"{stem}.md")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2)
    header = (
        f"# MOESART benchmarks: paper B Table 1 on Multi-Digits\n\n"
        f"Multi-Digits (two of scikit-learn's handwritten digits overlaid on 20x20, one label each; "
        f"{data_sizes[0]} / {data_sizes[1]} / {data_sizes[2]} train / val / test pairs), {settings.num_experts} CNN "
        f"experts, one gate per task, k = {settings.k} for the sparse routers; Adam lr {settings.lr}, "
        f"{settings.steps} steps of batch {settings.batch_size}, no tuning; {seeds} seeds, mean ± standard error; "
        f"wall time {wall_s / 60:.1f} min. The paper's column is its Multi-MNIST row (k = 4, 50 seeds, tuned), "
        f"for reference, not a like-for-like comparison.\n\n"
    )
    with open(md_path, "w") as f:
        f.write(header + markdown_table(summary, test) + "\n")
    return [json_path, md_path]
