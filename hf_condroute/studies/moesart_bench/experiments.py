"""The tables of paper B's benchmarks as rows of run setups, and the random search that tunes each router first.

Protocol (paper B supplement S6.3, scaled to 2 CPU cores): for each data set and each searched router, `trials`
random draws of its hyperparameters (Adam's learning rate log-uniform in the data set's range; MOESART's trimmed
lasso lambda; DSelect-k's and COMET's entropy weights), one training run each with its own seed, the best by
validation loss kept. Every row then trains `seeds` times (seeds 0..seeds-1) with its router's tuned settings plus
the row's own change (k, sampling with replacement, an adjustment strategy, load balancing, local search). A row
that is the same setup as a row of another table (Table 1's Top-k in Figure 4 and Table S1, ...) is one set of runs.

Tables (paper B's numbers beside ours in the report):
- table1: softmax (dense), top_k, v_moe, smoe, expert_choice, x_moe, moesart - every data set.
- fig3: MOESART sampling without and with replacement, validation loss during training - image sets.
- fig4: k = 2, 4, 6 experts per gate for Top-k and MOESART, softmax for reference - image sets.
- s1: MOESART's eq. (3) against the adjustments (i)/(ii) (the same without replacement), Top-k for reference.
- s2: MOESART's best trial with trimmed lasso lambda = 0 against its best with lambda > 0 - recommender sets.
- s3: Top-k and MOESART with Switch's load-balancing loss, Expert Choice (balanced by design) - recommender sets.
- s4: DSelect-k, COMET, COMET+ (permutation local search) against MOESART, softmax for reference - every set.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from .benchmark import Benchmark
from .train import RunSpec

TABLE1 = ("softmax", "top_k", "v_moe", "smoe", "expert_choice", "x_moe", "moesart")
SEARCHED = (*TABLE1, "dselect_k", "comet")
DENSE = ("softmax",)
LASSO = (0.01, 0.1, 1.0, 10.0)  # paper B's lambda > 0 values; trials alternate lambda = 0 and lambda > 0
ENTROPY = (0.05, 0.1, 1.0)
LOAD_BALANCE_COEF = 0.1  # Switch Transformer's auxiliary loss, strong enough for near-uniform loads
FIG4_K = (2, 4, 6)
LABELS = {
    "softmax": "Softmax (Dense)",
    "top_k": "Top-k",
    "v_moe": "V-MoE",
    "smoe": "SMoE",
    "expert_choice": "Expert Choice Router",
    "x_moe": "X-MoE",
    "moesart": "MOESART",
    "dselect_k": "DSelect-k",
    "comet": "COMET",
}
TABLES = {
    "table1": ("Table 1: MOESART against the sparse routers", ("image", "recommender")),
    "fig3": ("Figure 3: MOESART sampling without / with replacement", ("image",)),
    "fig4": ("Figure 4: k experts per gate, Top-k and MOESART", ("image",)),
    "s1": ("Table S1: MOESART's adjustment (3) against (i)/(ii)", ("image",)),
    "s2": ("Table S2: MOESART without / with trimmed lasso", ("recommender",)),
    "s3": ("Table S3: with load balancing", ("recommender",)),
    "s4": ("Table S4: MOESART against DSelect-k and COMET", ("image", "recommender")),
}


@dataclass(frozen=True)
class Trial:
    router: str
    index: int
    spec: RunSpec

    @property
    def seed(self) -> int:
        return 1000 + self.index  # search seeds never coincide with the final runs' 0..seeds-1


def search_trials(bench: Benchmark, router: str, trials: int) -> list[Trial]:
    """The random search's draws for one router on one data set (seeded by both names)."""
    rng = random.Random(f"{bench.name}/{router}")
    lo, hi = bench.lr_range
    out = []
    for i in range(trials):
        lr = float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
        spec = RunSpec(router, lr=lr)
        if router == "moesart":
            spec = spec.with_overrides(trimmed_lasso_coef=0.0 if i % 2 == 0 else rng.choice(LASSO))
        elif router == "dselect_k":
            spec = spec.with_overrides(dselect_entropy_coef=rng.choice(ENTROPY))
        elif router == "comet":
            spec = spec.with_overrides(comet_entropy_coef=rng.choice(ENTROPY))
        out.append(Trial(router, i, spec))
    return out


def best_trial(results: dict[Trial, float], router: str, where=lambda spec: True) -> RunSpec:
    """The trial of lowest validation loss among a router's trials that satisfy `where`."""
    pool = [(loss, t.index, t.spec) for t, loss in results.items() if t.router == router and where(t.spec)]
    if not pool:
        raise ValueError(f"No search trial of {router} fits; run the search with more trials (at least 2).")
    return min(pool, key=lambda p: (p[0], p[1]))[2]


def lasso(spec: RunSpec) -> float:
    return dict(spec.overrides).get("trimmed_lasso_coef", 0.0)


@dataclass(frozen=True)
class Row:
    table: str
    label: str
    spec: RunSpec


# the tuned routers each table's rows start from
TABLE_ROUTERS = {
    "table1": TABLE1,
    "fig3": ("moesart",),
    "fig4": ("softmax", "top_k", "moesart"),
    "s1": ("top_k", "moesart"),
    "s2": ("moesart",),
    "s3": ("top_k", "expert_choice", "moesart"),
    "s4": ("softmax", "dselect_k", "comet", "moesart"),
}


def applies(bench: Benchmark, table: str) -> bool:
    return bench.kind in TABLES[table][1]


def routers_to_search(bench: Benchmark, tables) -> list[str]:
    """The routers the given tables need tuned on this data set, in SEARCHED's order."""
    need = {r for t in tables if applies(bench, t) for r in TABLE_ROUTERS[t]}
    return [r for r in SEARCHED if r in need]


def table_rows(
    bench: Benchmark, tuned: dict[str, RunSpec], search: dict[Trial, float], tables=tuple(TABLES)
) -> list[Row]:
    """Every row of the given tables that apply to this data set (tuned: at least their routers)."""
    rows: list[Row] = []

    def add(table, label, spec_of):
        if table in tables and applies(bench, table):
            rows.append(Row(table, label, spec_of()))

    for r in TABLE1:
        add("table1", LABELS[r], lambda r=r: tuned[r])
    add("fig3", "MOESART without replacement", lambda: tuned["moesart"])
    add("fig3", "MOESART with replacement", lambda: tuned["moesart"].with_overrides(moesart_replacement=True))
    add("fig4", "Softmax (Dense)", lambda: tuned["softmax"])
    for k in FIG4_K:
        if k < bench.num_experts:
            # the data set's own k is the same setup as Table 1's row, and so the same runs
            change = {} if k == bench.k else {"top_k": k}
            add("fig4", f"Top-k, k = {k}", lambda c=change: tuned["top_k"].with_overrides(**c))
            add("fig4", f"MOESART, k = {k}", lambda c=change: tuned["moesart"].with_overrides(**c))
    add("s1", "Top-k", lambda: tuned["top_k"])
    add("s1", "MOESART with (i),(ii)", lambda: tuned["moesart"].with_overrides(moesart_adjustment="i"))
    add("s1", "MOESART with (3)", lambda: tuned["moesart"])
    add("s2", "MOESART without trimmed lasso", lambda: best_trial(search, "moesart", lambda s: lasso(s) == 0))
    add("s2", "MOESART with trimmed lasso", lambda: best_trial(search, "moesart", lambda s: lasso(s) > 0))
    add("s3", "Top-k", lambda: tuned["top_k"].with_overrides(router_aux_loss_coef=LOAD_BALANCE_COEF))
    add("s3", "Expert Choice Router", lambda: tuned["expert_choice"])
    add("s3", "MOESART", lambda: tuned["moesart"].with_overrides(router_aux_loss_coef=LOAD_BALANCE_COEF))
    add("s4", "Softmax (Dense)", lambda: tuned["softmax"])
    add("s4", "DSelect-k", lambda: tuned["dselect_k"])
    add("s4", "COMET", lambda: tuned["comet"])
    add("s4", "COMET+ (local search)", lambda: replace(tuned["comet"], local_search=True))
    add("s4", "MOESART", lambda: tuned["moesart"])
    return rows


# which row each table tests, against which rows: the one-sided t-test takes the candidate of lowest mean loss
COMPARISONS = {
    "table1": ("MOESART", [LABELS[r] for r in TABLE1 if r not in DENSE and r != "moesart"]),
    "fig3": ("MOESART without replacement", ["MOESART with replacement"]),
    "s1": ("MOESART with (3)", ["MOESART with (i),(ii)", "Top-k"]),
    "s2": ("MOESART with trimmed lasso", ["MOESART without trimmed lasso"]),
    "s3": ("MOESART", ["Top-k", "Expert Choice Router"]),
    "s4": ("MOESART", ["DSelect-k", "COMET", "COMET+ (local search)"]),
}
