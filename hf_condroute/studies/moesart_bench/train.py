"""Training and scoring of one row's setup for one seed on one data set: plain PyTorch, Adam at a constant learning
rate, the tasks' weighted loss (paper B 4.1) plus the routers' auxiliary losses through the `RoutingStep`.

Early stopping as the paper's, within a fixed step budget: the validation loss is measured every `eval_every`
steps and the parameters of the best measurement are the ones scored on the test split (the validation curve is
kept: Figure 3 plots it). COMET+ (`local_search=True`) runs the permutation local search
(`hf_condroute.integrations.local_search`) at each of those measurements during the first half of training, on two fixed
training batches.

Scores: test loss, each task's metric (accuracy %, ROC AUC %, MSE), and the experts used per example in training:
`k_per_gate` (what one gate computes per example, the paper's k/s) and `experts_run` (distinct experts computed per
example over all gates, since a shared expert runs once).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from hf_condroute import RoutingStep, local_search

from .benchmark import Benchmark
from .model import routing_config_for
from .tasks import Split, total_loss

SEARCH_BATCHES = 2  # fixed training batches the local search's loss is measured on


@dataclass(frozen=True)
class RunSpec:
    """One row's setup. overrides: routing-config fields (e.g. top_k, moesart_replacement, router_aux_loss_coef)
    as sorted (name, value) pairs, so a spec is hashable and two tables' identical rows are one run."""

    router: str
    lr: float = 1e-3
    overrides: tuple[tuple[str, Any], ...] = ()
    local_search: bool = False

    def with_overrides(self, **kw) -> RunSpec:
        merged = dict(self.overrides)
        merged.update(kw)
        return replace(self, overrides=tuple(sorted(merged.items())))

    def config(self, bench: Benchmark):
        kw = dict(self.overrides)
        k = kw.pop("top_k", bench.k)
        if self.local_search:
            kw["expert_permutation"] = True
        return routing_config_for(self.router, bench.num_experts, k, **kw)


@dataclass
class RunResult:
    scores: dict[str, float]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)


def forward(model, batch: Split, step: RoutingStep | None = None) -> dict[str, torch.Tensor]:
    return model(batch.inputs, step)


def experts_used(step: RoutingStep, num_experts: int) -> tuple[float, float]:
    """(mean over gates of experts per example, distinct experts per example over all gates) of one forward."""
    chosen = [record.decision.experts for record in step.records.values()]
    per_gate = sum(float((c >= 0).sum(dim=1).float().mean()) for c in chosen) / len(chosen)
    rows = chosen[0].shape[0]
    hit = torch.zeros(rows, num_experts + 1, dtype=torch.bool)
    for c in chosen:
        hit.scatter_(1, torch.where(c >= 0, c, num_experts), True)
    return per_gate, float(hit[:, :num_experts].sum(dim=1).float().mean())


@torch.no_grad()
def predict(model, data: Split, batch_size: int = 2048) -> dict[str, torch.Tensor]:
    """Every task's outputs on a split, in eval mode."""
    model.eval()
    parts = [forward(model, data.take(slice(s, s + batch_size))) for s in range(0, len(data), batch_size)]
    return {t: torch.cat([p[t] for p in parts]) for t in parts[0]}


def evaluate(model, bench: Benchmark, data: Split) -> dict[str, float]:
    """The total loss and each task's metric (over its labelled rows) on one split."""
    outs = predict(model, data)
    scores = {"loss": float(total_loss(bench.tasks, outs, data))}
    for t, task in enumerate(bench.tasks):
        rows = slice(None) if data.mask is None else data.mask[:, t]
        scores[f"{task.name}_{task.metric}"] = task.score(outs[task.name][rows], data.labels[rows, t])
    return scores


def train(bench: Benchmark, spec: RunSpec, seed: int) -> tuple[torch.nn.Module, RunResult]:
    """Train one model; returns it with its best-validation parameters loaded, and the run's curve and usage."""
    torch.manual_seed(seed)
    config = spec.config(bench)
    model = bench.build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    data = bench.splits["train"]
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(data), generator=order), 0
    search_batches = [data.take(perm[i * bench.batch_size : (i + 1) * bench.batch_size]) for i in range(SEARCH_BATCHES)]
    best, best_state, best_step, curve = float("inf"), None, 0, []
    per_gate = run = 0.0
    for i in range(1, bench.steps + 1):
        model.train()
        if pos + bench.batch_size > len(perm):
            perm, pos = torch.randperm(len(data), generator=order), 0
        batch = data.take(perm[pos : pos + bench.batch_size])
        pos += bench.batch_size
        step = RoutingStep()
        loss = step.add_to_loss(total_loss(bench.tasks, forward(model, batch, step), batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        g, r = experts_used(step, config.num_experts)
        per_gate, run = per_gate + g, run + r
        if i % bench.eval_every == 0 or i == bench.steps:
            if spec.local_search and i <= bench.steps // 2:
                local_search(model, search_batches, loss_fn=lambda m, b: total_loss(bench.tasks, forward(m, b), b))
            val = evaluate(model, bench, bench.splits["val"])["loss"]
            curve.append((i, val))
            if val < best:
                best, best_step, best_state = val, i, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    usage = {"k_per_gate": per_gate / bench.steps, "experts_run": run / bench.steps}
    return model, RunResult(scores={"val_loss": best, "best_step": best_step, **usage}, curve=curve)


def run(bench: Benchmark, spec: RunSpec, seed: int) -> RunResult:
    """Train, then score the best-validation model on the test split."""
    model, result = train(bench, spec, seed)
    result.scores.update(evaluate(model, bench, bench.splits["test"]))
    return result
