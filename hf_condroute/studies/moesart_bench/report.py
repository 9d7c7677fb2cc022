"""The benchmarks' results: each row's mean +- standard error over seeds, the one-sided unpaired t-test of each
table's tested row against its best competitor (scipy.stats.ttest_ind), markdown tables with paper B's numbers
beside ours, the JSON record and the Figure 3 / Figure 4 plots (matplotlib)."""

from __future__ import annotations

import math
import os

import numpy as np

from ..rows import write_results_json
from .benchmark import Benchmark
from .experiments import COMPARISONS, FIG4_K, TABLES

SCORE_LABELS = {"accuracy": "acc. (%) ↑", "auc": "AUC (%) ↑", "mse": "MSE ↓"}
# paper B's numbers for the rows we run: test loss x 1e-2 and the two tasks' metrics. Image sets: its Multi-MNIST
# rows (k = 4 of 8); recommender sets: its MovieLens rows with task weights (0.1, 0.9) (k = 2 of 16). A router's
# numbers are the same in every table that has it (Tables 1, S1, S4).
MULTI_MNIST = {
    "Softmax (Dense)": (7.16, 98.16, 97.57),
    "Top-k": (7.15, 98.12, 97.58),
    "V-MoE": (6.98, 98.16, 97.68),
    "SMoE": (6.90, 98.18, 97.69),
    "Expert Choice Router": (8.57, 97.80, 97.22),
    "X-MoE": (7.02, 98.21, 97.63),
    "MOESART": (5.86, 98.40, 97.92),
    "MOESART with (i),(ii)": (6.15, 98.33, 97.92),
    "DSelect-k": (6.93, 98.14, 97.68),
    "COMET": (6.83, 98.21, 97.63),
}
MOVIELENS = {
    "Softmax (Dense)": (73.96, 86.02, 0.7701),
    "Top-k": (77.72, 86.08, 0.8121),
    "V-MoE": (75.67, 86.79, 0.7904),
    "SMoE": (79.47, 85.36, 0.8303),
    "Expert Choice Router": (81.14, 84.65, 0.8477),
    "X-MoE": (77.59, 86.86, 0.8119),
    "MOESART": (73.60, 87.33, 0.7684),
    "DSelect-k": (73.81, 87.79, 0.7715),
    "COMET": (74.19, 87.67, 0.7756),
}


def _pick(numbers: dict, labels: list[str], renamed: dict | None = None) -> dict:
    renamed = renamed or {}
    return {label: numbers[renamed.get(label, label)] for label in labels}


PAPER = {
    ("table1", "image"): _pick(MULTI_MNIST, list(MULTI_MNIST)[:7]),
    ("table1", "recommender"): _pick(MOVIELENS, list(MOVIELENS)[:7]),
    ("s1", "image"): _pick(
        MULTI_MNIST, ["Top-k", "MOESART with (i),(ii)", "MOESART with (3)"], {"MOESART with (3)": "MOESART"}
    ),
    ("s2", "recommender"): {"MOESART without trimmed lasso": (73.85,), "MOESART with trimmed lasso": (73.40,)},
    ("s3", "recommender"): {"Top-k": (77.72,), "Expert Choice Router": (81.14,), "MOESART": (74.04,)},
    ("s4", "image"): _pick(MULTI_MNIST, ["Softmax (Dense)", "DSelect-k", "COMET", "MOESART"]),
    ("s4", "recommender"): _pick(MOVIELENS, ["Softmax (Dense)", "DSelect-k", "COMET", "MOESART"]),
}
PAPER_SOURCE = {"image": "Multi-MNIST, k = 4 of 8", "recommender": "MovieLens, TW = (0.1, 0.9), k = 2 of 16"}


def mean_sem(values: list[float]) -> tuple[float, float | None]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None)


def summarize(per_seed: list[dict[str, float]]) -> dict:
    """{metric: mean, metric_sem: standard error (None for one seed)} of every score, the seed count and the
    per-seed test losses (what the t-tests use)."""
    out: dict = {"seeds": len(per_seed), "losses": [s["loss"] for s in per_seed]}
    for m in per_seed[0]:
        out[m], out[f"{m}_sem"] = mean_sem([s[m] for s in per_seed])
    return out


def ttest(target: dict, candidates: dict[str, dict]) -> dict | None:
    """One-sided unpaired t-test that the target row's test loss is lower than that of the candidate of lowest mean
    loss (p_value), and the reverse (p_value_reverse: that it is higher). None without candidates; p values are
    None with fewer than two seeds on a side."""
    from scipy.stats import ttest_ind

    if not candidates:
        return None
    best = min(candidates, key=lambda r: candidates[r]["loss"])
    a, b = target["losses"], candidates[best]["losses"]
    p = q = None
    if len(a) > 1 and len(b) > 1:
        p = float(ttest_ind(a, b, alternative="less").pvalue)
        q = float(ttest_ind(a, b, alternative="greater").pvalue)
        p, q = (None if math.isnan(p) else p), (None if math.isnan(q) else q)
    return {"against": best, "p_value": p, "p_value_reverse": q, "significant": p is not None and p < 0.05}


def table_test(table: str, rows: dict[str, dict]) -> dict | None:
    if table not in COMPARISONS or COMPARISONS[table][0] not in rows:
        return None
    target, others = COMPARISONS[table]
    return ttest(rows[target], {r: rows[r] for r in others if r in rows})


def _fmt(mean: float, sem: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    s = f"{mean * scale:.{digits}f}"
    return s + (f" ± {sem * scale:.{digits}f}" if sem is not None else "")


def _paper_cell(paper: tuple | None, n_tasks: int) -> str:
    if not paper:
        return "–"
    return ", ".join(f"{v:g}" for v in paper)


def markdown_table(bench: Benchmark, table: str, rows: dict[str, dict], test: dict | None) -> str:
    """One table of one data set: rows {label: summary}."""
    metrics = [f"{t.name}_{t.metric}" for t in bench.tasks]
    digits = {"accuracy": 2, "auc": 2, "mse": 4}
    paper = PAPER.get((table, bench.kind), {})
    head = ["Row", "Test loss (×10⁻²) ↓"] + [f"{t.name} {SCORE_LABELS[t.metric]}" for t in bench.tasks]
    head += ["k/s per gate (training)", "experts run / example", "best step", "Adam lr"]
    if paper:
        head.append(f"paper B ({PAPER_SOURCE[bench.kind]}): loss, metrics")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in rows.items():
        loss = _fmt(s["loss"], s["loss_sem"], 100)
        if test and test["significant"] and label == COMPARISONS[table][0]:
            loss = f"**{loss}**"
        cells = [label, loss]
        for m, t in zip(metrics, bench.tasks):
            cells.append(_fmt(s[m], s[f"{m}_sem"], 1, digits[t.metric]))
        cells += [f"{s['k_per_gate']:.2f}", f"{s['experts_run']:.2f}", f"{s['best_step']:.0f}", f"{s['lr']:.3g}"]
        if paper:
            cells.append(_paper_cell(paper.get(label), len(bench.tasks)))
        lines.append("| " + " | ".join(cells) + " |")
    if test is not None:
        p = "n/a (one seed)" if test["p_value"] is None else f"{test['p_value']:.3g}"
        q = "" if test["p_value_reverse"] is None else f"; the reverse (higher): p = {test['p_value_reverse']:.3g}"
        lines.append(
            f"\nOne-sided unpaired t-test, {COMPARISONS[table][0]}'s test loss < {test['against']}'s (the best of "
            f"{', '.join(COMPARISONS[table][1])}): p = {p}{q}" + (" (bold: p < 0.05)." if test["significant"] else ".")
        )
    return "\n".join(lines)


def fig3_plot(curves: dict[str, list[list[tuple[int, float]]]], title: str, path: str) -> str:
    """Validation loss during training, mean +- standard error over seeds, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        values = np.array([[v for _, v in run] for run in runs])
        mean = values.mean(axis=0)
        sem = values.std(axis=0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
        ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - sem, mean + sem, alpha=0.25)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fig4_plot(rows: dict[str, dict], title: str, path: str) -> str:
    """Test loss against k for Top-k and MOESART (mean +- standard error), softmax as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("Top-k", "MOESART"):
        ks = [k for k in FIG4_K if f"{name}, k = {k}" in rows]
        mean = [rows[f"{name}, k = {k}"]["loss"] for k in ks]
        err = [rows[f"{name}, k = {k}"]["loss_sem"] or 0.0 for k in ks]
        ax.errorbar(ks, mean, yerr=err, marker="o", capsize=3, label=name)
    if "Softmax (Dense)" in rows:
        ax.axhline(rows["Softmax (Dense)"]["loss"], color="grey", linestyle="--", label="Softmax (dense)")
    ax.set_xlabel("k (experts per example and gate)")
    ax.set_ylabel("test loss")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, output_dir: str, stem: str, header: str) -> list[str]:
    """results: {"benchmarks": {name: {"bench": Benchmark, "tables": {table: {"rows": {label: summary},
    "curves": {label: [...]}}}, ...}}, ...}; writes <stem>.json, <stem>.md and the PNGs."""
    os.makedirs(output_dir, exist_ok=True)
    md, written, payload = [header], [], {k: v for k, v in results.items() if k != "benchmarks"}
    payload["benchmarks"] = {}
    for name, entry in results["benchmarks"].items():
        bench = entry["bench"]
        md.append(f"\n## {bench.title}\n")
        if bench.standin:
            md.append(f"Data: a stand-in for {bench.standin}, not the paper's data set.\n")
        md.append(
            f"{bench.sizes['train']} / {bench.sizes['val']} / {bench.sizes['test']} train / val / test rows; "
            f"{bench.num_experts} experts, k = {bench.k} per gate unless a row says otherwise; {bench.steps} steps "
            f"of batch {bench.batch_size}, the best validation loss (measured every {bench.eval_every} steps) kept."
        )
        record = {"settings": entry["settings"], "search": entry["search"], "tables": {}}
        for table, t in entry["tables"].items():
            test = table_test(table, t["rows"])
            md.append(f"\n### {TABLES[table][0]}\n\n" + markdown_table(bench, table, t["rows"], test))
            record["tables"][table] = {"rows": t["rows"], "ttest": test}
            if table == "fig3" and t.get("curves"):
                written.append(
                    fig3_plot(t["curves"], f"{TABLES[table][0]}\n({bench.title})", _png(output_dir, stem, name, table))
                )
                md.append(f"\n![Figure 3]({os.path.basename(written[-1])})")
                record["tables"][table]["curves"] = t["curves"]
            if table == "fig4":
                written.append(
                    fig4_plot(t["rows"], f"{TABLES[table][0]}\n({bench.title})", _png(output_dir, stem, name, table))
                )
                md.append(f"\n![Figure 4]({os.path.basename(written[-1])})")
        payload["benchmarks"][name] = record
    json_path, md_path = os.path.join(output_dir, f"{stem}.json"), os.path.join(output_dir, f"{stem}.md")
    write_results_json(payload, json_path)
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    return [json_path, md_path, *written]


def _png(output_dir: str, stem: str, name: str, table: str) -> str:
    return os.path.join(output_dir, f"{stem}_{name}_{table}.png")
