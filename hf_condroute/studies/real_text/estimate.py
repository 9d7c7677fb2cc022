"""What a full real-text run will cost, from a few timed steps of every row (`recipes/real_text.py --estimate`).

Each row trains `probe_steps` steps on a small sample and is scored on it; its median CPU seconds per step and its
CPU seconds per scored review (the whole rest of the run: model copy, evaluation) are scaled to the settings'
steps and split sizes. With one torch thread per worker, a run's wall time on idle cores is its CPU time, and the
workers split the runs: wall = features + (tuning runs + rows x seeds runs) / workers.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

from .rows import TUNED_ROWS, get_rows
from .runner import Context, run_one


def estimate_study(ctx: Context, row_names, seeds: int, workers: int, features_seconds: float,
                   full_sizes, probe_steps: int = 4) -> dict:  # fmt: skip
    """Print and return the per-row timings and the estimated wall time of the run with `ctx.settings` and
    `full_sizes` (reviews per source of the full run; `ctx` holds a small sample)."""
    s = ctx.settings
    probe = dataclasses.replace(ctx, settings=dataclasses.replace(s, steps=probe_steps))
    sampled = sum(len(d) for d in ctx.data.values())
    per_review_features = features_seconds / sampled
    num_sources = len(ctx.sources)
    rows, timings, experts = get_rows(row_names), {}, None
    if any(r.needs_tag_row for r in rows) and all(r.name != "tag" for r in rows):
        rows.insert(0, get_rows(["tag"])[0])  # X-LoRA's LoRAs: the full run trains it too, unreported
    with tempfile.TemporaryDirectory() as tmp:
        for row in sorted(rows, key=lambda r: r.name != "tag"):
            start = time.process_time()
            scores = run_one(probe, row, 0, s.lr_grid[0], "val", experts, tmp if row.name == "tag" else None)
            total = time.process_time() - start
            experts = scores.get("experts", experts)
            step = scores.get("step_cpu_seconds", 0.0)
            rest = max(total - probe_steps * step, 0.0) / len(ctx.data["val"])
            timings[row.name] = {"step_cpu_seconds": step, "other_cpu_seconds_per_review": rest}
    test_reviews, val_reviews = full_sizes.test * num_sources, full_sizes.val * num_sources
    run = {n: t["step_cpu_seconds"] * s.steps + t["other_cpu_seconds_per_review"] * test_reviews
           for n, t in timings.items()}  # fmt: skip
    tuned = [n for n in TUNED_ROWS if n in timings] if len(s.lr_grid) > 1 else []
    tuning = sum(
        timings[n]["step_cpu_seconds"] * s.steps + timings[n]["other_cpu_seconds_per_review"] * val_reviews
        for n in tuned
    ) * len(s.lr_grid)
    reviews = (full_sizes.train + full_sizes.val + full_sizes.test) * num_sources
    features = per_review_features * reviews
    total_cpu = tuning + seeds * sum(run.values())
    wall = features + total_cpu / workers
    lora = timings.get("LoRA", {}).get("step_cpu_seconds")
    print("| Row | CPU s / step | step / LoRA | CPU s per run |\n|---|---|---|---|")
    for name, t in timings.items():
        ratio = f"{t['step_cpu_seconds'] / lora:.2f}" if lora and t["step_cpu_seconds"] else "-"
        print(f"| {name} | {t['step_cpu_seconds']:.3f} | {ratio} | {run[name]:.0f} |")
    print(
        f"\nfeatures {features / 60:.1f} min ({per_review_features:.3f} s per review, {reviews} reviews); "
        f"learning-rate tuning {tuning / 60:.1f} CPU min; runs {seeds * sum(run.values()) / 60:.1f} CPU min; "
        f"estimated wall time with {workers} worker(s) on idle cores: {wall / 60:.1f} min"
    )
    return {"rows": timings, "features_seconds": features, "tuning_cpu_seconds": tuning,
            "run_cpu_seconds": run, "estimated_wall_seconds": wall}  # fmt: skip
