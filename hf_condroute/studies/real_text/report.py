"""The real-text study's summary, markdown table, JSON and figure (accuracy against the cost of a training step)."""

from __future__ import annotations

import os

from ..rows import sem, write_results_json


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(
    per_seed: list[dict], sources: tuple[str, ...], lora_step: float | None, lora_cpu: float | None = None
) -> dict:
    """Means over seeds; accuracy_sem the standard error of the mean accuracy; step_vs_lora the row's median
    seconds per training step over LoRA's, step_cpu_vs_lora the same in process CPU seconds (which leave out time
    spent waiting for a core, so they hold on a shared machine); None for rows that do not train, or without a
    LoRA row."""
    acc = [s["accuracy"] for s in per_seed]
    out = {
        "accuracy": mean(acc),
        "accuracy_sem": sem(acc),
        "source_accuracy": {name: mean([s["source_accuracy"][i] for s in per_seed]) for i, name in enumerate(sources)},
        "trainable": per_seed[0]["trainable"],
        "lr": per_seed[0]["lr"],
        "seeds": len(per_seed),
    }
    if "step_seconds" in per_seed[0]:
        out["step_seconds"] = mean([s["step_seconds"] for s in per_seed])
        out["step_cpu_seconds"] = mean([s["step_cpu_seconds"] for s in per_seed])
        out["step_vs_lora"] = out["step_seconds"] / lora_step if lora_step else None
        out["step_cpu_vs_lora"] = out["step_cpu_seconds"] / lora_cpu if lora_cpu else None
    if "focus" in per_seed[0]:
        out["focus"] = mean([s["focus"] for s in per_seed])
        out["cover"] = mean([s["cover"] for s in per_seed])
    return out


def summarize_study(result: dict, sources: tuple[str, ...]) -> dict[str, dict]:
    rows = result["rows"]
    lora = rows.get("LoRA")
    lora_step = mean([s["step_seconds"] for s in lora]) if lora else None
    lora_cpu = mean([s["step_cpu_seconds"] for s in lora]) if lora else None
    return {name: summarize(per_seed, sources, lora_step, lora_cpu) for name, per_seed in rows.items()}


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(summary: dict[str, dict], sources: tuple[str, ...]) -> str:
    head = ["Row", "Accuracy % (mean ± SEM)", *sources, "Focus", "Cover", "Step / LoRA", "CPU step / LoRA",
            "Trainable", "lr", "Seeds"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in summary.items():
        acc = f"{r['accuracy']:.1f}" + (f" ± {r['accuracy_sem']:.1f}" if r["accuracy_sem"] is not None else "")
        cells = [name, acc, *[f"{r['source_accuracy'][s]:.1f}" for s in sources]]
        cells += [_cell(r.get(k), ".2f") for k in ("focus", "cover", "step_vs_lora", "step_cpu_vs_lora")]
        cells += [f"{r['trainable']:,}", "-" if "step_seconds" not in r else f"{r['lr']:g}", str(r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(summary: dict[str, dict], title: str):
    """Test accuracy (with SEM error bars) against CPU seconds per training step relative to LoRA's, one point per
    trained row; the zero-shot accuracy as a horizontal line."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global figure manager, the backend left as it is

    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    for i, (name, r) in enumerate(summary.items()):
        cost = r.get("step_cpu_vs_lora")
        if cost is None:
            if "step_seconds" not in r:
                ax.axhline(r["accuracy"], color="0.5", linestyle=":", linewidth=1, label=name)
            continue
        ax.errorbar(cost, r["accuracy"], yerr=r["accuracy_sem"] or 0.0, marker="o", capsize=3,
                    color=colormaps["tab20"](i % 20), label=name)  # fmt: skip
        ax.annotate(name, (cost, r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("CPU seconds per training step / LoRA's")
    ax.set_ylabel("test accuracy %, mean of the sources")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_outputs(summary: dict, result: dict, meta: dict, out_dir: str, stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")]
    write_results_json({"meta": meta, "lr": result["lr"], "summary": summary, "tuning": result["tuning"],
                        "per_seed": result["rows"]}, paths[0])  # fmt: skip
    sources = tuple(meta["sources"])
    text = [
        "# Real text: routed LoRA against LoRA and X-LoRA on a pretrained causal LM",
        "",
        meta["settings_text"],
        "",
        "Accuracy: next-token classification (' negative' / ' positive') on each source's held-out test split; the "
        "overall score is the mean of the sources. Focus/Cover (paper A 4.2) of each learned routing against the "
        "source (per-token routers: every real token a row). Step / LoRA: median seconds per training step over "
        "LoRA's, on the same machine; CPU step / LoRA: the same in process CPU seconds, which leave out waiting for "
        "a core (the steadier of the two on a shared machine).",
        "",
        f"Learning rates chosen on the validation split: {', '.join(f'{k} {v:g}' for k, v in result['lr'].items())}.",
        "",
        markdown_table(summary, sources),
        "",
    ]
    with open(paths[1], "w") as f:
        f.write("\n".join(text))
    figure(summary, f"{meta['model']} on movie reviews: accuracy against cost").savefig(paths[2], dpi=120)
    return paths
