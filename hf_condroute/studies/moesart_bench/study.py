"""The whole study: the random search per router and data set, then every table's rows over the seeds, then the
report. `recipes/moesart_benchmarks.py` is its command line."""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from .benchmark import build_benchmark
from .experiments import TABLES, best_trial, routers_to_search, search_trials, table_rows
from .report import summarize, write_report
from .runner import Job, Runner


def resumed_text(results: dict) -> str:
    """'' for a fresh run; else which log it resumed from and how many runs it took from there (then the wall time
    is this invocation's alone)."""
    resumed = results.get("resumed")
    if not resumed:
        return ""
    return (
        f"resumed from {resumed['log']}: {resumed['reused_runs']} runs taken from an earlier invocation, "
        f"{resumed['new_runs']} run now (delete the log to start over); this invocation's "
    )


def run_study(
    datasets: list[str],
    data_dir: str | None = None,
    quick: bool = False,
    seeds: int = 20,
    trials: int = 6,
    workers: int = 2,
    threads: int = 1,
    output_dir: str = "results",
    stem: str = "moesart_benchmarks",
    tables: tuple[str, ...] = tuple(TABLES),
    steps: int | None = None,
    command: str | None = None,
) -> dict:
    """steps: a training budget for every data set instead of its own; command: the command line the report
    quotes (default: the recipe's, with --quick where quick)."""
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"Unknown table(s) {unknown}: choose from {', '.join(TABLES)}.")
    if seeds < 1 or trials < 2 or workers < 1 or threads < 1:
        raise ValueError(
            f"Need seeds >= 1, trials >= 2 (MOESART's search alternates lambda = 0 and lambda > 0), workers >= 1 and "
            f"threads >= 1; got seeds={seeds}, trials={trials}, workers={workers}, threads={threads}."
        )
    start = time.perf_counter()
    benches = {n: build_benchmark(n, data_dir=data_dir, quick=quick, steps=steps) for n in datasets}
    os.makedirs(output_dir, exist_ok=True)
    log = os.path.join(output_dir, f"{stem}.runs.jsonl")
    runner = Runner(benches, data_dir, quick, workers, threads, log, steps)

    searched = {n: routers_to_search(b, tables) for n, b in benches.items()}
    drawn = {n: [t for r in searched[n] for t in search_trials(b, r, trials)] for n, b in benches.items()}
    found = runner.run([Job(n, t.spec, t.seed) for n in benches for t in drawn[n]], "random search")
    search = {n: {t: found[Job(n, t.spec, t.seed)]["scores"]["val_loss"] for t in drawn[n]} for n in benches}
    tuned = {n: {r: best_trial(search[n], r) for r in searched[n]} for n in benches}
    search_time = time.perf_counter() - start

    rows = {n: table_rows(b, tuned[n], search[n], tables) for n, b in benches.items()}
    done = runner.run([Job(n, row.spec, s) for n in benches for row in rows[n] for s in range(seeds)], "table rows")

    results = {
        "datasets": datasets,
        "seeds": seeds,
        "trials_per_router": trials,
        "workers": workers,
        "threads": threads,
        "benchmarks": {},
    }
    for n, bench in benches.items():
        tables: dict = {}
        for row in rows[n]:
            runs = [done[Job(n, row.spec, s)] for s in range(seeds)]
            summary = summarize([r["scores"] for r in runs]) | {"lr": row.spec.lr, "spec": asdict(row.spec)}
            entry = tables.setdefault(row.table, {"rows": {}, "curves": {}})
            entry["rows"][row.label] = summary
            if row.table == "fig3":
                entry["curves"][row.label] = [r["curve"] for r in runs]
        results["benchmarks"][n] = {
            "bench": bench,
            "settings": {
                k: getattr(bench, k)
                for k in ("sizes", "steps", "batch_size", "eval_every", "num_experts", "k", "lr_range", "standin")
            }
            | {"tasks": [asdict(t) for t in bench.tasks]},
            "search": {
                r: {
                    "chosen": asdict(tuned[n][r]),
                    "trials": [{"spec": asdict(t.spec), "val_loss": v} for t, v in search[n].items() if t.router == r],
                }
                for r in searched[n]
            },
            "tables": {t: tables[t] for t in TABLES if t in tables},
        }
    wall = time.perf_counter() - start
    results["wall_time_s"], results["search_time_s"] = wall, search_time
    # a second run of the same command resumes from the log: its wall time covers only the runs it did itself
    results["resumed"] = {"log": log, "reused_runs": runner.reused, "new_runs": runner.ran} if runner.reused else None
    command = command or f"python recipes/moesart_benchmarks.py{' --quick' if quick else ''}"
    header = (
        "# MOESART benchmarks: paper B's Table 1, Figures 3-4 and Tables S1-S4\n\n"
        f"`{command}`: {', '.join(datasets)}; a random search "
        f"of {trials} trials per router (one seed each, chosen by validation loss), then {seeds} seeds per row, "
        f"mean ± standard error; {workers} worker process(es) of {threads} thread(s); {resumed_text(results)}wall time "
        f"{wall / 60:.1f} min (search {search_time / 60:.1f} min). Paper B's columns are its own data sets' "
        "numbers (50 seeds, 500 tuning trials), for reference, not a like-for-like comparison.\n"
    )
    results["written"] = write_report(results, output_dir, stem, header)
    return results
